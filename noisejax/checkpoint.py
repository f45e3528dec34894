"""Deprecated alias of :mod:`noisejax.study.files` (the one safe-file layer); import from there."""

from noisejax._deprecated import forwarder

__all__: list = []
__getattr__ = forwarder("checkpoint", "noisejax.study.files", {
    "config_hash": ("noisejax.study.files", "fingerprint"),
})
