"""Noise mitigation by transforming a trained network.

Every function here takes a network of :mod:`noisejax.layers` built from *blocks*
— the top-level children of ``layers.mlp`` / ``layers.from_weights``, each one
paper layer ``serial(Dense, f, NeuronNoise)`` with params ``(dense_params, (), ())``
— and returns a new ``(net, params)`` that is again an ordinary
:mod:`noisejax.layers` network, so Monte Carlo (:mod:`noisejax.simulate`) and the
analytic moments (:mod:`noisejax.moments`) apply to it unchanged.  Blocks may
also be ``serial(Dense)`` (a noise-free linear read-out, as appended below) or
``serial(Dense, f)`` (no noise site).

Transformations (Semenova, Larger & Brunner 2022 and the follow-ups in Chaos 32,
061106 (2022) and Chaos 34, 051101 (2024)):

* :func:`scale_slope` — replace ``f(x)`` by ``f(s·x)`` in a layer and compensate in
  the next layer, ``W' = W/s``, ``b' = b + f(0)(1 − 1/s) Σ_i W_ij``.  Exact for
  linear and ReLU (positive homogeneity ``f(s·x) − f(0) = s(f(x) − f(0))``, s > 0);
  a first-order approximation around 0 otherwise (sigmoid: measure the change of
  the clean accuracy).  With ``s > 1`` the signal leaving the layer grows while its
  additive noise does not: the next layer sees additive noise ``/s²``.
* :func:`pool` — ``P`` copies of every neuron of the chosen layers see the same
  input; the next layer averages them (its rows repeated ``P`` times and divided by
  ``P``).  The uncorrelated noise reaching the next layer is divided by ``P``, the
  correlated noise is unchanged.  Pooling the last layer appends a fixed, noise-free
  averaging read-out ``serial(Dense)``.
* :func:`ghost_neurons` — one extra neuron per layer with no input (zero weights and
  bias: output ``f(0)`` plus the layer's noise), connected to the next layer with
  ``W_g = −Σ_i W_ij`` and the next bias corrected by ``−f(0)·W_g``.  The layer's
  correlated *additive* noise ``ξ_AC`` reaches the next pre-activation as
  ``ξ_AC·(Σ_i W_ij + W_g) = 0`` (exactly, for any activation); the ghost's own
  uncorrelated/multiplicative noise adds ``W_g²·(D_AU + f(0)² (D_MU + D_MC))``.  For
  the last layer a noise-free differential read-out ``y_j − y_g + f(0)`` is appended.

Noise-free outputs are unchanged (up to float rounding) by :func:`pool` and
:func:`ghost_neurons` for every activation, and by :func:`scale_slope` for
linear/ReLU hidden layers.  Appended read-outs have no noise site, so the number
of noise sites (and hence a per-site ``noise`` list) is unchanged.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from noisejax import layers, mitigate, noise
    >>> net = layers.mlp([64, 20, 10], "sigmoid")
    >>> _, params = net.init(jax.random.key(0), (64,))
    >>> pnet, pparams = mitigate.pool(net, params, 4)          # 64 → 80 → 40 → 10
    >>> gnet, gparams = mitigate.ghost_neurons(net, params)    # 64 → 21 → 11 → 10
    >>> x = jnp.ones(64)
    >>> bool(jnp.allclose(net.apply(params, x), gnet.apply(gparams, x), atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import _validate, layers
from noisejax import simulate as _simulate
from noisejax import snr as _snr
from noisejax.errors import InvalidArgumentError, ShapeMismatchError

__all__ = [
    "Block",
    "blocks",
    "assemble",
    "widths",
    "scale_slope",
    "pool",
    "ghost_neurons",
    "output_snr",
]

Array = jax.Array
PerLayer = Union[None, float, int, Sequence, Mapping[int, Any]]


# ----------------------------------------------------------------------------------
# Block view of a network
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    """One paper layer ``y = f(x W + b)`` (+ noise site), as plain arrays and specs.

    Attributes:
      W: ``(fan_in, fan_out)`` weights (a NumPy array: transformations run eagerly in
        NumPy on concrete, trained parameters; :func:`assemble` turns them back into
        jax arrays).
      b: ``(fan_out,)`` bias or ``None``.
      act: the activation's :class:`~noisejax.layers.ActivationSpec` (``None``: identity, a linear read-out).
      noisy: whether the block ends with a :func:`noisejax.layers.NoiseSite` site.
      extra: params of the non-dense children, reused when the block is rebuilt.
    """

    W: Array
    b: Optional[Array]
    act: Optional[layers.ActivationSpec]
    noisy: bool
    extra: tuple = ()

    @property
    def width(self) -> int:
        return int(self.W.shape[1])

    def f0(self) -> float:
        """The activation at 0, ``f(0)`` (0 for the identity)."""
        if self.act is None:
            return 0.0
        return _f0(self.act.fn)

    def replace(self, **kw) -> "Block":
        return dataclasses.replace(self, **kw)


_BAD_NET = (
    "net must be a serial network whose children are serial(Dense[, activation][, NeuronNoise]) blocks "
    "(e.g. layers.mlp or layers.from_weights)"
)


def blocks(net: layers.Layer, params) -> list[Block]:
    """Split a block network and its params into a list of :class:`Block`.

    Raises :class:`~noisejax.errors.InvalidArgumentError` for another architecture
    and :class:`~noisejax.errors.ShapeMismatchError` when params do not fit.
    """
    spec = getattr(net, "spec", None)
    if not isinstance(net, layers.Layer) or not isinstance(spec, layers.SerialSpec):
        raise InvalidArgumentError(_BAD_NET)
    children = spec.children
    if not isinstance(params, (tuple, list)) or len(params) != len(children):
        raise ShapeMismatchError(f"params must be a tuple with one entry per block ({len(children)})")
    out: list[Block] = []
    for l, (cs, p) in enumerate(zip(children, params)):
        if not isinstance(cs, layers.SerialSpec):
            raise InvalidArgumentError(f"block {l}: {_BAD_NET}")
        kinds = [c.kind for c in cs.children]
        if kinds not in (["dense"], ["dense", "activation"], ["dense", "activation", "neuron_noise"], ["dense", "neuron_noise"]):
            raise InvalidArgumentError(f"block {l} has children {kinds}; {_BAD_NET}")
        if not isinstance(p, (tuple, list)) or len(p) != len(kinds) or not isinstance(p[0], Mapping) or "W" not in p[0]:
            raise ShapeMismatchError(f"params[{l}] must be a tuple ({{'W', 'b'}}, ...) with {len(kinds)} entries")
        W = _concrete(f"params[{l}][0]['W']", p[0]["W"])
        b = p[0].get("b")
        if W.ndim != 2:
            raise ShapeMismatchError(f"params[{l}][0]['W'] must be 2-D (fan_in, fan_out), got shape {tuple(W.shape)}")
        if out and out[-1].width != W.shape[0]:
            raise ShapeMismatchError(f"block {l} has fan_in {W.shape[0]} but block {l - 1} has {out[-1].width} outputs")
        if b is not None:
            b = _concrete(f"params[{l}][0]['b']", b)
            if tuple(b.shape) != (W.shape[1],):
                raise ShapeMismatchError(f"params[{l}][0]['b'] must have shape ({W.shape[1]},), got {tuple(b.shape)}")
        act = cs.children[1] if "activation" in kinds else None
        out.append(Block(W, b, act, kinds[-1] == "neuron_noise", tuple(p[1:])))
    return out


@functools.lru_cache(maxsize=64)
def _f0(fn) -> float:
    return float(fn(np.zeros((), np.float32)))


def _concrete(name: str, value) -> np.ndarray:
    if isinstance(value, jax.core.Tracer):
        raise InvalidArgumentError(f"{name} is traced: mitigate transformations need concrete params (call them outside jit)")
    return np.asarray(value)


def _activation_layer(spec: layers.ActivationSpec) -> layers.Layer:
    """Rebuild an activation layer from its spec, preferring the library's own layer."""
    candidate = None
    if spec.name == "linear":
        candidate = layers.Linear(1.0 if spec.slope is None else spec.slope)
    elif spec.name in layers.ACTIVATIONS:
        candidate = layers.ACTIVATIONS[spec.name]()
    if candidate is not None and (candidate.spec.name, candidate.spec.slope) == (spec.name, spec.slope):
        return candidate
    return layers.Elementwise(spec.fn, spec.name, slope=spec.slope)


