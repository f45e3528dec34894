"""Noise in any JAX function, and its analytic statistics: two interpretations of one jaxpr.

A researcher's model — a Flax linen or NNX module, an Equinox module, a plain
``jnp`` function — is traced once with :func:`jax.make_jaxpr`; noisejax then
reads the program twice, with the same sites (:mod:`noisejax._jaxpr`):

* :func:`noisy` — the **sampling** interpretation: the program runs as written,
  with neuron noise ``y·(1 + ξ_MU + ξ_MC) + ξ_AU + ξ_AC`` added at the selected
  sites and the selected parameter leaves perturbed (weight noise).  It returns
  an ordinary function of ``(key, *args)``: ``jit``, ``vmap`` it over keys, or
  hand it to :func:`noisejax.simulate.monte_carlo`.
* :func:`analytic` — the **moment** interpretation: every value carries a
  :class:`noisejax.gaussian.Gaussian` state and every primitive its moment rule
  (:mod:`noisejax.rules`), giving the mean and the noise variance of every
  output over noise realizations, without sampling.

Sites (:func:`sites` lists them): ``"activations"`` — the outputs of elementwise
nonlinearities (``sigmoid``, ``tanh``, ``erf``, ``relu``, ``gelu``, ``silu``,
``softplus``, ``elu``... however JAX wrapped them); ``"matmuls"`` — the outputs of
``dot_general``/``conv_general_dilated`` (an analog matrix-vector product's
output); ``"marked"`` — explicit :func:`noisejax.mark` points (how
:mod:`noisejax.layers` marks its ``NeuronNoise`` sites); a sequence of these; or
a predicate over :class:`Site` (kind, primitive, Flax module path, source line).

**Product models** at matmul sites: instead of adding noise to a product's output, an
object with ``sample_site`` and ``site_moments`` (e.g. :class:`noisejax.hardware.AnalogHardware`:
DAC, output noise, ADC of an analog crossbar) *computes* the ``dot_general``/``conv``
itself — its sampling rule replaces the op, its moment rule replaces the op's rule::

    nz.sample_site(op, ins, *, key, batch_axes, gains, params) -> [output]
    nz.site_moments(ctx, op, ins, *, gains) -> [output state]

``op`` is the program's :class:`noisejax._jaxpr.Op` (primitive, params, shapes, source),
``ins`` its operands (arrays; Gaussian states or arrays for the moments), ``params`` (and
``ctx.params``) whether each operand is a parameter, ``ctx`` the
:class:`noisejax.rules.Context` (apply other rules with :func:`noisejax.rules.apply_rule`).
``gains`` holds, per operand, the digital output gain its weight model folded into it
(``None``: none): a weight model may implement ``apply_with_gains(params, *, key) ->
(params, gains)`` and ``weight_moments_with_gains(params) -> (mean, var, gains)`` (``gains``
like ``params``, ``None`` per leaf without one) — a drift compensation multiplies the
products of a crossbar after its ADC; folded into the weights it is right for every digital
use of the leaf, and a product model moves it back behind its periphery.  An operand is
matched to its parameter leaf through ``mark``/``convert_element_type``/``copy`` only.

Keys: realization key ``k`` → neuron noise of site ``s`` uses
``fold_in(fold_in(k, 1), s.index)`` and then ``fold_in(·, e)`` for example ``e``
(the flattened leading ``batch_axes`` axes of the site's array); weight leaf ``j``
of the parameters uses ``fold_in(fold_in(k, 2), j)``.  A site's draws therefore
do not depend on which other sites are noisy, on ``jit``/``vmap``, on the batch it
is in, or on how :func:`~noisejax.simulate.monte_carlo` chunks realizations.
Correlated draws (``ξ_AC``, ``ξ_MC``) are shared over the features of each example
(or over ``NeuronNoise.correlated_axes`` of them).

Example (the Flax MNIST example's CNN, unmodified)::

    >>> noisy_fn = noisejax.noisy(model.apply, neuron=NeuronNoise(add_uncorrelated=1e-3),
    ...                           weight=AdditiveWeightNoise(20.0), sites="activations")
    >>> res = simulate.monte_carlo(lambda k: noisy_fn(k, variables, x), rng.key(0), 10_000)
    >>> pred = noisejax.analytic(model.apply, neuron=NeuronNoise(add_uncorrelated=1e-3),
    ...                          weight=AdditiveWeightNoise(20.0), sites="activations")(variables, x)
    >>> pred.var.shape == res.var.shape
    True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from noisejax import _struct as struct

from noisejax import _jaxpr
from noisejax import gaussian as G
from noisejax import rules as R
from noisejax import snr as _snr
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.noise import (
    AdditiveWeightNoise,
    LocalWeightNoise,
    MultiplicativeWeightNoise,
    NeuronNoise,
    Quantization,
    apply_neuron_noise,
)

__all__ = [
    "noisy",
    "analytic",
    "sites",
    "Site",
    "Prediction",
    "mark",
    "UnsupportedPrimitiveError",
    "weight_moments",
    "SwitchedWeights",
    "is_product_model",
]

Site = _jaxpr.Site
mark = _jaxpr.mark
UnsupportedPrimitiveError = R.UnsupportedPrimitiveError
Array = jax.Array
PyTree = Any

_NEURON_TAG, _WEIGHT_TAG = 1, 2
COVARIANCES = ("factored", "lowrank", "full")
METHODS = ("gaussian", "linearized")


# ----------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------


@struct.dataclass
class Prediction:
    """Analytic statistics over noise realizations, pytrees like the function's output.

    Attributes:
      mean: ``E[y]`` per output element.
      var: ``Var[y]`` per output element (the quantity Monte Carlo's ``var`` estimates).

    Derived (definitions in :mod:`noisejax.snr`): ``std``, ``snr`` (``mean²/var``),
    ``snr_db``, ``layer_snr_db`` (``10·log10(Σ mean² / Σ var)`` per leaf).
    """

    mean: PyTree
    var: PyTree

    @property
    def std(self) -> PyTree:
        return jax.tree_util.tree_map(jnp.sqrt, self.var)

    @property
    def snr(self) -> PyTree:
        return jax.tree_util.tree_map(_snr.snr, self.mean, self.var)

    @property
    def snr_db(self) -> PyTree:
        return jax.tree_util.tree_map(_snr.snr_db, self.mean, self.var)

    @property
    def layer_snr_db(self) -> PyTree:
        return jax.tree_util.tree_map(_snr.layer_snr_db, self.mean, self.var)


# ----------------------------------------------------------------------------------
# Tracing (cached per function, argument structure and shapes)
# ----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Traced:
    program: _jaxpr.Program
    closed: Any  # the ClosedJaxpr
    in_tree: Any
    out_tree: Any
    param_mask: tuple  # per flat input: belongs to a params argument
    param_leaf: tuple  # per flat input: index of the leaf within its params argument (-1: not a param)


def _argnums(params_argnums, n_args) -> tuple:
    if params_argnums is None:
        return ()
    nums = (params_argnums,) if isinstance(params_argnums, int) else tuple(params_argnums)
    for p in nums:
        if not isinstance(p, int) or not -n_args <= p < n_args:
            raise InvalidArgumentError(f"params_argnums={params_argnums!r} is out of range for {n_args} positional argument(s)")
    return tuple(sorted(p % n_args for p in nums))


def _aval_key(a) -> tuple:
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return tuple(a.shape), str(a.dtype), bool(getattr(a, "weak_type", False))
    return tuple(np.shape(a)), str(jnp.result_type(a)), True


def _trace(fn, args, params_argnums, cache: dict) -> _Traced:
    nums = _argnums(params_argnums, len(args))
    flat, in_tree = jax.tree_util.tree_flatten(args)
    key = (in_tree, tuple(_aval_key(a) for a in flat), nums)
    hit = cache.get(key)
    if hit is not None:
        return hit
    mask, leaf_idx = [], []
    for i, a in enumerate(args):
        n = len(jax.tree_util.tree_leaves(a))
        mask += [i in nums] * n
        leaf_idx += list(range(n)) if i in nums else [-1] * n

    def flat_fn(*leaves):
        return fn(*jax.tree_util.tree_unflatten(in_tree, leaves))

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
    out_tree = jax.tree_util.tree_structure(out_shape)
    program = _jaxpr.flatten(closed, param_inputs=mask)
    traced = _Traced(program, closed, in_tree, out_tree, tuple(mask), tuple(leaf_idx))
    if len(cache) > 16:
        cache.pop(next(iter(cache)))
    cache[key] = traced
    return traced


def _check_fn(fn) -> None:
    if not callable(fn):
        raise InvalidArgumentError(f"fn must be callable, got {type(fn).__name__}")


def _select_sites(program, selection) -> tuple:
    chosen = _jaxpr.select(program.sites, selection)
    if not chosen:
        kinds = sorted({s.kind for s in program.sites})
        raise InvalidArgumentError(
            f"sites={selection!r} matches none of the {len(program.sites)} site(s) of fn"
            + (f" (kinds present: {', '.join(kinds)})" if kinds else "")
            + "; list them with noisejax.sites(fn, *args)"
        )
    return chosen


def is_product_model(nz: Any) -> bool:
    """Whether ``nz`` is a product model (computes a matmul site's op itself; module doc)."""
    return hasattr(nz, "sample_site") and hasattr(nz, "site_moments")


def _check_product_site(s: Site, nz) -> None:
    if is_product_model(nz) and s.kind != "matmul":
        raise InvalidArgumentError(
            f"{type(nz).__name__} computes products: it goes at matmul sites (sites='matmuls'), not at {s}"
        )


def _site_noise(chosen: Sequence[Site], neuron) -> dict:
    """``{site: noise}`` for the chosen sites from a NeuronNoise (or product model), a callable or a sequence."""
    if neuron is None:
        return {}
    one = (NeuronNoise, LocalWeightNoise)
    if isinstance(neuron, one) or is_product_model(neuron):
        out = {s: neuron for s in chosen}
    elif isinstance(neuron, (list, tuple)):
        if len(neuron) != len(chosen):
            raise InvalidArgumentError(f"neuron has {len(neuron)} entries but {len(chosen)} site(s) are selected")
        out = {s: n for s, n in zip(chosen, neuron) if n is not None}
    elif callable(neuron):
        out = {}
        for s in chosen:
            n = neuron(s)
            if n is not None and not isinstance(n, one) and not is_product_model(n):
                raise InvalidArgumentError(f"neuron({s}) returned {type(n).__name__}; expected a NeuronNoise, a product model or None")
            if n is not None:
                out[s] = n
    else:
        raise InvalidArgumentError(
            "neuron must be a NeuronNoise (or a product model such as hardware.AnalogHardware), a sequence of them "
            f"(one per selected site) or a function Site -> NeuronNoise, got {type(neuron).__name__}"
        )
    for s, n in out.items():
        _check_product_site(s, n)
    return out


def _check_key(key) -> None:
    if isinstance(key, jax.core.Tracer):
        return
    if not isinstance(key, jax.Array):
        raise InvalidArgumentError(f"key must be a JAX PRNG key (jax.random.key(seed) or noisejax.rng.key(seed)), got {type(key).__name__}")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise InvalidArgumentError(f"key must be a single PRNG key, got a key array of shape {key.shape}")
    elif not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise InvalidArgumentError(f"key must be a JAX PRNG key, got an array of dtype {key.dtype} and shape {key.shape}")


# ----------------------------------------------------------------------------------
# Weight noise: sampling and moments
# ----------------------------------------------------------------------------------

_WEIGHT_TYPES = (AdditiveWeightNoise, MultiplicativeWeightNoise, Quantization)


def _check_weight(weight) -> None:
    if weight is not None and not isinstance(weight, _WEIGHT_TYPES) and not hasattr(weight, "weight_moments"):
        raise InvalidArgumentError(
            "weight must be an AdditiveWeightNoise, MultiplicativeWeightNoise, Quantization or an object with "
            f"apply(params, key=) and weight_moments(params); got {type(weight).__name__}"
        )


def weight_moments(weight, params: PyTree) -> tuple[PyTree, PyTree]:
    """``(mean, variance)`` per leaf of ``params`` under a weight perturbation (variance ``None``: noise-free).

    * :class:`~noisejax.noise.AdditiveWeightNoise`: ``(w, σ_n²)`` on the selected leaves;
    * :class:`~noisejax.noise.MultiplicativeWeightNoise`: ``(w, D·w²)``;
    * :class:`~noisejax.noise.Quantization`: round to nearest — the quantized weights, no
      noise (deterministic); stochastic rounding — ``(w, Δ²·f(1 − f))`` with ``f`` the
      fractional part of ``w/Δ`` (unbiased);
    * any object with a ``weight_moments(params)`` method (e.g. device models).
    """
    if hasattr(weight, "weight_moments"):
        return weight.weight_moments(params)
    if isinstance(weight, AdditiveWeightNoise):
        return params, weight.power(params)
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    means, variances = [], []
    for path, leaf in leaves:
        chosen = weight.leaf_filter(path, leaf)
        if not chosen:
            means.append(leaf)
            variances.append(None)
            continue
        if isinstance(weight, MultiplicativeWeightNoise):
            means.append(leaf)
            variances.append(jnp.asarray(weight.variance, leaf.dtype) * jnp.square(leaf))
        else:  # Quantization
            levels = 2 ** (weight.bits - 1) - 1
            step = jnp.max(jnp.abs(leaf)) / levels
            step = jnp.where(step > 0, step, 1.0)
            if weight.stochastic:
                frac = leaf / step - jnp.floor(leaf / step)
                means.append(leaf)
                variances.append(jnp.square(step) * frac * (1.0 - frac))
            else:
                means.append((jnp.clip(jnp.round(leaf / step), -levels, levels) * step).astype(leaf.dtype))
                variances.append(None)
    tdef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(tdef, means), jax.tree_util.tree_unflatten(tdef, variances)


def _moments_and_gains(weight, params: PyTree) -> tuple:
    """``(mean, variance, gains)`` of a weight model (``gains`` None when it reports none)."""
    if hasattr(weight, "weight_moments_with_gains"):
        return weight.weight_moments_with_gains(params)
    mean, var = weight_moments(weight, params)
    return mean, var, None


@struct.dataclass
class SwitchedWeights:
    """One of several weight models, chosen by a traced ``index``: one compiled program for all of them.

    ``noisy``/``analytic`` programs are compiled per weight model *structure*; models that differ
    only in a static setting (e.g. :class:`noisejax.hardware.AnalogHardware`'s ``compensation``)
    each compile their own program.  ``SwitchedWeights(models, index)`` applies
    ``models[index]`` through :func:`jax.lax.switch`, so the network's program is compiled once
    and the model is data (a leaf: ``jit`` once, ``vmap``/sweep over it).  Realization ``k``
    draws what ``models[index]`` draws with ``k`` (the same keys, the same code); the numbers
    agree to float32 rounding, as XLA optimizes a branch on its own (bitwise for the PCM
    weights of ``pcm_drift`` and for additive noise, not for the quantizer's division).

    The models' outputs must agree leaf by leaf in dtype and in shape up to broadcasting (a
    per-leaf scalar variance becomes the leaf's shape).  Where some models report a gain
    (``apply_with_gains``) or a variance for a leaf and others none, the others get a gain of
    one or a variance of zero there: the same numbers.  A traced ``index`` outside
    ``[0, len(models))`` is clamped, as :func:`jax.lax.switch` does.

    Attributes:
      models: tuple of weight models (``AdditiveWeightNoise``, ``MultiplicativeWeightNoise``,
        ``Quantization`` or any object with ``apply``/``weight_moments``).
      index: integer scalar (may be traced): the model in use.

    Example::

        >>> chips = [hw.AnalogHardware(compensation=c) for c in ("readout", "exact", "none")]
        >>> f = jax.jit(lambda ci, k: noisejax.noisy(model.apply, weight=SwitchedWeights(
        ...     tuple(c.weights(3600.0) for c in chips), ci))(k, variables, x))
        >>> ys = [f(ci, key) for ci in range(3)]  # one compiled program
    """

    models: tuple
    index: Any = 0

    def __post_init__(self):
        if isinstance(self.models, list):
            object.__setattr__(self, "models", tuple(self.models))
        if not isinstance(self.models, tuple) or not self.models:
            raise InvalidArgumentError(f"SwitchedWeights.models must be a non-empty tuple of weight models, got {self.models!r}")
        for m in self.models:
            if isinstance(m, SwitchedWeights):
                raise InvalidArgumentError("SwitchedWeights.models must not contain a SwitchedWeights (list its models instead)")
            _check_weight(m)
        idx = self.index
        if isinstance(idx, (bool, np.bool_)) or not (isinstance(idx, (int, np.integer)) or
                                                     (hasattr(idx, "dtype") and jnp.issubdtype(idx.dtype, jnp.integer))):
            raise InvalidArgumentError(f"SwitchedWeights.index must be an integer, got {idx!r}")
        if isinstance(idx, (int, np.integer)) and not 0 <= int(idx) < len(self.models):
            raise InvalidArgumentError(f"SwitchedWeights.index must be in [0, {len(self.models)}), got {int(idx)}")

    def _switch(self, branch: Callable, *args):
        """``branch(models[index], *args)``, its ``None`` leaves where other models have arrays filled (:func:`_fill`)."""
        outs = [jax.eval_shape(functools.partial(branch, m), *args) for m in self.models]
        structs = [jax.tree_util.tree_structure(o, is_leaf=lambda v: v is None) for o in outs]
        if len(set(structs)) > 1:
            raise InvalidArgumentError(f"SwitchedWeights: the models' outputs differ in structure ({structs[0]} vs "
                                       f"{next(s for s in structs if s != structs[0])})")
        flat = [jax.tree_util.tree_leaves(o, is_leaf=lambda v: v is None) for o in outs]
        proto = []
        kinds = _leaf_kinds(structs[0], len(flat[0]))
        for i, (col, kind) in enumerate(zip(zip(*flat), kinds)):
            arrays = {(tuple(c.shape), jnp.dtype(c.dtype)) for c in col if c is not None}
            try:  # a per-leaf scalar variance (e.g. AdditiveWeightNoise's) broadcasts to the leaf's shape
                shape = np.broadcast_shapes(*(s for s, _ in arrays)) if kind == "var" or len(arrays) <= 1 else None
            except ValueError:
                shape = None
            if shape is None or len({d for _, d in arrays}) > 1:
                raise InvalidArgumentError(f"SwitchedWeights: the models' outputs differ in shape/dtype at leaf {i}: "
                                           f"{sorted(map(str, arrays))}")
            proto.append((shape, next(iter(arrays))[1]) if arrays else None)

        def run(m, *a):
            leaves, treedef = jax.tree_util.tree_flatten(branch(m, *a), is_leaf=lambda v: v is None)
            leaves = [(_fill(kind, p) if v is None else jnp.broadcast_to(v, p[0])) if p is not None else v
                      for v, p, kind in zip(leaves, proto, kinds)]
            return jax.tree_util.tree_unflatten(treedef, leaves)

        if len(self.models) == 1:
            return run(self.models[0], *args)
        return jax.lax.switch(jnp.asarray(self.index, jnp.int32), [functools.partial(run, m) for m in self.models], *args)

    def apply_with_gains(self, params: PyTree, *, key: Array) -> tuple[PyTree, PyTree]:
        """``models[index]``'s realization and gains (gains of one where another model reports some)."""
        def branch(m, p, k):
            new, g = _apply_and_gains(m, p, k)
            return new, _full_tree(p, g)

        return self._switch(branch, params, key)

    def apply(self, params: PyTree, *, key: Array) -> PyTree:
        return self.apply_with_gains(params, key=key)[0]

    def weight_moments_with_gains(self, params: PyTree) -> tuple[PyTree, PyTree, PyTree]:
        """``models[index]``'s ``(mean, variance, gains)`` (zeros / ones where another model reports some)."""
        def branch(m, p):
            mean, var, g = _moments_and_gains(m, p)
            return mean, _full_tree(p, var), _full_tree(p, g)

        return self._switch(branch, params)

    def weight_moments(self, params: PyTree) -> tuple[PyTree, PyTree]:
        return self.weight_moments_with_gains(params)[:2]


def _leaf_kinds(treedef, n: int) -> list:
    """What each flat leaf of a ``(value, gain)`` or ``(value, var, gain)`` output is: ``"value"``, ``"var"`` or ``"gain"``."""
    children = treedef.children()
    kinds = []
    for pos, child in enumerate(children):
        kinds += [("value", "var", "gain")[pos] if len(children) == 3 else ("value", "gain")[pos]] * child.num_leaves
    assert len(kinds) == n
    return kinds


def _full_tree(params: PyTree, tree: Any) -> PyTree:
    """``tree`` (``None`` for all leaves allowed) with ``params``' structure, ``None`` per empty leaf."""
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), _per_leaf(params, tree))


