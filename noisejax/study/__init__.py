"""noisejax.study: experiments, files and the report — the edge of the package.

The core of noisejax (noise models, layers, Monte Carlo, moments, training,
denoisers, sweeps...) computes and writes nothing to disk.  Everything that touches
disk, draws a figure or writes the report is here:

    noisejax.study.files      the one safe-file layer: atomic writes, one canonical JSON and hash,
                              checked JSON / .npz / msgpack files, resumable points, caches
    noisejax.study.convert    WEIGHTS.npz files of dense networks; PyTorch / Flax weights into them
    noisejax.study.models     the Flax models of the weight-noise experiments, their recipe and cache
    noisejax.study.claims     typed claims and results of an experiment (Claim, Result)
    noisejax.study.plots      figures (accuracy-vs-WNR curves)
    noisejax.study.report     report.md from the experiments' records
    noisejax.study.reproduce  ``noisejax reproduce``: the experiment protocol and the orchestrator

Submodules are imported on first use (``noisejax.study.files`` loads without the others).
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("files", "convert", "models", "claims", "plots", "report", "reproduce")

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"noisejax.study.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'noisejax.study' has no attribute {name!r}")
