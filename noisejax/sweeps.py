"""Accuracy-vs-WNR sweeps for noisy weights, grid searches, dB gains and plots.

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
* :func:`plot_accuracy_curves` — mean ± std bands, PNG (Agg backend).

Resumable sweeps: with ``store=FOLDER`` every finished WNR point is written
atomically to ``FOLDER/point-IIII.npz`` (temporary file + rename, SHA-256 of the
arrays, a fingerprint of everything the point depends on: data, clean weights,
estimators, WNR, key, ``R``).  A restarted sweep loads the points whose file is
intact and whose fingerprint matches, and recomputes the others (missing,
truncated, corrupted or computed for other inputs) — a killed sweep finishes with
bitwise the same result as an uninterrupted one.  ``logits_fn`` itself cannot be
fingerprinted: give each model function its own folder (or a ``store_key``).

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
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import _validate
from noisejax import noise as _noise
from noisejax import store as _files
from noisejax.errors import InvalidArgumentError, ShapeMismatchError

__all__ = [
    "accuracy_sweep",
    "grid_accuracies",
    "select_grid",
    "wnr_at_accuracy",
    "gain_db",
    "gains_table",
    "plot_accuracy_curves",
    "gain_claims",
]

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]


def _accuracy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == y)


@functools.lru_cache(maxsize=64)
def _sweep_point_fn(logits_fn, reference, scope, leaf_filter, batch_size):
    """Compiled ``(variables, x, y, wnr, keys, ests) -> (R, E)`` accuracies, cached per static setup."""

    @jax.jit
    def point(variables, x, y, wnr, keys, ests):
        pw = _noise.noise_power(variables, wnr, reference=reference, scope=scope, leaf_filter=leaf_filter)

        def one(k):
            noisy = _noise.add_weight_noise(
                variables, wnr, key=k, reference=reference, scope=scope, leaf_filter=leaf_filter
            )
            return jnp.stack([_accuracy(logits_fn(e(noisy, pw, wnr_db=wnr), x), y) for e in ests])

        return jax.lax.map(one, keys, batch_size=batch_size)

    return point


@functools.lru_cache(maxsize=64)
def _grid_point_fn(logits_fn, reference, scope, leaf_filter, grid_batch_size):
    """Compiled ``(variables, wnr, keys, grid, arrays) -> {name: (G, R)}``, cached per static setup."""

    @jax.jit
    def point(variables, wnr, keys, grid, arrays):
        pw = _noise.noise_power(variables, wnr, reference=reference, scope=scope, leaf_filter=leaf_filter)

        def one(k):
            noisy = _noise.add_weight_noise(
                variables, wnr, key=k, reference=reference, scope=scope, leaf_filter=leaf_filter
            )

            def score(e):
                den = e(noisy, pw, wnr_db=wnr)
                return {name: _accuracy(logits_fn(den, x), y) for name, (x, y) in arrays.items()}

            return jax.lax.map(score, grid, batch_size=grid_batch_size)

        return jax.vmap(one, out_axes=1)(keys)

    return point


def _realization_keys(key: jax.Array, n: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


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
      store: folder for resumable points (see the module docstring); ``None``: keep nothing.
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

    point = _sweep_point_fn(logits_fn, reference, scope, leaf_filter, batch_size)

    keys = _realization_keys(key, n_realizations)
    t0 = time.perf_counter()
    points = _files.PointStore(store, {} if store is None else {
        "kind": "accuracy_sweep", "names": names, "R": n_realizations, "reference": reference, "scope": scope,
        "data": _files.tree_digest((variables, x, y, key)), "store_key": store_key,
    })
    rows = []
    iterator = enumerate(grid)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(grid), desc="WNR sweep", leave=False)
    for i, w in iterator:
        ests = [per_point[n][i] for n in names]
        ident = {} if store is None else {"wnr_db": float(w), "estimators": _files.tree_digest(ests)}
        arrays, reused = points.get_or_compute(
            i, ident, lambda: {"acc": point(variables, x, y, jnp.asarray(w, jnp.result_type(float)), keys, ests)}
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
    and evaluates all ``G`` grid points on each of them (``vmap`` over realizations,
    ``lax.map`` over the grid with ``grid_batch_size`` to bound memory).
    ``store``, ``store_key`` and ``on_point`` make it resumable, as in :func:`accuracy_sweep`.
    """
    n_realizations = _validate.check_int("n_realizations", n_realizations, minimum=1)
    if not data:
        raise InvalidArgumentError("data must name at least one (x, y) pair")
    arrays = {name: _check_data(*xy) for name, xy in data.items()}
    sizes = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(grid)}
    if len(sizes) != 1:
        raise ShapeMismatchError(f"grid leaves must share one leading size, got {sorted(sizes)}")

    point = _grid_point_fn(logits_fn, reference, scope, leaf_filter, grid_batch_size)

    _validate.check_real_number("wnr_db", np.asarray(wnr_db, dtype=float))
    keys = _realization_keys(key, n_realizations)
    points = _files.PointStore(store, {} if store is None else {
        "kind": "grid_accuracies", "R": n_realizations, "reference": reference, "scope": scope,
        "data": _files.tree_digest((variables, arrays, grid, key)), "store_key": store_key,
    })
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


