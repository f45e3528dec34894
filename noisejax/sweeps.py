"""Accuracy-vs-WNR sweeps for noisy weights, grid searches and dB gains (no files, no plots).

* :func:`accuracy_sweep` — for each WNR point, ``R`` noise realizations and every
  estimator evaluated in **one compiled call** (the WNR is a traced argument, so the
  whole sweep compiles once).  Realization ``r`` uses ``fold_in(key, r)`` at every
  WNR point and for every estimator (common random numbers: the estimators see the
  same noisy weights, which makes their differences less noisy).
* :func:`grid_accuracies` — accuracy of every point of a vmappable estimator grid
  (e.g. :func:`noisejax.denoise.compensated_grid`) over ``R`` realizations, in one
  compiled call; :func:`select_grid` picks the point with the best mean accuracy.
* :func:`wnr_at_accuracy` / :func:`gain_db` — the WNR at which a curve reaches a
  target accuracy (linear interpolation between measured points) and the gain
  ``WNR_ML(target) − WNR_est(target)`` in dB.

Plots and report claims of these curves live at the edge, in :mod:`noisejax.study`
(:func:`noisejax.study.plots.plot_accuracy_curves`, :func:`noisejax.study.claims.gain_claims`).

Resumable sweeps: ``store=`` takes a point store, e.g.
``noisejax.study.files.PointStore(FOLDER)``: every finished WNR point is written
atomically to ``FOLDER/point-IIII.npz`` (temporary file + rename, SHA-256 of the
arrays, a fingerprint of everything the point depends on: data, clean weights,
estimators, WNR, key, ``R``).  A restarted sweep loads the points whose file is
intact and whose fingerprint matches, and recomputes the others (missing,
truncated, corrupted or computed for other inputs) — a killed sweep finishes with
bitwise the same result as an uninterrupted one.  ``logits_fn`` itself cannot be
fingerprinted: give each model function its own folder (or a ``store_key``).
This module itself writes no file: it only calls the store's ``bind`` and
``get_or_compute`` (any object with these two methods is a point store).

Example::

    >>> res = accuracy_sweep(f, variables, x, y, [0., 5., 10.], key=jax.random.key(0),
    ...                      n_realizations=20, estimators={"ml": denoise.ML()})
    >>> res["ml"].shape        # (W, R)
    (3, 20)
    >>> round(gain_db([0, 10], [0.2, 0.8], [0.4, 0.9], 0.6), 3)   # ML: 60 % at 6.667 dB, est: at 4 dB
    2.667
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from noisejax import _backend, _validate
from noisejax import noise as _noise
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.simulate import _key_data, _shard_map, _wrap_keys, realization_keys
from noisejax.train import accuracy

__all__ = [
    "accuracy_sweep",
    "grid_accuracies",
    "select_grid",
    "wnr_at_accuracy",
    "gain_db",
    "gains_table",
]

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]


def _realization_mesh(n_realizations: int):
    """A 1-D mesh of this process's devices for ``n_realizations`` realizations, or ``None`` (one device, or not divisible)."""
    devices = jax.local_devices()
    if len(devices) == 1 or n_realizations % len(devices):
        return None
    return Mesh(np.asarray(devices), ("realizations",))


def _over_realizations(local, mesh, n_args: int, keys_at: int, out_axis: int = 0):
    """``local`` (realizations on its argument ``keys_at``, raw key data) run side by side on ``mesh``'s devices.

    Each device runs ``local`` on its slice of the realizations (:func:`jax.shard_map`; the
    other arguments replicated): the same per-realization program as on one device, so
    the results do not depend on the device count.
    """
    if mesh is None:
        return local
    specs = tuple(P("realizations") if i == keys_at else P() for i in range(n_args))
    return _shard_map(local, mesh, in_specs=specs, out_specs=P(*([None] * out_axis), "realizations"))


@functools.lru_cache(maxsize=64)
def _sweep_point_fn(logits_fn, reference, scope, leaf_filter, batch_size, mesh, impl):
    """Compiled ``(variables, x, y, wnr, key_data, ests) -> (R, E)`` accuracies, cached per static setup."""

    def local(variables, x, y, wnr, key_data, ests):
        pw = _noise.noise_power(variables, wnr, reference=reference, scope=scope, leaf_filter=leaf_filter)

        def one(k):
            noisy = _noise.add_weight_noise(
                variables, wnr, key=k, reference=reference, scope=scope, leaf_filter=leaf_filter
            )
            return jnp.stack([accuracy(logits_fn(e(noisy, pw, wnr_db=wnr), x), y) for e in ests])

        return jax.lax.map(one, _wrap_keys(key_data, impl), batch_size=batch_size)

    return jax.jit(_over_realizations(local, mesh, 6, 4))


