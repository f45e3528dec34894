"""Mitigating neuron noise in a trained sigmoid MLP on digits.

For each of the four neuron-noise types (additive/multiplicative × uncorrelated/
correlated) the plain network's accuracy is measured along an intensity grid; the
*target* intensity is the smallest one where it loses ≥ ``min_loss`` accuracy on
the validation set.  Compared along the grid (test set, mean over noise
realizations):

* ``plain``          — the network trained without noise;
* ``pooled``         — :func:`noisejax.mitigate.pool` with ``P`` copies of every noisy layer;
* ``ghost``          — :func:`noisejax.mitigate.ghost_neurons` (all layers, differential read-out);
* ``pooled+ghost``   — both;
* ``noise_aware``    — trained with that noise type at the target intensity
  (:func:`noisejax.train.noise_aware_loss`, ``train_realizations`` per step);
* ``moment_reg``     — trained on ``CE(E[y]) + λ·ΣVar[y]`` from the analytic moments
  (:func:`noisejax.train.moment_loss`), λ chosen on validation;
* ``combined``       — the noise-aware network with ghosts, then pooled.

Reported at the target: accuracy, output SNR ``Σmean²/Σvar`` (over test inputs and
outputs) and its gain over plain, the fraction of the lost accuracy recovered, the
training times of the two noise-trained variants; plus the slope-scaling report
(clean-accuracy change of a sigmoid network under :func:`noisejax.mitigate.scale_slope`).

Run (from the repository root)::

    python -m experiments.mitigation.run --config default --out noisejax-report/mitigation

``main(config, out_dir)`` returns the :class:`~noisejax.study.claims.Result` (also
written as ``results.json``, with ``accuracy_vs_noise.png`` and ``snr_gain.png``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import numpy as np
import optax

from noisejax import data, layers, mitigate, rng, train
from noisejax.study.claims import Claim, Result, claim

from .. import _common
from .._common import LABELS as NOISE_LABELS
from .._common import NOISE_TYPES, one_type

NAME = "mitigation"
METHODS = ("plain", "pooled", "ghost", "pooled+ghost", "noise_aware", "moment_reg", "combined")


def _noise(cfg, noise_type: Optional[str], intensity: float, n_sites: int):
    """All four variances present (zeros elsewhere): one compiled function serves every type."""
    nz = one_type(noise_type, float(intensity))
    if cfg.noise_sites == "all":
        return nz
    if cfg.noise_sites == "hidden":
        return tuple([nz] * (n_sites - 1) + [None])
    raise ValueError(f"noise_sites must be 'all' or 'hidden', got {cfg.noise_sites!r}")


def _flip_probability(d: float) -> float:
    """P(1 + ξ < 0) for ξ ~ N(0, d): a multiplicative gain that flips the sign."""
    return 0.0 if d <= 0 else 0.5 * math.erfc(1.0 / math.sqrt(2.0 * d))


@dataclasses.dataclass
class _Setup:
    """The trained plain network, its transformed versions and their compiled evaluators."""

    cfg: Any
    ds: data.Dataset
    net: layers.Layer
    p0: Any
    keys: dict
    fit_kw: dict
    plain: train.TrainResult
    nets: dict
    evaluators: dict

    @property
    def n_sites(self) -> int:
        return self.net.n_sites

    def evaluate(self, method_net: str, params, x, y, noise_type, d) -> train.NoisyEval:
        """Accuracy and output statistics over the noise realizations, as float64 NumPy (no small compiled programs)."""
        res = self.evaluators[method_net](params, x, y, noise=_noise(self.cfg, noise_type, d, self.n_sites),
                                          key=self.keys["eval"])
        return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), res)


def _setup(cfg, progress: bool) -> _Setup:
    ds = data.load_digits(seed=cfg.seed)
    root = rng.make_key(cfg.seed, cfg.rng)
    keys = dict(zip(("init", "plain", "noise_aware", "moment_reg", "eval"), (jax.random.fold_in(root, i) for i in range(5))))
    opt = optax.adam(cfg.learning_rate)  # one object: trainings with equal structure share compiled steps
    fit_kw = dict(optimizer=opt, steps=cfg.steps, batch_size=cfg.batch_size, progress=progress)
    net = layers.mlp(list(cfg.widths), cfg.activation, cfg.activation_out)
    _, p0 = net.init(keys["init"], (ds.x_train.shape[1],))
    plain = train.train_plain(net, p0, ds.x_train, ds.y_train, key=keys["plain"], **fit_kw)
    # transformed networks (ordinary noisejax.layers networks)
    nets = {
        "plain": (net, plain.params),
        "pooled": mitigate.pool(net, plain.params, cfg.pool_copies),
        "ghost": mitigate.ghost_neurons(net, plain.params),
    }
    # ghosts first, then pooling: the ghosts are pooled too, so their own noise is averaged
    nets["pooled+ghost"] = mitigate.pool(*mitigate.ghost_neurons(net, plain.params), cfg.pool_copies)
    evaluators = {name: train.make_evaluator(n, n_realizations=cfg.eval_realizations) for name, (n, _) in nets.items()}
    return _Setup(cfg, ds, net, p0, keys, fit_kw, plain, nets, evaluators)


def _clean(st: _Setup) -> dict:
    """Noise-free accuracies; the transformations must not change the noise-free outputs."""
    ds = st.ds
    clean_eval = {m: st.evaluate(m, p, ds.x_test, ds.y_test, None, 0.0) for m, (_, p) in st.nets.items()}
    plain_out = clean_eval["plain"].output_mean
    return {
        "val_plain": st.evaluate("plain", st.plain.params, ds.x_val, ds.y_val, None, 0.0).mean_accuracy,
        "test": {m: r.mean_accuracy for m, r in clean_eval.items()},
        "scale": float(np.max(np.abs(plain_out))),
        "noise_free_change": {m: float(np.max(np.abs(r.output_mean - plain_out))) for m, r in clean_eval.items() if m != "plain"},
    }


def _noise_trained(st: _Setup, ti: int, nt: str, target: float) -> tuple:
    """Noise-aware and moment-regularized training at the target (λ chosen on validation); their timings."""
    cfg, ds = st.cfg, st.ds
    nz_target = _noise(cfg, nt, target, st.n_sites)
    na_obj = train.noise_aware_loss(st.net, noise=nz_target, n_realizations=cfg.train_realizations)
    na = train.fit(na_obj, st.p0, ds.x_train, ds.y_train, key=jax.random.fold_in(st.keys["noise_aware"], ti), **st.fit_kw)
    mr_runs = {}
    for lam in cfg.penalties:
        obj = train.moment_loss(st.net, noise=nz_target, penalty=lam, method=cfg.moments_method,
                                covariance=cfg.moments_covariance)
        r = train.fit(obj, st.p0, ds.x_train, ds.y_train, key=jax.random.fold_in(st.keys["moment_reg"], ti), **st.fit_kw)
        mr_runs[lam] = (st.evaluate("plain", r.params, ds.x_val, ds.y_val, nt, target).mean_accuracy, r)
    best_lam = max(mr_runs, key=lambda lam: mr_runs[lam][0])
    timing = {
        "noise_aware": {"compile_s": na.compile_seconds, "run_s": na.run_seconds, "s_per_step": na.seconds_per_step},
        "moment_reg": {
            "compile_s": sum(r.compile_seconds for _, r in mr_runs.values()),
            "run_s_per_lambda": [r.run_seconds for _, r in mr_runs.values()],
            "s_per_step": mr_runs[best_lam][1].seconds_per_step,
        },
    }
    return na, mr_runs, best_lam, timing


def _methods_at(st: _Setup, nt: str, grid: list, target: float, na, mr) -> tuple[dict, dict]:
    """Accuracy curves along the grid and the statistics at the target, per method (test set)."""
    cfg, ds, nets = st.cfg, st.ds, st.nets
    method_params = {
        "plain": ("plain", st.plain.params),
        "pooled": ("pooled", nets["pooled"][1]),
        "ghost": ("ghost", nets["ghost"][1]),
        "pooled+ghost": ("pooled+ghost", nets["pooled+ghost"][1]),
        "noise_aware": ("plain", na.params),
        "moment_reg": ("plain", mr.params),
        # noise-aware training + ghosts + pooling (same structure as pooled+ghost: same evaluator)
        "combined": ("pooled+ghost", mitigate.pool(*mitigate.ghost_neurons(st.net, na.params), cfg.pool_copies)[1]),
    }
    curves, at_target = {}, {}
    for m, (ev_name, params) in method_params.items():
        accs = [st.evaluate(ev_name, params, ds.x_test, ds.y_test, nt, d) for d in grid]
        curves[m] = {"mean": [a.mean_accuracy for a in accs], "std": [a.accuracy_std for a in accs]}
        r = st.evaluate(ev_name, params, ds.x_test, ds.y_test, nt, target)
        at_target[m] = {"accuracy": r.mean_accuracy, "accuracy_std": r.accuracy_std, "snr": r.snr,
                        "clean_accuracy": curves[m]["mean"][grid.index(0.0)] if 0.0 in grid else None}
    return curves, at_target


def _noise_type(st: _Setup, ti: int, nt: str, clean: dict, timing: dict) -> dict:
    """Everything for one noise type: the target intensity, the trainings, every method along the grid."""
    cfg, ds = st.cfg, st.ds
    grid = [float(d) for d in cfg.grid(nt)]
    # target intensity, chosen on the validation set
    val_acc = [st.evaluate("plain", st.plain.params, ds.x_val, ds.y_val, nt, d).mean_accuracy for d in grid]
    hits = [d for d, a in zip(grid, val_acc) if d > 0 and clean["val_plain"] - a >= cfg.min_loss]
    target = hits[0] if hits else max(grid)
    na, mr_runs, best_lam, timing[nt] = _noise_trained(st, ti, nt, target)
    curves, at_target = _methods_at(st, nt, grid, target, na, mr_runs[best_lam][1])
    plain_clean = clean["test"]["plain"]
    lost = plain_clean - at_target["plain"]["accuracy"]
    for m, row in at_target.items():
        row["snr_gain"] = row["snr"] / at_target["plain"]["snr"]
        row["snr_gain_db"] = 10 * math.log10(row["snr_gain"]) if row["snr_gain"] > 0 else None
        row["recovered_fraction"] = (row["accuracy"] - at_target["plain"]["accuracy"]) / lost if lost > 0 else None
    best = max((m for m in METHODS if m != "plain"), key=lambda m: at_target[m]["accuracy"])
    out = {
        "grid": grid, "plain_val_accuracy": val_acc, "target": target, "target_reached_min_loss": bool(hits),
        "plain_test_loss_at_target": lost, "accuracy": curves, "at_target": at_target, "moment_penalty": best_lam,
        "moment_penalty_val_accuracy": {str(k): v[0] for k, v in mr_runs.items()},
        "best": {
            "method": best,
            "accuracy": at_target[best]["accuracy"],
            "recovered_fraction": at_target[best]["recovered_fraction"],
            "recovers_half": bool(at_target[best]["recovered_fraction"] is not None and at_target[best]["recovered_fraction"] >= 0.5),
            "snr_gain": at_target[best]["snr_gain"],
        },
    }
    if nt == "mul_correlated":
        # a gain 1 + ξ < 0 shared by a layer reverses the order of its outputs; at best an
        # even number of flips cancels: accuracy <= clean · P(even number of flips)
        p = _flip_probability(target)
        n_noisy = st.n_sites if cfg.noise_sites == "all" else st.n_sites - 1
        out["sign_flip_probability_at_target"] = p
        out["sign_flip_accuracy_bound"] = plain_clean * 0.5 * (1 + (1 - 2 * p) ** n_noisy)
    return out


def _slope_scaling(st: _Setup, per_type: dict, clean: dict) -> dict:
    """Slope scaling of the hidden layers (sigmoid: approximate; report the clean-accuracy change)."""
    cfg, ds = st.cfg, st.ds
    hidden = list(range(len(cfg.widths) - 2))
    au_target = per_type["add_uncorrelated"]["target"]
    rows = []
    for s in cfg.slope_scales:
        snet, sparams = mitigate.scale_slope(st.net, st.plain.params, {l: float(s) for l in hidden})
        ev = (st.evaluators["plain"] if cfg.activation != "linear"
              else train.make_evaluator(snet, n_realizations=cfg.eval_realizations))

        def stats(nt, d):
            res = ev(sparams, ds.x_test, ds.y_test, noise=_noise(cfg, nt, d, st.n_sites), key=st.keys["eval"])
            return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), res)

        clean_acc = stats(None, 0.0).mean_accuracy
        noisy = stats("add_uncorrelated", au_target)
        rows.append({
            "scale": float(s),
            "clean_accuracy": clean_acc,
            "clean_accuracy_change": clean_acc - clean["test"]["plain"],
            "accuracy_at_add_uncorrelated_target": noisy.mean_accuracy,
            "snr_gain_at_add_uncorrelated_target": noisy.snr / per_type["add_uncorrelated"]["at_target"]["plain"]["snr"],
        })
    return {"layers": hidden, "rows": rows}


def _summary(per_type: dict, clean: dict) -> dict:
    return {
        nt: {
            "target": v["target"],
            "clean": clean["test"]["plain"],
            **{m: v["at_target"][m]["accuracy"] for m in METHODS},
            "best": v["best"]["method"],
            "recovered_fraction": v["best"]["recovered_fraction"],
            "snr_gain_best": v["best"]["snr_gain"],
        }
        for nt, v in per_type.items()
    }


def main(config, out_dir, *, data_dir: Optional[str] = None, progress: bool = True) -> Result:
    """Run the experiment in ``out_dir`` (``results.json``, the two PNGs); ``data_dir`` is unused.

    Matrix products run at full float32 precision (``jax.default_matmul_precision("highest")``):
    on GPUs the default (TF32) would blur the check that the transformations keep the
    noise-free outputs (≈1e-2 on logits of order 10 instead of ≈1e-5).
    """
    cfg = config
    with _common.Run(NAME, out_dir, steps=len(NOISE_TYPES) + 3, progress=progress) as run:
        st = run.stage("plain", _setup, cfg, progress)
        timing: dict = {"plain": {"compile_s": st.plain.compile_seconds, "run_s": st.plain.run_seconds}}
        clean = _clean(st)
        per_type = {nt: run.stage(nt, _noise_type, st, ti, nt, clean, timing) for ti, nt in enumerate(NOISE_TYPES)}
        slope = run.stage("slope_scaling", _slope_scaling, st, per_type, clean)
        timing["total_s"] = sum(run.seconds.values())
        values = {
            "config": cfg, "widths": {m: mitigate.widths(n, p) for m, (n, p) in st.nets.items()},
            "clean_test_accuracy": clean["test"], "noise_free_output_max_abs_change": clean["noise_free_change"],
            "noise_free_output_max_abs": clean["scale"], "clean_val_accuracy_plain": clean["val_plain"],
            "noise_types": per_type, "slope_scaling": slope, "timing": timing, "summary": _summary(per_type, clean),
            "reference": "Semenova, Larger & Brunner follow-up (Chaos 2022/2024): MNIST, combined mitigation "
            "92.07 % -> 97.49 %, output SNR x4",
        }
        figures = [run.figure("accuracy_vs_noise.png", _plot(values, cfg), dpi=110),
                   run.figure("snr_gain.png", _plot_gains(values, cfg), dpi=110, bbox_inches="tight")]
        run.tick()
        return run.result(_claims(per_type), figures, **values)


def _claims(per_type: dict) -> list[Claim]:
    """The report's claims: per noise type, does the best mitigation recover half the loss?"""
    claims = []
    for nt, v in per_type.items():
        best = v["best"]
        frac = best["recovered_fraction"]
        note = ""
        if nt == "mul_correlated" and "sign_flip_accuracy_bound" in v:
            note = (f"a shared gain 1+ξ<0 (p={v['sign_flip_probability_at_target']:.3f} per layer) reverses the output "
                    f"order; accuracy bound {v['sign_flip_accuracy_bound']:.3f} for any weights")
        claims.append(claim(
            f"{nt}: the best mitigation recovers at least half of the accuracy lost to noise",
            "follow-ups (Chaos 2022, 2024): mitigation",
            "best = {}: accuracy {:.4f}, recovered {}, output SNR gain {}".format(
                best["method"], best["accuracy"], "n/a" if frac is None else f"{100 * frac:.0f} %",
                _gain_text(best["snr_gain"])),
            bool(best["recovers_half"]),
            note,
        ))
    return claims


