"""Analytic moments of :mod:`noisejax.layers` networks: per-layer mean and noise covariance.

There is one implementation of every moment rule: the per-primitive table of
:mod:`noisejax.rules`, applied by the moment interpretation of
:mod:`noisejax.interpret` to the jaxpr of ``net.apply``.  This module is the
``layers``-shaped front end: it traces one example through the network, puts
the network's ``NoiseSite()`` sites (and ``WeightNoiseDense`` weights) where
the network marks them, and returns one :class:`LayerMoments` per top-level
child — the same numbers :func:`noisejax.analytic` gives for the same function.

Statistics are over noise realizations for a fixed input (the quantity
:func:`noisejax.simulate.monte_carlo` estimates).

Covariance forms (``covariance=``)
----------------------------------
* ``"factored"`` (default) — ``C = diag(d) + F Fᵀ``: independent noise stays
  diagonal until a linear layer mixes it into columns (one per source), and
  correlated sources (``ξ_AC``, ``ξ_MC``, a kernel's noise shared across
  positions) are columns from the start.  Exact at any depth in the linear
  regime (correlated noise from layer 1 arriving at layer 3 included).
* ``"lowrank"`` — the independent parts are propagated as variances only
  (``d' = (W∘W)ᵀ d``, the paper's ``Σ_j W_ij² σ_j²``), dropping the
  cross-neuron covariance a linear layer creates: exact for noise that crossed
  at most one linear layer, a mean-field approximation beyond; cheap.
* ``"full"`` — the same mathematics as ``"factored"``, returned as the dense
  ``n × n`` covariance (small widths).

The rules themselves (linear maps exact; Gaussian moment matching or
linearization for activations; the exact second-moment algebra of a noise
site ``z = y·(1 + ξ_MU + s ξ_MC) + ξ_AU + a ξ_AC``; additive weight noise
``Σ_j σ² E[y_j²]``) are documented in :mod:`noisejax.rules` and
:func:`noisejax.interpret._neuron_site_state`.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from noisejax import layers, moments, noise
    >>> net = layers.mlp([8, 16, 4], "sigmoid")
    >>> _, params = net.init(jax.random.key(0), (8,))
    >>> per_layer = moments.predict(net, params, jnp.ones(8), noise=noise.NeuronNoise(add_uncorrelated=1e-3))
    >>> [(m.mean.shape, m.var.shape) for m in per_layer]
    [((16,), (16,)), ((4,), (4,))]
"""

from __future__ import annotations

import collections
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from noisejax import _struct as struct

from noisejax import _validate
from noisejax import gaussian as G
from noisejax import layers as _layers
from noisejax import interpret as _interp
from noisejax import rules as _rules
from noisejax import snr as _snr
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.noise import LocalWeightNoise, NeuronNoise
from noisejax.quadrature import METHODS, _DEFAULT_QUAD, activation_moments

__all__ = [
    "METHODS",
    "COVARIANCES",
    "LayerMoments",
    "NoisyParam",
    "initial_moments",
    "activation_moments",
    "neuron_noise_rule",
    "with_weight_noise",
    "propagate",
    "predict",
    "output_variance",
]

Array = jax.Array
PyTree = Any

COVARIANCES: tuple[str, ...] = ("factored", "lowrank", "full")


# ----------------------------------------------------------------------------------
# Representation
# ----------------------------------------------------------------------------------