def _fill(kind: str, proto: tuple) -> Array:
    """The neutral entry of a leaf a model leaves empty: zero variance, unit gain (values are never empty)."""
    shape, dtype = proto
    return jnp.zeros(shape, dtype) if kind == "var" else jnp.ones(shape, dtype)


def _apply_and_gains(weight, params: PyTree, key: Array) -> tuple:
    """``(params realization, gains)`` of a weight model (``gains`` None when it reports none)."""
    if hasattr(weight, "apply_with_gains"):
        return weight.apply_with_gains(params, key=key)
    return weight.apply(params, key=key), None


def _per_leaf(params: PyTree, tree: Any) -> list:
    """``tree`` (like ``params``, ``None`` allowed per leaf; ``None`` for all) as one entry per leaf of ``params``."""
    treedef = jax.tree_util.tree_structure(params)
    return [None] * treedef.num_leaves if tree is None else treedef.flatten_up_to(tree)


def _offsets(args) -> list:
    """Flat index of the first leaf of every positional argument."""
    out, pos = [], 0
    for a in args:
        out.append(pos)
        pos += len(jax.tree_util.tree_leaves(a))
    return out


def _perturb(args, nums, weight, key):
    """The perturbed arguments, and ``{flat input index: gain}`` of the weight model (module doc)."""
    args = list(args)
    offsets = _offsets(args)
    gains = {}
    for j, p in enumerate(nums):
        k = jax.random.fold_in(jax.random.fold_in(key, _WEIGHT_TAG), j)
        new, g = _apply_and_gains(weight, args[p], k)
        for i, gi in enumerate(_per_leaf(args[p], g)):
            if gi is not None:
                gains[offsets[p] + i] = gi
        args[p] = new
    return tuple(args), gains


