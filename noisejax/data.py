"""Datasets that ship, are generated offline, or are read from a directory the user names.

Loaders (all return a :class:`Dataset` of NumPy arrays; nothing is downloaded):

* :func:`load_digits` — scikit-learn's bundled 8×8 digits (1 797 images, 64 features,
  10 classes), scaled to [0, 1].
* :func:`load_mnist1d` — MNIST-1D (Greydanus 2020) generated locally with the
  ``mnist1d`` package from its bundled templates: ``(40,)`` features, 10 classes,
  standardized with the training set's mean and standard deviation.
* :func:`load_mnist` — real MNIST from IDX files (gzipped or not) in ``data_dir``.
* :func:`load_cifar10` — CIFAR-10, binary version (``data_batch_1..5.bin``,
  ``test_batch.bin``) in ``data_dir``.
* :func:`load` — dispatch by name (``"digits"``, ``"mnist1d"``, ``"mnist"``, ``"cifar10"``).

File readers check magic numbers, dimensions, sizes against the file length, label
ranges and image/label counts, and raise :class:`noisejax.errors.DataFormatError`
naming the file and the problem.  Nothing here unpickles.

:func:`batches` yields shuffled, deterministic minibatches for training loops.

Example::

    >>> from noisejax import data
    >>> ds = data.load("mnist1d", n_samples=1000, seed=0)
    >>> ds.x_train.shape[1:], ds.n_classes
    ((40,), 10)
"""

from __future__ import annotations

import functools
import gzip
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from noisejax import _validate
from noisejax.errors import DataFormatError, InvalidArgumentError, ShapeMismatchError

__all__ = [
    "Dataset",
    "DATASETS",
    "load",
    "load_digits",
    "load_mnist1d",
    "load_mnist",
    "load_cifar10",
    "read_idx",
    "read_cifar10_batch",
    "split_indices",
    "batches",
]

PathLike = Union[str, "os.PathLike[str]"]


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


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        _validate.check_real_number(name, f)
        if not (0.0 <= f < 1.0):
            raise InvalidArgumentError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise InvalidArgumentError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")


