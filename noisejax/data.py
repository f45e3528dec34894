"""Datasets that ship or are generated offline, with fixed train/validation/test splits.

* :func:`load_digits` — scikit-learn's bundled 8×8 digits (1 797 images, 64 features,
  10 classes), scaled to [0, 1].

Every loader returns a :class:`Dataset` of NumPy arrays; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from noisejax import _validate
from noisejax.errors import InvalidArgumentError

__all__ = ["Dataset", "load_digits", "split_indices"]


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test arrays; ``x_*`` float32 ``(n, *feature_shape)``, ``y_*`` int32 ``(n,)``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, val={len(self.y_val)}, "
            f"test={len(self.y_test)}, features={self.feature_shape}, classes={self.n_classes})"
        )


def split_indices(n: int, *, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Disjoint shuffled index sets ``(train, val, test)`` of ``range(n)``."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (0.0 <= f < 1.0):
            raise InvalidArgumentError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise InvalidArgumentError("val_fraction + test_fraction must be < 1")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]


def load_digits(*, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's digits, pixel values scaled to [0, 1], split with ``seed``."""
    _validate.check_int("seed", seed, minimum=0)
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    tr, va, te = split_indices(len(y), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    return Dataset("digits", x[tr], y[tr], x[va], y[va], x[te], y[te], 10)