@struct.dataclass
class LayerMoments(_snr.Statistics):
    """Mean and noise covariance of one layer's features (one example, or a batch).

    Attributes:
      mean: ``E[y]``, shape ``(*features)`` (``(B, *features)`` for a batch).
      diag: the independent part ``d`` of the variance, same shape as ``mean``;
        ``None`` means statically zero.  Unused (``None``) when ``covariance="full"``.
      factors: ``F`` of shape ``(*features, K)``; the covariance is
        ``diag(d) + F Fᵀ``.  Column ``r`` is the covariance of the features with a
        unit-variance latent noise source.  ``None`` means ``K = 0``.
      cov: ``(n, n)`` covariance of the flattened features (``covariance="full"``);
        ``None`` means zero.
      covariance: static; ``"factored"``, ``"lowrank"`` or ``"full"`` (see the module doc).
      lazy: ``(l, A, r)``, more factor columns ``diag(l) A diag(r)`` kept unmultiplied
        (``A`` is a layer's ``Wᵀ``, shared by the examples of a batch); ``None``: none.

    Derived: ``var`` (per-feature noise variance, the quantity Monte Carlo
    estimates), ``std``, ``snr`` (``mean²/var``), ``snr_db``, ``layer_snr_db``
    (``10·log10(Σ mean² / Σ var)``; definitions in :mod:`noisejax.snr`), ``n_factors``.
    """

    mean: Array
    diag: Optional[Array] = None
    factors: Optional[Array] = None
    cov: Optional[Array] = None
    covariance: str = struct.field(pytree_node=False, default="factored")
    lazy: Optional[tuple] = None

    @property
    def var(self) -> Array:
        """Per-feature variance ``C_ii``, same shape as ``mean``."""
        if self.covariance == "full":
            if self.cov is None:
                return jnp.zeros_like(self.mean)
            return jnp.diagonal(self.cov, axis1=-2, axis2=-1).reshape(self.mean.shape)
        v = jnp.zeros_like(self.mean) if self.diag is None else self.diag
        if self.factors is not None:
            v = v + jnp.sum(jnp.square(self.factors), axis=-1)
        if self.lazy is not None:
            left, a, right = self.lazy
            v = v + (jnp.square(left) * jnp.einsum("...nm,...m->...n", jnp.square(a), jnp.square(right))).reshape(self.mean.shape)
        return v

    @property
    def n_factors(self) -> int:
        """Number of low-rank columns ``K`` (0 without factors or in full mode)."""
        k = 0 if self.factors is None else int(self.factors.shape[-1])
        return k + (0 if self.lazy is None else int(self.lazy[2].shape[-1]))

    def covariance_matrix(self) -> Array:
        """Dense ``(n, n)`` covariance of the flattened features of ONE example (vmap for a batch)."""
        n = self.mean.size
        if self.covariance == "full":
            return jnp.zeros((n, n), self.mean.dtype) if self.cov is None else self.cov
        c = jnp.zeros((n, n), self.mean.dtype)
        if self.diag is not None:
            c = c + jnp.diag(self.diag.reshape(n))
        factors = self.factors
        if self.lazy is not None:
            left, a, right = self.lazy
            lazy_cols = left[..., :, None] * a * right[..., None, :]
            factors = lazy_cols if factors is None else jnp.concatenate([factors, lazy_cols], axis=-1)
        if factors is not None:
            f = factors.reshape(n, -1)
            c = c + f @ f.T
        return c

    def compact(self) -> "LayerMoments":
        """Same ``mean``/``var``, covariance structure dropped (``diag = var``; for small outputs)."""
        return LayerMoments(self.mean, self.var, None, None, "lowrank", None)


@struct.dataclass
class NoisyParam:
    """A parameter leaf with the variance of the additive i.i.d. noise on its entries.

    :func:`propagate` and :func:`predict` accept ``NoisyParam`` leaves in ``params``
    (see :func:`with_weight_noise`); ``noise_var`` is a scalar or broadcastable to
    ``value``.
    """

    value: Array
    noise_var: Array


def initial_moments(x: Array, covariance: str = "factored") -> LayerMoments:
    """Moments of a noise-free input ``x`` (one example): mean ``x``, no covariance."""
    _validate.check_choice("covariance", covariance, COVARIANCES)
    return LayerMoments(jnp.asarray(x), None, None, None, covariance)


# ----------------------------------------------------------------------------------
# LayerMoments <-> Gaussian states of the interpreter
# ----------------------------------------------------------------------------------


def _to_gaussian(state: LayerMoments) -> G.Gaussian:
    """The interpreter's state for given moments (fresh sources)."""
    m = jnp.asarray(state.mean)
    blocks = []
    if state.covariance == "full":
        if state.cov is not None:
            lam, vec = jnp.linalg.eigh(state.cov)
            cols = vec * G._safe_sqrt(lam)[None, :]
            blocks.append(G.Dense(G.fresh(), cols.reshape(m.shape + (-1,))))
    else:
        if state.diag is not None:
            blocks.append(G.Diag(G.fresh(), G._safe_sqrt(jnp.broadcast_to(state.diag, m.shape))))
        if state.factors is not None:
            blocks.append(G.Dense(G.fresh(), state.factors))
        if state.lazy is not None:
            left, a, right = state.lazy
            blocks.append(G.Lazy(G.fresh(), left.reshape(m.shape), a, right))
    return G.Gaussian(m, tuple(blocks))