def assemble(block_list: Sequence[Block]) -> tuple[layers.Layer, tuple]:
    """Build ``(net, params)`` from blocks: ``serial(serial(Dense, f, NeuronNoise), ...)``."""
    if not block_list:
        raise InvalidArgumentError("block_list is empty; expected at least one Block")
    children, params = [], []
    for blk in block_list:
        parts = [layers.Dense(blk.width, use_bias=blk.b is not None)]
        dense_p = {"W": jnp.asarray(blk.W)} if blk.b is None else {"W": jnp.asarray(blk.W), "b": jnp.asarray(blk.b)}
        p = [dense_p]
        extra = list(blk.extra)
        if blk.act is not None:
            parts.append(_activation_layer(blk.act))
            p.append(extra.pop(0) if extra else ())
        if blk.noisy:
            parts.append(layers.NoiseSite())
            p.append(extra.pop(0) if extra else ())
        children.append(layers.serial(*parts))
        params.append(tuple(p))
    return layers.serial(*children), tuple(params)


def widths(net: layers.Layer, params) -> list[int]:
    """``[fan_in, n_1, ..., n_L]`` of a block network."""
    bl = blocks(net, params)
    return [int(bl[0].W.shape[0])] + [b.width for b in bl]


def _per_layer(name: str, value: PerLayer, n: int, default, noisy: Sequence[bool]) -> list:
    """Expand a per-layer argument: scalar (all noisy layers), sequence (one per block) or {index: value}."""
    if value is None:
        return [default] * n
    if isinstance(value, Mapping):
        out = [default] * n
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not -n <= k < n:
                raise InvalidArgumentError(f"{name}: layer index {k!r} out of range for {n} blocks")
            out[int(k) % n] = v
        return out
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidArgumentError(f"{name} has {len(value)} entries; the network has {n} blocks")
        return list(value)
    return [value if nz else default for nz in noisy]