_VIEWS = ("noisejax_site", "convert_element_type", "copy", "copy_p")


def _param_source(program, ref) -> Optional[int]:
    """The flat input an operand is a view of (through marks, dtype casts, copies), or None."""
    if not ref.is_var:
        return None
    producer = program.producer
    v = ref.var
    while v >= program.n_in:
        k = producer.get(v)
        if k is None or program.ops[k].prim.name not in _VIEWS or not program.ops[k].ins[0].is_var:
            return None
        v = program.ops[k].ins[0].var
    return v


def _param_flags(program, op) -> tuple:
    """Per operand: a parameter (or constant) value, marked or cast parameters included."""
    return tuple(r.is_var and (r.var in program.param_only or _param_source(program, r) in program.param_only) for r in op.ins)


def _operand_gains(program, op, gains: dict) -> tuple:
    if not gains:
        return (None,) * len(op.ins)
    return tuple(gains.get(_param_source(program, r)) for r in op.ins)


def _site_op(program, s: Site):
    return program.ops[program.producer[s.var]]


# ----------------------------------------------------------------------------------
# Sampling interpretation
# ----------------------------------------------------------------------------------


def _noise_at_site(y: Array, nz: NeuronNoise, key: Array, batch_axes: int) -> Array:
    """Neuron noise on a site's array; examples = the flattened leading ``batch_axes`` axes."""
    nb = min(batch_axes, y.ndim)
    lead, feat = y.shape[:nb], y.shape[nb:]
    n_ex = int(np.prod(lead)) if lead else 1
    ye = y.reshape((n_ex,) + feat)
    keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(jnp.arange(n_ex))
    out = jax.vmap(lambda v, k: apply_neuron_noise(v, nz, key=k))(ye, keys)
    return out.reshape(y.shape)


