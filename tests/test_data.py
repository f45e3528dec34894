"""Tests of noisejax.data: offline datasets, IDX / CIFAR-10 readers, dispatch, batches."""

from __future__ import annotations

import gzip
import random
import struct

import numpy as np
import pytest

from noisejax import data
from noisejax.errors import DataFormatError, InvalidArgumentError, ShapeMismatchError

# ----------------------------------------------------------------------------------
# Writers for tiny files in the real formats (independent of the reader)
# ----------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | arr.ndim
    return struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in arr.shape) + arr.tobytes()


def write(path, payload: bytes, gz: bool = False):
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_mnist(root, *, n_train=12, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write(root / name, idx_bytes(arr), gz=gz)
    return arrays


def make_cifar(root, *, n_per_batch=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [*data.CIFAR10_TRAIN_FILES, data.CIFAR10_TEST_FILE]:
        n = n_test if name == data.CIFAR10_TEST_FILE else n_per_batch
        img = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # HWC
        lab = rng.integers(0, 10, (n,), dtype=np.uint8)
        # record: label, then R plane, G plane, B plane (row-major each)
        records = [bytes([lab[i]]) + img[i].transpose(2, 0, 1).tobytes() for i in range(n)]
        (root / name).write_bytes(b"".join(records))
        batches[name] = (img, lab)
    return batches


# ----------------------------------------------------------------------------------
# Offline datasets
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_small():
    return data.load_mnist1d(n_samples=300, seed=3)


def test_mnist1d_shapes_standardization_and_determinism(mnist1d_small):
    ds = mnist1d_small
    assert ds.name == "mnist1d" and ds.n_classes == 10
    assert ds.feature_shape == (40,)
    assert len(ds.y_train) + len(ds.y_val) + len(ds.y_test) == 300
    assert (len(ds.y_val), len(ds.y_test)) == (30, 60)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    # standardized with the training set's scalar statistics
    assert abs(float(ds.x_train.mean())) < 1e-5
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-5
    assert set(np.unique(np.concatenate([ds.y_train, ds.y_val, ds.y_test]))) == set(range(10))
    again = data.load_mnist1d(n_samples=300, seed=3)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    other = data.load_mnist1d(n_samples=300, seed=4)
    assert not np.array_equal(other.x_train[:20], ds.x_train[:20])


def test_mnist1d_generation_is_local_no_pickle_and_leaves_global_rng_alone(monkeypatch):
    import requests

    def no_network(*a, **k):  # pragma: no cover - only reached on a regression
        raise AssertionError("load_mnist1d tried to download")

    def no_pickle(*a, **k):  # pragma: no cover - only reached on a regression
        raise AssertionError("load_mnist1d tried to unpickle")

    import pickle

    import mnist1d.data
    import mnist1d.utils

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(mnist1d.utils, "from_pickle", no_pickle)
    monkeypatch.setattr(mnist1d.data, "from_pickle", no_pickle)
    monkeypatch.setattr(mnist1d.data, "to_pickle", no_pickle)
    np.random.seed(123)
    random.seed(123)
    data._mnist1d_raw.cache_clear()
    data.load_mnist1d(n_samples=50, seed=11)
    a, b = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    assert (a, b) == (np.random.rand(), random.random())


def test_mnist1d_is_learnable_above_chance(mnist1d_small):
    # A linear least-squares classifier must beat chance (10 %) clearly: the labels carry signal.
    ds = mnist1d_small
    X = np.c_[ds.x_train, np.ones(len(ds.x_train))]
    W, *_ = np.linalg.lstsq(X, np.eye(10)[ds.y_train], rcond=None)
    acc = np.mean(np.argmax(np.c_[ds.x_test, np.ones(len(ds.x_test))] @ W, 1) == ds.y_test)
    assert acc > 0.2


def test_load_dispatch_digits_and_mnist1d():
    assert data.load("digits").feature_shape == (64,)
    assert data.load("MNIST1D", n_samples=300, seed=3, data_dir="/ignored").feature_shape == (40,)


# ----------------------------------------------------------------------------------
# MNIST round trips
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_round_trip(tmp_path, gz):
    arrays = make_mnist(tmp_path, gz=gz)
    ds = data.load_mnist(tmp_path, val_fraction=0.25, seed=1)
    assert ds.name == "mnist" and ds.n_classes == 10
    assert ds.x_train.shape == (9, 28, 28, 1) and ds.x_val.shape == (3, 28, 28, 1)
    assert ds.x_test.shape == (5, 28, 28, 1) and ds.x_train.dtype == np.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_allclose(ds.x_test[..., 0] * 255.0, arrays["t10k-images-idx3-ubyte"], atol=1e-3)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    # train + val is a partition of the training files, image/label pairing preserved
    xs = np.concatenate([ds.x_train, ds.x_val])[..., 0] * 255.0
    ys = np.concatenate([ds.y_train, ds.y_val])
    ref_x = arrays["train-images-idx3-ubyte"].astype(np.float32)
    ref_y = arrays["train-labels-idx1-ubyte"]
    for img, lab in zip(xs, ys):
        match = np.where(np.all(np.abs(ref_x - img) < 1e-3, axis=(1, 2)))[0]
        assert len(match) == 1 and ref_y[match[0]] == lab
    flat = data.load("mnist", data_dir=tmp_path, flatten=True, max_train=8, max_test=2, val_fraction=0.25)
    assert flat.x_train.shape == (6, 784) and flat.x_test.shape == (2, 784)


def test_read_idx_accepts_misnamed_gzip(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    p = tmp_path / "a.idx"
    p.write_bytes(gzip.compress(idx_bytes(arr)))  # gzipped content without .gz suffix
    np.testing.assert_array_equal(data.read_idx(p), arr)


# ----------------------------------------------------------------------------------
# CIFAR-10 round trip
# ----------------------------------------------------------------------------------


def test_cifar10_round_trip(tmp_path):
    sub = tmp_path / "cifar-10-batches-bin"
    sub.mkdir()
    written = make_cifar(sub)
    ds = data.load("cifar10", data_dir=tmp_path, val_fraction=0.2, seed=0)  # finds the sub-folder
    assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_val.shape == (3, 32, 32, 3)
    assert ds.x_test.shape == (4, 32, 32, 3) and ds.x_test.dtype == np.float32
    img, lab = written[data.CIFAR10_TEST_FILE]
    np.testing.assert_allclose(ds.x_test * 255.0, img, atol=1e-3)
    np.testing.assert_array_equal(ds.y_test, lab)
    # channel order: the first 1024 pixel bytes of a record are the red plane
    x, _ = data.read_cifar10_batch(sub / data.CIFAR10_TEST_FILE)
    raw = np.frombuffer((sub / data.CIFAR10_TEST_FILE).read_bytes(), np.uint8)
    np.testing.assert_array_equal(x[0, :, :, 0].ravel(), raw[1:1025])
    assert data.load_cifar10(sub, flatten=True, val_fraction=0.2).x_train.shape == (12, 3072)


# ----------------------------------------------------------------------------------
# Malformed inputs: each raises the right type and names the file / argument
# ----------------------------------------------------------------------------------


def _rewrite(name, payload_fn):
    def mutate(root):
        (root / name).write_bytes(payload_fn((root / name).read_bytes()))
        return name

    return mutate


def _wrong_magic(raw):
    return struct.pack(">i", 2049) + raw[4:]


def _wrong_dims(root):
    write(root / "train-images-idx3-ubyte", idx_bytes(np.zeros((12, 27, 28), np.uint8)))
    return "train-images-idx3-ubyte"


def _count_mismatch(root):
    write(root / "train-labels-idx1-ubyte", idx_bytes(np.zeros((11,), np.uint8)))
    return "train-labels-idx1-ubyte"


def _label_range(root):
    write(root / "t10k-labels-idx1-ubyte", idx_bytes(np.array([0, 1, 12, 3, 4], np.uint8)))
    return "t10k-labels-idx1-ubyte"


def _missing(root):
    (root / "t10k-images-idx3-ubyte").unlink()
    return "t10k-images-idx3-ubyte"


def _bad_gzip(root):
    payload = gzip.compress((root / "train-images-idx3-ubyte").read_bytes())
    (root / "train-images-idx3-ubyte").unlink()
    (root / "train-images-idx3-ubyte.gz").write_bytes(payload[: len(payload) // 2])
    return "train-images-idx3-ubyte.gz"


def _labels_as_images(root):
    write(root / "train-labels-idx1-ubyte", idx_bytes(np.zeros((12, 28, 28), np.uint8)))
    return "train-labels-idx1-ubyte"


def _empty_file(root):
    (root / "t10k-labels-idx1-ubyte").write_bytes(b"")
    return "t10k-labels-idx1-ubyte"


def _no_images(root):
    write(root / "train-images-idx3-ubyte", idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    write(root / "train-labels-idx1-ubyte", idx_bytes(np.zeros((0,), np.uint8)))
    return "train-images-idx3-ubyte"


MNIST_BAD = {
    "wrong magic": _rewrite("train-images-idx3-ubyte", _wrong_magic),
    "truncated body": _rewrite("train-images-idx3-ubyte", lambda raw: raw[:-100]),
    "trailing bytes": _rewrite("t10k-images-idx3-ubyte", lambda raw: raw + b"\0\0"),
    "truncated header": _rewrite("train-labels-idx1-ubyte", lambda raw: raw[:6]),
    "wrong image size": _wrong_dims,
    "count mismatch": _count_mismatch,
    "label out of range": _label_range,
    "missing file": _missing,
    "corrupt gzip": _bad_gzip,
    "labels file with 3 dims": _labels_as_images,
    "empty file": _empty_file,
    "no images": _no_images,
}


@pytest.mark.parametrize("case", sorted(MNIST_BAD))
def test_mnist_malformed(tmp_path, case):
    make_mnist(tmp_path)
    culprit = MNIST_BAD[case](tmp_path)
    with pytest.raises(DataFormatError) as info:
        data.load_mnist(tmp_path)
    assert culprit in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def _cifar_rewrite(name, payload_fn):
    def build(root):
        make_cifar(root)
        (root / name).write_bytes(payload_fn((root / name).read_bytes()))
        return name

    return build


def _cifar_missing(root):
    make_cifar(root)
    (root / "data_batch_4.bin").unlink()
    return "data_batch_4.bin"


def _cifar_label(raw):
    arr = bytearray(raw)
    arr[data.CIFAR10_RECORD] = 10  # label of record 1
    return bytes(arr)


CIFAR_BAD = {
    "truncated": _cifar_rewrite("data_batch_2.bin", lambda raw: raw[:-1]),
    "extra bytes": _cifar_rewrite("test_batch.bin", lambda raw: raw + b"\0" * 5),
    "label out of range": _cifar_rewrite("data_batch_3.bin", _cifar_label),
    "empty batch": _cifar_rewrite("data_batch_5.bin", lambda raw: b""),
    "missing batch": _cifar_missing,
}


@pytest.mark.parametrize("case", sorted(CIFAR_BAD))
def test_cifar10_malformed(tmp_path, case):
    culprit = CIFAR_BAD[case](tmp_path)
    with pytest.raises(DataFormatError) as info:
        data.load_cifar10(tmp_path)
    assert culprit in str(info.value), str(info.value)


ARG_BAD = [
    ("unknown name", lambda tmp: data.load("imagenet"), InvalidArgumentError, "imagenet"),
    ("mnist without data_dir", lambda tmp: data.load("mnist"), InvalidArgumentError, "data_dir"),
    ("cifar without data_dir", lambda tmp: data.load("cifar10"), InvalidArgumentError, "data_dir"),
    ("empty dir", lambda tmp: data.load_mnist(tmp), DataFormatError, "train-images-idx3-ubyte"),
    ("empty dir cifar", lambda tmp: data.load_cifar10(tmp), DataFormatError, "data_batch_1.bin"),
    ("nonexistent dir", lambda tmp: data.load_mnist(tmp / "nope"), InvalidArgumentError, "nope"),
    ("dir is a file", lambda tmp: data.load_cifar10(_touch(tmp / "f")), InvalidArgumentError, "not a directory"),
    ("bad seed", lambda tmp: data.load_mnist1d(seed=-1), InvalidArgumentError, "seed"),
    ("too few samples", lambda tmp: data.load_mnist1d(n_samples=5), InvalidArgumentError, "n_samples"),
    ("bad fraction", lambda tmp: data.load_mnist1d(val_fraction=1.5), InvalidArgumentError, "val_fraction"),
    ("batch size 0", lambda tmp: data.batches(np.zeros(3), np.zeros(3), 0, seed=0), InvalidArgumentError, "batch_size"),
    ("batch no seed", lambda tmp: data.batches(np.zeros(3), np.zeros(3), 2), InvalidArgumentError, "seed"),
    ("batch length", lambda tmp: data.batches(np.zeros(3), np.zeros(4), 2, seed=0), ShapeMismatchError, "same length"),
]


def _touch(path):
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("case", ARG_BAD, ids=[c[0] for c in ARG_BAD])
def test_bad_arguments(tmp_path, case):
    _, call, exc, needle = case
    with pytest.raises(exc) as info:
        call(tmp_path)
    assert needle in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------


def test_batches_cover_epoch_deterministically():
    import jax

    x = np.arange(23, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    y = np.arange(23)
    run = lambda **kw: list(data.batches(x, y, 5, **kw))  # noqa: E731
    a, b = run(seed=7), run(seed=7)
    assert [len(yb) for _, yb in a] == [5, 5, 5, 5, 3]
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    ys = np.concatenate([yb for _, yb in a])
    assert sorted(ys.tolist()) == list(range(23)) and ys.tolist() != list(range(23))
    for xb, yb in a:  # pairs stay together
        np.testing.assert_array_equal(xb[:, 0], yb)
    assert not np.array_equal(ys, np.concatenate([yb for _, yb in run(seed=8)]))
    k = run(key=jax.random.key(1))
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in k]), np.concatenate([yb for _, yb in run(key=jax.random.key(1))]))
    assert [len(yb) for _, yb in run(seed=0, drop_last=True)] == [5, 5, 5, 5]
    assert np.concatenate([yb for _, yb in run(shuffle=False)]).tolist() == list(range(23))
