"""Noisy inference: accuracy vs WNR for ML, MMSE, compensated MMSE (ours and the authors' form) and a learned denoiser.

For each model of the config: train (or load from the cache) the model; choose the
compensated MMSE's (λ', β) per WNR on the validation split (one compiled grid call
per WNR point) and, beside it, the test-oracle choice; train (or load) the learned
denoiser on the validation split; then evaluate every estimator on the test split
with R noise realizations per WNR point (all realizations and estimators of a point
in one compiled call), read off the dB gains over ML at the target accuracies and
write ``results.json`` and one PNG per model into ``config.out_dir``.

Usage::

    python experiments/noisy_inference/run.py [--config tiny|default|full] [--out DIR] [--progress]
"""

from __future__ import annotations

import argparse
import importlib.util
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import checkpoint, denoise, models, rng, sweeps
from noisejax import flax as njflax


def _load_config_module():
    path = Path(__file__).with_name("config.py")
    spec = importlib.util.spec_from_file_location("noisy_inference_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("noisy_inference_config", module)
    spec.loader.exec_module(module)
    return module


config_lib = _load_config_module()

_VARIANTS = {
    "affine": "learned (affine)",
    "common": "learned (affine + common mode)",
    "projection": "learned (affine + projection)",
}
_RECAL = " + BN re-estimation"
_PB = "compensated MMSE, authors' form (val-selected)"

__all__ = ["main", "run_model"]


def _learned_denoiser(spec, cfg, variables, ds, logits_fn, key, variant, recalibrate=None):
    """Train (or load from the cache) a learned denoiser of ``spec`` on the validation split.

    With ``recalibrate`` (BatchNorm models) the training loss re-estimates the batch
    statistics on each minibatch's inputs after denoising, as the evaluation does.
    """
    template = denoise.init_learned(
        variables, wnr_range=spec.learned_wnr_range, per_channel=cfg.learned_per_channel,
        projection=(variant == "projection"), common_mode=(variant == "common"),
    )
    recipe = {
        "what": "learned_denoiser",
        "version": 4,
        "variant": variant,
        "recalibrate": recalibrate is not None,
        "model": spec.model.to_dict(),
        "per_channel": cfg.learned_per_channel,
        "steps": cfg.learned_steps,
        "draws": cfg.learned_draws,
        "batch": cfg.learned_batch,
        "lr": cfg.learned_lr,
        "wnr_range": list(spec.learned_wnr_range),
        "reference": cfg.reference,
        "scope": cfg.scope,
        "seed": cfg.seed,
    }

    def build():
        if recalibrate is None:
            loss = lambda p, b: models.loss_fn(logits_fn(p, b[0]), b[1])  # noqa: E731
        else:
            loss = lambda p, b: models.loss_fn(logits_fn(recalibrate(p, b[0]), b[0]), b[1])  # noqa: E731
        den, hist = denoise.train_learned(
            template, variables, loss, (ds.x_val, ds.y_val), key=key, steps=cfg.learned_steps,
            n_draws=cfg.learned_draws, batch_size=cfg.learned_batch, learning_rate=cfg.learned_lr,
            reference=cfg.reference, scope=cfg.scope, progress=cfg.progress,
        )
        losses = hist["loss"]
        k = max(1, len(losses) // 10)
        info = {
            "seconds": hist["seconds"],
            "loss_first": float(np.mean(losses[:k])),
            "loss_last": float(np.mean(losses[-k:])),
        }
        return den, info

    den, info, status = checkpoint.cached(recipe, build, cache_dir=cfg.cache_dir, name="denoiser", target=template)
    den = jax.tree_util.tree_map(jnp.asarray, den)
    return den, dict(info, cache=status)


def run_model(spec, cfg) -> dict:
    """Everything for one model; returns its JSON-ready result dict (and writes its PNG)."""
    t_start = time.perf_counter()
    # noisejax's counter-based generator: JAX's threefry made every program that draws weight
    # noise take seconds to compile (one unrolled 20-round hash per parameter leaf)
    key = jax.random.fold_in(rng.key(cfg.seed), sum(map(ord, spec.name)))
    k_val, k_test, k_learn = (jax.random.fold_in(key, i) for i in (1, 2, 3))
    variables, train_info, ds = models.load_or_train(spec.model, cache_dir=cfg.cache_dir, progress=cfg.progress)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    f = models.logits_fn(spec.model)
    wnr = list(spec.wnr_db)
    common = dict(reference=cfg.reference, scope=cfg.scope)

    # (λ', β) grid: validation selection and the test oracle, one compiled call per WNR point each
    t0 = time.perf_counter()
    grid = denoise.compensated_grid(cfg.grid_lams, cfg.grid_betas)
    points = Path(cfg.out_dir) / "points" / spec.name  # finished WNR points, reused by a restarted run
    grid_acc = sweeps.grid_accuracies(
        f, variables, {"val": (ds.x_val, ds.y_val), "test": (ds.x_test, ds.y_test)}, wnr, grid, key=k_val,
        n_realizations=cfg.grid_realizations, store=points / "grid", store_key=spec.model.to_dict(), **common,
    )
    val_acc, test_grid = grid_acc["val"], grid_acc["test"]
    sel, oracle = sweeps.select_grid(val_acc), sweeps.select_grid(test_grid)
    lam, beta = np.asarray(grid.lam), np.asarray(grid.beta)
    pick = lambda idx: [denoise.CompensatedMMSE(lam=grid.lam[i], beta=grid.beta[i]) for i in idx]  # noqa: E731
    # the authors' closed form (global clean-weight variance, no fallback) on the same grid, selected on
    # the validation split only (same noise realizations as above: same key)
    signal_var = denoise.global_signal_var(variables)
    pb_grid = denoise.mmse_pb_grid(cfg.grid_lams, cfg.grid_betas, signal_var)
    pb_sel, pb_val = [], None
    if cfg.authors_form:
        pb_val = sweeps.grid_accuracies(
            f, variables, {"val": (ds.x_val, ds.y_val)}, wnr, pb_grid, key=k_val,
            n_realizations=cfg.grid_realizations, store=points / "grid_pb", store_key=spec.model.to_dict(), **common,
        )["val"]
        pb_sel = sweeps.select_grid(pb_val)
    t_grid = time.perf_counter() - t0

    # BatchNorm models: batch statistics re-estimated on the (unlabeled) validation inputs after denoising
    recal = None
    if cfg.recalibrate and "batch_stats" in variables:
        recal = functools.partial(njflax.recalibrate_batch_stats, models.build(spec.model), train=False)
    x_cal = jnp.asarray(ds.x_val)

    learned, learn_info = {}, {}
    for variant in cfg.learned_variants:
        label = _VARIANTS[variant]
        learned[label], learn_info[label] = _learned_denoiser(spec, cfg, variables, ds, f, k_learn, variant)
        if recal is not None and variant == "common":
            den, learn_info[label + _RECAL] = _learned_denoiser(spec, cfg, variables, ds, f, k_learn, variant, recal)
            learned[label + _RECAL] = denoise.Recalibrated(den, x_cal, recal)
    if "projection" in cfg.learned_variants:  # the untrained projection alone: what the side information buys
        learned["projection only (untrained)"] = denoise.retarget(
            denoise.init_learned(variables, projection=True, wnr_range=spec.learned_wnr_range), variables
        )

    estimators = {
        "ML": denoise.ML(),
        "MMSE": denoise.MMSE(),
        "MMSE (side info)": denoise.MMSE(prior=denoise.clean_prior(variables), name="mmse_side"),
        "compensated MMSE (val-selected)": pick(sel),
        "compensated MMSE (test oracle)": pick(oracle),
    }
    if cfg.authors_form:
        estimators[_PB] = [denoise.MMSEpb(lam=pb_grid.lam[i], beta=pb_grid.beta[i], signal_var=signal_var) for i in pb_sel]
    estimators.update({"common-mode MMSE": denoise.CommonModeMMSE(), **learned})
    if recal is not None:
        estimators["ML" + _RECAL] = denoise.Recalibrated(denoise.ML(), x_cal, recal)
        estimators["compensated MMSE (val-selected)" + _RECAL] = [
            denoise.Recalibrated(e, x_cal, recal) for e in estimators["compensated MMSE (val-selected)"]
        ]
    sweep = sweeps.accuracy_sweep(
        f, variables, ds.x_test, ds.y_test, wnr, key=k_test, n_realizations=cfg.n_realizations,
        estimators=estimators, progress=cfg.progress, store=points / "sweep", store_key=spec.model.to_dict(), **common,
    )
    t_sweep = sweep.pop("_seconds")
    reused = sweep.pop("_reused")
    curves = {name: sweep[name] for name in estimators}
    gains = sweeps.gains_table(wnr, curves, cfg.targets, baseline="ML")

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{spec.name}.png"
    _plot_model(spec.name, wnr, curves, cfg, png)
    return {
        "model": spec.model.to_dict(),
        "train": train_info,
        "wnr_db": wnr,
        "n_realizations": cfg.n_realizations,
        "curves": {
            name: {"mean": acc.mean(1).tolist(), "std": acc.std(1).tolist(), "acc": acc.tolist()}
            for name, acc in curves.items()
        },
        "gains": gains,
        "compensated": {
            "grid": {"lam": list(cfg.grid_lams), "beta": list(cfg.grid_betas)},
            "grid_realizations": cfg.grid_realizations,
            "val_selected": [{"lam": float(lam[i]), "beta": float(beta[i])} for i in sel],
            "test_oracle": [{"lam": float(lam[i]), "beta": float(beta[i])} for i in oracle],
            "val_accuracy_selected": [float(val_acc[w, i].mean()) for w, i in enumerate(sel)],
        },
        "mmse_pb": None if pb_val is None else {
            "signal_var": float(signal_var),
            "val_selected": [{"lam": float(lam[i]), "beta": float(beta[i])} for i in pb_sel],
            "val_accuracy_selected": [float(pb_val[w, i].mean()) for w, i in enumerate(pb_sel)],
        },
        "learned": learn_info,
        "seconds": {"grid": t_grid, "sweep": t_sweep, "total": time.perf_counter() - t_start},
        "points_reused": int(reused),
        "png": png.name,
    }


_HIDDEN = ("MMSE (side info)", "compensated MMSE (test oracle)", "projection only (untrained)")


def _panel(name: str) -> int:
    """0: closed-form estimators, 1: learned denoisers, 2: with BatchNorm re-estimation."""
    if name.endswith(_RECAL):
        return 2
    return 1 if name.startswith(("learned", "projection")) else 0


def _plot_model(model_name: str, wnr, curves: dict, cfg, png) -> None:
    """Accuracy vs WNR in panels of at most four curves, ML (black) in each; ``curves[name]`` is ``(W, R)``."""
    shown = {k: v for k, v in curves.items() if k not in _HIDDEN and k != "ML"}
    titles = ("closed-form estimators", "learned denoisers (trained on the validation split)",
              "with BatchNorm statistics re-estimated after denoising")
    panels = [(t, [k for k in shown if _panel(k) == i]) for i, t in enumerate(titles)]
    panels = [(t, ks) for t, ks in panels if ks]
    if "ML" + _RECAL in shown:  # in the BN panel, ML + BN is the reference the others add to
        panels = [(t, ([k for k in ks if k == "ML" + _RECAL] + [k for k in ks if k != "ML" + _RECAL])) for t, ks in panels]
    styles = {k: {"ls": ":", "label": f"{k}: side information (one clean number per output channel)"}
              for k in shown if "projection" in k}
    sweeps.plot_accuracy_curves(
        wnr, {"ML": curves["ML"], **shown}, str(png), targets=cfg.targets, styles=styles, panels=panels, reference="ML",
        band_label=f"±1 std over {cfg.n_realizations} noise realizations",
        target_label="accuracy at which the dB gains over ML are read",
        title=f"Noisy inference, {model_name}: test accuracy of the denoised network vs weight-to-noise ratio\n"
              f"(noise added to every weight; {cfg.scope} WNR = the weights' {cfg.reference} over the noise power, in dB; "
              "ML = the noisy weights as received)",
    )


def replot(result: dict, cfg, out_dir) -> None:
    """Re-draw the figures from a stored result (no recomputation)."""
    for name, res in result["models"].items():
        curves = {k: np.asarray(v["acc"]) for k, v in res["curves"].items()}
        _plot_model(name, res["wnr_db"], curves, cfg, Path(out_dir) / f"{name}.png")


def main(config=None) -> dict:
    """Run the experiment; returns (and writes to ``out_dir/results.json``) the results dict."""
    cfg = config if config is not None else config_lib.default()
    t0 = time.perf_counter()
    results = {"experiment": "noisy_inference", "config": _config_dict(cfg), "models": {}}
    for spec in cfg.specs:
        results["models"][spec.name] = run_model(spec, cfg)
        _write(cfg, results)  # partial results survive an interrupted run
    results["figures"] = [res["png"] for res in results["models"].values()]
    results["points_reused"] = sum(res["points_reused"] for res in results["models"].values())
    results["seconds"] = time.perf_counter() - t0
    results["summary"] = {
        name: {
            est: {t: g[t]["gain_db"] for t in g}
            for est, g in res["gains"].items()
            if est != "ML"
        }
        for name, res in results["models"].items()
    }
    thresholds = {  # the paper's targets; compensated MMSE + BN re-estimation is reported, not judged by them
        "compensated mmse (val-selected)" + _RECAL.lower(): None, "compensated": 1.0, "learned": 4.1,
    }
    results["claims"] = sweeps.gain_claims(
        results["summary"], thresholds, figure="Shao et al. TSP 2023, noisy inference (accuracy vs WNR)"
    )
    # gain_claims makes one claim per (model, estimator) of the summary, in its order
    pairs = [(model, est) for model, per_est in results["summary"].items() for est in per_est]
    for claim, (model, est) in zip(results["claims"], pairs):
        claim["note"] = _claim_note(results["summary"][model], est)
    out = Path(cfg.out_dir) / "results.json"
    out.write_text(json.dumps(results, indent=1))
    return results


def _claim_note(gains: dict, est: str) -> str:
    """What a reader needs to know about estimator ``est`` beside its gain (``gains``: the model's summary)."""
    if est.endswith(_RECAL):
        note = "BatchNorm running statistics re-estimated on the unlabeled validation inputs after denoising (no clean number)"
        over, base = gains[est].get("60%"), gains.get("ML" + _RECAL, {}).get("60%")
        if est != "ML" + _RECAL and over is not None and base is not None:
            note += f"; over ML{_RECAL} it adds {over - base:.2f} dB"
        if est.startswith("compensated"):
            note += " — the gain is the re-estimation's, so the paper's 1 dB target is not applied"
        return note
    if "common mode" in est:
        return "blind: no clean number is stored; per-layer coefficients and the common-mode direction, trained on the validation split"
    if est == "common-mode MMSE":
        return "blind closed form: no trained coefficient, no clean number"
    if "projection" in est:
        return ("uses side information: one clean number per output channel (the weights' "
                "component along a learned per-layer direction), besides the per-layer coefficients")
    if est == _PB:
        return ("the authors' published closed form (denoise.mmse_pb): one global clean-weight variance "
                "(side information) and no fallback where η+1−λ' < 0; (λ', β) chosen on the validation split")
    if "oracle" in est:
        return "(λ', β) chosen by test accuracy, as in the authors' published curves"
    return ""


def _config_dict(cfg) -> dict:
    import dataclasses

    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps(d, default=str))


def _write(cfg, results) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default", choices=("tiny", "default", "full"))
    p.add_argument("--out", default=None, help="output folder (default experiments/noisy_inference/results)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = _parse()
    cfg = config_lib.get(args.config)
    cfg = cfg.replace(progress=args.progress)
    if args.out:
        cfg = cfg.replace(out_dir=args.out)
    if args.cache_dir:
        cfg = cfg.replace(cache_dir=args.cache_dir)
    res = main(cfg)
    print(json.dumps(res["summary"], indent=1))
    print(f"total {res['seconds']:.1f} s -> {cfg.out_dir}")