def _bind_eqn(eqn, invals):
    """``eqn`` applied to ``invals`` as :func:`jax.core.eval_jaxpr` does (keeps names and call rules)."""
    from jax._src import source_info_util as siu

    got = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = got if isinstance(got, tuple) else ((), got)
    with siu.user_context(eqn.source_info.traceback, name_stack=siu.current_name_stack() + eqn.source_info.name_stack):
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval_sampling(jaxpr, consts, args, path, plan):
    """Evaluate ``jaxpr``, adding noise at the planned site eqns; calls without sites run untouched."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for i, eqn in enumerate(jaxpr.eqns):
        p = path + (i,)
        invals = [read(v) for v in eqn.invars]
        site = plan["sites"].get(p)
        if p in plan["prefixes"]:
            sub = _jaxpr._sub_jaxpr(eqn)
            outvals = _eval_sampling(sub[0], sub[1], invals, p, plan)
        elif site is not None and is_product_model(site[1]):  # the product model computes the op
            s, nz = site
            op = plan["ops"][p]
            k = jax.random.fold_in(plan["key"], s.index)
            outvals = nz.sample_site(op, invals, key=k, batch_axes=plan["batch_axes"], gains=plan["gains"][p],
                                     params=plan["params"][p])
            site = None
        else:
            outvals = _bind_eqn(eqn, invals)
        outvals = list(outvals)
        if site is not None:
            s, nz = site
            k = jax.random.fold_in(plan["key"], s.index)
            outvals[0] = _noise_at_site(outvals[0], nz, k, plan["batch_axes"])
        if p in plan["taps"]:
            plan["tapped"][plan["taps"][p]] = outvals[0]
        for v, val in zip(eqn.outvars, outvals):
            env[v] = val
    return [read(v) for v in jaxpr.outvars]


def noisy(
    fn: Callable,
    *,
    neuron: Any = None,
    weight: Any = None,
    sites: Any = "activations",
    params_argnums: Union[int, Sequence[int], None] = 0,
    batch_axes: int = 1,
    taps: Any = None,
) -> Callable:
    """``fn`` with noise: returns ``noisy_fn(key, *args)``, same output structure as ``fn(*args)``.

    Args:
      fn: any JAX-traceable function of positional arguments (``model.apply``,
        ``lambda state, x: nnx.merge(graphdef, state)(x)``, an Equinox call, ``jnp`` code).
      neuron: neuron noise at the selected sites: a :class:`~noisejax.noise.NeuronNoise`
        (every site), a sequence with one entry (or ``None``) per selected site, or a
        function ``Site -> NeuronNoise | None``.  ``None``: no neuron noise.  At matmul
        sites it may also be a product model (module doc), e.g.
        :class:`noisejax.hardware.AnalogHardware` (an analog crossbar's periphery).
      weight: a perturbation of the parameters ``args[params_argnums]``:
        :class:`~noisejax.noise.AdditiveWeightNoise` (WNR in dB),
        :class:`~noisejax.noise.MultiplicativeWeightNoise`, :class:`~noisejax.noise.Quantization`,
        or any object with ``apply(params, *, key)`` and ``weight_moments(params)`` (e.g.
        :class:`noisejax.hardware.PCMWeights`: PCM devices read at a time ``t``);
        its leaf filter chooses the leaves (normalization parameters and statistics
        excluded by default).  Drawn once per realization, shared by all examples.
      sites: ``"activations"``, ``"matmuls"``, ``"marked"``, ``"all"``, a sequence of them,
        or a predicate over :class:`Site`.  Must match at least one site when
        ``neuron`` is given.
      params_argnums: the positional argument(s) holding parameters (``None``: none).
      batch_axes: leading axes of a site's array that index examples (1 for batched
        models, 0 for a function of one example).
      taps: a site selection (as ``sites``) whose values to return as well: then
        ``noisy_fn`` returns ``(fn's output, tuple of the tapped sites' values)``, in
        site order (after the noise of a noisy site) — per-site statistics from one run.

    Returns:
      ``noisy_fn(key, *args)``; pure, ``jit``/``vmap``/``grad``-able.  Calls inside
      ``fn`` that contain no selected site keep their custom derivative rules.

    Example::

        >>> nf = noisy(model.apply, neuron=NeuronNoise(add_uncorrelated=1e-3))
        >>> ys = jax.vmap(lambda k: nf(k, variables, x))(jax.random.split(key, 100))
    """
    _check_fn(fn)
    _check_weight(weight)
    if neuron is None and weight is None:
        raise InvalidArgumentError("noisy(fn) needs neuron= and/or weight=; with neither it would return fn unchanged")
    if not isinstance(batch_axes, int) or batch_axes < 0:
        raise InvalidArgumentError(f"batch_axes must be an integer >= 0, got {batch_axes!r}")
    cache: dict = {}

    @functools.wraps(fn)
    def noisy_fn(key, *args):
        _check_key(key)
        nums = _argnums(params_argnums, len(args))
        gains = {}
        if weight is not None:
            if not nums:
                raise InvalidArgumentError("weight= needs params_argnums: which argument holds the parameters")
            args, gains = _perturb(args, nums, weight, key)
        if neuron is None and taps is None:
            return fn(*args)
        traced = _trace(fn, args, params_argnums, cache)
        program = traced.program
        chosen = _select_sites(program, sites) if neuron is not None else ()
        tapped = _select_sites(program, taps) if taps is not None else ()
        per_site = _site_noise(chosen, neuron)
        plan_sites, prefixes, ops, op_gains, op_params = {}, set(), {}, {}, {}
        for s, nz in per_site.items():
            if is_product_model(nz):
                op = _site_op(program, s)
                ops[s.path], op_gains[s.path] = op, _operand_gains(program, op, gains)
                op_params[s.path] = _param_flags(program, op)
            elif not (isinstance(nz, NeuronNoise) and not nz.is_zero):
                continue
            plan_sites[s.path] = (s, nz)
            prefixes.update(s.path[:k] for k in range(1, len(s.path)))
        for s in tapped:
            prefixes.update(s.path[:k] for k in range(1, len(s.path)))
        plan = {"sites": plan_sites, "prefixes": prefixes, "key": jax.random.fold_in(key, _NEURON_TAG), "batch_axes": batch_axes,
                "taps": {s.path: j for j, s in enumerate(tapped)}, "tapped": {}, "ops": ops, "gains": op_gains,
                "params": op_params}
        flat = jax.tree_util.tree_leaves(args)
        out = _eval_sampling(traced.closed.jaxpr, traced.closed.consts, flat, (), plan)
        out = jax.tree_util.tree_unflatten(traced.out_tree, out)
        if taps is None:
            return out
        return out, tuple(plan["tapped"][j] for j in range(len(tapped)))

    return noisy_fn


# ----------------------------------------------------------------------------------
# Listing sites
# ----------------------------------------------------------------------------------


def sites(fn: Callable, *args, sites: Any = "all", params_argnums: Union[int, Sequence[int], None] = 0) -> tuple:
    """The sites of ``fn(*args)`` that a selection matches (default: all), in order.

    ``print(noisejax.interpret.describe(noisejax.sites(fn, *args)))`` prints a table.

    Example::

        >>> [str(s) for s in sites(model.apply, variables, x, sites="activations")]
        ['#1 activation relu in CNN float32[1, 8, 8, 32] at cnn.py:6:8 (CNN.__call__)', ...]
    """
    _check_fn(fn)
    traced = _trace(fn, args, params_argnums, {})
    return _jaxpr.select(traced.program.sites, sites)


describe = _jaxpr.describe


# ----------------------------------------------------------------------------------
# Moment interpretation
# ----------------------------------------------------------------------------------


def _neuron_site_state(x, nz: NeuronNoise, nb: int, live: set):
    """Moments after ``z = y·(1 + ξ_MU + s ξ_MC) + ξ_AU + a ξ_AC`` (exact second-moment algebra)::

        E z = m;  Cov z = C + D_MU diag(m² + diag C) + (s sᵀ∘Δ)∘(C + m mᵀ) + D_AU I + (a aᵀ∘Δ)

    ``Δ_ik = 1`` when features ``i``, ``k`` share their correlated draws.  The ``ξ_MC``
    products with the incoming noise are new sources (``s∘1_γ∘L``), merged into
    ``√(1 + D_MC)·L`` when nothing else carries ``L``'s sources (scalar ``D_MC``, one group).
    """
    g = G.as_gaussian(x)
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise InvalidArgumentError(f"neuron noise at a site of dtype {g.dtype}; expected a floating-point array")
    m = g.mean
    shape, dtype = m.shape, m.dtype
    nb = min(nb, m.ndim)
    feat = shape[nb:]

    def bc(v):
        return None if v is None else jnp.broadcast_to(jnp.asarray(v, dtype), shape)

    d_mu, d_au, d_mc, d_ac = bc(nz.mul_uncorrelated), bc(nz.add_uncorrelated), bc(nz.mul_correlated), bc(nz.add_correlated)
    cshape = (1,) * nb + nz.correlated_shape(feat) if feat else (1,) * len(shape)
    cshape = tuple(s if i < nb else c for i, (s, c) in enumerate(zip(shape, cshape)))
    n_groups = int(np.prod(cshape)) if cshape else 1
    ind = jax.nn.one_hot(jnp.broadcast_to(jnp.arange(n_groups).reshape(cshape), shape), n_groups, dtype=dtype)
    var = G.variance(g)
    blocks = list(g.blocks)
    if d_mc is not None:
        s = G._safe_sqrt(d_mc)
        merge_ok = jnp.ndim(nz.mul_correlated) == 0 and n_groups == 1
        new = []
        for b in blocks:
            if merge_ok and b.sid not in live:
                new.append(G._scale_block(b, jnp.sqrt(1.0 + jnp.asarray(nz.mul_correlated, dtype)), shape))
                continue
            new.append(b)
            if isinstance(b, G.Diag):  # each source times its feature's group draw: still one source per feature
                new.append(G.Diag(G.fresh(), s * b.scale))
            else:
                cols = G.to_dense(b, shape).cols
                load = (s[..., None] * ind)[..., :, None] * cols[..., None, :]
                new.append(G.Dense(G.fresh(), load.reshape(shape + (-1,))))
        blocks = new
        blocks.append(G.Dense(G.fresh(), (s * m)[..., None] * ind))
    if d_mu is not None:
        blocks.append(G.Diag(G.fresh(), G._safe_sqrt(d_mu * (jnp.square(m) + var))))
    if d_au is not None:
        blocks.append(G.Diag(G.fresh(), G._safe_sqrt(d_au)))
    if d_ac is not None:
        blocks.append(G.Dense(G.fresh(), G._safe_sqrt(d_ac)[..., None] * ind))
    return G.Gaussian(m, tuple(blocks))


def _weight_site_state(x, nz: LocalWeightNoise, tag: str):
    """A parameter marked as a local-weight-noise site: independent noise per entry."""
    v = nz.variance if (tag == "local_weight" or nz.bias_variance is None) else nz.bias_variance
    g = G.as_gaussian(x)
    scale = G._safe_sqrt(jnp.broadcast_to(jnp.asarray(v, g.dtype), g.shape))
    return G.Gaussian(g.mean, g.blocks + (G.Diag(G.fresh(), scale),))


def _cluster_fn(program, cluster, env, out_var):
    """The cluster as a Python function of its root (parameters read from ``env``)."""
    ops = program.ops

    def fn(x):
        local = {cluster.root: x}

        def read(r):
            if not r.is_var:
                return r.const
            return local[r.var] if r.var in local else env[r.var]

        for k in cluster.members:
            op = ops[k]
            outs = R._bind(op, [read(r) for r in op.ins])
            for o, val in zip(op.outs, outs):
                local[o] = val
        return local[out_var]

    return fn


def _cluster_ready(program, cluster, env) -> bool:
    members = set(cluster.members)
    member_vars = {o for k in members for o in program.ops[k].outs}
    for k in members:
        for r in program.ops[k].ins:
            if r.is_var and r.var not in member_vars:
                if r.var not in env or (r.var != cluster.root and isinstance(env[r.var], G.Gaussian)):
                    return False
    return True


def _run_cluster(ctx, program, cluster, env):
    root = env[cluster.root]
    outs = {}
    single = len(cluster.members) == 1
    for v in cluster.outputs:
        if single:
            op = program.ops[cluster.members[0]]
            ins = [r.const if not r.is_var else env[r.var] for r in op.ins]
            ctx.op = op
            outs[v] = R.apply_rule(ctx, op, ins)[0]
        else:
            fn = _cluster_fn(program, cluster, env, v)
            partial = any(program.ops[k].prim.name in _jaxpr._PARTIAL for k in cluster.members) and cluster.name not in _jaxpr._NN_FUNCTIONS
            outs[v] = R.activation_state(ctx, root, fn, linearize=partial)
    return outs


def _softmax_shifts(program) -> set:
    """``stop_gradient`` ops fed by a ``reduce_max``/``reduce_min`` (through layout/elementwise ops)."""
    producer = {o: k for k, op in enumerate(program.ops) for o in op.outs}
    found = set()
    passthrough = {"broadcast_in_dim", "reshape", "max", "min", "convert_element_type", "expand_dims", "squeeze"}
    for k, op in enumerate(program.ops):
        if op.prim.name != "stop_gradient" or not op.ins[0].is_var:
            continue
        v, depth = op.ins[0].var, 0
        while v in producer and depth < 6:
            p = program.ops[producer[v]]
            if p.prim.name in ("reduce_max", "reduce_min", "argmax"):
                found.add(k)
                break
            if p.prim.name not in passthrough:
                break
            nxt = [r.var for r in p.ins if r.is_var]
            if len(nxt) != 1:
                break
            v, depth = nxt[0], depth + 1
    return found


def _interpret(program, inputs: list, site_noise: dict, *, ctx: R.Context, batch_axes: int, taps: Sequence[Site] = (),
               gains: Optional[dict] = None) -> list:
    """Run the moment interpretation; ``inputs`` are arrays or Gaussian states per flat input.

    ``site_noise`` maps sites to their noise (product models compute their op); ``gains``
    maps flat input indices to the output gains of their weight model (module doc).
    Returns the program's outputs, followed by the values at the ``taps`` sites."""
    env: dict = {}
    tap_vars = {s.var: j for j, s in enumerate(taps)}
    tapped: dict = {}
    last = program.last_use
    for i, v in enumerate(inputs):
        env[i] = v
    by_var = {s.var: (s, nz) for s, nz in site_noise.items() if not is_product_model(nz)}
    products = {program.producer[s.var]: nz for s, nz in site_noise.items() if is_product_model(nz)}
    shifts = _softmax_shifts(program)
    done = set()
    n_ops = len(program.ops)

    def live_sids(k, exclude=()):
        out = set()
        for v, val in env.items():
            if isinstance(val, G.Gaussian) and last.get(v, -1) > k and v not in exclude:
                out |= G.sids(val)
        return frozenset(out)

    def store(v, val, k):
        if v in by_var:
            s, nz = by_var[v]
            if isinstance(nz, NeuronNoise) and not nz.is_zero:
                val = _neuron_site_state(val, nz, batch_axes, live_sids(k, exclude=(v,)))
            elif isinstance(nz, LocalWeightNoise):
                val = _weight_site_state(val, nz, s.primitive)
        if isinstance(val, G.Gaussian):
            val = G.compact(val, live_sids(k, exclude=(v,)))
        env[v] = val
        if v in tap_vars:
            tapped[tap_vars[v]] = val

    for k, op in enumerate(program.ops):
        if k in done:
            continue
        ci = program.cluster_of.get(k)
        if ci is not None:
            cl = program.clusters[ci]
            if isinstance(env.get(cl.root), G.Gaussian) and _cluster_ready(program, cl, env):
                ctx.live = live_sids(k)
                ctx.params = ()
                outs = _run_cluster(ctx, program, cl, env)
                done.update(cl.members)
                member_vars = {o for m in cl.members for o in program.ops[m].outs}
                for v in member_vars:
                    if v in outs:
                        store(v, outs[v], k)
                _drop_dead(env, last, max(cl.members), program.out_vars)
                continue
        ins = [r.const if not r.is_var else env[r.var] for r in op.ins]
        ctx.op = op
        ctx.live = live_sids(k)
        ctx.params = tuple(r.is_var and r.var in program.param_only for r in op.ins)
        ctx.noise_free_stop_gradient = k in shifts
        if k in products:
            ctx.params = _param_flags(program, op)
            outs = products[k].site_moments(ctx, op, ins, gains=_operand_gains(program, op, gains or {}))
        else:
            outs = R.apply_rule(ctx, op, ins)
        for v, val in zip(op.outs, outs):
            store(v, val, k)
        _drop_dead(env, last, k, program.out_vars)
    del n_ops
    return [r.const if not r.is_var else env[r.var] for r in program.outs] + [tapped[j] for j in range(len(taps))]