def _to_layer_moments(x: Any, covariance: str) -> LayerMoments:
    """Moments of an interpreter value (``diag``: the independent part; ``factors``: the rest)."""
    g = G.as_gaussian(x)
    m = g.mean
    diag, cols = None, []
    for b in g.blocks:
        if isinstance(b, G.Diag):
            v = jnp.square(b.scale)
            diag = v if diag is None else diag + v
        else:
            cols.append(G.to_dense(b, m.shape).cols)
    factors = None if not cols else (cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1))
    if covariance == "full":
        n = m.size
        c = None
        if factors is not None:
            f = factors.reshape(n, -1)
            c = f @ f.T
        if diag is not None:
            c = jnp.diag(diag.reshape(n)) if c is None else c + jnp.diag(diag.reshape(n))
        return LayerMoments(m, None, None, c, "full")
    return LayerMoments(m, diag, factors, None, covariance)


def neuron_noise_rule():
    """The moment rule of a :func:`noisejax.layers.NoiseSite` site on :class:`LayerMoments` — exact::

        E z = m
        C' = C + D_MU diag(m² + diag C) + (s sᵀ ∘ Δ) ∘ (C + m mᵀ) + D_AU I + (a aᵀ ∘ Δ)

    with ``s = √D_MC``, ``a = √D_AC``, ``Δ_ik = [γ(i) = γ(k)]`` (same correlated draw).
    ``rule(params, state, *, noise=None) -> state``; the same rule every site of
    :func:`noisejax.analytic` uses (:func:`noisejax.interpret._neuron_site_state`).
    """

    def rule(params, state, *, noise=None, **options):
        if not isinstance(state, LayerMoments):
            raise InvalidArgumentError(f"NeuronNoise moments: state must be a LayerMoments, got {type(state).__name__}")
        if noise is None or noise.is_zero:
            return state
        if not isinstance(noise, NeuronNoise):
            raise InvalidArgumentError(f"noise for a NeuronNoise site must be a NeuronNoise, got {type(noise).__name__}")
        out = _interp._neuron_site_state(_to_gaussian(state), noise, 0, set())
        return _to_layer_moments(out, state.covariance)

    return rule


# ----------------------------------------------------------------------------------
# Whole networks
# ----------------------------------------------------------------------------------


def with_weight_noise(params: PyTree, weight_noise_var: PyTree) -> PyTree:
    """Wrap the leaves of ``params`` with their weight-noise variance as :class:`NoisyParam`.

    ``weight_noise_var`` has the structure of ``params`` with a variance (scalar
    or broadcastable array) or ``None`` per leaf — e.g.
    ``noise.noise_power(params, wnr_db)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    try:
        variances = treedef.flatten_up_to(weight_noise_var)
    except (ValueError, TypeError) as e:
        raise ShapeMismatchError(f"weight_noise_var must have the structure of params (None to skip a leaf): {e}") from None
    out = [leaf if v is None else NoisyParam(leaf, v) for leaf, v in zip(leaves, variances)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _is_serial(net) -> bool:
    return isinstance(net.spec, _layers.SerialSpec)


def _split_noisy_params(params: PyTree, weight_noise_var: Any) -> tuple[PyTree, list]:
    """Plain parameter values, and the weight-noise variance per flat leaf (``None``: noise-free)."""
    is_np = lambda x: isinstance(x, NoisyParam)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_np)
    values = [l.value if is_np(l) else l for l in leaves]
    variances = [l.noise_var if is_np(l) else weight_noise_var for l in leaves]
    return jax.tree_util.tree_unflatten(treedef, values), variances


# Caches per network (a Layer is hashable), least recently used first: traced programs
# and compiled predictors of the last _NETS_MAX networks.
_NETS_MAX = 32
_PROGRAMS: "collections.OrderedDict" = collections.OrderedDict()
_JIT_CACHE: "collections.OrderedDict" = collections.OrderedDict()


def _per_net(cache: "collections.OrderedDict", net) -> dict:
    """The cache entry (a dict) of ``net``, created if needed; the oldest network's entry goes when full."""
    entry = cache.get(net)
    if entry is None:
        entry = cache[net] = {}
        while len(cache) > _NETS_MAX:
            cache.popitem(last=False)
    cache.move_to_end(net)
    return entry


