"""Gaussian states: the mean and the noise covariance of one array, as loadings on latent sources.

The analytic interpretation of :mod:`noisejax.interpret` gives every noisy value
of a program a :class:`Gaussian` state: its mean, and its noise as a sum of
*blocks*, each the loading of the value's features on a set of independent,
unit-variance latent noise sources::

    x = mean + Σ_blocks L_b ξ_b,     Cov(x) = Σ_b L_b L_bᵀ

A block is identified by a static source id ``sid``: two values that carry a
block with the same ``sid`` share those sources, so their cross-covariance
``Σ_b L_b(x) L_b(y)ᵀ`` is kept exactly — a residual ``x + f(x)``, an attention
``q kᵀ`` of two projections of the same noisy input, a convolution kernel's
noise shared by all positions.  Three storage forms:

* :class:`Diag` — one source per feature: ``L = diag(scale)`` (after layout
  operations, feature ``f`` loads on source ``src[f]``).  Independent noise
  (uncorrelated neuron noise, weight noise entries, the non-Gaussian residue of
  an activation) stays in this form until a mixing linear map (a matrix
  product, a convolution, a sum) turns it into columns.
* :class:`Dense` — explicit columns ``cols`` of shape ``(*shape, k)``.
* :class:`Channel` — loadings confined to one channel: source ``(c, q)`` loads only on
  the features of channel ``c`` (a convolution kernel's noise: each output channel has
  its own kernel entries, shared by all positions), stored as ``(*shape, r)``.
* :class:`Lazy` — ``diag(left) · A · diag(right)`` with a matrix ``A`` shared by
  all examples of a batch (a Dense layer's ``Wᵀ``), multiplied out only when the
  next mixing map needs it.

Everything here is trace-time Python over jax arrays: a state never crosses a
``jit``/``vmap`` boundary, only its arrays do.

Example::

    >>> g = Gaussian(jnp.zeros(3), (Diag(fresh(), jnp.ones(3)),))
    >>> variance(g)
    Array([1., 1., 1.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Any, Callable, Iterable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Diag",
    "Dense",
    "Lazy",
    "Channel",
    "Gaussian",
    "fresh",
    "square_sid",
    "variance",
    "block_variance",
    "to_dense",
    "scale",
    "add",
    "merge",
    "map_linear",
    "layout_diag",
    "cross",
    "compact",
    "sids",
    "as_gaussian",
    "with_blocks",
]

Array = jax.Array
_SIDS = itertools.count(1)


def fresh() -> int:
    """A new source id."""
    return next(_SIDS)


_SQUARES: dict = {}
_SQUARES_LOCK = threading.Lock()


def is_square_sid(sid: int) -> bool:
    """Whether ``sid`` names second-order sources ``η = (ξ² − 1)/√2`` (non-Gaussian)."""
    return sid in _SQUARE_OF


_SQUARE_OF: dict = {}


def square_sid(sid: int) -> int:
    """The id of the sources ``η_r = (ξ_r² − 1)/√2`` of the sources ``ξ_r`` of block ``sid`` (the same everywhere)."""
    with _SQUARES_LOCK:  # one id per block, also when analyses run in threads
        if sid not in _SQUARES:
            _SQUARES[sid] = fresh()
            _SQUARE_OF[_SQUARES[sid]] = sid
        return _SQUARES[sid]


@dataclasses.dataclass(frozen=True, eq=False)
class Diag:
    """One independent source per feature: feature ``f`` loads ``scale[f]`` on source ``src[f]``.

    ``src`` is a static int array of the value's shape (``-1``: no source) or ``None``
    for the identity (source = flat feature index); ``n`` is the number of sources.
    """

    sid: int
    scale: Array
    src: Optional[np.ndarray] = None
    n: int = -1

    def __post_init__(self):
        if self.n < 0:
            object.__setattr__(self, "n", int(np.prod(np.shape(self.scale))) if self.src is None else int(self.src.max()) + 1)


@dataclasses.dataclass(frozen=True, eq=False)
class Dense:
    """Explicit loadings ``cols`` of shape ``(*shape, k)`` on ``k`` sources."""

    sid: int
    cols: Array


@dataclasses.dataclass(frozen=True, eq=False)
class Lazy:
    """Loadings ``diag(left) A diag(right)``: ``left`` has the value's shape (size ``m``), ``a`` is
    ``(m, n)`` and shared by the examples of a batch, ``right`` is ``(n,)`` (one entry per source)."""

    sid: int
    left: Array
    a: Array
    right: Array


@dataclasses.dataclass(frozen=True, eq=False)
class Channel:
    """Per-channel loadings ``u`` of shape ``(*shape, r)``: source ``(c, q)`` (``c``-major) loads
    ``u[..., q]`` on the features whose index along ``axis`` is ``c`` and nothing elsewhere."""

    sid: int
    u: Array
    axis: int


Block = Union[Diag, Dense, Lazy, Channel]


@dataclasses.dataclass(frozen=True, eq=False)
class Gaussian:
    """Mean and blocks of one noisy array (see the module doc)."""

    mean: Array
    blocks: tuple = ()

    @property
    def shape(self):
        return self.mean.shape

    @property
    def dtype(self):
        return self.mean.dtype


def as_gaussian(x: Any) -> Gaussian:
    return x if isinstance(x, Gaussian) else Gaussian(jnp.asarray(x), ())


def with_blocks(g: Gaussian, blocks: Iterable[Block], mean: Optional[Array] = None) -> Gaussian:
    return Gaussian(g.mean if mean is None else mean, tuple(blocks))


def sids(g: Any) -> set:
    return {b.sid for b in g.blocks} if isinstance(g, Gaussian) else set()


# ----------------------------------------------------------------------------------
# Variances and dense forms
# ----------------------------------------------------------------------------------


def block_variance(b: Block, shape) -> Array:
    """Per-feature variance contributed by one block."""
    if isinstance(b, Diag):
        return jnp.square(b.scale)
    if isinstance(b, (Dense, Channel)):
        return jnp.sum(jnp.square(b.cols if isinstance(b, Dense) else b.u), axis=-1)
    v = jnp.einsum("mn,n->m", jnp.square(b.a), jnp.square(b.right))
    return jnp.square(b.left) * v.reshape(b.left.shape)


def variance(g: Any) -> Array:
    """Per-feature noise variance ``diag Cov(x)``."""
    g = as_gaussian(g)
    v = jnp.zeros(g.shape, g.dtype)
    for b in g.blocks:
        v = v + block_variance(b, g.shape)
    return v


def _identity_src(shape) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)


def to_dense(b: Block, shape) -> Dense:
    """The block as explicit columns ``(*shape, n_sources)``."""
    if isinstance(b, Dense):
        return b
    if isinstance(b, Channel):
        n_ch, r = shape[b.axis], b.u.shape[-1]
        sel = jnp.eye(n_ch, dtype=b.u.dtype).reshape((1,) * b.axis + (n_ch,) + (1,) * (len(shape) - b.axis - 1) + (n_ch,))
        cols = sel[..., :, None] * b.u[..., None, :]  # (*shape, C, r)
        return Dense(b.sid, cols.reshape(tuple(shape) + (n_ch * r,)))
    if isinstance(b, Lazy):
        cols = b.left.reshape(-1)[:, None] * b.a * b.right[None, :]
        return Dense(b.sid, cols.reshape(tuple(shape) + (b.a.shape[1],)))
    if b.src is None:  # iota-built identity: no (n, n) constant in the program
        cols = b.scale.reshape(-1)[:, None] * jnp.eye(b.n, dtype=b.scale.dtype)
        return Dense(b.sid, cols.reshape(tuple(shape) + (b.n,)))
    onehot = jnp.asarray(b.src, jnp.int32)[..., None] == jnp.arange(b.n, dtype=jnp.int32)
    return Dense(b.sid, jnp.where(onehot, b.scale[..., None], jnp.zeros((), b.scale.dtype)))


# ----------------------------------------------------------------------------------
# Elementwise scaling and addition
# ----------------------------------------------------------------------------------


def _scale_block(b: Block, s: Array, shape) -> Block:
    if isinstance(b, Diag):
        return Diag(b.sid, b.scale * s, b.src, b.n)
    if isinstance(b, Dense):
        return Dense(b.sid, b.cols * jnp.broadcast_to(s, shape)[..., None])
    if isinstance(b, Channel):
        return Channel(b.sid, b.u * jnp.broadcast_to(s, shape)[..., None], b.axis)
    return Lazy(b.sid, b.left * jnp.broadcast_to(s, shape).reshape(b.left.shape), b.a, b.right)


def scale(g: Gaussian, s: Any, mean: Optional[Array] = None) -> Gaussian:
    """``s ∘ x`` for a constant ``s`` broadcastable to ``x``'s shape (the mean becomes ``mean`` if given)."""
    s = jnp.asarray(s, g.dtype)
    return Gaussian(g.mean * s if mean is None else mean, tuple(_scale_block(b, s, g.shape) for b in g.blocks))


