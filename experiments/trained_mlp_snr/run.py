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

Run alone::

    python experiments/trained_mlp_snr/run.py --config tiny --out /tmp/trained_mlp_snr
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from noisejax import data, layers, moments, noise, rng, simulate, train
from noisejax import snr as snr_lib
from noisejax.reproduce import atomic_write_bytes, cached_point, claim, import_file, load_arrays, save_arrays, to_jsonable

NAME = "trained_mlp_snr"
NOISE_TYPES = ("add_uncorrelated", "add_correlated", "mul_uncorrelated", "mul_correlated")
SHORT = {"add_uncorrelated": "AU", "add_correlated": "AC", "mul_uncorrelated": "MU", "mul_correlated": "MC"}
LABELS = {"add_uncorrelated": "additive uncorr.", "add_correlated": "additive corr.",
          "mul_uncorrelated": "multiplicative uncorr.", "mul_correlated": "multiplicative corr."}
PAPER = "A, trained sigmoid DNN"
PREDICTION_DB = 0.5  # analytic vs Monte Carlo SNR agreement counted as a prediction (≈ 12 % in variance)


def _config_module():
    return import_file(Path(__file__).with_name("config.py"))


# ----------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------


def _has_mnist(data_dir: Optional[str]) -> bool:
    if not data_dir:
        return False
    root = Path(data_dir)
    return any(root.glob("train-images*idx3-ubyte*")) and any(root.glob("t10k-images*idx3-ubyte*"))


def dataset(cfg, data_dir: Optional[str] = None) -> data.Dataset:
    """Real MNIST (flattened, ``max_train``/``max_test``) when ``data_dir`` holds it, else digits."""
    if _has_mnist(data_dir):
        return data.load_mnist(data_dir, seed=cfg.seed, flatten=True, max_train=cfg.max_train, max_test=cfg.max_test)
    return data.load_digits(seed=cfg.seed)


def one_type(t: str, d) -> noise.NeuronNoise:
    """Noise ``t`` with variance ``d``, the other three present but zero (same pytree for all)."""
    return noise.NeuronNoise(**{u: (d if u == t else 0.0) for u in NOISE_TYPES})


def noise_stack(d: float) -> noise.NeuronNoise:
    eye = np.eye(4, dtype=np.float32) * d
    return noise.NeuronNoise(**{t: eye[i] for i, t in enumerate(NOISE_TYPES)})


def trained_model(cfg, ds: data.Dataset, out: Path) -> tuple[Any, tuple, dict, bool]:
    """``(net, params, info, reused)``: the trained MLP, loaded from ``model.npz`` when valid."""
    widths = [int(np.prod(ds.feature_shape))] + list(cfg.hidden) + [ds.n_classes]
    ident = {"widths": widths, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.learning_rate,
             "loss": cfg.loss, "seed": cfg.seed, "dataset": ds.name, "n_train": len(ds.y_train)}
    path = out / "model.npz"
    arrays = load_arrays(path, key=ident)
    reused = arrays is not None
    if arrays is None:
        net0 = layers.mlp(widths, "sigmoid")
        _, p0 = jax.jit(net0.init, static_argnums=1)(jax.random.key(cfg.seed), (widths[0],))
        res = train.train_plain(net0, p0, ds.x_train, ds.y_train, key=jax.random.key(cfg.seed + 1), loss=cfg.loss,
                                steps=cfg.steps, batch_size=cfg.batch_size, optimizer=optax.adam(cfg.learning_rate))
        arrays = {}
        for l, blk in enumerate(res.params):
            arrays[f"W{l}"] = np.asarray(blk[0]["W"])
            arrays[f"b{l}"] = np.asarray(blk[0]["b"])
        arrays["losses"] = np.asarray(res.losses, np.float32)
        save_arrays(path, arrays, key=ident)
    n = len(widths) - 1
    net, params = layers.from_weights([jnp.asarray(arrays[f"W{l}"]) for l in range(n)],
                                      [jnp.asarray(arrays[f"b{l}"]) for l in range(n)], "sigmoid")
    acc = float(_clean_accuracy(net)(params, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)))
    info = {"widths": widths, "dataset": ds.name, "n_train": len(ds.y_train), "n_test": len(ds.y_test),
            "clean_test_accuracy": acc, "final_loss": float(arrays["losses"][-1])}
    return net, params, info, reused


def _clean_accuracy(net):
    return jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(layers.apply_batch(net, p, x), -1) == y))


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


