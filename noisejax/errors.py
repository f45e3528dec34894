"""Exception types raised by noisejax when user input is invalid.

All of them subclass :class:`ValueError` (or :class:`TypeError`), so code that
already catches the builtin types keeps working.  The CLI turns any of them into
a single line on stderr and a non-zero exit status.
"""

from __future__ import annotations

__all__ = ["NoisejaxError", "InvalidArgumentError", "ShapeMismatchError", "DataFormatError", "NonFiniteError",
           "PrecisionWarning"]


class NoisejaxError(ValueError):
    """Base class of every user-facing error noisejax raises."""


class InvalidArgumentError(NoisejaxError):
    """An argument has a bad value (negative variance, unknown name, NaN, ...)."""


class ShapeMismatchError(NoisejaxError):
    """Arrays whose shapes must agree do not (layers, parameters, inputs)."""


class DataFormatError(NoisejaxError):
    """A file is malformed: wrong magic number, truncated, wrong sizes, bad keys."""


class NonFiniteError(NoisejaxError, FloatingPointError):
    """A simulation produced NaN or infinite statistics (see ``check_finite=True``)."""


class PrecisionWarning(UserWarning):
    """A statistic may be limited by floating-point accumulation (see ``docs/precision.md``)."""