def _same_src(a: Diag, b: Diag) -> bool:
    if a.n != b.n:
        return False
    if a.src is None and b.src is None:
        return True
    sa = a.src if a.src is not None else None
    sb = b.src if b.src is not None else None
    if sa is None:
        sa = _identity_src(np.shape(a.scale))
    if sb is None:
        sb = _identity_src(np.shape(b.scale))
    return sa.shape == sb.shape and bool(np.array_equal(sa, sb))


def _combine(a: Block, b: Block, shape) -> Block:
    """Sum of two blocks with the same sources."""
    if isinstance(a, Diag) and isinstance(b, Diag) and _same_src(a, b):
        return Diag(a.sid, a.scale + b.scale, a.src, a.n)
    if isinstance(a, Channel) and isinstance(b, Channel) and a.axis == b.axis and a.u.shape == b.u.shape:
        return Channel(a.sid, a.u + b.u, a.axis)
    if isinstance(a, Lazy) and isinstance(b, Lazy) and a.a is b.a and a.right is b.right:
        return Lazy(a.sid, a.left + b.left, a.a, a.right)
    da, db = to_dense(a, shape), to_dense(b, shape)
    return Dense(a.sid, da.cols + db.cols)


def merge(blocks: Iterable[Block], shape) -> tuple:
    """Blocks with equal ``sid`` summed (their sources are the same)."""
    out: dict = {}
    for b in blocks:
        out[b.sid] = _combine(out[b.sid], b, shape) if b.sid in out else b
    return tuple(out.values())


