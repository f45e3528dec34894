"""Deprecated: ``noisejax.reproduce`` moved to :mod:`noisejax.study.reproduce` (the edge of the package).

Every name it had is still reachable here, with a :class:`DeprecationWarning`;
import it from its new home (named in the warning) instead.
"""

from __future__ import annotations

import importlib
import warnings

__all__: list = []
_NEW = "noisejax.study.reproduce"
#: names whose new home is another module: name -> (module, name there)
_MOVED = {
    "atomic_write_bytes": ("noisejax.study.files", "atomic_write_bytes"),
    "atomic_write_json": ("noisejax.study.files", "atomic_write_json"),
    "safe_join": ("noisejax.study.files", "safe_join"),
    "to_jsonable": ("noisejax.study.files", "to_jsonable"),
    "fingerprint": ("noisejax.study.files", "fingerprint"),
    "read_checked_json": ("noisejax.study.files", "read_checked_json"),
    "write_checked_json": ("noisejax.study.files", "write_checked_json"),
    "cached_point": ("noisejax.study.files", "cached_point"),
    "save_arrays": ("noisejax.study.files", "save_arrays"),
    "load_arrays": ("noisejax.study.files", "load_arrays"),
    "code_digest": ("noisejax.study.files", "code_digest"),
    "claim": ("noisejax.study.claims", "claim"),
    "claims_summary": ("noisejax.study.claims", "claims_summary"),
    "claims_summary_line": ("noisejax.study.claims", "claims_summary_line"),
    "Claim": ("noisejax.study.claims", "Claim"),
    "Result": ("noisejax.study.claims", "Result"),
}


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    module, new_name = _MOVED.get(name, (_NEW, name))
    value = getattr(importlib.import_module(module), new_name)
    warnings.warn(f"noisejax.reproduce.{name} is deprecated: use {module}.{new_name}", DeprecationWarning, stacklevel=2)
    return value
