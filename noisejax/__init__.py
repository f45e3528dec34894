"""noisejax: simulate, predict and mitigate noise in neural networks with JAX.

Namespaces (imported on first use)::

    noisejax.noise      neuron-noise and weight-noise models (pytrees)
    noisejax.layers     stax-style noisy layers with sampling and moment rules
    noisejax.simulate   streamed, sharded, reproducible Monte Carlo
    noisejax.rng        a fast counter-based PRNG implementation for noise
    noisejax.moments    analytic propagation of mean and noise covariance
    noisejax.meanfield  mean-field recursions for deep networks
    noisejax.mitigate   slope scaling, pooling, ghost neurons
    noisejax.train      plain, noise-aware and moment-regularized training
    noisejax.denoise    ML / MMSE / compensated MMSE / learned weight denoisers
    noisejax.data       offline datasets and loaders for user-supplied MNIST / CIFAR-10
    noisejax.flax       noise injection into unmodified Flax (linen / NNX) models
    noisejax.hardware   analog in-memory hardware: PCM drift, crossbar DAC/ADC, compensation
    noisejax.sweeps     accuracy-vs-WNR sweeps (resumable), dB gains, plots
    noisejax.store      atomic, checksummed result files and resumable points
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "errors",
    "noise",
    "layers",
    "simulate",
    "rng",
    "moments",
    "meanfield",
    "mitigate",
    "train",
    "denoise",
    "sweeps",
    "models",
    "checkpoint",
    "store",
    "federated",
    "reproduce",
    "data",
    "flax",
    "hardware",
)

__all__ = list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"noisejax.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'noisejax' has no attribute {name!r}")