@functools.lru_cache(maxsize=64)
def _grid_point_fn(logits_fn, reference, scope, leaf_filter, grid_batch_size, mesh, impl, loop):
    """Compiled ``(variables, wnr, key_data, grid, arrays) -> {name: (G, R)}``, cached per static setup.

    ``loop``: the realizations one after the other (``lax.map``) instead of ``vmap`` — on the
    CPU for a model with convolutions (:func:`noisejax._backend.batched_kernels_slow`).
    """

    def local(variables, wnr, key_data, grid, arrays):
        pw = _noise.noise_power(variables, wnr, reference=reference, scope=scope, leaf_filter=leaf_filter)

        def one(k):
            noisy = _noise.add_weight_noise(
                variables, wnr, key=k, reference=reference, scope=scope, leaf_filter=leaf_filter
            )

            def score(e):
                den = e(noisy, pw, wnr_db=wnr)
                return {name: accuracy(logits_fn(den, x), y) for name, (x, y) in arrays.items()}

            return jax.lax.map(score, grid, batch_size=grid_batch_size)

        keys = _wrap_keys(key_data, impl)
        if loop:  # same per-realization program; (R, G) -> (G, R)
            return jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), jax.lax.map(one, keys))
        return jax.vmap(one, out_axes=1)(keys)  # (G, R) per dataset

    return jax.jit(_over_realizations(local, mesh, 5, 2, out_axis=1))


class _NoStore:
    """Computes every point (``store=None``)."""

    reused = 0

    def bind(self, identity, data=None):
        return self

    def get_or_compute(self, i, ident, compute, data=None):
        return {k: np.asarray(v) for k, v in compute().items()}, False


def _point_store(store: Any, identity: dict, data: Any):
    """The sweep's bound point store (``None``: every point is computed, nothing is kept)."""
    if store is None:
        return _NoStore()
    if isinstance(store, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"store={os.fspath(store)!r} is a folder: pass store=noisejax.study.files.PointStore({os.fspath(store)!r}) "
            "(the core of noisejax writes no file itself)"
        )
    if not (callable(getattr(store, "bind", None)) and callable(getattr(store, "get_or_compute", None))):
        raise InvalidArgumentError(
            f"store must be None or a point store such as noisejax.study.files.PointStore(folder), got {type(store).__name__}"
        )
    return store.bind(identity, data)


