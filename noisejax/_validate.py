"""Boundary checks, run on concrete values outside of jit.

Each check raises a :mod:`noisejax.errors` exception whose message names the
argument and what was expected, in one line.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from noisejax.errors import InvalidArgumentError

__all__: list[str] = []


def _is_concrete(x: Any) -> bool:
    """True for Python numbers, NumPy arrays and committed (non-traced) jax arrays."""
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (int, float, np.ndarray, np.number, jax.Array))


def check_variance(name: str, value: Any) -> None:
    """Raise unless ``value`` is finite and >= 0 everywhere (skips traced values)."""
    if value is None or not _is_concrete(value):
        return
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InvalidArgumentError(f"{name} must be a real number, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(f"{name} must be finite, got {_short(arr)}")
    if np.any(arr < 0):
        raise InvalidArgumentError(f"{name} must be a variance >= 0, got {_short(arr)}")


def check_finite(name: str, value: Any) -> None:
    """Raise unless the concrete array ``value`` holds only finite numbers."""
    if value is None or not _is_concrete(value):
        return
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number):
        raise InvalidArgumentError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InvalidArgumentError(f"{name} contains {n_bad} NaN or infinite value(s); expected finite numbers")


def check_real_number(name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite real scalar or array (e.g. a WNR in dB)."""
    if value is None or not _is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InvalidArgumentError(f"{name} must be a real number, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(f"{name} must be finite, got {_short(arr)}")


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` as int, raising unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _short(arr: np.ndarray) -> str:
    if arr.ndim == 0:
        v = arr.item()
        return repr(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return f"array of shape {arr.shape} (min {np.nanmin(arr) if arr.size else 'n/a'})"
