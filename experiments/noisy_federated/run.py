"""Noisy federated training: final test accuracy vs WNR of the update channel, per server denoiser.

For each model of the config: a noise-free reference run, then for each server
denoiser (ML, MMSE, compensated MMSE selected on validation each round, learned)
all WNR points and seeds in one compiled call (:func:`noisejax.federated.run`);
the dB gains over ML at the target accuracies are read off the final-accuracy
curves.  Writes ``results.json`` and one PNG per model into ``config.out_dir``.

Usage (from the repository root)::

    python -m experiments.noisy_federated.run --config tiny --out /tmp/noisy_federated
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import federated, rng, sweeps
from noisejax.study import models
from noisejax.study.claims import Result, gain_claims
from noisejax.study.plots import plot_accuracy_curves

from .. import _common

NAME = "noisy_federated"
__all__ = ["main", "run_model"]

_LABELS = {"ml": "ML", "mmse": "MMSE", "compensated": "compensated MMSE (val-selected)", "learned": "learned"}


def _plot_model(spec, cfg, wnr, finals: dict, noise_free):
    """Final test accuracy vs WNR for each denoiser; ``finals[label]`` is ``(W, seeds)``, ``noise_free`` ``(seeds,)``."""
    curves = dict(finals)
    curves["noise-free training (no channel noise)"] = np.tile(np.asarray(noise_free, float), (len(wnr), 1))
    fed = spec.fed
    return plot_accuracy_curves(
        wnr, curves, None, targets=cfg.targets, reference="ML" if "ML" in curves else None,
        ylabel=f"test accuracy after {fed.rounds} rounds",
        band_label=f"±1 std over {cfg.n_seeds} seeds", target_label="accuracy at which the dB gains over ML are read",
        styles={"noise-free training (no channel noise)": {"color": "k", "ls": ":", "marker": "", "lw": 1.2}},
        title=f"Noisy federated training, {spec.name}: {fed.n_devices} devices, {fed.n_active} active per round; "
              "the model is sent over a noisy channel\n(WNR: weight-to-noise ratio of the channel in dB; "
              "ML = the noisy model as received, the others denoise it)",
    )


def run_model(spec, cfg, run: _common.Run, progress: bool) -> dict:
    """All denoisers for one model; returns its JSON-ready result dict (and writes its PNG)."""
    ds = models.load_dataset(spec.model)
    module = models.build(spec.model)
    variables = models.init(module, jax.random.key(spec.model.seed), jnp.asarray(ds.x_train[:2]), train=False)
    # noisejax's counter-based generator: with JAX's threefry, compiling each run (one unrolled
    # 20-round hash per parameter leaf, permutation and device choice) took longer than running it
    key = jax.random.fold_in(rng.key(cfg.seed), sum(map(ord, spec.name)))
    wnr = list(spec.wnr_db)
    fed_run = lambda fed, w: federated.run(module, variables, ds, fed, wnr_db=w, key=key,  # noqa: E731
                                           n_seeds=cfg.n_seeds, split_seed=spec.model.seed)
    ref = run.stage("noise_free", fed_run, dataclasses.replace(spec.fed, noise_free=True), [0.0])
    histories, finals, seconds = {}, {}, {"noise_free": ref["seconds"]}
    names = list(cfg.denoisers)
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(names, desc=f"{spec.name} denoisers", leave=False)
    for name in names:
        out = run.stage(name, fed_run, dataclasses.replace(spec.fed, denoiser=name), wnr)
        label = _LABELS[name]
        histories[label] = out["test_accuracy"]  # (W, S, E)
        finals[label] = out["test_accuracy"][:, :, -1]  # (W, S)
        seconds[name] = out["seconds"]
    png = run.figure(f"{spec.name}.png", _plot_model(spec, cfg, wnr, finals, ref["test_accuracy"][0, :, -1]),
                     bbox_inches="tight")
    return {
        "model": spec.model.to_dict(),
        "federated": dataclasses.asdict(spec.fed),
        "wnr_db": wnr,
        "rounds": ref["rounds"],
        "noise_free": {"final": ref["test_accuracy"][0, :, -1].tolist(), "history": ref["test_accuracy"][0].tolist()},
        "curves": {
            label: {"mean": f.mean(1).tolist(), "std": f.std(1).tolist(), "final": f.tolist(),
                    "history": histories[label].tolist()}
            for label, f in finals.items()
        },
        "gains": sweeps.gains_table(wnr, finals, cfg.targets, baseline="ML") if "ML" in finals else {},
        "seconds": seconds,
        "png": png,
    }


def main(config, out_dir, *, data_dir: Optional[str] = None, progress: bool = True) -> Result:
    """Run the experiment in ``out_dir`` (one PNG per model, ``results.json``); ``data_dir`` is unused."""
    cfg = config
    steps = sum(1 + len(cfg.denoisers) + 1 for _ in cfg.specs)
    with _common.Run(NAME, out_dir, steps=steps, progress=progress, precision=None) as run:
        models_out = {spec.name: run_model(spec, cfg, run, progress) for spec in cfg.specs}
        summary = {
            name: {est: {t: g[t]["gain_db"] for t in g} for est, g in res["gains"].items() if est != "ML"}
            for name, res in models_out.items()
        }
        claims = gain_claims(summary, {"compensated": 8.0, "learned": 8.0},
                             figure="Shao et al. TSP 2023, noisy federated training")
        return run.result(claims, [res["png"] for res in models_out.values()], config=cfg, models=models_out,
                          summary=summary)


if __name__ == "__main__":  # pragma: no cover
    from .config import CONFIGS

    _common.cli(main, CONFIGS, __doc__)