def _program(net, params, x_shape, dtype):
    """The traced one-example program of ``net`` (cached per network and shapes)."""
    per_net = _per_net(_PROGRAMS, net)
    serial = _is_serial(net)

    def fn(p, x):
        if serial:
            return tuple(net.apply(p, x, return_layers=True)[1])
        return (net.apply(p, x),)

    x_struct = jax.ShapeDtypeStruct(tuple(x_shape), dtype)
    return _interp._trace(fn, (params, x_struct), 0, per_net)


def _consuming_products(program, mark_site) -> list:
    """The matmul sites whose op takes the marked value directly (an analog layer's crossbar)."""
    out = []
    for k in program.consumers.get(mark_site.var, ()):
        site = program.site_at(program.ops[k].outs[0])
        if site is not None and site.kind == "matmul":
            out.append(site)
    return out


def _layer_sites(program) -> list:
    """The network's noise sites in order, each as the tuple of its marks (one NeuronNoise mark,
    or a WeightNoiseDense's weight and bias marks)."""
    marks = [s for s in program.sites if s.kind == "marked"]
    out, k = [], 0
    while k < len(marks):
        s = marks[k]
        if s.primitive == "local_weight" and k + 1 < len(marks) and marks[k + 1].primitive == "local_bias":
            out.append((s, marks[k + 1]))
            k += 2
        else:
            out.append((s,))
            k += 1
    return out


def propagate(
    net,
    params: PyTree,
    x: Union[Array, LayerMoments],
    *,
    noise=None,
    method: str = "gaussian",
    covariance: str = "factored",
    weight_noise_var: Optional[Array] = None,
    quad_nodes: int = _DEFAULT_QUAD,
    weight: Any = None,
) -> tuple[LayerMoments, ...]:
    """Core of :func:`predict` for ONE example, no validation and no jit (compose it freely).

    Returns one :class:`LayerMoments` per top-level child of ``net`` (one per paper
    layer for :func:`noisejax.layers.mlp`).  ``x`` is the input (noise-free) or the
    moments of a noisy input.  ``weight_noise_var`` here is a scalar for every
    parameter leaf; per-leaf variances go in ``params`` via :func:`with_weight_noise`.
    ``weight``: a weight model instead (see :func:`predict`).
    """
    outs = _states(net, params, x, noise=noise, method=method, covariance=covariance,
                   weight_noise_var=weight_noise_var, quad_nodes=quad_nodes, weight=weight)
    return tuple(_to_layer_moments(o, covariance) for o in outs)


def _states(net, params, x, *, noise, method, covariance, weight_noise_var, quad_nodes, weight=None) -> list:
    """The interpreter's state of every top-level child's output (see :func:`propagate`)."""
    values, variances = _split_noisy_params(params, weight_noise_var)
    state = x if isinstance(x, LayerMoments) else None
    xm = jnp.asarray(x.mean if state is not None else x)
    if not jnp.issubdtype(xm.dtype, jnp.floating):
        xm = xm.astype(jnp.result_type(float))
    traced = _program(net, values, xm.shape, xm.dtype)
    program = traced.program
    groups = _layer_sites(program)
    per_site = {}
    for marks, nz in zip(groups, _layers.split_noise(noise, [1] * len(groups))):
        if nz is None:
            continue
        for s in marks:
            if s.primitive == "neuron" and isinstance(nz, NeuronNoise):
                per_site[s] = nz
            elif s.primitive in ("local_weight", "local_bias") and isinstance(nz, LocalWeightNoise):
                per_site[s] = nz
            elif _interp.is_product_model(nz):  # e.g. hardware.AnalogDense: the product taking the marked weights
                per_site.update({p: nz for p in _consuming_products(program, s)})
    mode = "lowrank" if covariance == "lowrank" else "factored"
    ctx = _rules.Context(mode=mode, method=method, quad_nodes=int(quad_nodes))
    inputs = list(jax.tree_util.tree_leaves(values))
    gains = {}
    if weight is not None:
        inputs, gain_l = _interp._weight_states(weight, values)
        gains = {j: g for j, g in enumerate(gain_l) if g is not None}
    for j, (leaf, v) in enumerate(zip(inputs, variances)):
        if v is not None:
            scale = G._safe_sqrt(jnp.broadcast_to(jnp.asarray(v, leaf.dtype), jnp.shape(leaf)))
            inputs[j] = G.Gaussian(leaf, (G.Diag(G.fresh(), scale),))
    inputs.append(_to_gaussian(state) if state is not None else xm)
    return _interp._interpret(program, inputs, per_site, ctx=ctx, batch_axes=0, gains=gains)


