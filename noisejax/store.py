"""Deprecated: ``noisejax.store`` moved to :mod:`noisejax.study.files` (the edge of the package).

Every name it had is still reachable here, with a :class:`DeprecationWarning`;
import it from its new home (named in the warning) instead.
"""

from __future__ import annotations

import importlib
import warnings

__all__: list = []
_NEW = "noisejax.study.files"
#: names whose new home is another module: name -> (module, name there)
_MOVED = {}


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    module, new_name = _MOVED.get(name, (_NEW, name))
    value = getattr(importlib.import_module(module), new_name)
    warnings.warn(f"noisejax.store.{name} is deprecated: use {module}.{new_name}", DeprecationWarning, stacklevel=2)
    return value
