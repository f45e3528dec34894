"""Deprecated alias of :mod:`noisejax.study.models` (the Flax models of the experiments, their recipe and cache); import from there."""

from noisejax._deprecated import forwarder

__all__: list = []
__getattr__ = forwarder("models", "noisejax.study.models", {
    "accuracy": ("noisejax.train", "accuracy"),
})