def _first_linear(spec: Any, params: Any) -> tuple[bool, Optional[int], Optional[int]]:
    """``(decided, rank, fan_in)``: feature rank expected at the input (1 for a leading Dense, 3
    for Conv) and the fan-in of that first Dense.  ``decided`` is False while only
    rank-preserving layers (activations, noise sites) were seen; a leading Flatten decides
    ``None`` (unknown)."""
    if isinstance(spec, _layers.DenseSpec):
        w = params.get("W") if isinstance(params, dict) else None
        w = w.value if isinstance(w, NoisyParam) else w
        return True, 1, None if w is None else int(np.shape(w)[0])
    if isinstance(spec, _layers.ConvSpec):
        return True, 3, None
    if isinstance(spec, _layers.SerialSpec):
        kids = params if isinstance(params, (tuple, list)) else ()
        for i, child in enumerate(spec.children):
            decided, rank, fan_in = _first_linear(child, kids[i] if i < len(kids) else None)
            if decided:
                return True, rank, fan_in
        return False, None, None
    if isinstance(spec, (_layers.ActivationSpec, _layers.NoiseSiteSpec)):
        return False, None, None
    return True, None, None


_SPECS = (_layers.DenseSpec, _layers.ConvSpec, _layers.FlattenSpec, _layers.ActivationSpec, _layers.NoiseSiteSpec,
          _layers.SerialSpec)


def _compiled(net, *, method, covariance, quad_nodes, batched, keep_covariance):
    per_net = _per_net(_JIT_CACHE, net)
    key = (method, covariance, quad_nodes, batched, keep_covariance)
    if key not in per_net:

        def one(params, x, noise, w_var, weight):
            kw = dict(noise=noise, method=method, covariance=covariance, weight_noise_var=w_var, quad_nodes=quad_nodes,
                      weight=weight)
            if keep_covariance:
                return propagate(net, params, x, **kw)
            # mean and variance only: straight from the states (lazy blocks are never multiplied out)
            return tuple(LayerMoments(G.as_gaussian(o).mean, G.variance(o), None, None, "lowrank")
                         for o in _states(net, params, x, **kw))

        def run(params, x, noise, w_var, weight):
            if batched:
                return jax.vmap(one, in_axes=(None, 0, None, None, None))(params, x, noise, w_var, weight)
            return one(params, x, noise, w_var, weight)

        per_net[key] = jax.jit(run)
    return per_net[key]


def _check_noise(noise) -> None:
    kinds = (NeuronNoise, LocalWeightNoise)

    def ok(n):
        return n is None or isinstance(n, kinds) or _interp.is_product_model(n)

    if ok(noise) or (isinstance(noise, (list, tuple)) and all(ok(n) for n in noise)):
        return
    raise InvalidArgumentError(
        "noise must be None, a NeuronNoise / LocalWeightNoise / product model (e.g. hardware.AnalogHardware) or a "
        f"sequence of them (one per site), got {type(noise).__name__}"
    )