def _check_data(x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ShapeMismatchError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    return x, y


def accuracy_sweep(
    logits_fn: LogitsFn,
    variables: PyTree,
    x: Any,
    y: Any,
    wnr_db: Sequence[float],
    *,
    key: jax.Array,
    n_realizations: int,
    estimators: Mapping[str, Any],
    reference: str = "variance",
    scope: str = "global",
    leaf_filter=_noise.default_leaf_filter,
    batch_size: Optional[int] = None,
    progress: bool = False,
    store: Optional[Any] = None,
    store_key: Any = None,
    on_point: Optional[Callable[[int, bool], None]] = None,
) -> dict[str, np.ndarray]:
    """Accuracy of every estimator, shape ``(W, R)`` each, for WNRs ``wnr_db``.

    Args:
      logits_fn: ``f(variables, x) -> logits`` for a batch.
      variables: clean parameter pytree (noise goes to the leaves ``leaf_filter`` picks).
      x, y: evaluation data (the whole array is one batch).
      wnr_db: WNR points in dB.
      key: base key; realization ``r`` uses ``fold_in(key, r)``.
      n_realizations: ``R``.
      estimators: name -> estimator called as ``est(noisy, noise_power, wnr_db=w)``, or
        name -> sequence of ``W`` estimators of one pytree structure (one per WNR
        point, e.g. grid points selected per WNR; no recompilation between points).
      reference, scope: WNR definition (see :func:`noisejax.noise.noise_power`).
      batch_size: realizations evaluated together (``lax.map`` batch; default all).
      progress: a tqdm bar over the WNR points.
      store: a point store for resumable points (see the module docstring); ``None``: keep nothing.
      store_key: extra JSON-able identity of the sweep (e.g. the model's name).
      on_point: ``on_point(i, reused)`` after WNR point ``i`` is finished (and stored).

    Returns:
      dict name -> NumPy array ``(W, R)`` of accuracies, plus ``"_seconds"`` (float)
      and ``"_reused"`` (points loaded from ``store``).
    """
    n_realizations = _validate.check_int("n_realizations", n_realizations, minimum=1)
    _validate.check_real_number("wnr_db", np.asarray(wnr_db, dtype=float))
    if not estimators:
        raise InvalidArgumentError("estimators must name at least one estimator")
    x, y = _check_data(x, y)
    names = list(estimators)
    grid = list(np.asarray(wnr_db, dtype=float))
    per_point = {}
    for n in names:
        e = estimators[n]
        if isinstance(e, (list, tuple)):
            if len(e) != len(grid):
                raise ShapeMismatchError(f"estimators[{n!r}] has {len(e)} entries for {len(grid)} WNR points")
            per_point[n] = list(e)
        else:
            per_point[n] = [e] * len(grid)

    keys, impl = _key_data(realization_keys(key, jnp.arange(n_realizations)))
    point = _sweep_point_fn(logits_fn, reference, scope, leaf_filter, batch_size, _realization_mesh(n_realizations), impl)

    t0 = time.perf_counter()
    points = _point_store(store, {"kind": "accuracy_sweep", "names": names, "R": n_realizations, "reference": reference,
                                  "scope": scope, "store_key": store_key}, (variables, x, y, key))
    rows = []
    iterator = enumerate(grid)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(grid), desc="WNR sweep", leave=False)
    for i, w in iterator:
        ests = [per_point[n][i] for n in names]
        arrays, reused = points.get_or_compute(
            i, {"wnr_db": float(w)}, lambda: {"acc": point(variables, x, y, jnp.asarray(w, jnp.result_type(float)), keys, ests)},
            ests,
        )
        rows.append(np.asarray(arrays["acc"]))
        if on_point is not None:
            on_point(i, reused)
    acc = np.stack(rows)  # (W, R, E)
    out: dict[str, Any] = {name: acc[:, :, i] for i, name in enumerate(names)}
    out["_seconds"] = time.perf_counter() - t0
    out["_reused"] = points.reused
    return out


def grid_accuracies(
    logits_fn: LogitsFn,
    variables: PyTree,
    data: Mapping[str, tuple[Any, Any]],
    wnr_db: Sequence[float],
    grid: Any,
    *,
    key: jax.Array,
    n_realizations: int,
    reference: str = "variance",
    scope: str = "global",
    leaf_filter=_noise.default_leaf_filter,
    grid_batch_size: Optional[int] = None,
    store: Optional[Any] = None,
    store_key: Any = None,
    on_point: Optional[Callable[[int, bool], None]] = None,
) -> dict[str, np.ndarray]:
    """Accuracy ``(W, G, R)`` of each point of ``grid`` on each dataset of ``data``.

    ``grid`` is an estimator whose leaves have a leading axis ``G`` (e.g.
    :func:`noisejax.denoise.compensated_grid`); ``data`` maps names to ``(x, y)``
    (e.g. ``{"val": ..., "test": ...}``: the same noisy weights are scored on each).
    At each WNR, one compiled call draws the ``R`` realizations (``fold_in(key, r)``)
    and evaluates all ``G`` grid points on each of them (``vmap`` over realizations —
    ``lax.map`` on the CPU for a model with convolutions, where vmapped kernels are slow:
    :func:`noisejax._backend.batched_kernels_slow` — and ``lax.map`` over the grid with
    ``grid_batch_size`` to bound memory).
    ``store``, ``store_key`` and ``on_point`` make it resumable, as in :func:`accuracy_sweep`.
    """
    n_realizations = _validate.check_int("n_realizations", n_realizations, minimum=1)
    if not data:
        raise InvalidArgumentError("data must name at least one (x, y) pair")
    arrays = {name: _check_data(*xy) for name, xy in data.items()}
    sizes = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(grid)}
    if len(sizes) != 1:
        raise ShapeMismatchError(f"grid leaves must share one leading size, got {sorted(sizes)}")

    _validate.check_real_number("wnr_db", np.asarray(wnr_db, dtype=float))
    keys, impl = _key_data(realization_keys(key, jnp.arange(n_realizations)))
    x0 = next(iter(arrays.values()))[0]
    loop = _backend.batched_kernels_slow(jax.make_jaxpr(logits_fn)(variables, x0))
    point = _grid_point_fn(logits_fn, reference, scope, leaf_filter, grid_batch_size, _realization_mesh(n_realizations),
                           impl, loop)
    points = _point_store(store, {"kind": "grid_accuracies", "R": n_realizations, "reference": reference, "scope": scope,
                                  "store_key": store_key}, (variables, arrays, grid, key))
    rows = []
    for i, w in enumerate(np.asarray(wnr_db, dtype=float)):
        row, reused = points.get_or_compute(
            i, {"wnr_db": float(w)}, lambda: point(variables, jnp.asarray(w, jnp.result_type(float)), keys, grid, arrays)
        )
        rows.append(row)
        if on_point is not None:
            on_point(i, reused)
    return {name: np.stack([np.asarray(r[name]) for r in rows]) for name in arrays}