def accuracy_sweep(net, params, ds: data.Dataset, cfg, key, points_dir: Path, ident) -> tuple[dict, int]:
    """Test accuracy (mean ± std over realizations) vs noise intensity, per noise type.

    Each (noise type, intensity) point is stored atomically in ``points_dir`` when
    finished; a restarted run reuses the stored points.  Returns ``(result, reused)``.
    """
    ev = train.make_evaluator(net, n_realizations=cfg.acc_realizations)
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    out = {"intensities": list(cfg.intensities), "mean": {}, "std": {}}
    reused = 0

    def point(i, t, j, d):
        r = ev(params, x, y, noise=one_type(t, jnp.float32(d)), key=jax.random.fold_in(key, 100 * i + j))
        acc = np.asarray(r.accuracy)
        return {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0}

    for i, t in enumerate(NOISE_TYPES):
        means, stds = [], []
        for j, d in enumerate(cfg.intensities):
            value, was_stored = cached_point(points_dir, f"accuracy-{t}-{j:03d}", lambda: point(i, t, j, d),
                                             key={**ident, "noise": t, "intensity": float(d)})
            reused += int(was_stored)
            means.append(value["mean"])
            stds.append(value["std"])
        out["mean"][t], out["std"][t] = means, stds
    return out, reused


# ----------------------------------------------------------------------------------
# Claims and figure
# ----------------------------------------------------------------------------------


def evaluate(snr: dict, acc: dict, info: dict, cfg) -> tuple[list[dict], dict]:
    claims = []
    n = cfg.realizations
    diffs = {t: np.abs(np.asarray(snr["mc_snr_db"][t]) - np.asarray(snr["analytic_snr_db"][t])) for t in NOISE_TYPES}
    worst = max(float(d.max()) for d in diffs.values())
    # sampling error of a layer SNR in dB: 10/ln10 · sqrt(2/(n-1)) for perfectly correlated neurons (worst case)
    tol_db = 5 * 10 / math.log(10) * math.sqrt(2.0 / (n - 1))
    accept_db = max(tol_db, PREDICTION_DB)
    resolved = worst > tol_db
    claims.append(claim(
        "The analytic method predicts the noise level (SNR) in every layer of a network trained with backpropagation",
        PAPER + ": per-layer SNR, simulation vs analytic",
        f"max |SNR_MC − SNR_analytic| over {len(info['widths']) - 1} layers × 4 noise types = {worst:.3f} dB "
        f"(5σ sampling tolerance {tol_db:.2f} dB, {n} realizations, D = {cfg.noise_variance:g})",
        worst < accept_db,
        f"criterion: within {accept_db:.2f} dB = max(5σ sampling tolerance, {PREDICTION_DB} dB ≈ 12 % in variance); "
        + ("the difference exceeds the sampling tolerance, so it is the analytic method's own error "
           "(Gaussian moment closure through the sigmoids)" if resolved else "the difference is within sampling error"),
    ))
    # accumulation: SNR of the last layer vs the first one
    first = {t: snr["mc_snr_db"][t][0] for t in NOISE_TYPES}
    last = {t: snr["mc_snr_db"][t][-1] for t in NOISE_TYPES}
    drops = {t: first[t] - last[t] for t in NOISE_TYPES}
    steps = {t: np.diff(np.asarray(snr["mc_snr_db"][t])).tolist() for t in NOISE_TYPES}
    # per-layer noise added by a layer alone is D (additive) or D·m² (multiplicative); accumulation bounded means the
    # last layer's noise variance stays within a small factor of that single-layer level
    own = {t: (cfg.noise_variance if t.startswith("add") else cfg.noise_variance * snr["signal_power"][-1]) for t in NOISE_TYPES}
    ratio = {t: snr["mc_var"][t][-1] / own[t] for t in NOISE_TYPES}
    bounded = all(r < 10.0 for r in ratio.values())
    claims.append(claim(
        "Noise accumulation through a trained sigmoid network is bounded: the output carries a small multiple of "
        "one layer's own noise, not the sum of all layers'",
        PAPER + ": noise/SNR vs layer",
        "output noise variance / one layer's own noise = "
        + ", ".join(f"{SHORT[t]} {ratio[t]:.2f}" for t in NOISE_TYPES)
        + f" with {len(info['widths']) - 1} noisy layers; SNR change first→last layer "
        + ", ".join(f"{SHORT[t]} {-drops[t]:+.1f} dB" for t in NOISE_TYPES),
        bounded,
        "a sigmoid has slope ≤ 1/4, so each layer attenuates the noise it receives unless its weights are large",
    ))
    # accuracy vs intensity
    clean = info["clean_test_accuracy"]
    ints = np.asarray(acc["intensities"])
    low = ints <= 1e-3 + 1e-12
    drop_low = {t: clean - min(np.asarray(acc["mean"][t])[low]) for t in NOISE_TYPES} if low.any() else {}
    ok_low = bool(drop_low) and all(v < 0.02 for v in drop_low.values())
    claims.append(claim(
        "Weak neuron noise does not affect the trained network's accuracy; strong noise degrades it",
        PAPER + ": accuracy vs noise intensity",
        f"clean test accuracy {clean:.3f}; largest drop for D ≤ 1e-3: "
        + (", ".join(f"{SHORT[t]} {drop_low[t]:.3f}" for t in NOISE_TYPES) if drop_low else "n/a")
        + f"; at D = {ints[-1]:g}: " + ", ".join(f"{SHORT[t]} {acc['mean'][t][-1]:.3f}" for t in NOISE_TYPES),
        ok_low and min(acc["mean"][t][-1] for t in NOISE_TYPES) < clean - 0.05,
    ))
    # correlated vs uncorrelated
    def d50(t):
        m = np.asarray(acc["mean"][t])
        thr = 0.5 * (clean + 1.0 / 10)  # halfway to chance
        below = np.nonzero(m < thr)[0]
        if below.size == 0:
            return float("inf")
        j = int(below[0])
        if j == 0:
            return float(ints[0])
        # log-linear interpolation between the two bracketing points
        x0, x1, y0, y1 = math.log10(ints[j - 1]), math.log10(ints[j]), m[j - 1], m[j]
        return 10 ** (x0 + (thr - y0) * (x1 - x0) / (y1 - y0))

    half = {t: d50(t) for t in NOISE_TYPES}
    summary = {"snr_abs_diff_db_max": worst, "snr_tolerance_db": tol_db, "snr_first_minus_last_db": drops,
               "snr_step_db": steps, "output_var_over_own_noise": ratio, "acc_drop_low_noise": drop_low,
               "intensity_at_half_accuracy": half}
    return claims, summary