def _gain_text(gain) -> str:
    """``×3.79``; a gain beyond 10⁶ means the noise was removed down to float32 rounding."""
    if gain is None:
        return "n/a"
    if gain > 1e6:
        return f"×{gain:.1e} (the noise is removed down to float32 rounding)"
    return f"×{gain:.2f}"


#: Legend names of the methods and noise types (the code names stay in results.json).
METHOD_LABELS = {
    "plain": "plain (trained without noise)",
    "pooled": "pooling ({P} copies of every neuron, averaged)",
    "ghost": "ghost neurons (differential read-out)",
    "pooled+ghost": "pooling + ghost neurons",
    "noise_aware": "noise-aware training",
    "moment_reg": "moment-regularized training",
    "combined": "combined (noise-aware + ghosts + pooling)",
}


def _labels(cfg) -> dict:
    return {m: t.format(P=cfg.pool_copies) for m, t in METHOD_LABELS.items()}


_STYLES = {
        "plain": dict(color="0.55", marker="o", lw=5, alpha=0.45, ms=7, zorder=1),  # wide and underneath: visible
        "pooled": dict(color="tab:blue", marker="s", ls="-"),                      # even where a method equals it
        "ghost": dict(color="tab:green", marker="^", ls="--"),
        "pooled+ghost": dict(color="tab:cyan", marker="v", ls=":"),
        "noise_aware": dict(color="tab:red", marker="D", ls="-"),
        "moment_reg": dict(color="tab:purple", marker="x", ls="--"),
        "combined": dict(color="tab:orange", marker="*", ls="-"),
}


