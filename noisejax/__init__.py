"""noisejax: simulate, predict and mitigate noise in neural networks with JAX.

Any JAX model (Flax linen/NNX, Equinox, plain ``jnp``), unmodified::

    noisejax.noisy(fn, neuron=..., weight=..., sites=...)     noise at any operation (sampling)
    noisejax.analytic(fn, neuron=..., weight=..., sites=...)  its mean and variance, no sampling
    noisejax.sites(fn, *args)                                 where noise can go

The core namespaces compute and write nothing to disk (imported on first use)::

    noisejax.noise      neuron-noise and weight-noise models (pytrees)
    noisejax.layers     stax-style noisy layers (typed specs, the NoiseSite layer)
    noisejax.simulate   streamed, sharded, reproducible Monte Carlo
    noisejax.rng        a fast counter-based PRNG implementation for noise
    noisejax.moments    analytic propagation of mean and noise covariance
    noisejax.meanfield  mean-field recursions for deep networks
    noisejax.mitigate   slope scaling, pooling, ghost neurons
    noisejax.train      the one optax training loop (fit), accuracy, noisy evaluation
    noisejax.denoise    ML / MMSE / compensated MMSE / learned weight denoisers
    noisejax.data       offline datasets and loaders for user-supplied MNIST / CIFAR-10
    noisejax.flax       noise injection into unmodified Flax (linen / NNX) models
    noisejax.hardware   analog in-memory hardware: PCM drift, crossbar DAC/ADC, compensation
    noisejax.sweeps     accuracy-vs-WNR sweeps (resumable through a point store), dB gains
    noisejax.interpret  the two interpretations of a jaxpr (noisy, analytic, sites)
    noisejax.rules      the moment rule of every primitive
    noisejax.gaussian   Gaussian states: mean and noise as loadings on latent sources
    noisejax.quadrature Gaussian expectations of elementwise functions
    noisejax.snr        the signal-to-noise ratio (per output, layer summary)
    noisejax.selfcheck  does this backend compute noisejax's kernels right? (also callable)

The edge — files, figures, the experiments' models, the report — is one subpackage::

    noisejax.study      files (the one safe-file layer), convert (WEIGHTS.npz), models, claims,
                        plots, report, reproduce

``noisejax.store``, ``noisejax.checkpoint``, ``noisejax.convert``, ``noisejax.models`` and
``noisejax.reproduce`` are deprecated aliases of ``noisejax.study.files`` / ``.convert`` /
``.models`` / ``.reproduce``.
Layout and recipes: ``docs/architecture.md``.

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
    "snr",
    "federated",
    "data",
    "flax",
    "interpret",
    "rules",
    "gaussian",
    "quadrature",
    "hardware",
    "selfcheck",
    "study",
    # deprecated aliases of noisejax.study.{models,files,files,reproduce,convert}
    "models",
    "checkpoint",
    "store",
    "reproduce",
    "convert",
)

# functions and types re-exported from noisejax.interpret
_FROM_INTERPRET = ("noisy", "analytic", "sites", "mark", "Site", "Prediction", "UnsupportedPrimitiveError")

__all__ = list(_SUBMODULES) + list(_FROM_INTERPRET) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"noisejax.{name}")
        globals()[name] = module
        return module
    if name in _FROM_INTERPRET:
        value = getattr(importlib.import_module("noisejax.interpret"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'noisejax' has no attribute {name!r}")
