"""Boundary checks, run on concrete values outside of jit.

Each check raises a :mod:`noisejax.errors` exception whose message names the
argument and what was expected, in one line.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from noisejax.errors import InvalidArgumentError, ShapeMismatchError

__all__: list[str] = []


def _is_concrete(x: Any) -> bool:
    """True for Python numbers, NumPy arrays and committed (non-traced) jax arrays."""
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (int, float, complex, str, bytes, list, tuple, np.ndarray, np.generic, jax.Array))


def check_variance(name: str, value: Any) -> None:
    """Raise unless ``value`` is finite and >= 0 everywhere (skips traced values)."""
    if value is None or not _is_concrete(value):
        return
    arr = _as_array(name, value)
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
    arr = _as_array(name, value)
    if not np.issubdtype(arr.dtype, np.number):
        raise InvalidArgumentError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InvalidArgumentError(f"{name} contains {n_bad} NaN or infinite value(s); expected finite numbers")


def check_real_number(name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite real scalar or array (e.g. a WNR in dB)."""
    if value is None or not _is_concrete(value):
        return
    arr = _as_array(name, value)
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


def check_tree_finite(name: str, tree: Any) -> None:
    """:func:`check_finite` on every concrete leaf of ``tree``; the message names the leaf's path."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        check_finite(f"{name}{jax.tree_util.keystr(path)}", leaf)


def _as_array(name: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number or an array of numbers, got {type(value).__name__}") from None


def check_input(name: str, x: Any, features: int | None = None, *, what: str = "the layer's W",
                finite: bool = True) -> None:
    """Raise unless ``x`` is a floating-point array whose last axis has ``features`` (and, with
    ``finite``, holds only finite numbers when concrete).

    The dtype and shape checks are static, so they also run under ``jit``/``vmap``; the
    finiteness check reads the values (a device-to-host copy), so layers leave it to the
    network's entry point.
    """
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = _as_array(name, x)
        dtype = x.dtype
    if not np.issubdtype(dtype, np.floating):
        raise InvalidArgumentError(f"{name} must be a floating-point array, got dtype {dtype}")
    shape = np.shape(x)
    if features is not None and (not shape or shape[-1] != features):
        raise ShapeMismatchError(
            f"{name} has {shape[-1] if shape else 0} features on its last axis; {what} expects {features}"
        )
    if finite:
        check_finite(name, x)


def _short(arr: np.ndarray) -> str:
    if arr.ndim == 0:
        v = arr.item()
        return repr(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return f"array of shape {arr.shape} (min {np.nanmin(arr) if arr.size else 'n/a'})"