def _layer_indices(name: str, value: Optional[Sequence[int]], n: int, default: Sequence[int]) -> list[int]:
    if value is None:
        return sorted(set(default))
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = [value]
    out = []
    for k in value:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not -n <= k < n:
            raise InvalidArgumentError(f"{name}: layer index {k!r} out of range for {n} blocks")
        out.append(int(k) % n)
    return sorted(set(out))


# ----------------------------------------------------------------------------------
# Slope scaling
# ----------------------------------------------------------------------------------


def scale_slope(net: layers.Layer, params, scales: PerLayer, *, offset_correction: bool = True) -> tuple[layers.Layer, tuple]:
    """Replace ``f(x)`` by ``f(s·x)`` in chosen layers and compensate in the next one.

    Layer ``l`` with factor ``s`` (> 0): a linear activation ``α·x`` becomes
    ``Linear(α·s)``; any other activation keeps its layer and the incoming weights
    and bias are multiplied by ``s`` (the same function ``f(s·x)``).  The next layer
    gets ``W' = W/s`` and ``b' = b + f(0)(1 − 1/s) Σ_i W_ij`` (the latter only with
    ``offset_correction``), so its pre-activation is unchanged whenever
    ``f(s·x) − f(0) = s·(f(x) − f(0))`` — exactly for linear and ReLU, to first order
    around ``x = 0`` for sigmoid/tanh/erf.  Scaling the *last* layer has nothing to
    compensate it: the output of a linear/ReLU last layer is multiplied by ``s``
    (argmax unchanged).

    Args:
      net, params: a block network (see the module docstring).
      scales: one factor for every noisy layer (scalar), one per block (sequence,
        1.0 = unchanged) or ``{block_index: s}``.
      offset_correction: add the ``f(0)`` bias term above.

    Returns:
      ``(net, params)`` of the same widths.

    Example::

        >>> snet, sparams = scale_slope(net, params, {0: 2.0})   # hidden layer twice as steep
    """
    bl = blocks(net, params)
    n = len(bl)
    ss = _per_layer("scales", scales, n, 1.0, [b.noisy for b in bl])
    for l, s in enumerate(ss):
        _validate.check_real_number(f"scales[{l}]", s)
        s = float(s)
        if not s > 0:
            raise InvalidArgumentError(f"scales[{l}] must be > 0 (positive homogeneity), got {s}")
        ss[l] = s
    bl = list(bl)
    for l, s in enumerate(ss):
        if s == 1.0:
            continue
        blk = bl[l]
        if blk.act is not None and blk.act.name == "linear":
            slope = 1.0 if blk.act.slope is None else blk.act.slope
            bl[l] = blk.replace(act=layers.Linear(slope * s).spec)
        else:
            bl[l] = blk.replace(W=blk.W * s, b=None if blk.b is None else blk.b * s)
        if l + 1 < n:
            nxt = bl[l + 1]
            W, b = nxt.W, nxt.b
            shift = blk.f0() * (1.0 - 1.0 / s)
            if offset_correction and shift != 0.0:
                b = (np.zeros(W.shape[1], W.dtype) if b is None else b) + shift * np.sum(W, axis=0)
            bl[l + 1] = nxt.replace(W=W / s, b=b)
    return assemble(bl)