def predict(
    net,
    params: PyTree,
    x: Array,
    *,
    noise=None,
    method: str = "gaussian",
    covariance: str = "factored",
    weight_noise_var: Any = None,
    quad_nodes: int = _DEFAULT_QUAD,
    batched: Optional[bool] = None,
    keep_covariance: bool = False,
    weight: Any = None,
) -> tuple[LayerMoments, ...]:
    """Analytic per-layer mean and noise variance of ``net`` for one input or a batch.

    Args:
      net: a :mod:`noisejax.layers` network, e.g. ``layers.mlp(...)`` or
        ``layers.from_weights(...)[0]`` (any other JAX function: :func:`noisejax.analytic`).
      params: its parameters.
      x: one example ``(*in_shape)`` or a batch ``(B, *in_shape)`` (inferred from
        the first Dense/Conv layer; pass ``batched`` otherwise).
      noise: a :class:`~noisejax.noise.NeuronNoise` for every site, or a sequence
        with one entry (or ``None``) per site — as for ``net.apply``.  A product model
        (:func:`noisejax.interpret.is_product_model`, e.g. :class:`noisejax.hardware.AnalogHardware`)
        computes the product that takes a layer's marked weights
        (:func:`noisejax.hardware.AnalogDense`).
      method: ``"gaussian"`` (moment matching) or ``"linearized"`` (first order).
      covariance: ``"factored"`` (exact in the linear regime), ``"lowrank"``
        (cheap, one rank per correlated source) or ``"full"``.
      weight_noise_var: additive weight noise: a scalar ``σ²`` for every W and b,
        or a pytree like ``params`` with a variance or ``None`` per leaf (e.g.
        ``noise.noise_power(params, wnr_db)``).
      quad_nodes: Gauss–Hermite points for activations without a closed form.
      batched: whether ``x`` is a batch (default: inferred, see ``x``).
      keep_covariance: also return each layer's covariance structure (``factors``
        or ``cov``, per example); by default only ``mean`` and ``var``
        (``diag = var``), which is all a batch needs and much smaller.
      weight: a weight model instead of ``weight_noise_var`` — any object with
        ``weight_moments(params)`` (:func:`noisejax.interpret.weight_moments`), e.g.
        :class:`noisejax.hardware.PCMWeights` (PCM devices read at a time ``t``).

    Returns:
      A tuple with one :class:`LayerMoments` per top-level child of ``net``;
      ``.mean`` and ``.var`` have shape ``(width,)`` or ``(B, width)``.  Jit-compiled
      and cached per network; differentiable w.r.t. ``params``, ``x`` and the noise.

    Example::

        >>> res = predict(net, params, X, noise=noise.NeuronNoise(add_uncorrelated=1e-3))
        >>> res[-1].var.shape   # (B, n_out)
    """
    if not (hasattr(net, "apply") and hasattr(net, "spec")):
        raise InvalidArgumentError(
            "net must be a noisejax.layers network (for any other JAX function use noisejax.analytic)"
        )
    if not isinstance(net.spec, (type(None), *_SPECS)):
        raise InvalidArgumentError(f"net.spec must be a noisejax.layers spec (e.g. layers.DenseSpec), got {type(net.spec).__name__}")
    _validate.check_choice("method", method, METHODS)
    _validate.check_choice("covariance", covariance, COVARIANCES)
    quad_nodes = _validate.check_int("quad_nodes", quad_nodes, minimum=2)
    _check_noise(noise)
    if not isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
        x = np.asarray(x)
    _validate.check_finite("x", x)
    _validate.check_tree_finite("params", params)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    _, rank, fan_in = _first_linear(net.spec, params)
    if batched is None:
        if rank is None:
            batched = False
        elif x.ndim == rank:
            batched = False
        elif x.ndim == rank + 1:
            batched = True
        else:
            raise ShapeMismatchError(f"x must have {rank} (one example) or {rank + 1} (a batch) dimensions, got shape {tuple(x.shape)}")
    if fan_in is not None and x.shape[-1] != fan_in:
        raise ShapeMismatchError(
            f"Dense moments: expected a vector of {fan_in} features per example, got shape {tuple(x.shape[int(bool(batched)):])}"
        )
    if isinstance(noise, (list, tuple)) and len(noise) != net.n_sites:
        raise InvalidArgumentError(f"noise has {len(noise)} entries; this network has {net.n_sites} noise sites")
    if weight is not None:
        _interp._check_weight(weight)
        if weight_noise_var is not None:
            raise InvalidArgumentError("pass weight_noise_var or weight (a weight model), not both")
    w_scalar = None
    if weight_noise_var is not None:
        if isinstance(weight_noise_var, (int, float)) or (hasattr(weight_noise_var, "ndim") and weight_noise_var.ndim == 0):
            _validate.check_variance("weight_noise_var", weight_noise_var)
            w_scalar = jnp.asarray(weight_noise_var, x.dtype)
        else:
            for leaf in jax.tree_util.tree_leaves(weight_noise_var):
                _validate.check_variance("weight_noise_var", leaf)
            params = with_weight_noise(params, weight_noise_var)
    fn = _compiled(
        net, method=method, covariance=covariance, quad_nodes=quad_nodes, batched=bool(batched), keep_covariance=keep_covariance
    )
    return fn(params, x, noise, w_scalar, weight)


def output_variance(net, params: PyTree, x: Array, *, noise=None, method: str = "gaussian", **kwargs) -> Array:
    """Noise variance of the network's output, ``(n_out,)`` or ``(B, n_out)`` — a differentiable regularizer.

    Example (noise-aware training)::

        >>> loss = ce(params) + lam * output_variance(net, params, X, noise=nz).mean()
        >>> jax.grad(lambda p: output_variance(net, p, X, noise=nz).sum())(params)
    """
    return predict(net, params, x, noise=noise, method=method, **kwargs)[-1].var
