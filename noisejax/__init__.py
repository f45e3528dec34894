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
    noisejax.sweeps     accuracy-vs-WNR sweeps (resumable), dB gains, plots
    noisejax.store      atomic, checksummed result files and resumable points
    noisejax.selfcheck  does this backend compute noisejax's kernels right? (also callable)

Importing noisejax first applies a backend guard (``noisejax._backend``): on an
affected jaxlib (0.10.2) it adds ``--xla_cpu_experimental_ynn_fusion_type=`` to
``XLA_FLAGS`` unless you set that flag yourself (or ``NOISEJAX_XLA_GUARD=0``).
"""

from __future__ import annotations

import importlib

from noisejax import _backend

_backend.apply_xla_guard()  # before any JAX backend starts: XLA reads XLA_FLAGS once

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
    "selfcheck",
)

__all__ = list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"noisejax.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'noisejax' has no attribute {name!r}")