# ----------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------


def pool(
    net: layers.Layer,
    params,
    copies: PerLayer,
    *,
    layers_to_pool: Optional[Sequence[int]] = None,
    readout: bool = True,
) -> tuple[layers.Layer, tuple]:
    """``P`` noisy copies of every neuron of the chosen layers, averaged by the next layer.

    Layer ``l`` pooled ``P``-fold: ``W_l → repeat(W_l, P, axis=1)``, ``b_l → repeat(b_l, P)``
    (copies of neuron ``i`` are the adjacent outputs ``i·P … i·P+P−1``), and the next
    layer ``W_{l+1} → repeat(W_{l+1}, P, axis=0) / P``.  Each copy has its own
    uncorrelated noise; the next pre-activation receives

    * uncorrelated noise ``Σ_i Σ_p (W_ij/P)² σ_i² = Σ_i W_ij² σ_i² / P``;
    * correlated noise ``(Σ_i Σ_p W_ij/P)² D = (Σ_i W_ij)² D`` (unchanged).

    Pooling the last layer appends a noise-free averaging read-out
    ``serial(Dense(n_out))`` with ``W = repeat(I, P, axis=0)/P`` when ``readout``
    (otherwise the output has ``n_out·P`` entries; average ``reshape(n_out, P)``).

    Args:
      copies: ``P`` (int >= 1) for every chosen layer, or one per block, or ``{index: P}``.
      layers_to_pool: block indices to pool when ``copies`` is a scalar (default: every
        block with a noise site).

    Example::

        >>> pnet, pparams = pool(net, params, 4)   # widths [64, 20, 10] → [64, 80, 40, 10]
    """
    bl = list(blocks(net, params))
    n = len(bl)
    if isinstance(copies, (int, np.integer)) and not isinstance(copies, bool):
        chosen = _layer_indices("layers_to_pool", layers_to_pool, n, [l for l, b in enumerate(bl) if b.noisy])
        ps = [int(copies) if l in chosen else 1 for l in range(n)]
    else:
        if layers_to_pool is not None:
            raise InvalidArgumentError("layers_to_pool is only used with a scalar copies")
        ps = _per_layer("copies", copies, n, 1, [b.noisy for b in bl])
    for l, P in enumerate(ps):
        ps[l] = _validate.check_int(f"copies[{l}]", P, minimum=1)
    appended = None
    for l, P in enumerate(ps):
        if P == 1:
            continue
        blk = bl[l]
        bl[l] = blk.replace(W=np.repeat(blk.W, P, axis=1), b=None if blk.b is None else np.repeat(blk.b, P))
        if l + 1 < n:
            nxt = bl[l + 1]
            bl[l + 1] = nxt.replace(W=np.repeat(nxt.W, P, axis=0) / P)
        elif readout:
            eye = np.eye(blk.width, dtype=blk.W.dtype)
            appended = Block(np.repeat(eye, P, axis=0) / P, None, None, False)
    return assemble(bl if appended is None else [*bl, appended])  # the read-out block, if any, last


# ----------------------------------------------------------------------------------
# Ghost neurons
# ----------------------------------------------------------------------------------


