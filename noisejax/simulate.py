"""Monte Carlo engine: streamed, sharded, and bitwise reproducible.

:func:`monte_carlo` evaluates ``fn(key_i)`` for realizations ``i = 0 .. n-1`` with
``key_i = fold_in(key, i)`` and returns per-leaf mean, variance, standard error
and SNR, without ever holding more than one *tile* of realizations in memory.

How the result is made independent of chunk size and device count
------------------------------------------------------------------
Floating-point results depend on the order of additions and, for matrix
products, on the shapes the backend sees.  The engine therefore fixes both:

* **Tiles.**  Realizations ``[jT, (j+1)T)`` (``T = tile_size``) are always computed
  together by one ``vmap`` of ``fn`` of width ``T`` — the same shapes whatever the
  chunk size or device count — and reduced to tile statistics (count, mean, sum
  of squared deviations) in one pass over the tile's rows, in order, of sums of the
  values shifted by the tile's first row (no cancellation for large means).
  Chunks are whole numbers of tiles, so every tile is reduced exactly once; only
  the last tile of a run is partial (masked), and it is the same in any chunking.
* **Streams.**  Tile ``j`` is merged (Chan et al.'s parallel formula) into the
  accumulator of stream ``j mod streams``, tiles in increasing order.  The
  ``streams`` accumulators are spread over the devices with :func:`jax.shard_map`
  on a 1-D :class:`jax.sharding.Mesh`; no communication happens until the end,
  when they are gathered and merged in a fixed pairwise tree on one device.
* **Pinned rounding.**  Optimization barriers isolate the tile computation and
  keep XLA from contracting products and sums of the merge into FMAs in some
  compilation contexts and not others.

* **Compiled once per structure.**  ``fn`` is traced once per call; the arrays it
  closes over (weights, inputs, noise intensities) become arguments of the compiled
  chunk program, which is cached on the traced program, not on ``fn``'s identity.

Hence the same ``key`` gives bitwise the same statistics for any ``chunk_size``
and any device count that divides ``streams`` — also across processes after
``jax.distributed.initialize()``, since the program only uses ``jax.devices()``.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from noisejax import simulate
    >>> res = simulate.monte_carlo(lambda k: 3.0 + jax.random.normal(k, (2,)), jax.random.key(0), 10_000)
    >>> res.mean.round(1), res.var.round(1)
    (Array([3., 3.], dtype=float32), Array([1., 1.], dtype=float32))
"""

from __future__ import annotations

import collections
import functools
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from noisejax import _struct as struct
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from noisejax import _validate
from noisejax import snr as _snr
from noisejax.errors import InvalidArgumentError

__all__ = ["MCResult", "Welford", "monte_carlo", "realization_keys", "merge", "finalize"]

PyTree = Any
_AXIS = "streams"
# Compiled chunk programs, keyed by the *program* of the realization function (its
# jaxpr, with the arrays it closes over lifted to arguments) and the static
# configuration: calling monte_carlo again with a new closure of the same structure
# (other weights, inputs or noise intensities of the same shapes) skips compilation.
_CHUNK_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_CHUNK_CACHE_SIZE = 32
# Tile statistics: rows of the tile handled per scan step (small outputs are unrolled
# so that one step touches about _ROW_BLOCK elements).
_ROW_BLOCK = 4096
_MAX_UNROLL = 64


# ----------------------------------------------------------------------------------
# Streaming statistics
# ----------------------------------------------------------------------------------


@struct.dataclass
class Welford:
    """Running count, mean and sum of squared deviations (``m2``) per leaf."""

    count: jax.Array
    mean: PyTree
    m2: PyTree


@struct.dataclass
class MCResult(_snr.Statistics):
    """Statistics over realizations, one entry per leaf of ``fn``'s output.

    Attributes:
      count: number of realizations ``n``.
      mean: sample mean, same pytree structure/shapes as ``fn(key)``.
      var: unbiased sample variance ``Σ(x - x̄)² / (n - 1)``.

    Derived: ``std``, ``stderr`` (``√(var/n)``), ``snr`` (``mean² / var``), ``snr_db``
    (per output) and ``layer_snr_db`` (``10·log10(Σ mean² / Σ var)``, one number per
    leaf) — the definitions of :mod:`noisejax.snr`.
    """

    count: jax.Array
    mean: PyTree
    var: PyTree

    @property
    def stderr(self) -> PyTree:
        return jax.tree_util.tree_map(lambda v: jnp.sqrt(v / self.count), self.var)