def plot_accuracy_curves(
    wnr_db: Sequence[float],
    curves: Mapping[str, Any],
    path: str,
    *,
    title: str = "",
    targets: Sequence[float] = (),
    xlabel: str = "WNR (dB)",
    ylabel: str = "test accuracy",
    styles: Optional[Mapping[str, dict]] = None,
    panels: Optional[Sequence[tuple[str, Sequence[str]]]] = None,
    reference: Optional[str] = None,
    band_label: str = "±1 std over realizations",
    target_label: str = "accuracy target of the dB gains",
) -> str:
    """Mean ± 1 std vs WNR for each curve (``(W, R)`` arrays or ``(W,)`` means) to a PNG at ``path``.

    Args:
      styles: maps a curve name to extra matplotlib line keywords (e.g. ``{"ls": "--"}``).
      panels: ``[(panel title, [curve names]), ...]`` — one panel each, side by side
        with a shared y axis (a crowded figure split up); curves of no panel are not
        drawn.  ``None``: one panel with every curve.
      reference: a curve drawn in every panel (e.g. ``"ML"``), in black.
      band_label, target_label: legend text of the shaded bands and of the dotted
        horizontal lines at ``targets``.

    A curve keeps its colour in every panel; within a panel curves differ by marker and
    dash too, and the reference is a wide translucent line underneath, so curves that
    coincide stay visible.  Bands (±1 std) are drawn for the reference and, when a panel
    has at most two other curves, for those too (more would hide each other).  The
    legend of each panel is under it; ``styles[name]["label"]`` renames a curve there.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    w = np.asarray(wnr_db, dtype=float)
    names = list(curves)
    if panels is None:
        panels = [("", names)]
    panels = [(t, [n for n in ns if n in curves]) for t, ns in panels]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"] + ["#8c564b", "#7f7f7f", "#bcbd22", "#17becf"]
    others = [n for n in names if n != reference]
    color = {n: palette[i % len(palette)] for i, n in enumerate(others)}
    if reference is not None:
        color[reference] = "#000000"
    n_panels = len(panels)
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels if n_panels > 1 else 6.4, 5.0), dpi=120,
                             sharey=True, squeeze=False)
    markers, dashes = ("o", "s", "^", "D", "v", "x"), ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)), ":", "-")
    for ax, (panel_title, members) in zip(axes[0], panels):
        shown = ([reference] if reference is not None and reference in curves and reference not in members else []) + members
        banded = [n for n in shown if n == reference or len([m for m in shown if m != reference]) <= 2]
        for i, name in enumerate(shown):
            a = np.asarray(curves[name], dtype=float)
            mean = a.mean(axis=1) if a.ndim == 2 else a
            if name == reference:
                kw = {"marker": "o", "ms": 4, "lw": 4.5, "alpha": 0.45, "zorder": 1}
            else:
                j = i - (reference in shown)
                kw = {"marker": markers[j % len(markers)], "ms": 3.5, "ls": dashes[j % len(dashes)], "lw": 1.4,
                      "mfc": "none", "zorder": 3}
            kw = {"color": color[name], "label": name, **kw, **((styles or {}).get(name, {}))}
            (line,) = ax.plot(w, mean, **kw)
            if name in banded and a.ndim == 2 and a.shape[1] > 1:
                std = a.std(axis=1)
                ax.fill_between(w, mean - std, mean + std, color=line.get_color(), alpha=0.13, lw=0, zorder=0)
        for t in targets:
            ax.axhline(t, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        if panel_title:
            ax.set_title(panel_title, fontsize=9.5)
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if targets:
            handles.append(Line2D([], [], color="gray", lw=0.8, ls=":",
                                  label=f"{target_label} ({', '.join(f'{100 * t:g} %' for t in targets)})"))
        if any(np.ndim(curves[n]) == 2 and np.shape(curves[n])[1] > 1 for n in banded):
            only = "" if len(banded) == len(shown) else f" ({', '.join(banded)} only)"
            handles.append(Patch(color="gray", alpha=0.3, lw=0, label=band_label + only))
        ax.legend(handles=handles, fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    axes[0][0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=10.5)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def gain_claims(summary: dict, thresholds: dict, *, figure: str, target: str = "60") -> list:
    """Claims for the reproduce report from ``summary[model][estimator][target] = gain_db``.

    ``thresholds`` maps a lower-case substring of an estimator name to the gain in dB it must
    reach (e.g. ``{"compensated": 1.0, "learned": 4.1}``); estimators matching none are listed
    with ``holds=None`` (reported, no claim).
    """
    claims = []
    for model, per_est in summary.items():
        for est, gains in per_est.items():
            key = next((k for k in gains if str(k).rstrip("%") == str(target).rstrip("%")), None)
            if key is None:
                key = next(iter(gains), None)
            gain = None if key is None else gains[key]
            need = next((v for k, v in thresholds.items() if k in est.lower()), None)
            claims.append({
                "claim": f"{model}: {est} gains >= {need} dB over ML at {key} accuracy" if need is not None
                         else f"{model}: {est} gain over ML at {key} accuracy",
                "figure": figure,
                "measured": "not reached" if gain is None else f"{gain:.2f} dB",
                "holds": None if need is None else (gain is not None and gain >= need),
                "note": "",
            })
    return claims