def add(a: Any, b: Any, mean: Optional[Array] = None) -> Gaussian:
    """``a + b`` of two states (or a state and a constant) of the same shape."""
    ga, gb = as_gaussian(a), as_gaussian(b)
    m = ga.mean + gb.mean if mean is None else mean
    return Gaussian(m, merge(ga.blocks + gb.blocks, m.shape))


# ----------------------------------------------------------------------------------
# Linear maps
# ----------------------------------------------------------------------------------


def map_linear(
    g: Gaussian,
    lin: Callable[[Array], Array],
    mean: Array,
    *,
    mode: str,
    layout: Optional[tuple] = None,
    lin_sq: Optional[Callable[[Array], Array]] = None,
) -> Gaussian:
    """Push the noise of ``x`` through a linear map ``lin`` (no offset); the new mean is given.

    ``layout = (on_src, on_scale)``, when given, applies the same map to an int
    array of ``x``'s shape (``-1`` where nothing lands) and to a float one, and the
    map only moves, drops or zero-pads features: ``Diag`` blocks then stay
    diagonal.  Otherwise a ``Diag`` block becomes columns (``mode="factored"``) or,
    in ``"lowrank"`` mode, a new independent ``Diag`` with variance
    ``lin_sq(scale²)`` (``lin`` with squared coefficients; the covariance the map
    creates between features is dropped).
    """
    out_shape = mean.shape
    blocks = []
    for b in g.blocks:
        if isinstance(b, Diag) and layout is not None:
            nb = layout_diag(b, layout[0], layout[1], g.shape)
            if nb is not None:
                blocks.append(nb)
                continue
        if isinstance(b, Diag) and mode == "lowrank":
            if lin_sq is not None:
                v = lin_sq(jnp.square(b.scale))
            else:
                v = jnp.sum(jnp.square(_map_cols(to_dense(b, g.shape).cols, lin)), axis=-1)
            blocks.append(Diag(fresh(), _safe_sqrt(v)))
            continue
        d = to_dense(b, g.shape)
        blocks.append(Dense(b.sid, _map_cols(d.cols, lin)))
    return Gaussian(mean, merge(blocks, out_shape))


