"""Deprecated alias of :mod:`noisejax.study.convert` (``WEIGHTS.npz`` files); import from there."""

from noisejax._deprecated import forwarder

__all__: list = []
__getattr__ = forwarder("convert", "noisejax.study.convert")