def _tile_stats(x: PyTree, valid: jax.Array) -> Welford:
    """Statistics of the valid rows of a tile (leading axis): one fused pass, fixed order.

    Each leaf is reduced by a sequential scan over the tile's rows (a column
    reduction over the leading axis, which XLA's CPU reduce emitter handles poorly,
    becomes one vectorized add per row) of the *shifted* values ``d = x - x₀``
    (``x₀``: the tile's first row, always a valid one): ``s = Σ d``, ``q = Σ d²``;
    then ``mean = x₀ + s/n`` and ``m2 = q - s·(s/n)``.  The shift keeps the sums at
    the scale of the spread, so the one-pass formula does not cancel catastrophically
    (a large mean costs nothing).  Rows are added in increasing order: the result
    depends only on the tile's values.
    """
    count = jnp.sum(valid.astype(jnp.int32), dtype=jnp.int32)
    leaves, treedef = jax.tree_util.tree_flatten(x)
    rows = valid.shape[0]
    shifts = [v[0] for v in leaves]
    size = sum(int(math.prod(v.shape[1:])) for v in leaves)
    unroll = max(1, min(rows, _ROW_BLOCK // max(size, 1), _MAX_UNROLL))

    def body(carry, xs):
        ok, row = xs
        out = []
        for (s, q), r, x0 in zip(carry, row, shifts):
            d = jnp.where(ok, r - x0, 0)
            out.append((s + d, q + d * d))
        return out, None

    zeros = [(jnp.zeros_like(x0), jnp.zeros_like(x0)) for x0 in shifts]
    sums, _ = lax.scan(body, zeros, (valid, leaves), unroll=unroll)
    mean, m2 = [], []
    for (s, q), x0 in zip(sums, shifts):
        # explicit reciprocal and barriers: the same rounding in every program
        inv = lax.optimization_barrier(1.0 / jnp.maximum(count, 1).astype(x0.dtype))
        ds = lax.optimization_barrier(s * inv)
        mean.append(x0 + ds)
        m2.append(jnp.maximum(q - lax.optimization_barrier(s * ds), 0))
    return Welford(count, jax.tree_util.tree_unflatten(treedef, mean), jax.tree_util.tree_unflatten(treedef, m2))


def _map_pairs(f, *trees):
    """Map ``f`` returning a pair over leaves; return two trees (safe for tuple-valued trees)."""
    leaves = [jax.tree_util.tree_leaves(t) for t in trees]
    treedef = jax.tree_util.tree_structure(trees[0])
    out = [f(*args) for args in zip(*leaves)]
    return (
        jax.tree_util.tree_unflatten(treedef, [o[0] for o in out]),
        jax.tree_util.tree_unflatten(treedef, [o[1] for o in out]),
    )


def merge(a: Welford, b: Welford) -> Welford:
    """Chan et al.'s parallel merge of two accumulators (elementwise over leaves).

    ``mean = m_a + δ·n_b/n``, ``m2 = m2_a + m2_b + δ²·n_a n_b/n`` with ``δ = m_b - m_a``.
    Barriers pin the rounding (no FMA contraction), so the same inputs give the
    same bits in any program.
    """
    n = a.count + b.count
    bar = lax.optimization_barrier

    def one(ma, m2a, mb, m2b):
        shape = a.count.shape + (1,) * (ma.ndim - a.count.ndim)
        na = a.count.astype(ma.dtype).reshape(shape)
        nb = b.count.astype(ma.dtype).reshape(shape)
        inv = bar(1.0 / jnp.maximum(na + nb, 1))
        delta = mb - ma
        mean = ma + bar(delta * bar(nb * inv))
        m2 = (m2a + m2b) + bar(bar(jnp.square(delta)) * bar(bar(na * nb) * inv))
        return mean, m2

    mean, m2 = _map_pairs(one, a.mean, a.m2, b.mean, b.m2)
    return Welford(n, mean, m2)


def _tree_reduce_axis0(state: Welford) -> Welford:
    """Merge accumulators stacked on axis 0 in a fixed pairwise tree ((0,1), (2,3), ...)."""
    while state.count.shape[0] > 1:
        k = state.count.shape[0]
        even = jax.tree_util.tree_map(lambda x: x[0 : k - k % 2 : 2], state)
        odd = jax.tree_util.tree_map(lambda x: x[1 : k - k % 2 : 2], state)
        merged = merge(even, odd)
        if k % 2:
            rest = jax.tree_util.tree_map(lambda x: x[k - 1 :], state)
            merged = jax.tree_util.tree_map(lambda m, r: jnp.concatenate([m, r]), merged, rest)
        state = merged
    return jax.tree_util.tree_map(lambda x: x[0], state)


def finalize(state: Welford) -> MCResult:
    """Turn an accumulator (no stacked axes) into an :class:`MCResult`."""
    var = jax.tree_util.tree_map(lambda m2: m2 / jnp.maximum(state.count - 1, 1).astype(m2.dtype), state.m2)
    return MCResult(state.count, state.mean, var)


# ----------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------


def realization_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
    """``fold_in(key, i)`` for every index (vectorized)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def _key_data(keys):
    """``(raw key data, impl)`` of a key array, what crosses ``shard_map`` (plain ``uint32`` keys: ``impl`` None)."""
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(keys), jax.random.key_impl(keys)
    return keys, None


def _wrap_keys(data, impl):
    """The inverse of :func:`_key_data`."""
    return data if impl is None else jax.random.wrap_key_data(data, impl=impl)


# ----------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------


def _shard_map(f, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older jax

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _build_chunk_fn(fn, rebuild_key, *, tile, streams, rounds, mesh):
    """Compile-once function ``(state, consts, key_data, start, stop) -> state`` for one chunk.

    ``fn(consts, key)`` is one realization; ``consts`` (the arrays the user's function
    closes over) are arguments, replicated over the devices.

    ``start`` is a multiple of ``tile`` (chunks are whole tiles); each stream
    processes at most ``rounds`` of the chunk's tiles, in increasing order.
    """
    n_dev = mesh.devices.size
    local_streams = streams // n_dev

    def tile_values(consts, key_data, j):
        base = j * tile
        idx = (base + jnp.arange(tile, dtype=jnp.uint32)).astype(jnp.uint32)
        key = rebuild_key(key_data)
        return jax.vmap(lambda i: fn(consts, jax.random.fold_in(key, i)))(idx)

    def update_with_tile(acc, consts, key_data, j, start, stop):
        # Barriers isolate the tile's computation from the program around it, so XLA
        # fuses (and rounds) it the same way whatever the chunk size or device count.
        consts, key_data, j = lax.optimization_barrier((consts, key_data, j))
        vals = lax.optimization_barrier(tile_values(consts, key_data, j))
        idx = j * tile + jnp.arange(tile, dtype=jnp.uint32)
        valid = (idx >= start) & (idx < stop)
        stats = lax.optimization_barrier(_tile_stats(vals, valid))
        return merge(acc, stats)

    def local(state, dev_ids, consts, key_data, start, stop):
        # The device index arrives as data (not lax.axis_index) so that a 1-device run
        # cannot constant-fold it and compile the tile differently from a sharded run.
        dev = dev_ids[0]
        first_tile = start // jnp.uint32(tile)

        def per_stream(carry, xs):
            acc, s_loc = xs
            stream = dev.astype(jnp.uint32) * local_streams + s_loc
            # the first tile of this chunk that belongs to this stream
            offset = (stream + jnp.uint32(streams) - first_tile % jnp.uint32(streams)) % jnp.uint32(streams)

            def per_round(a, q):
                j = first_tile + offset + q * jnp.uint32(streams)
                lo, hi = j * tile, (j + 1) * tile
                needed = (hi > start) & (lo < stop)
                a = lax.cond(needed, lambda a_: update_with_tile(a_, consts, key_data, j, start, stop), lambda a_: a_, a)
                return a, None

            acc, _ = lax.scan(per_round, acc, jnp.arange(rounds, dtype=jnp.uint32))
            return carry, acc

        _, new = lax.scan(per_stream, None, (state, jnp.arange(local_streams, dtype=jnp.uint32)))
        return new

    spec_state = P(_AXIS)
    sharded = _shard_map(local, mesh, in_specs=(spec_state, spec_state, P(), P(), P(), P()), out_specs=spec_state)
    compiled = jax.jit(sharded, donate_argnums=0)
    dev_ids = jax.device_put(np.arange(n_dev, dtype=np.uint32), NamedSharding(mesh, spec_state))
    return lambda state, consts, key_data, start, stop: compiled(state, dev_ids, consts, key_data, start, stop)


def _trace(fn, key):
    """Trace one realization: ``(flat_fn, consts, out_struct, program)``.

    ``flat_fn(consts, key)`` evaluates ``fn``'s jaxpr with the arrays it closes over
    (``consts``: weights, inputs, noise intensities) as arguments; ``program`` is a
    hashable description of everything else (the jaxpr's text, the constants' shapes
    and dtypes, the output structure), the key of the compilation cache.
    """
    closed, out_struct = jax.make_jaxpr(fn, return_shape=True)(key)
    out_tree = jax.tree_util.tree_structure(out_struct)
    jaxpr = closed.jaxpr
    consts = list(closed.consts)

    def flat_fn(consts, key):
        return jax.tree_util.tree_unflatten(out_tree, jax.core.eval_jaxpr(jaxpr, consts, key))

    avals = tuple((tuple(np.shape(c)), str(getattr(c, "dtype", type(c))), bool(getattr(c, "weak_type", False))) for c in consts)
    return flat_fn, consts, out_struct, (str(jaxpr), avals, out_tree)


def _empty_state(out_struct, streams, sharding) -> Welford:
    for s in jax.tree_util.tree_leaves(out_struct):
        if not jnp.issubdtype(s.dtype, jnp.inexact):
            raise InvalidArgumentError(f"fn must return floating-point arrays, got dtype {s.dtype}")
    leaves, treedef = jax.tree_util.tree_flatten(out_struct)
    return _zeros_builder(treedef, tuple((tuple(s.shape), jnp.dtype(s.dtype)) for s in leaves), streams, sharding)()


@functools.lru_cache(maxsize=64)
def _zeros_builder(treedef, specs, streams, sharding):
    """A compiled zero-state constructor, built once per output structure and sharding."""

    def make():
        zeros = [jnp.zeros((streams,) + shape, dtype) for shape, dtype in specs]
        return Welford(
            jnp.zeros((streams,), jnp.int32),
            jax.tree_util.tree_unflatten(treedef, zeros),
            jax.tree_util.tree_unflatten(treedef, [jnp.zeros_like(z) for z in zeros]),
        )

    return jax.jit(make, out_shardings=sharding)


def monte_carlo(
    fn: Callable[[jax.Array], PyTree],
    key: jax.Array,
    n_realizations: int,
    *,
    chunk_size: Optional[int] = None,
    tile_size: int = 64,
    streams: int = 8,
    devices: Optional[Sequence[jax.Device]] = None,
    progress: bool = False,
    description: str = "realizations",
    check_finite: bool = False,
    precision_check: bool = True,
) -> MCResult:
    """Streaming Monte Carlo statistics of ``fn(fold_in(key, i))``, ``i < n_realizations``.

    Args:
      fn: one realization, ``fn(key) -> pytree`` of floating arrays (e.g. a noisy
        forward pass over a batch of inputs).  Traced once.
      key: base PRNG key (typed ``jax.random.key`` or legacy ``PRNGKey``).
      n_realizations: ``n >= 2``.
      chunk_size: realizations per compiled call (progress-bar granularity),
        rounded up to whole tiles.  Default: ``4 * tile_size * streams``.  Results
        do not depend on it.
      tile_size: realizations vmapped together (the unit of computation and of
        peak memory; larger on accelerators, e.g. 1024-4096).  Results are bitwise
        reproducible for a fixed ``tile_size``.
      streams: independent accumulator sets spread over devices; the number of
        devices must divide it.
      devices: devices to shard over (default: ``jax.devices()``, all hosts).
      progress: show a tqdm progress bar.
      check_finite: debug mode; raise :class:`noisejax.errors.NonFiniteError` naming
        the first output leaf (e.g. the first layer of ``return_layers`` outputs)
        whose statistics contain NaN or inf.
      precision_check: warn (:class:`noisejax.errors.PrecisionWarning`) for output leaves
        whose mean or variance float32 accumulation may shift by more than one standard
        error (large ``|mean|/std`` and many realizations; bounds in ``docs/precision.md``).

    Returns:
      :class:`MCResult` with ``count``, ``mean``, ``var`` (and ``stderr``, ``snr``...).

    Memory is ``O(streams · |output| + tile · |activations|)`` per device,
    independent of ``n_realizations``.
    """
    n = _validate.check_int("n_realizations", n_realizations, minimum=2)
    if n >= 2**31:  # the realization count is accumulated in int32
        raise InvalidArgumentError(f"n_realizations must be < 2**31, got {n}")
    tile = _validate.check_int("tile_size", tile_size, minimum=1)
    streams = _validate.check_int("streams", streams, minimum=1)
    devices = list(jax.devices() if devices is None else devices)
    if streams % len(devices):
        raise InvalidArgumentError(f"streams ({streams}) must be a multiple of the device count ({len(devices)})")
    if chunk_size is None:
        chunk_size = 4 * tile * streams
    chunk = _validate.check_int("chunk_size", chunk_size, minimum=1)
    # whole tiles, and no more than the run needs
    tiles_per_chunk = min(-(-chunk // tile), -(-n // tile))
    chunk = tiles_per_chunk * tile
    rounds = -(-tiles_per_chunk // streams)  # tiles per stream per chunk, at most

    if not callable(fn):
        raise InvalidArgumentError("fn must be callable: fn(key) -> pytree of arrays")
    key_data, impl = _key_data(key)
    rebuild = functools.partial(_wrap_keys, impl=impl)
    flat_fn, consts, out_struct, program = _trace(fn, rebuild(key_data))

    mesh = Mesh(np.asarray(devices), (_AXIS,))
    state_sharding = NamedSharding(mesh, P(_AXIS))
    state = _empty_state(out_struct, streams, state_sharding)
    consts = jax.device_put(consts, NamedSharding(mesh, P()))
    chunk_fn = _chunk_program((program, str(key.dtype), tile, streams, rounds, tuple(devices)),
                              lambda: _build_chunk_fn(flat_fn, rebuild, tile=tile, streams=streams, rounds=rounds, mesh=mesh))

    # compiled before the chunks are dispatched, so that compiling it does not overlap the computation
    finalize_fn = _finalizer(*_structure(state))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=description, unit="real", leave=False)
    try:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            state = chunk_fn(state, consts, key_data, np.uint32(start), np.uint32(stop))  # NumPy: nothing to compile
            if bar is not None:
                jax.block_until_ready(state.count)
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()
    result = _finalize_sharded(state, mesh, finalize_fn)
    if check_finite:
        _raise_if_nonfinite(result)
    if precision_check:  # float32 accumulation limits (noisejax._precision, docs/precision.md)
        from noisejax import _precision
        from noisejax.errors import PrecisionWarning

        for message in _precision.check_result(result, n, tile, streams):
            warnings.warn(message, PrecisionWarning, stacklevel=2)
    return result


def _chunk_program(cache_key, build: Callable[[], Any]):
    """The compiled chunk program for ``cache_key`` (the traced program and the static setup), built on a miss."""
    chunk_fn = _CHUNK_CACHE.get(cache_key)
    if chunk_fn is None:
        chunk_fn = _CHUNK_CACHE[cache_key] = build()
        while len(_CHUNK_CACHE) > _CHUNK_CACHE_SIZE:
            _CHUNK_CACHE.popitem(last=False)
    else:
        _CHUNK_CACHE.move_to_end(cache_key)
    return chunk_fn


def _raise_if_nonfinite(result: MCResult) -> None:
    from noisejax.errors import NonFiniteError

    paths = jax.tree_util.tree_flatten_with_path(result.mean)[0]
    variances = jax.tree_util.tree_leaves(result.var)
    for (path, mean), var in zip(paths, variances):
        bad = ~(np.isfinite(np.asarray(mean)) & np.isfinite(np.asarray(var)))
        if bad.any():
            where = jax.tree_util.keystr(path) or "<output>"
            raise NonFiniteError(
                f"Monte Carlo statistics are not finite first at output leaf {where} "
                f"({int(bad.sum())} of {bad.size} entries); check noise intensities and inputs"
            )


def _finalize_sharded(state: Welford, mesh: Mesh, finalize_fn) -> MCResult:
    """Gather the accumulators (small: streams × output) and merge them on one device.

    The merge runs on a single device with a fixed program, so its rounding is the
    same whatever the number of devices that produced the accumulators.
    """
    if mesh.devices.size > 1:
        state = _replicator(NamedSharding(mesh, P()))(state)
    local = jax.tree_util.tree_map(lambda x: jax.device_put(x.addressable_data(0), jax.local_devices()[0]), state)
    return finalize_fn(local)


def _structure(state: Welford):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


@functools.lru_cache(maxsize=64)
def _finalizer(treedef, specs):
    """``_finalize_local`` compiled for accumulators of this structure on the first local device."""
    device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    abstract = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in specs])
    return _finalize_local.lower(abstract).compile()


@functools.lru_cache(maxsize=16)
def _replicator(sharding):
    return jax.jit(lambda s: s, out_shardings=sharding)


@jax.jit
def _finalize_local(state: Welford) -> MCResult:
    return finalize(_tree_reduce_axis0(state))
