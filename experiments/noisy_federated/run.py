"""Noisy federated training: final test accuracy vs WNR of the update channel, per server denoiser.

For each model of the config: a noise-free reference run, then for each server
denoiser (ML, MMSE, compensated MMSE selected on validation each round, learned)
all WNR points and seeds in one compiled call (:func:`noisejax.federated.run`);
the dB gains over ML at the target accuracies are read off the final-accuracy
curves.  Writes ``results.json`` and one PNG per model into ``config.out_dir``.

Usage::

    python experiments/noisy_federated/run.py [--config tiny|default|full] [--out DIR] [--progress]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import federated, models, rng, sweeps


def _load_config_module():
    path = Path(__file__).with_name("config.py")
    spec = importlib.util.spec_from_file_location("noisy_federated_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("noisy_federated_config", module)
    spec.loader.exec_module(module)
    return module


config_lib = _load_config_module()

__all__ = ["main", "run_model"]

_LABELS = {"ml": "ML", "mmse": "MMSE", "compensated": "compensated MMSE (val-selected)", "learned": "learned"}


def _plot_model(spec, cfg, wnr, finals: dict, noise_free, png) -> None:
    """Final test accuracy vs WNR for each denoiser; ``finals[label]`` is ``(W, seeds)``, ``noise_free`` ``(seeds,)``."""
    curves = dict(finals)
    curves["noise-free training (no channel noise)"] = np.tile(np.asarray(noise_free, float), (len(wnr), 1))
    fed = spec.fed
    sweeps.plot_accuracy_curves(
        wnr, curves, str(png), targets=cfg.targets, reference="ML" if "ML" in curves else None,
        ylabel=f"test accuracy after {fed.rounds} rounds",
        band_label=f"±1 std over {cfg.n_seeds} seeds", target_label="accuracy at which the dB gains over ML are read",
        styles={"noise-free training (no channel noise)": {"color": "k", "ls": ":", "marker": "", "lw": 1.2}},
        title=f"Noisy federated training, {spec.name}: {fed.n_devices} devices, {fed.n_active} active per round; "
              "the model is sent over a noisy channel\n(WNR: weight-to-noise ratio of the channel in dB; "
              "ML = the noisy model as received, the others denoise it)",
    )


def replot(result: dict, cfg, out_dir) -> None:
    """Re-draw the figures from a stored result (no recomputation)."""
    for spec in cfg.specs:
        res = result["models"].get(spec.name)
        if res is None:
            continue
        finals = {label: np.asarray(c["final"]) for label, c in res["curves"].items()}
        _plot_model(spec, cfg, res["wnr_db"], finals, res["noise_free"]["final"], Path(out_dir) / f"{spec.name}.png")


def run_model(spec, cfg) -> dict:
    """All denoisers for one model; returns its JSON-ready result dict (and writes its PNG)."""
    t_start = time.perf_counter()
    ds = models.load_dataset(spec.model)
    module = models.build(spec.model)
    variables = module.init(jax.random.key(spec.model.seed), jnp.asarray(ds.x_train[:2]), train=False)
    # noisejax's counter-based generator: with JAX's threefry, compiling each run (one unrolled
    # 20-round hash per parameter leaf, permutation and device choice) took longer than running it
    key = jax.random.fold_in(rng.key(cfg.seed), sum(map(ord, spec.name)))
    wnr = list(spec.wnr_db)

    ref = federated.run(
        module, variables, ds, dataclasses.replace(spec.fed, noise_free=True), wnr_db=[0.0], key=key,
        n_seeds=cfg.n_seeds, split_seed=spec.model.seed,
    )
    histories, finals, seconds = {}, {}, {"noise_free": ref["seconds"]}
    names = list(cfg.denoisers)
    iterator = names
    if cfg.progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc=f"{spec.name} denoisers", leave=False)
    for name in iterator:
        out = federated.run(
            module, variables, ds, dataclasses.replace(spec.fed, denoiser=name), wnr_db=wnr, key=key,
            n_seeds=cfg.n_seeds, split_seed=spec.model.seed,
        )
        label = _LABELS[name]
        histories[label] = out["test_accuracy"]  # (W, S, E)
        finals[label] = out["test_accuracy"][:, :, -1]  # (W, S)
        seconds[name] = out["seconds"]
    gains = sweeps.gains_table(wnr, finals, cfg.targets, baseline="ML") if "ML" in finals else {}

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{spec.name}.png"
    _plot_model(spec, cfg, wnr, finals, ref["test_accuracy"][0, :, -1], png)
    return {
        "model": spec.model.to_dict(),
        "federated": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec.fed).items()},
        "wnr_db": wnr,
        "rounds": ref["rounds"],
        "noise_free": {"final": ref["test_accuracy"][0, :, -1].tolist(), "history": ref["test_accuracy"][0].tolist()},
        "curves": {
            label: {"mean": f.mean(1).tolist(), "std": f.std(1).tolist(), "final": f.tolist(),
                    "history": histories[label].tolist()}
            for label, f in finals.items()
        },
        "gains": gains,
        "seconds": dict(seconds, total=time.perf_counter() - t_start),
        "png": png.name,
    }


def main(config=None) -> dict:
    """Run the experiment; returns (and writes to ``out_dir/results.json``) the results dict."""
    cfg = config if config is not None else config_lib.default()
    t0 = time.perf_counter()
    results = {"experiment": "noisy_federated", "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
               "models": {}}
    for spec in cfg.specs:
        results["models"][spec.name] = run_model(spec, cfg)
        _write(cfg, results)  # partial results survive an interrupted run
    results["figures"] = [res["png"] for res in results["models"].values()]
    results["seconds"] = time.perf_counter() - t0
    results["summary"] = {
        name: {est: {t: g[t]["gain_db"] for t in g} for est, g in res["gains"].items() if est != "ML"}
        for name, res in results["models"].items()
    }
    results["claims"] = sweeps.gain_claims(results["summary"], {"compensated": 8.0, "learned": 8.0}, figure="Shao et al. TSP 2023, noisy federated training")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _write(cfg, results) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default", choices=("tiny", "default", "full"))
    p.add_argument("--out", default=None, help="output folder (default experiments/noisy_federated/results)")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = _parse()
    cfg = config_lib.get(args.config).replace(progress=args.progress)
    if args.out:
        cfg = cfg.replace(out_dir=args.out)
    res = main(cfg)
    print(json.dumps(res["summary"], indent=1))
    print(f"total {res['seconds']:.1f} s -> {cfg.out_dir}")