def ghost_neurons(
    net: layers.Layer,
    params,
    *,
    layers_with_ghost: Optional[Sequence[int]] = None,
    readout: bool = True,
) -> tuple[layers.Layer, tuple]:
    """Add one input-less "ghost" neuron to layers to cancel correlated additive noise.

    For layer ``l`` the ghost is an extra last column of ``W_l`` (zeros) and of ``b_l``
    (0): its noise-free output is ``f(0)`` and it carries the layer's correlated noise.
    The next layer gets a last row ``W_g = −Σ_i W_ij`` and bias ``b_j − f(0)·W_gj``, so
    the next pre-activation is unchanged without noise and receives
    ``ξ_AC (Σ_i W_ij + W_gj) = 0`` from the layer's correlated additive noise
    (any activation).  The ghost adds its own uncorrelated additive noise
    ``W_gj²·D_AU`` (and ``W_gj² f(0)² (D_MU + D_MC)`` from multiplicative noise).

    With ``readout`` the last layer gets a ghost too, and a noise-free read-out
    ``out_j = y_j − y_ghost + f(0)`` is appended (``serial(Dense)``), which removes
    the correlated additive noise of the output layer itself.

    Args:
      layers_with_ghost: block indices (default: every block with a noise site;
        the last one only when ``readout``).
      readout: append the differential read-out for a ghost on the last block.

    Example::

        >>> gnet, gparams = ghost_neurons(net, params)   # [64, 20, 10] → [64, 21, 11, 10]
    """
    bl = list(blocks(net, params))
    n = len(bl)
    default = [l for l, b in enumerate(bl) if b.noisy and (readout or l < n - 1)]
    chosen = _layer_indices("layers_with_ghost", layers_with_ghost, n, default)
    if not readout and n - 1 in chosen:
        raise InvalidArgumentError("layers_with_ghost includes the last block; a ghost there needs readout=True")
    appended = None
    for l in chosen:
        blk = bl[l]
        W = np.concatenate([blk.W, np.zeros((blk.W.shape[0], 1), blk.W.dtype)], axis=1)
        b = None if blk.b is None else np.concatenate([blk.b, np.zeros((1,), blk.b.dtype)])
        bl[l] = blk.replace(W=W, b=b)
        f0 = blk.f0()
        if l + 1 < n:
            nxt = bl[l + 1]
            Wg = -np.sum(nxt.W, axis=0)
            Wn = np.concatenate([nxt.W, Wg[None, :]], axis=0)
            bn = nxt.b
            if f0 != 0.0:
                bn = (np.zeros(nxt.width, nxt.W.dtype) if bn is None else bn) - f0 * Wg
            bl[l + 1] = nxt.replace(W=Wn, b=bn)
        else:
            m = blk.width
            Wr = np.concatenate([np.eye(m, dtype=W.dtype), -np.ones((1, m), W.dtype)], axis=0)
            appended = Block(Wr, np.full((m,), f0, W.dtype), None, False)
    return assemble(bl if appended is None else [*bl, appended])  # the read-out block, if any, last


# ----------------------------------------------------------------------------------
# Output SNR
# ----------------------------------------------------------------------------------


def output_snr(
    net: layers.Layer,
    params,
    x: Array,
    *,
    noise,
    key: Array,
    n_realizations: int = 256,
    **mc_kwargs,
) -> Array:
    """Output SNR ``Σ mean² / Σ var`` over a batch of inputs and all outputs.

    ``mean`` and ``var`` are taken over ``n`` = ``n_realizations`` noise realizations
    (:func:`noisejax.simulate.monte_carlo`) for each input of ``x`` ``(B, *in_shape)``
    and each output neuron; the ratio of their sums is the paper's per-neuron
    ``mean²/var`` pooled over neurons and inputs, with ``Σ mean²`` estimated without
    bias as ``Σ (m̂² − v̂/n)``.  Compare two networks with the same ``x``:
    ``output_snr(mitigated) / output_snr(plain)`` is the SNR gain.
    """
    x = jnp.asarray(x)
    res = _simulate.monte_carlo(
        lambda k: layers.apply_batch(net, params, x, key=k, noise=noise), key, n_realizations, **mc_kwargs
    )
    return _snr.layer_snr(res.mean, res.var, count=res.count)
