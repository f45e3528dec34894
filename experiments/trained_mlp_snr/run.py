"""Figure 2 — per-layer SNR and accuracy of a trained sigmoid MLP under neuron noise (paper A).

A sigmoid MLP (every layer ``y = σ(x W + b)`` followed by a noise site) is trained
with Adam on scikit-learn's digits (or real MNIST from ``--data-dir``); the trained
weights are cached as ``model.npz`` (no pickle) in the experiment's folder.  Then:

* **SNR per layer** for each of the four noise types (variance ``D`` at every
  layer, one type at a time) on ``n_inputs`` test inputs: Monte Carlo
  (:func:`noisejax.simulate.monte_carlo`) against the analytic moments
  (:func:`noisejax.moments.predict`, Gaussian moment matching).  The layer SNR is
  ``10·log10(Σ m² / Σ var)`` with the sums over inputs and neurons (:mod:`noisejax.snr`).
* **Accuracy vs noise intensity** on the test set for each noise type, with
  :func:`noisejax.train.make_evaluator` (realizations ``vmap``-ped, one compile
  for the whole sweep).

Run alone (from the repository root)::

    python -m experiments.trained_mlp_snr.run --config tiny --out /tmp/trained_mlp_snr
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import data, layers, moments, rng, simulate, train
from noisejax import snr as snr_lib
from noisejax.study.claims import Claim, Result, claim

from .. import _common
from .._common import LABELS, NOISE_TYPES, SHORT, noise_stack, one_type

NAME = "trained_mlp_snr"
PAPER = "A, trained sigmoid DNN"
PREDICTION_DB = 0.5  # analytic vs Monte Carlo SNR agreement counted as a prediction (≈ 12 % in variance)


# ----------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------


def _layer_snr_db(mean, var) -> float:
    """The layer summary of :mod:`noisejax.snr`: ``10·log10(Σ m² / Σ var)`` over inputs and neurons."""
    return float(snr_lib.layer_snr_db(np.asarray(mean, np.float64), np.asarray(var, np.float64)))


def snr_per_layer(net, params, x, cfg, key) -> dict:
    """Per-layer SNR (dB) and mean noise variance, Monte Carlo and analytic, for each noise type."""
    nz4 = noise_stack(cfg.noise_variance)

    def one(k):
        return jax.vmap(lambda nz: layers.apply_batch(net, params, x, key=k, noise=nz, return_layers=True)[1])(nz4)

    t0 = time.perf_counter()
    mc = simulate.monte_carlo(one, key, cfg.realizations)
    t1 = time.perf_counter()
    out: dict[str, Any] = {"mc_snr_db": {}, "analytic_snr_db": {}, "mc_var": {}, "analytic_var": {}, "signal_power": []}
    n_layers = len(mc.mean)
    for i, t in enumerate(NOISE_TYPES):
        pred = moments.predict(net, params, x, noise=one_type(t, cfg.noise_variance), method="gaussian",
                               keep_covariance=False)
        out["mc_snr_db"][t] = [_layer_snr_db(mc.mean[l][i], mc.var[l][i]) for l in range(n_layers)]
        out["analytic_snr_db"][t] = [_layer_snr_db(pred[l].mean, pred[l].var) for l in range(n_layers)]
        out["mc_var"][t] = [float(np.mean(mc.var[l][i])) for l in range(n_layers)]
        out["analytic_var"][t] = [float(np.mean(pred[l].var)) for l in range(n_layers)]
    out["signal_power"] = [float(np.mean(np.square(mc.mean[l][0]))) for l in range(n_layers)]
    out["seconds"] = {"monte_carlo": t1 - t0, "analytic": time.perf_counter() - t1}
    return out


def accuracy_sweep(net, params, ds: data.Dataset, cfg, key, run: _common.Run, ident) -> dict:
    """Test accuracy (mean ± std over realizations) vs noise intensity, per noise type.

    Each (noise type, intensity) point is stored atomically in the run's points folder
    when finished; a restarted run reuses the stored points.
    """
    ev = train.make_evaluator(net, n_realizations=cfg.acc_realizations)
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    out = {"intensities": list(cfg.intensities), "mean": {}, "std": {}}

    def point(i, t, j, d):
        r = ev(params, x, y, noise=one_type(t, jnp.float32(d)), key=jax.random.fold_in(key, 100 * i + j))
        acc = np.asarray(r.accuracy)
        return {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0}

    for i, t in enumerate(NOISE_TYPES):
        means, stds = [], []
        for j, d in enumerate(cfg.intensities):
            value = run.point(f"accuracy-{t}-{j:03d}", lambda: point(i, t, j, d),
                              key={**ident, "noise": t, "intensity": float(d)})
            means.append(value["mean"])
            stds.append(value["std"])
        out["mean"][t], out["std"][t] = means, stds
    return out


# ----------------------------------------------------------------------------------
# Claims and figure
# ----------------------------------------------------------------------------------


def _prediction_claim(snr: dict, info: dict, cfg, summary: dict) -> Claim:
    """Analytic vs Monte Carlo layer SNRs, within max(5σ sampling tolerance, PREDICTION_DB)."""
    n = cfg.realizations
    diffs = {t: np.abs(np.asarray(snr["mc_snr_db"][t]) - np.asarray(snr["analytic_snr_db"][t])) for t in NOISE_TYPES}
    worst = max(float(d.max()) for d in diffs.values())
    # sampling error of a layer SNR in dB: 10/ln10 · sqrt(2/(n-1)) for perfectly correlated neurons (worst case)
    tol_db = 5 * 10 / math.log(10) * math.sqrt(2.0 / (n - 1))
    accept_db = max(tol_db, PREDICTION_DB)
    summary.update({"snr_abs_diff_db_max": worst, "snr_tolerance_db": tol_db})
    return claim(
        "The analytic method predicts the noise level (SNR) in every layer of a network trained with backpropagation",
        PAPER + ": per-layer SNR, simulation vs analytic",
        f"max |SNR_MC − SNR_analytic| over {len(info['widths']) - 1} layers × 4 noise types = {worst:.3f} dB "
        f"(5σ sampling tolerance {tol_db:.2f} dB, {n} realizations, D = {cfg.noise_variance:g})",
        worst < accept_db,
        f"criterion: within {accept_db:.2f} dB = max(5σ sampling tolerance, {PREDICTION_DB} dB ≈ 12 % in variance); "
        + ("the difference exceeds the sampling tolerance, so it is the analytic method's own error "
           "(Gaussian moment closure through the sigmoids)" if worst > tol_db else "the difference is within sampling error"),
    )


def _accumulation_claim(snr: dict, info: dict, cfg, summary: dict) -> Claim:
    """The output's noise against one layer's own noise: bounded accumulation."""
    drops = {t: snr["mc_snr_db"][t][0] - snr["mc_snr_db"][t][-1] for t in NOISE_TYPES}
    # per-layer noise added by a layer alone is D (additive) or D·m² (multiplicative); accumulation bounded means the
    # last layer's noise variance stays within a small factor of that single-layer level
    own = {t: (cfg.noise_variance if t.startswith("add") else cfg.noise_variance * snr["signal_power"][-1]) for t in NOISE_TYPES}
    ratio = {t: snr["mc_var"][t][-1] / own[t] for t in NOISE_TYPES}
    summary.update({"snr_first_minus_last_db": drops,
                    "snr_step_db": {t: np.diff(np.asarray(snr["mc_snr_db"][t])).tolist() for t in NOISE_TYPES},
                    "output_var_over_own_noise": ratio})
    return claim(
        "Noise accumulation through a trained sigmoid network is bounded: the output carries a small multiple of "
        "one layer's own noise, not the sum of all layers'",
        PAPER + ": noise/SNR vs layer",
        "output noise variance / one layer's own noise = "
        + ", ".join(f"{SHORT[t]} {ratio[t]:.2f}" for t in NOISE_TYPES)
        + f" with {len(info['widths']) - 1} noisy layers; SNR change first→last layer "
        + ", ".join(f"{SHORT[t]} {-drops[t]:+.1f} dB" for t in NOISE_TYPES),
        all(r < 10.0 for r in ratio.values()),
        "a sigmoid has slope ≤ 1/4, so each layer attenuates the noise it receives unless its weights are large",
    )


def _half_accuracy_intensity(acc: dict, t: str, clean: float) -> float:
    """Intensity where the accuracy falls halfway to chance (log-linear interpolation; inf if never)."""
    ints = np.asarray(acc["intensities"])
    m = np.asarray(acc["mean"][t])
    thr = 0.5 * (clean + 1.0 / 10)  # halfway to chance
    below = np.nonzero(m < thr)[0]
    if below.size == 0:
        return float("inf")
    j = int(below[0])
    if j == 0:
        return float(ints[0])
    x0, x1, y0, y1 = math.log10(ints[j - 1]), math.log10(ints[j]), m[j - 1], m[j]
    return 10 ** (x0 + (thr - y0) * (x1 - x0) / (y1 - y0))


def _accuracy_claim(acc: dict, info: dict, summary: dict) -> Claim:
    """Weak noise leaves the accuracy, strong noise degrades it."""
    clean = info["clean_test_accuracy"]
    ints = np.asarray(acc["intensities"])
    low = ints <= 1e-3 + 1e-12
    drop_low = {t: clean - min(np.asarray(acc["mean"][t])[low]) for t in NOISE_TYPES} if low.any() else {}
    ok_low = bool(drop_low) and all(v < 0.02 for v in drop_low.values())
    summary.update({"acc_drop_low_noise": drop_low,
                    "intensity_at_half_accuracy": {t: _half_accuracy_intensity(acc, t, clean) for t in NOISE_TYPES}})
    return claim(
        "Weak neuron noise does not affect the trained network's accuracy; strong noise degrades it",
        PAPER + ": accuracy vs noise intensity",
        f"clean test accuracy {clean:.3f}; largest drop for D ≤ 1e-3: "
        + (", ".join(f"{SHORT[t]} {drop_low[t]:.3f}" for t in NOISE_TYPES) if drop_low else "n/a")
        + f"; at D = {ints[-1]:g}: " + ", ".join(f"{SHORT[t]} {acc['mean'][t][-1]:.3f}" for t in NOISE_TYPES),
        ok_low and min(acc["mean"][t][-1] for t in NOISE_TYPES) < clean - 0.05,
    )


def evaluate(snr: dict, acc: dict, info: dict, cfg) -> tuple[list[Claim], dict]:
    summary: dict[str, Any] = {}
    claims = [_prediction_claim(snr, info, cfg, summary), _accumulation_claim(snr, info, cfg, summary),
              _accuracy_claim(acc, info, summary)]
    order = ("snr_abs_diff_db_max", "snr_tolerance_db", "snr_first_minus_last_db", "snr_step_db",
             "output_var_over_own_noise", "acc_drop_low_noise", "intensity_at_half_accuracy")
    return claims, {k: summary[k] for k in order}


def figure(snr: dict, acc: dict, info: dict, cfg):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6), dpi=100)
    colors = {"add_uncorrelated": "C0", "add_correlated": "C1", "mul_uncorrelated": "C2", "mul_correlated": "C3"}
    # coinciding curves stay visible: solid under dashed, circles under squares
    dash = {"add_uncorrelated": "-", "add_correlated": "--", "mul_uncorrelated": "-", "mul_correlated": "--"}
    mark = {"add_uncorrelated": "o", "add_correlated": "s", "mul_uncorrelated": "o", "mul_correlated": "s"}
    full = LABELS
    ax = fig.add_subplot(1, 2, 1)
    n_layers = len(snr["signal_power"])
    idx = np.arange(1, n_layers + 1)
    for t in NOISE_TYPES:
        ax.plot(idx, snr["analytic_snr_db"][t], dash[t], color=colors[t], lw=1.6, label=f"{full[t]}")
        ax.plot(idx, snr["mc_snr_db"][t], mark[t], color=colors[t], mfc="none", ms=7 if mark[t] == "o" else 5)
    ax.plot([], [], "k-", label="lines: analytic prediction")
    ax.plot([], [], "ko", mfc="none", label="markers: Monte Carlo")
    ax.set_xticks(idx)
    ax.set_xlabel("layer (last = output)")
    ax.set_ylabel("layer SNR (dB) = 10 log10(Σ mean² / Σ var)")
    ax.set_title(f"per-layer SNR, D = {cfg.noise_variance:g} at every layer, {cfg.realizations} realizations", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    ints = np.asarray(acc["intensities"])
    for t in NOISE_TYPES:
        m, s = np.asarray(acc["mean"][t]), np.asarray(acc["std"][t])
        ax.plot(ints, m, dash[t], marker=mark[t], color=colors[t], ms=4, label=full[t])
        ax.fill_between(ints, m - s, m + s, color=colors[t], alpha=0.15)
    ax.axhline(info["clean_test_accuracy"], color="k", ls=":", lw=1, label="without noise")
    ax.set_xscale("log")
    ax.set_xlabel("noise variance D (every layer)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"accuracy vs noise (mean and ±1 std band over {cfg.acc_realizations} realizations)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    w = "-".join(map(str, info["widths"]))
    fig.suptitle(f"Trained sigmoid MLP {w} on {info['dataset']} (clean test accuracy {info['clean_test_accuracy']:.3f})",
                 fontsize=11)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------


def main(config, out_dir, *, data_dir: Optional[str] = None, progress: bool = True) -> Result:
    """Run the experiment in ``out_dir`` (model, finished points, figure); real MNIST from ``data_dir`` if there."""
    cfg = config
    with _common.Run(NAME, out_dir, steps=4, progress=progress) as run:
        ds = _common.dataset(data_dir, seed=cfg.seed, max_train=cfg.max_train, max_test=cfg.max_test)
        net, params, info, model_reused = run.stage(
            "train", _common.trained_mlp, ds, cfg.hidden, steps=cfg.steps, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, loss=cfg.loss, seed=cfg.seed, train_seed=cfg.seed + 1, path=run.out / "model.npz")
        run.reused += int(model_reused)
        ident = {"config": cfg, "model": info}
        key = rng.key(cfg.seed)
        x = jnp.asarray(ds.x_test[: cfg.n_inputs])
        snr = run.stage("snr", run.point, "snr", lambda: snr_per_layer(net, params, x, cfg, jax.random.fold_in(key, 0)),
                        key=ident)
        acc = run.stage("accuracy", accuracy_sweep, net, params, ds, cfg, jax.random.fold_in(key, 1), run, ident)
        claims, summary = evaluate(snr, acc, info, cfg)
        fig = run.stage("figure", run.figure, f"{NAME}.png", figure(snr, acc, info, cfg))
        return run.result(claims, [fig], config=cfg, model=info, summary=summary, snr=snr, accuracy=acc)


if __name__ == "__main__":  # pragma: no cover
    from .config import CONFIGS

    _common.cli(main, CONFIGS, __doc__)