def _map_cols(cols: Array, lin: Callable[[Array], Array]) -> Array:
    return jax.vmap(lin, in_axes=-1, out_axes=-1)(cols)


def layout_diag(b: Diag, on_src: Callable, on_scale: Callable, shape) -> Optional[Diag]:
    """A layout map of a diagonal block, or None if the map duplicates a source or is not static."""
    src = _identity_src(shape) if b.src is None else b.src
    try:
        with jax.ensure_compile_time_eval():
            new_src = np.asarray(on_src(jnp.asarray(src, jnp.int32)))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return None
    valid = new_src[new_src >= 0]
    if valid.size != np.unique(valid).size:
        return None
    scale = on_scale(b.scale)
    flat = new_src.reshape(-1)
    if flat.size == b.n and np.array_equal(flat, np.arange(b.n)):
        return Diag(b.sid, scale, None, b.n)
    return Diag(b.sid, scale, new_src.astype(np.int64), b.n)


def _safe_sqrt(x: Array) -> Array:
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


# ----------------------------------------------------------------------------------
# Covariances between states
# ----------------------------------------------------------------------------------


def cross(a: Any, b: Any) -> Array:
    """Elementwise covariance ``Cov(a_f, b_f)`` of two states of the same shape."""
    ga, gb = as_gaussian(a), as_gaussian(b)
    shape = ga.shape
    out = jnp.zeros(shape, ga.dtype)
    bb = {blk.sid: blk for blk in gb.blocks}
    for x in ga.blocks:
        y = bb.get(x.sid)
        if y is None:
            continue
        if isinstance(x, Diag) and isinstance(y, Diag):
            sx = _identity_src(shape) if x.src is None else x.src
            sy = _identity_src(shape) if y.src is None else y.src
            out = out + x.scale * y.scale * jnp.asarray((sx == sy) & (sx >= 0), ga.dtype)
        else:
            out = out + jnp.sum(to_dense(x, shape).cols * to_dense(y, shape).cols, axis=-1)
    return out


# ----------------------------------------------------------------------------------
# Compaction
# ----------------------------------------------------------------------------------


def compact(g: Gaussian, live: set) -> Gaussian:
    """Merge blocks whose sources no other live value carries.

    Exact: the identity ``Diag`` blocks become one (independent per-feature sources
    that nothing else references can be summed: their variances add), and the
    ``Dense`` blocks one (their columns side by side); new ``sid``s name them.
    """
    diag = [b for b in g.blocks if isinstance(b, Diag) and b.src is None and b.sid not in live]
    dense = [b for b in g.blocks if isinstance(b, Dense) and b.sid not in live]
    if len(diag) < 2 and len(dense) < 2:
        return g
    rest = [b for b in g.blocks if b not in diag and b not in dense]
    if len(diag) >= 2:
        rest.append(Diag(fresh(), _safe_sqrt(sum(jnp.square(b.scale) for b in diag))))
    else:
        rest += diag
    if len(dense) >= 2:
        rest.append(Dense(fresh(), jnp.concatenate([b.cols for b in dense], axis=-1)))
    else:
        rest += dense
    return Gaussian(g.mean, tuple(rest))
