"""Noisy inference: accuracy vs WNR for ML, MMSE, compensated MMSE (ours and the authors' form) and a learned denoiser.

For each model of the config: train (or load from the cache) the model; choose the
compensated MMSE's (λ', β) per WNR on the validation split (one compiled grid call
per WNR point) and, beside it, the test-oracle choice; train (or load) the learned
denoiser on the validation split; then evaluate every estimator on the test split
with R noise realizations per WNR point (all realizations and estimators of a point
in one compiled call), read off the dB gains over ML at the target accuracies and
write ``results.json`` and one PNG per model into ``config.out_dir``.

Usage (from the repository root)::

    python -m experiments.noisy_inference.run --config tiny --out /tmp/noisy_inference
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import denoise, rng, sweeps
from noisejax import flax as njflax
from noisejax.study import files
from noisejax.study import models
from noisejax.study.claims import Result, gain_claims
from noisejax.study.plots import plot_accuracy_curves

from .. import _common

NAME = "noisy_inference"
_VARIANTS = {
    "affine": "learned (affine)",
    "common": "learned (affine + common mode)",
    "projection": "learned (affine + projection)",
}
_RECAL = " + BN re-estimation"
_PB = "compensated MMSE, authors' form (val-selected)"

__all__ = ["main", "run_model"]


def _learned_denoiser(spec, cfg, variables, ds, loss, key, variant, template, out: Path, progress: bool, *,
                      gated=None, recalibrate: bool = False):
    """Train (or load from the cache) a learned denoiser of ``spec`` on the validation split.

    ``loss(params, (x, y))`` is the training loss (with ``recalibrate``, one that re-estimates
    the batch statistics on each minibatch's inputs after denoising, as the evaluation does).
    ``gated`` (from :func:`noisejax.denoise.gate_learned`) is ``template`` in the structure
    shared by the model's variants: trained in that form, the variants compile one program.
    """
    recipe = {
        "what": "learned_denoiser", "version": 5, "variant": variant, "recalibrate": recalibrate,
        "model": spec.model.to_dict(), "per_channel": cfg.learned_per_channel, "steps": cfg.learned_steps,
        "draws": cfg.learned_draws, "batch": cfg.learned_batch, "lr": cfg.learned_lr,
        "wnr_range": list(spec.learned_wnr_range), "reference": cfg.reference, "scope": cfg.scope, "seed": cfg.seed,
        "gated": gated is not None,
    }

    def build():
        den, hist = denoise.train_learned(
            template if gated is None else gated, variables, loss, (ds.x_val, ds.y_val), key=key,
            steps=cfg.learned_steps, n_draws=cfg.learned_draws, batch_size=cfg.learned_batch,
            learning_rate=cfg.learned_lr, reference=cfg.reference, scope=cfg.scope, progress=progress,
        )
        losses = hist["loss"]
        k = max(1, len(losses) // 10)
        return denoise.ungate_learned(den), {"seconds": hist["seconds"], "loss_first": float(np.mean(losses[:k])),
                                             "loss_last": float(np.mean(losses[-k:]))}

    den, info, status = files.cached(recipe, build, cache_dir=out / "cache", name="denoiser", target=template)
    return jax.tree_util.tree_map(jnp.asarray, den), dict(info, cache=status)


def _grid_search(spec, cfg, variables, ds, f, key, points: Path) -> dict:
    """The (λ', β) grid on the validation split (selection) and the test split (oracle), one compiled call per WNR
    point each; the authors' closed form on the same grid and realizations, selected on validation."""
    wnr, common = list(spec.wnr_db), dict(reference=cfg.reference, scope=cfg.scope)
    grid = denoise.compensated_grid(cfg.grid_lams, cfg.grid_betas)
    grid_acc = sweeps.grid_accuracies(
        f, variables, {"val": (ds.x_val, ds.y_val), "test": (ds.x_test, ds.y_test)}, wnr, grid, key=key,
        n_realizations=cfg.grid_realizations, store=files.PointStore(points / "grid"), store_key=spec.model.to_dict(),
        **common,
    )
    out = {"grid": grid, "val_acc": grid_acc["val"], "sel": sweeps.select_grid(grid_acc["val"]),
           "oracle": sweeps.select_grid(grid_acc["test"]), "signal_var": denoise.global_signal_var(variables),
           "pb_sel": [], "pb_val": None}
    out["pb_grid"] = denoise.mmse_pb_grid(cfg.grid_lams, cfg.grid_betas, out["signal_var"])
    if cfg.authors_form:
        out["pb_val"] = sweeps.grid_accuracies(
            f, variables, {"val": (ds.x_val, ds.y_val)}, wnr, out["pb_grid"], key=key,
            n_realizations=cfg.grid_realizations, store=files.PointStore(points / "grid_pb"),
            store_key=spec.model.to_dict(), **common,
        )["val"]
        out["pb_sel"] = sweeps.select_grid(out["pb_val"])
    return out


def _estimators(spec, cfg, variables, ds, f, key, sel: dict, out: Path, progress: bool) -> tuple[dict, dict]:
    """Every estimator of the curves (name -> estimator, or one per WNR point) and the learned ones' training info."""
    grid = sel["grid"]
    pick = lambda idx: [denoise.CompensatedMMSE(lam=grid.lam[i], beta=grid.beta[i]) for i in idx]  # noqa: E731
    # BatchNorm models: batch statistics re-estimated on the (unlabeled) validation inputs after denoising
    recal = None
    if cfg.recalibrate and "batch_stats" in variables:
        recal = functools.partial(njflax.recalibrate_batch_stats, models.build(spec.model), train=False)
    x_cal = jnp.asarray(ds.x_val)
    templates = [denoise.init_learned(variables, wnr_range=spec.learned_wnr_range, per_channel=cfg.learned_per_channel,
                                      projection=(v == "projection"), common_mode=(v == "common"))
                 for v in cfg.learned_variants]
    # the variants in one coefficient structure: one compiled training program for all of them
    # (the MLP's three: 11.1 s of compile -> 5.1 s; the ResNet-1D's: 22.5 s -> 11.8 s)
    gated = denoise.gate_learned(templates) if len(templates) > 1 else [None] * len(templates)
    loss = lambda p, b: models.loss_fn(f(p, b[0]), b[1])  # noqa: E731  (one object: one compiled program)
    learned, learn_info = {}, {}
    for variant, template, g in zip(cfg.learned_variants, templates, gated):
        label = _VARIANTS[variant]
        learned[label], learn_info[label] = _learned_denoiser(spec, cfg, variables, ds, loss, key, variant, template,
                                                              out, progress, gated=g)
        if recal is not None and variant == "common":
            recal_loss = lambda p, b: models.loss_fn(f(recal(p, b[0]), b[0]), b[1])  # noqa: E731
            den, learn_info[label + _RECAL] = _learned_denoiser(spec, cfg, variables, ds, recal_loss, key, variant,
                                                                template, out, progress, recalibrate=True)
            learned[label + _RECAL] = denoise.Recalibrated(den, x_cal, recal)
    if "projection" in cfg.learned_variants:  # the untrained projection alone: what the side information buys
        learned["projection only (untrained)"] = denoise.retarget(
            denoise.init_learned(variables, projection=True, wnr_range=spec.learned_wnr_range), variables
        )
    estimators = {
        "ML": denoise.ML(),
        "MMSE": denoise.MMSE(),
        "MMSE (side info)": denoise.MMSE(prior=denoise.clean_prior(variables), name="mmse_side"),
        "compensated MMSE (val-selected)": pick(sel["sel"]),
        "compensated MMSE (test oracle)": pick(sel["oracle"]),
    }
    if cfg.authors_form:
        pb = sel["pb_grid"]
        estimators[_PB] = [denoise.MMSEpb(lam=pb.lam[i], beta=pb.beta[i], signal_var=sel["signal_var"]) for i in sel["pb_sel"]]
    estimators.update({"common-mode MMSE": denoise.CommonModeMMSE(), **learned})
    if recal is not None:
        estimators["ML" + _RECAL] = denoise.Recalibrated(denoise.ML(), x_cal, recal)
        estimators["compensated MMSE (val-selected)" + _RECAL] = [
            denoise.Recalibrated(e, x_cal, recal) for e in estimators["compensated MMSE (val-selected)"]
        ]
    return estimators, learn_info


def run_model(spec, cfg, run: _common.Run, progress: bool) -> dict:
    """Everything for one model; returns its JSON-ready result dict (and writes its PNG)."""
    # noisejax's counter-based generator: JAX's threefry made every program that draws weight
    # noise take seconds to compile (one unrolled 20-round hash per parameter leaf)
    key = jax.random.fold_in(rng.key(cfg.seed), sum(map(ord, spec.name)))
    k_val, k_test, k_learn = (jax.random.fold_in(key, i) for i in (1, 2, 3))
    variables, train_info, ds = models.load_or_train(spec.model, cache_dir=run.out / "cache", progress=progress)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    f = models.logits_fn(spec.model)
    wnr = list(spec.wnr_db)
    points = run.out / "points" / spec.name  # finished WNR points, reused by a restarted run
    sel = run.stage("grid", _grid_search, spec, cfg, variables, ds, f, k_val, points)
    estimators, learn_info = run.stage("learned", _estimators, spec, cfg, variables, ds, f, k_learn, sel, run.out, progress)
    sweep = run.stage("sweep", sweeps.accuracy_sweep,
                      f, variables, ds.x_test, ds.y_test, wnr, key=k_test, n_realizations=cfg.n_realizations,
                      estimators=estimators, progress=progress, store=files.PointStore(points / "sweep"),
                      store_key=spec.model.to_dict(), reference=cfg.reference, scope=cfg.scope)
    sweep.pop("_seconds")
    run.reused += sweep.pop("_reused")
    curves = {name: sweep[name] for name in estimators}
    png = run.figure(f"{spec.name}.png", _plot_model(spec.name, wnr, curves, cfg), bbox_inches="tight")
    lam, beta = np.asarray(sel["grid"].lam), np.asarray(sel["grid"].beta)
    return {
        "model": spec.model.to_dict(),
        "train": train_info,
        "wnr_db": wnr,
        "n_realizations": cfg.n_realizations,
        "curves": {name: {"mean": acc.mean(1).tolist(), "std": acc.std(1).tolist(), "acc": acc.tolist()}
                   for name, acc in curves.items()},
        "gains": sweeps.gains_table(wnr, curves, cfg.targets, baseline="ML"),
        "compensated": {
            "grid": {"lam": list(cfg.grid_lams), "beta": list(cfg.grid_betas)},
            "grid_realizations": cfg.grid_realizations,
            "val_selected": [{"lam": float(lam[i]), "beta": float(beta[i])} for i in sel["sel"]],
            "test_oracle": [{"lam": float(lam[i]), "beta": float(beta[i])} for i in sel["oracle"]],
            "val_accuracy_selected": [float(sel["val_acc"][w, i].mean()) for w, i in enumerate(sel["sel"])],
        },
        "mmse_pb": None if sel["pb_val"] is None else {
            "signal_var": float(sel["signal_var"]),
            "val_selected": [{"lam": float(lam[i]), "beta": float(beta[i])} for i in sel["pb_sel"]],
            "val_accuracy_selected": [float(sel["pb_val"][w, i].mean()) for w, i in enumerate(sel["pb_sel"])],
        },
        "learned": learn_info,
        "png": png,
    }


_HIDDEN = ("MMSE (side info)", "compensated MMSE (test oracle)", "projection only (untrained)")


def _panel(name: str) -> int:
    """0: closed-form estimators, 1: learned denoisers, 2: with BatchNorm re-estimation."""
    if name.endswith(_RECAL):
        return 2
    return 1 if name.startswith(("learned", "projection")) else 0


def _plot_model(model_name: str, wnr, curves: dict, cfg):
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
    return plot_accuracy_curves(
        wnr, {"ML": curves["ML"], **shown}, None, targets=cfg.targets, styles=styles, panels=panels, reference="ML",
        band_label=f"±1 std over {cfg.n_realizations} noise realizations",
        target_label="accuracy at which the dB gains over ML are read",
        title=f"Noisy inference, {model_name}: test accuracy of the denoised network vs weight-to-noise ratio\n"
              f"(noise added to every weight; {cfg.scope} WNR = the weights' {cfg.reference} over the noise power, in dB; "
              "ML = the noisy weights as received)",
    )


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
        return ("the authors' published closed form (denoise.MMSEpb): one global clean-weight variance "
                "(side information) and no fallback where η+1−λ' < 0; (λ', β) chosen on the validation split")
    if "oracle" in est:
        return "(λ', β) chosen by test accuracy, as in the authors' published curves"
    return ""


def main(config, out_dir, *, data_dir: Optional[str] = None, progress: bool = True) -> Result:
    """Run the experiment in ``out_dir`` (model and denoiser caches, points, one PNG per model); ``data_dir`` is unused."""
    cfg = config
    with _common.Run(NAME, out_dir, steps=3 * len(cfg.specs), progress=progress, precision=None) as run:
        models_out = {spec.name: run_model(spec, cfg, run, progress) for spec in cfg.specs}
        summary = {
            name: {est: {t: g[t]["gain_db"] for t in g} for est, g in res["gains"].items() if est != "ML"}
            for name, res in models_out.items()
        }
        thresholds = {  # the paper's targets; compensated MMSE + BN re-estimation is reported, not judged by them
            "compensated mmse (val-selected)" + _RECAL.lower(): None, "compensated": 1.0, "learned": 4.1,
        }
        notes = {(model, est): _claim_note(per_est, est) for model, per_est in summary.items() for est in per_est}
        claims = gain_claims(summary, thresholds, figure="Shao et al. TSP 2023, noisy inference (accuracy vs WNR)",
                             notes=notes)
        return run.result(claims, [res["png"] for res in models_out.values()], config=cfg, models=models_out,
                          summary=summary)


if __name__ == "__main__":  # pragma: no cover
    from .config import CONFIGS

    _common.cli(main, CONFIGS, __doc__)