def figure(snr: dict, acc: dict, info: dict, cfg) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6), dpi=100)
    colors = {"add_uncorrelated": "C0", "add_correlated": "C1", "mul_uncorrelated": "C2", "mul_correlated": "C3"}
    # coinciding curves stay visible: solid under dashed, circles under squares
    dash = {"add_uncorrelated": "-", "add_correlated": "--", "mul_uncorrelated": "-", "mul_correlated": "--"}
    mark = {"add_uncorrelated": "o", "add_correlated": "s", "mul_uncorrelated": "o", "mul_correlated": "s"}
    full = {t: LABELS[t].replace("uncorr.", "uncorrelated").replace("corr.", "correlated") for t in NOISE_TYPES}
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------


def main(config: Any = "default", out_dir: Optional[str] = None, *, data_dir: Optional[str] = None,
         progress: bool = True) -> dict:
    """Run the experiment; returns the results dict (claims, figures, numbers).

    Args:
      config: a ``config.Config`` or a name (``tiny``/``default``/``full``).
      out_dir: folder for the model, the finished points and the figure (default: a temp folder).
      data_dir: folder with real MNIST IDX files (used when present).
    """
    # full float32 matrix products: on GPUs the default (TF32) would add rounding noise of ~1e-3 relative
    with jax.default_matmul_precision("highest"):
        return _main(config, out_dir, data_dir=data_dir, progress=progress)


def _main(config: Any = "default", out_dir: Optional[str] = None, *, data_dir: Optional[str] = None,
         progress: bool = True) -> dict:
    cfg = _config_module().get_config(config) if isinstance(config, str) else config
    if out_dir is None:
        import tempfile

        out_dir = tempfile.mkdtemp(prefix=f"{NAME}-")
    out = Path(out_dir)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=4, desc=NAME, unit="step", leave=False)
    seconds = {}
    try:
        ds = dataset(cfg, data_dir)
        t = time.perf_counter()
        net, params, info, model_reused = trained_model(cfg, ds, out)
        seconds["train"] = time.perf_counter() - t
        if bar is not None:
            bar.update(1)
        ident = {"config": cfg, "model": info}
        key = rng.key(cfg.seed)
        x = jnp.asarray(ds.x_test[: cfg.n_inputs])
        t = time.perf_counter()
        snr, r1 = cached_point(out / "points", "snr", lambda: snr_per_layer(net, params, x, cfg, jax.random.fold_in(key, 0)),
                               key=ident)
        seconds["snr"] = time.perf_counter() - t
        if bar is not None:
            bar.update(1)
        t = time.perf_counter()
        acc, r2 = accuracy_sweep(net, params, ds, cfg, jax.random.fold_in(key, 1), out / "points", ident)
        seconds["accuracy"] = time.perf_counter() - t
        if bar is not None:
            bar.update(1)
        claims, summary = evaluate(snr, acc, info, cfg)
        atomic_write_bytes(out / f"{NAME}.png", figure(snr, acc, info, cfg))
        if bar is not None:
            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return to_jsonable({
        "experiment": NAME,
        "config": cfg,
        "model": info,
        "claims": claims,
        "figures": [f"{NAME}.png"],
        "summary": summary,
        "snr": snr,
        "accuracy": acc,
        "points_reused": int(model_reused) + int(r1) + int(r2),
        "seconds": dict(seconds, total=time.perf_counter() - t0),
    })


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="default", choices=("tiny", "default", "full"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args()
    r = main(a.config, a.out, data_dir=a.data_dir)
    for c in r["claims"]:
        print(("HOLDS " if c["holds"] else "FAILS ") + c["claim"] + " — " + str(c["measured"]))
    print(r["seconds"])