def split_indices(n: int, *, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Disjoint shuffled index sets ``(train, val, test)`` of ``range(n)``."""
    _check_fractions(val_fraction, test_fraction)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]


# ----------------------------------------------------------------------------------
# Offline datasets
# ----------------------------------------------------------------------------------


def load_digits(*, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's digits, pixel values scaled to [0, 1], split with ``seed``."""
    _validate.check_int("seed", seed, minimum=0)
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    tr, va, te = split_indices(len(y), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    return Dataset("digits", x[tr], y[tr], x[va], y[va], x[te], y[te], 10)


@functools.lru_cache(maxsize=8)
def _mnist1d_raw(n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate MNIST-1D locally (no download, no pickle); cached per ``(n_samples, seed)``.

    ``mnist1d.data.make_dataset`` seeds NumPy's and Python's *global* generators; their
    states are saved and restored so callers' random streams are not disturbed.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()  # ObjectView with the reference transform parameters
    args.num_samples = n_samples
    args.seed = seed
    args.train_split = 1.0  # we split ourselves
    args.url = None  # never used by make_dataset; make sure nothing could download
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.asarray(raw["x"], dtype=np.float64)
    y = np.asarray(raw["y"], dtype=np.int32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_mnist1d(
    *, n_samples: int = 5000, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> Dataset:
    """MNIST-1D generated offline with the ``mnist1d`` package's templates.

    ``n_samples`` signals (rounded down to a multiple of 10, balanced classes) of
    length 40 are generated with the reference transformations (padding, scaling,
    translation, correlated and i.i.d. noise, shear) seeded by ``seed``, split into
    train / validation / test with ``seed``, and standardized with the *training*
    set's scalar mean and standard deviation (so the signal shape is kept).

    Returns:
      Dataset ``"mnist1d"``, ``x`` float32 ``(n, 40)``, ``y`` int32 in 0..9.
      Deterministic for a given ``(n_samples, seed)``; generation (~1 s per 5 000
      samples) is cached in memory.

    Example::

        >>> ds = load_mnist1d(n_samples=4000, seed=1)
    """
    n_samples = _validate.check_int("n_samples", n_samples, minimum=10)
    seed = _validate.check_int("seed", seed, minimum=0)
    _check_fractions(val_fraction, test_fraction)
    x, y = _mnist1d_raw(n_samples, seed)
    tr, va, te = split_indices(len(y), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    mean, std = float(x[tr].mean()), float(x[tr].std())
    xs = ((x - mean) / (std if std > 0 else 1.0)).astype(np.float32)
    return Dataset("mnist1d", xs[tr], y[tr], xs[va], y[va], xs[te], y[te], 10)


# ----------------------------------------------------------------------------------
# File helpers
# ----------------------------------------------------------------------------------


def _check_dir(data_dir: Any, what: str) -> Path:
    if data_dir is None:
        raise InvalidArgumentError(f"data_dir is required for {what}; pass the folder holding its files")
    if not isinstance(data_dir, (str, os.PathLike)):
        raise InvalidArgumentError(f"data_dir must be a path, got {type(data_dir).__name__}")
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise InvalidArgumentError(f"data_dir {str(path)!r} does not exist")
    if not path.is_dir():
        raise InvalidArgumentError(f"data_dir {str(path)!r} is not a directory")
    return path


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFormatError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return raw


def _find_file(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    tried = ", ".join(f"{n}[.gz]" for n in names)
    raise DataFormatError(f"{what}: file not found in {str(root)!r} (tried {tried})")


# ----------------------------------------------------------------------------------
# MNIST (IDX)
# ----------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def read_idx(path: PathLike, *, expected_magic: Optional[int] = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped or not) into a ``uint8`` array.

    Header: big-endian int32 magic ``0x0000 08 NDIM`` then NDIM int32 sizes; the body
    must hold exactly ``prod(sizes)`` bytes.

    Raises:
      DataFormatError: naming ``path`` — wrong magic number, short header, a
        truncated body or trailing bytes.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataFormatError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataFormatError(f"{path}: wrong IDX magic number {magic}, expected {expected_magic}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataFormatError(f"{path}: wrong IDX magic number {magic}; expected unsigned-byte data (0x0000 08 NN)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0:
        raise DataFormatError(f"{path}: IDX header declares 0 dimensions")
    if len(raw) < header:
        raise DataFormatError(f"{path}: IDX header truncated, {len(raw)} bytes but {ndim} dimensions need {header}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < expected:
        raise DataFormatError(f"{path}: truncated, {len(raw)} bytes but header {dims} needs {expected}")
    if len(raw) > expected:
        raise DataFormatError(f"{path}: {len(raw) - expected} unexpected trailing bytes after data of shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _read_mnist_pair(root: Path, split: str, image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    img_path = _find_file(root, _MNIST_FILES[f"{split}_images"], f"MNIST {split} images")
    lbl_path = _find_file(root, _MNIST_FILES[f"{split}_labels"], f"MNIST {split} labels")
    images = read_idx(img_path, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(lbl_path, expected_magic=IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise DataFormatError(f"{img_path}: expected 3 dimensions (n, rows, cols), got shape {images.shape}")
    if labels.ndim != 1:
        raise DataFormatError(f"{lbl_path}: expected 1 dimension (n,), got shape {labels.shape}")
    if images.shape[1:] != image_shape:
        raise DataFormatError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, expected {image_shape[0]}x{image_shape[1]}")
    if images.shape[0] == 0:
        raise DataFormatError(f"{img_path}: holds no images")
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels")
    if labels.max(initial=0) > 9:
        raise DataFormatError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    return images, labels


def load_mnist(
    data_dir: PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    flatten: bool = False,
    max_train: Optional[int] = None,
    max_test: Optional[int] = None,
) -> Dataset:
    """Real MNIST from IDX files in ``data_dir`` (also Fashion-MNIST, same format).

    Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``;
    the ``train-images.idx3-ubyte`` spelling is accepted too).  The validation set is
    carved out of the training files with ``seed``; the test set is ``t10k``.

    Args:
      flatten: return ``x`` as ``(n, 784)`` instead of ``(n, 28, 28, 1)``.
      max_train, max_test: keep only the first that many train / test examples
        (before the validation split), for quick runs.

    Returns:
      Dataset ``"mnist"``, ``x`` float32 in [0, 1], ``y`` int32 in 0..9.

    Raises:
      InvalidArgumentError: ``data_dir`` missing / not a directory, bad arguments.
      DataFormatError: a file is missing or malformed (the message names it).
    """
    root = _check_dir(data_dir, "MNIST")
    seed = _validate.check_int("seed", seed, minimum=0)
    _check_fractions(val_fraction, 0.0)
    x_tr, y_tr = _read_mnist_pair(root, "train", (28, 28))
    x_te, y_te = _read_mnist_pair(root, "test", (28, 28))
    return _finish(
        "mnist", x_tr, y_tr, x_te, y_te, seed=seed, val_fraction=val_fraction, flatten=flatten,
        max_train=max_train, max_test=max_test, channels_last=True,
    )


def _finish(name, x_tr, y_tr, x_te, y_te, *, seed, val_fraction, flatten, max_train, max_test, channels_last):
    if max_train is not None:
        max_train = _validate.check_int("max_train", max_train, minimum=1)
        x_tr, y_tr = x_tr[:max_train], y_tr[:max_train]
    if max_test is not None:
        max_test = _validate.check_int("max_test", max_test, minimum=1)
        x_te, y_te = x_te[:max_test], y_te[:max_test]
    tr, va, _ = split_indices(len(y_tr), val_fraction=val_fraction, test_fraction=0.0, seed=seed)
    tr, va = np.sort(tr), np.sort(va)

    def prep(x):
        x = x.astype(np.float32) / np.float32(255.0)
        if flatten:
            return x.reshape(len(x), -1)
        return x[..., None] if channels_last and x.ndim == 3 else x

    y_tr, y_te = y_tr.astype(np.int32), y_te.astype(np.int32)
    return Dataset(name, prep(x_tr[tr]), y_tr[tr], prep(x_tr[va]), y_tr[va], prep(x_te), y_te, 10)


# ----------------------------------------------------------------------------------
# CIFAR-10 (binary version)
# ----------------------------------------------------------------------------------

CIFAR10_RECORD = 1 + 32 * 32 * 3  # label byte + 3072 pixel bytes (R plane, G plane, B plane)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"


def read_cifar10_batch(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch: ``x`` uint8 ``(n, 32, 32, 3)``, ``y`` uint8 ``(n,)``.

    Each record is 1 label byte then 3 072 pixel bytes (1 024 red, 1 024 green,
    1 024 blue, row-major).  Raises :class:`DataFormatError` naming ``path`` when the
    file is empty, its length is not a multiple of 3 073 or a label is not 0..9.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) == 0:
        raise DataFormatError(f"{path}: empty CIFAR-10 batch file")
    if len(raw) % CIFAR10_RECORD:
        raise DataFormatError(
            f"{path}: size {len(raw)} bytes is not a multiple of the {CIFAR10_RECORD}-byte CIFAR-10 record "
            f"(truncated or not the binary version)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataFormatError(f"{path}: record {bad} has label {int(labels[bad])}, expected 0..9")
    x = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, labels


def load_cifar10(
    data_dir: PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    flatten: bool = False,
    max_train: Optional[int] = None,
    max_test: Optional[int] = None,
) -> Dataset:
    """CIFAR-10 (binary version) from ``data_dir`` or ``data_dir/cifar-10-batches-bin``.

    Reads ``data_batch_1.bin`` … ``data_batch_5.bin`` (train, validation carved out
    with ``seed``) and ``test_batch.bin``.  Returns Dataset ``"cifar10"`` with ``x``
    float32 ``(n, 32, 32, 3)`` in [0, 1] (``(n, 3072)`` with ``flatten``), ``y``
    int32 in 0..9.

    Raises:
      InvalidArgumentError: ``data_dir`` missing / not a directory.
      DataFormatError: a batch file is missing or malformed (the message names it).
    """
    root = _check_dir(data_dir, "CIFAR-10")
    seed = _validate.check_int("seed", seed, minimum=0)
    _check_fractions(val_fraction, 0.0)
    if not (root / CIFAR10_TEST_FILE).is_file() and (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    missing = [n for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if not (root / n).is_file()]
    if missing:
        raise DataFormatError(f"CIFAR-10: missing file(s) {', '.join(missing)} in {str(root)!r}")
    parts = [read_cifar10_batch(root / n) for n in CIFAR10_TRAIN_FILES]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = read_cifar10_batch(root / CIFAR10_TEST_FILE)
    return _finish(
        "cifar10", x_tr, y_tr, x_te, y_te, seed=seed, val_fraction=val_fraction, flatten=flatten,
        max_train=max_train, max_test=max_test, channels_last=False,
    )


# ----------------------------------------------------------------------------------
# Dispatch and batching
# ----------------------------------------------------------------------------------

DATASETS = ("digits", "mnist1d", "mnist", "cifar10")


def load(name: str, *, data_dir: Optional[PathLike] = None, **kwargs) -> Dataset:
    """Load a dataset by name: ``"digits"``, ``"mnist1d"`` (offline; ``data_dir``
    ignored), ``"mnist"``, ``"cifar10"`` (read from ``data_dir``, required).

    Extra keyword arguments go to the loader (``seed``, ``val_fraction``, ...).

    Example::

        >>> ds = load("mnist", data_dir="~/data/mnist", flatten=True)
    """
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise InvalidArgumentError(f"dataset name must be one of {', '.join(map(repr, DATASETS))}; got {name!r}")
    name = name.lower()
    if name == "digits":
        return load_digits(**kwargs)
    if name == "mnist1d":
        return load_mnist1d(**kwargs)
    if data_dir is None:
        raise InvalidArgumentError(f"dataset {name!r} is read from files: pass data_dir= (CLI: --data-dir)")
    loader = load_mnist if name == "mnist" else load_cifar10
    return loader(data_dir, **kwargs)


def _seed_from(seed: Optional[int], key: Any) -> Any:
    if (seed is None) == (key is None):
        raise InvalidArgumentError("batches needs exactly one of seed= or key=")
    if key is not None:
        import jax

        data = key
        if hasattr(jax, "dtypes") and jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
            data = jax.random.key_data(key)
        return np.random.SeedSequence([int(v) for v in np.asarray(data, dtype=np.uint32).ravel()])
    return _validate.check_int("seed", seed, minimum=0)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: Optional[int] = None,
    key: Any = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x_batch, y_batch)`` over one epoch, shuffled deterministically.

    Exactly one of ``seed`` (int) or ``key`` (a JAX PRNG key) fixes the order; e.g.
    ``key=jax.random.fold_in(key, epoch)`` for one order per epoch.  The last batch is
    smaller unless ``drop_last``.  Arguments are checked when called, not when first
    iterated.

    Example::

        >>> for xb, yb in batches(ds.x_train, ds.y_train, 128, seed=epoch): ...
    """
    batch_size = _validate.check_int("batch_size", batch_size, minimum=1)
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ShapeMismatchError(f"x and y must be arrays of the same length, got shapes {x.shape} and {y.shape}")
    n = len(y)
    if shuffle:
        order = np.random.default_rng(_seed_from(seed, key)).permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return _iterate(x, y, order, batch_size, stop)


def _iterate(x, y, order, batch_size, stop):
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