def _drop_dead(env, last, k, keep):
    """Forget values no later op consumes (outputs are kept, but never share sources again)."""
    for v in [v for v in env if last.get(v, -1) <= k and v not in keep]:
        del env[v]


def _weight_states(weight, params: PyTree) -> tuple[list, list]:
    """Per leaf of ``params``: its state under ``weight`` (an array, or a Gaussian with independent
    entries) and the weight model's output gain (``None``: none)."""
    mean_t, var_t, gain_t = _moments_and_gains(weight, params)
    states = []
    for m, v in zip(_per_leaf(params, mean_t), _per_leaf(params, var_t)):
        if v is None:
            states.append(m)
        else:
            scale = G._safe_sqrt(jnp.broadcast_to(jnp.asarray(v, m.dtype), m.shape))
            states.append(G.Gaussian(m, (G.Diag(G.fresh(), scale),)))
    return states, _per_leaf(params, gain_t)


def _weight_inputs(traced, flat_args, weight, nums, args):
    """Flat inputs with the perturbed parameter leaves as Gaussian states, and ``{flat index: gain}``."""
    inputs = list(flat_args)
    gains = {}
    if weight is None:
        return inputs, gains
    offsets = _offsets(args)
    for p in nums:
        states, gain_l = _weight_states(weight, args[p])
        for j, (st, g) in enumerate(zip(states, gain_l)):
            inputs[offsets[p] + j] = st
            if g is not None:
                gains[offsets[p] + j] = g
    return inputs, gains