def select_grid(acc: np.ndarray) -> np.ndarray:
    """Index of the grid point with the highest mean accuracy, per WNR: ``(W, G, R) -> (W,)``.

    Ties go to the lowest index (put ML first in the grid to prefer it on ties).
    """
    acc = np.asarray(acc)
    if acc.ndim != 3:
        raise ShapeMismatchError(f"acc must have shape (W, G, R), got {acc.shape}")
    return np.argmax(acc.mean(axis=2), axis=1)


def wnr_at_accuracy(wnr_db: Sequence[float], acc: Sequence[float], target: float) -> float:
    """WNR above which the curve stays at or above ``target``, by linear interpolation.

    Points are sorted by WNR; with ``i`` the last point below ``target``, the crossing
    is interpolated between points ``i`` and ``i + 1`` (for a monotone curve this is
    its only crossing; for a non-monotone one it is the conservative, last upward
    crossing).  Returns ``-inf`` if no point is below the target (the crossing lies
    below the measured range) and ``nan`` if the last point is below it.
    """
    w = np.asarray(wnr_db, dtype=float)
    a = np.asarray(acc, dtype=float)
    if a.ndim == 2:
        a = a.mean(axis=1)
    if w.shape != a.shape or w.ndim != 1:
        raise ShapeMismatchError(f"wnr_db {w.shape} and acc {a.shape} must be matching 1-D arrays")
    _validate.check_real_number("target", target)
    _validate.check_real_number("wnr_db", w)
    order = np.argsort(w)
    w, a = w[order], a[order]
    below = np.nonzero(a < target)[0]
    if below.size == 0:
        return -math.inf
    i = int(below[-1])
    if i == len(a) - 1:
        return math.nan
    w0, w1, a0, a1 = w[i], w[i + 1], a[i], a[i + 1]
    return float(w0 + (target - a0) * (w1 - w0) / (a1 - a0))


def gain_db(wnr_db: Sequence[float], acc_ml: Sequence[float], acc_est: Sequence[float], target: float) -> float:
    """``WNR_ML(target) − WNR_est(target)`` in dB (positive: the estimator needs less WNR).

    Curves may be ``(W,)`` means or ``(W, R)`` realizations (averaged).  ``nan`` when a
    crossing is outside the measured range.

    Example::

        >>> round(gain_db([0, 10], [0.2, 0.8], [0.4, 0.9], 0.6), 3)   # 6.667 − 4.0
        2.667
    """
    a = wnr_at_accuracy(wnr_db, acc_ml, target)
    b = wnr_at_accuracy(wnr_db, acc_est, target)
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    return a - b


def gains_table(
    wnr_db: Sequence[float], curves: Mapping[str, Any], targets: Sequence[float], *, baseline: str = "ml"
) -> dict:
    """``{name: {"60%": {"wnr_db": ..., "gain_db": ...}, ...}}`` for every curve against ``baseline``."""
    out = {}
    for name, acc in curves.items():
        out[name] = {}
        for t in targets:
            w = wnr_at_accuracy(wnr_db, acc, t)
            g = gain_db(wnr_db, curves[baseline], acc, t)
            out[name][f"{round(100 * t)}%"] = {"wnr_db": _json_float(w), "gain_db": _json_float(g)}
    return out


def _json_float(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None
