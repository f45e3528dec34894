"""Deprecation forwarding for names that moved (``noisejax.store`` → ``noisejax.study.files``...).

``__getattr__ = forwarder("store", "noisejax.study.files")`` in an old module makes every
name of the new module reachable under the old one, with a :class:`DeprecationWarning`
that names the new home; ``moved`` maps names whose new home is another module.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, Mapping

__all__: list = []


def forwarder(old: str, new: str, moved: Mapping[str, tuple[str, str]] = None) -> Callable[[str], object]:
    """A module ``__getattr__`` forwarding ``noisejax.<old>.<name>`` to ``new`` (or to ``moved[name]``)."""
    moved = dict(moved or {})

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        module, new_name = moved.get(name, (new, name))
        value = getattr(importlib.import_module(module), new_name)
        warnings.warn(f"noisejax.{old}.{name} is deprecated: use {module}.{new_name}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