def _check_outputs(program, out_tree) -> None:
    for i, aval in enumerate(program.out_avals):
        if not (hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.floating)):
            raise InvalidArgumentError(
                f"analytic: output leaf {i} of fn has dtype {getattr(aval, 'dtype', type(aval).__name__)}; "
                "only floating-point outputs have noise statistics (return logits, not argmax)"
            )


def analytic(
    fn: Callable,
    *,
    neuron: Any = None,
    weight: Any = None,
    sites: Any = "activations",
    params_argnums: Union[int, Sequence[int], None] = 0,
    batch_axes: int = 1,
    method: str = "gaussian",
    covariance: str = "factored",
    quad_nodes: int = 64,
    unknown: str = "error",
    taps: Any = None,
    batch_size: Optional[int] = 32,
) -> Callable:
    """``fn``'s noise statistics without sampling: returns ``analytic_fn(*args) -> Prediction``.

    Takes the same arguments as :func:`noisy` and describes the same noise; ``pred.mean``
    and ``pred.var`` are pytrees like ``fn(*args)``: the mean and the variance over noise
    realizations for the given inputs (what Monte Carlo over :func:`noisy` estimates).

    Args (besides those of :func:`noisy`):
      batch_axes: 1 (default): the leading axis of every non-parameter argument indexes
        examples, which ``fn`` must treat independently (inference mode: no batch
        statistics); each example is analysed on its own (``vmap``), so the cost is
        linear in the batch.  0: ``fn`` is analysed as one whole computation.
      method: ``"gaussian"`` (moment matching; exact for linear maps and noise sites,
        Gaussian closed forms/quadrature for activations) or ``"linearized"`` (first order).
      covariance: ``"factored"`` (cross-covariances kept exactly: correlated noise,
        residual branches, kernel noise shared across positions) or ``"lowrank"``
        (independent parts propagated as variances only: cheap for big models);
        ``"full"`` is ``"factored"``.
      quad_nodes: quadrature points for activations without a closed form.
      unknown: ``"error"`` (default) or ``"linearize"``: first order through ``jax.jvp``
        for primitives that have no moment rule (see :mod:`noisejax.rules`).
      taps: as for :func:`noisy`: ``pred.mean`` and ``pred.var`` become
        ``(fn's output, tuple per tapped site)``.
      batch_size: with ``batch_axes=1``, the examples analysed together: ``batch_size``
        at a time, one chunk after the other (a ``lax.scan``; the batch is padded to a
        multiple of it with copies of its last example, which are dropped). Memory grows
        with it: a factored state holds one column per noise source and example (a
        MNIST-1D ResNet with kernel noise: ≈ 9 MB per example). ``None``: the whole batch
        at once (``vmap``). Every chunk size gives the same numbers up to float
        rounding (tested); bitwise only where the backend's kernels do not depend on the
        batch size (on some CPUs XLA's convolutions block their sums by it).

    Returns:
      ``analytic_fn(*args)``, jit-compiled per argument structure and shapes.

    Raises:
      UnsupportedPrimitiveError: a primitive with a noisy input has no moment rule
        (the message names it and your source line).

    Example::

        >>> pred = analytic(model.apply, neuron=NeuronNoise(add_uncorrelated=1e-3))(variables, x)
        >>> pred.var.shape   # like model.apply(variables, x)
        (100, 10)
    """
    _check_fn(fn)
    _check_weight(weight)
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}")
    if covariance not in COVARIANCES:
        raise InvalidArgumentError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if unknown not in ("error", "linearize"):
        raise InvalidArgumentError(f"unknown must be 'error' or 'linearize', got {unknown!r}")
    if not isinstance(batch_axes, int) or batch_axes not in (0, 1):
        raise InvalidArgumentError(f"batch_axes must be 0 or 1 for analytic, got {batch_axes!r}")
    if not isinstance(quad_nodes, int) or quad_nodes < 2:
        raise InvalidArgumentError(f"quad_nodes must be an integer >= 2, got {quad_nodes!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidArgumentError(f"batch_size must be a positive integer (examples analysed together) or None, got {batch_size!r}")
    cache: dict = {}
    compiled: dict = {}

    def analytic_fn(*args):
        nums = _argnums(params_argnums, len(args))
        if weight is not None and not nums:
            raise InvalidArgumentError("weight= needs params_argnums: which argument holds the parameters")
        data_pos = [i for i in range(len(args)) if i not in nums]
        if batch_axes == 1:
            sizes = {np.shape(l)[0] if np.ndim(l) else None for i in data_pos for l in jax.tree_util.tree_leaves(args[i])}
            if None in sizes or len(sizes) > 1:
                raise ShapeMismatchError(
                    "analytic(batch_axes=1): every leaf of the non-parameter arguments must have the same leading "
                    f"(example) axis; got leading sizes {sorted(s for s in sizes if s is not None)}"
                    + (" and a scalar" if None in sizes else "") + "; use batch_axes=0 for a function of one example"
                )
            one = tuple(
                jax.tree_util.tree_map(lambda l: jax.ShapeDtypeStruct((1,) + tuple(np.shape(l)[1:]), jnp.result_type(l)), a)
                if i in data_pos else a
                for i, a in enumerate(args)
            )
            traced = _trace(fn, one, params_argnums, cache)
        else:
            traced = _trace(fn, args, params_argnums, cache)
        _check_outputs(traced.program, traced.out_tree)
        if batch_axes == 1:
            for i, aval in enumerate(traced.program.out_avals):
                if not aval.shape or aval.shape[0] != 1:
                    raise ShapeMismatchError(
                        f"analytic(batch_axes=1): output leaf {i} has shape {tuple(aval.shape)} for one example; "
                        "expected a leading example axis (fn must map a batch to a batch); use batch_axes=0"
                    )
        chosen = _select_sites(traced.program, sites) if neuron is not None else ()
        tapped = _select_sites(traced.program, taps) if taps is not None else None
        per_site = _site_noise(chosen, neuron)
        key = (id(traced), tuple(sorted(s.index for s in per_site)), None if tapped is None else tuple(s.index for s in tapped))
        run = compiled.get(key)
        if run is None:
            run = _build(traced, per_site, weight, nums, batch_axes, data_pos, method, covariance, quad_nodes, unknown, tapped,
                         batch_size)
            compiled[key] = run
        site_leaves = [per_site[s] for s in sorted(per_site, key=lambda s: s.index)]
        mean, var = run(args, site_leaves)
        return Prediction(mean, var)

    return analytic_fn


def _build(traced, per_site, weight, nums, batch_axes, data_pos, method, covariance, quad_nodes, unknown, tapped,
           batch_size=None):
    order = sorted(per_site, key=lambda s: s.index)
    n_out = len(traced.program.outs)

    def one(args, site_leaves):
        ctx = R.Context(mode="lowrank" if covariance == "lowrank" else "factored", method=method, quad_nodes=quad_nodes, unknown=unknown)
        flat = jax.tree_util.tree_leaves(args)
        inputs, gains = _weight_inputs(traced, flat, weight, nums, args)
        site_noise = dict(zip(order, site_leaves))
        outs = _interpret(traced.program, inputs, site_noise, ctx=ctx, batch_axes=batch_axes, taps=tapped or (), gains=gains)
        means = [G.as_gaussian(o).mean for o in outs]
        vars_ = [G.variance(o) for o in outs]
        mean = jax.tree_util.tree_unflatten(traced.out_tree, means[:n_out])
        var = jax.tree_util.tree_unflatten(traced.out_tree, vars_[:n_out])
        if tapped is None:
            return mean, var
        return (mean, tuple(means[n_out:])), (var, tuple(vars_[n_out:]))

    if batch_axes == 0:
        return jax.jit(one)

    def batched(args, site_leaves):
        in_axes = tuple(0 if i in data_pos else None for i in range(len(args)))

        def ex(*a):
            a = tuple(jax.tree_util.tree_map(lambda l: l[None], x) if i in data_pos else x for i, x in enumerate(a))
            m, v = one(a, site_leaves)
            return jax.tree_util.tree_map(lambda t: t[0], m), jax.tree_util.tree_map(lambda t: t[0], v)

        if batch_size is None:
            return jax.vmap(ex, in_axes=in_axes)(*args)
        return _in_chunks(lambda a: jax.vmap(ex, in_axes=in_axes)(*a), args, data_pos, batch_size)

    return jax.jit(batched)


def _in_chunks(fn: Callable, args: tuple, data_pos: Sequence[int], size: int):
    """``fn(args)`` for the examples (leading axis of ``args[i]``, ``i`` in ``data_pos``) ``size`` at a time.

    The batch is padded to a multiple of ``size`` with copies of its last example and
    the chunks run one after the other in a ``lax.scan`` (every example in the same
    compiled loop body, whatever its position); the padding is dropped from the output.
    Peak memory is that of one chunk.
    """
    n = jax.tree_util.tree_leaves(args[data_pos[0]])[0].shape[0]
    chunks = -(-n // size)
    pad = chunks * size - n

    def split(leaf):
        if pad:
            leaf = jnp.concatenate([leaf, jnp.repeat(leaf[-1:], pad, axis=0)])
        return leaf.reshape((chunks, size) + leaf.shape[1:])

    data = tuple(jax.tree_util.tree_map(split, args[i]) for i in data_pos)

    def body(_, d):
        a = list(args)
        for i, x in zip(data_pos, d):
            a[i] = x
        return None, fn(tuple(a))

    _, out = jax.lax.scan(body, None, data)
    return jax.tree_util.tree_map(lambda o: o.reshape((chunks * size,) + o.shape[2:])[:n], out)