def _plot(results: dict, cfg):
    """Accuracy vs noise variance, one panel per noise type, every method."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    labels, styles = _labels(cfg), _STYLES
    fig = Figure(figsize=(11, 8.6))
    axes = fig.subplots(2, 2)
    for ax, nt in zip(axes.ravel(), NOISE_TYPES):
        v = results["noise_types"][nt]
        grid = np.asarray(v["grid"])
        pos = grid > 0
        for m in METHODS:
            mean = np.asarray(v["accuracy"][m]["mean"])
            std = np.asarray(v["accuracy"][m]["std"])
            kw = {"lw": 1.3, "ms": 4, "zorder": 3, **styles[m]}
            ax.errorbar(grid[pos], mean[pos], yerr=std[pos], capsize=2, elinewidth=0.8, **kw)
        ax.axhline(results["clean_test_accuracy"]["plain"], color="k", ls=":", lw=1)
        ax.axvline(v["target"], color="k", ls="--", lw=0.9)
        ax.set_xscale("log")
        low = min(float(np.min(np.asarray(v["accuracy"][m]["mean"])[pos])) for m in METHODS)
        ax.set_ylim(max(0.0, np.floor((low - 0.05) * 10) / 10), 1.01)
        ax.set_xlabel(f"noise variance D ({NOISE_LABELS[nt]} noise at every layer)")
        ax.set_ylabel("test accuracy (mean ± std over realizations)")
        b = v["best"]
        rec = "n/a" if b["recovered_fraction"] is None else f"{100 * b['recovered_fraction']:.0f} %"
        ax.set_title(f"{NOISE_LABELS[nt]} noise; best at the target D:\n{labels[b['method']].split(' (')[0]}, "
                     f"recovering {rec} of the lost accuracy", fontsize=9)
        ax.grid(alpha=0.25, which="both")
    handles = [Line2D([], [], **{k: val for k, val in styles[m].items() if k != "zorder"}, label=labels[m]) for m in METHODS]
    handles += [Line2D([], [], color="k", ls=":", lw=1, label="plain network without noise"),
                Line2D([], [], color="k", ls="--", lw=0.9,
                       label=f"target D: the plain network loses ≥ {cfg.min_loss:g} accuracy (validation set)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Noise mitigation in a sigmoid MLP {'-'.join(map(str, cfg.widths))} trained on digits: "
                 "test accuracy vs noise intensity", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def _plot_gains(results: dict, cfg):
    """Output SNR gain over plain at each target: log bars, a broken axis when some gains are astronomically large."""
    from matplotlib.figure import Figure

    labels, styles = _labels(cfg), _STYLES

    methods = METHODS[1:]
    gains = np.asarray([[results["noise_types"][nt]["at_target"][m]["snr_gain"] for nt in NOISE_TYPES] for m in methods],
                       float)
    huge = gains > 1e3  # exact cancellation (ghosts under correlated additive noise): noise left at float32 rounding
    lo = min(0.5, np.nanmin(gains) / 1.5)
    hi_small = max(10.0, np.nanmax(np.where(huge, np.nan, gains)) * 2.5)
    n = len(methods)
    width = 0.8 / n
    if huge.any():
        fig = Figure(figsize=(11, 5.4))
        ax_top, ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 3], "hspace": 0.06})
        ax_top.set_ylim(gains[huge].min() / 20, gains[huge].max() * 3e3)
        axes = (ax_top, ax)
    else:
        fig = Figure(figsize=(11, 4.6))
        ax = fig.subplots()
        axes = (ax,)
    for j, m in enumerate(methods):
        xs = np.arange(len(NOISE_TYPES)) + (j - (n - 1) / 2) * width
        for a in axes:
            a.bar(xs, gains[j], width, color=styles[m]["color"], label=labels[m] if a is ax else None, zorder=2)
        for x, g, big in zip(xs, gains[j], huge[j]):
            target = axes[0] if big else ax
            target.text(x, g * 1.08, f"×{g:.2g}".replace("e+", "e"), rotation=90, fontsize=7, ha="center", va="bottom")
    for a in axes:
        a.set_yscale("log")
        a.axhline(1.0, color="k", lw=0.8)
        a.axhline(4.0, color="k", ls="--", lw=0.8)
        a.grid(alpha=0.25, axis="y", which="major")
    ax.set_ylim(lo, hi_small)
    if huge.any():  # the break: no spine between the two panels, diagonal marks on the axis
        ax_top.spines["bottom"].set_visible(False)
        ax.spines["top"].set_visible(False)
        ax_top.tick_params(bottom=False)
        d = dict(marker=[(-1, -0.5), (1, 0.5)], markersize=10, linestyle="none", color="k", mec="k", mew=1, clip_on=False)
        ax_top.plot([0, 1], [0, 0], transform=ax_top.transAxes, **d)
        ax.plot([0, 1], [1, 1], transform=ax.transAxes, **d)
        ax_top.set_title("bars above the break: the noise is cancelled down to float32 rounding "
                         "(ghost neurons subtract a shared additive noise exactly)", fontsize=8.5)
    ax.set_xticks(np.arange(len(NOISE_TYPES)),
                  [f"{NOISE_LABELS[nt]}\n(target D = {results['noise_types'][nt]['target']:g})" for nt in NOISE_TYPES])
    ax.set_ylabel("output SNR gain over plain\n(Σ mean² / Σ var, ratio)")
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="k", lw=0.8, label="×1: no gain"),
                Line2D([], [], color="k", ls="--", lw=0.8, label="×4: the gain reported by the paper's follow-up (MNIST)")]
    ax.legend(handles=handles, fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.suptitle("Output SNR gain of each mitigation over the plain network, at each noise type's target intensity",
                 fontsize=10.5)
    return fig


if __name__ == "__main__":  # pragma: no cover
    from .config import CONFIGS

    _common.cli(main, CONFIGS, __doc__)
