"""Safe result files: atomic writes, checksums, fingerprints, resumable points (no pickle).

The low-level file layer shared by :mod:`noisejax.checkpoint` (models),
:mod:`noisejax.sweeps` (resumable WNR points) and :mod:`noisejax.reproduce` (the
report), which re-exports these names.

* :func:`atomic_write_bytes` — temporary file in the destination folder, ``fsync``,
  ``os.replace``: a reader sees the old file or the new one, never a partial one.
* :func:`write_checked_json` / :func:`read_checked_json` — JSON with a SHA-256 of its
  canonical form; a missing, truncated or corrupted file reads as ``None``.
* :func:`save_arrays` / :func:`load_arrays` — ``.npz`` (``allow_pickle=False``) with a
  checksum and a key fingerprint; anything that does not verify reads as ``None``.
* :func:`cached_point` — load a finished sweep point or compute and store it;
  :class:`PointStore` the same for numbered array points (the resumable sweeps).
* :func:`tree_digest` — SHA-256 of a pytree's structure and leaves (a point's inputs).
* :func:`safe_join` — a path inside a folder, refusing escapes.

Example::

    >>> from noisejax import store
    >>> value, reused = store.cached_point("points", "p0", lambda: {"acc": 0.9}, key={"wnr": 0.0})
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from noisejax.errors import InvalidArgumentError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "safe_join",
    "to_jsonable",
    "fingerprint",
    "code_digest",
    "write_checked_json",
    "read_checked_json",
    "cached_point",
    "save_arrays",
    "load_arrays",
    "tree_digest",
    "PointStore",
]

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise InvalidArgumentError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def safe_join(root: PathLike, *parts: str) -> Path:
    """``root/parts...``, refusing anything that resolves outside ``root``.

    Raises :class:`~noisejax.errors.InvalidArgumentError` for absolute parts,
    ``..`` escapes and symlinks pointing out of ``root``.
    """
    base = Path(root).resolve()
    for p in parts:
        if not isinstance(p, str) or not p or os.path.isabs(p) or "\x00" in p:
            raise InvalidArgumentError(f"path component {p!r} must be a non-empty relative name")
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise InvalidArgumentError(f"path {os.path.join(*parts)!r} escapes the folder {str(base)!r}")
    return target



def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from NumPy / JAX arrays, dataclasses, tuples and paths.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict JSON).
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__array__") and hasattr(obj, "shape"):
        arr = np.asarray(obj)
        if arr.dtype.kind in "fc":
            arr = arr.astype(np.float64)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    return repr(obj)


def _canonical(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _sha256(text: Union[str, bytes]) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def write_checked_json(path: PathLike, payload: Any) -> Any:
    """Atomically write ``{"sha256": ..., "payload": payload}``; returns the JSON round trip of ``payload``.

    The returned value is exactly what :func:`read_checked_json` will give back, so
    callers can use it in place of the freshly computed one (results identical
    whether a value was computed now or loaded later).
    """
    plain = to_jsonable(payload)
    body = _canonical(plain)
    text = json.dumps({"sha256": _sha256(body), "payload": plain}, indent=1, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, text.encode())
    return json.loads(body)


def atomic_write_json(path: PathLike, obj: Any, *, indent: Optional[int] = 1) -> Path:
    """Atomically write ``obj`` as strict JSON (no checksum; for human-facing files)."""
    return atomic_write_bytes(path, json.dumps(to_jsonable(obj), indent=indent, sort_keys=False, allow_nan=False).encode())


def read_checked_json(path: PathLike) -> Any:
    """Payload of a file written by :func:`write_checked_json`, or ``None``.

    ``None`` when the file is missing, unreadable, not JSON, truncated, or its
    checksum does not match — the caller recomputes.
    """
    try:
        raw = Path(path).read_bytes()
        obj = json.loads(raw.decode())
        payload = obj["payload"]
        if not isinstance(obj.get("sha256"), str) or _sha256(_canonical(payload)) != obj["sha256"]:
            return None
        return payload
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def fingerprint(obj: Any) -> str:
    """Short SHA-256 of the canonical JSON of ``obj`` (a config, a point's parameters...)."""
    return _sha256(_canonical(obj))[:16]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Short SHA-256 of the installed ``noisejax`` package's source files.

    Part of every stored point's key (and of the report's fingerprints), so results
    computed by another version of the library are recomputed, never reused.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cached_point(directory: PathLike, name: str, compute: Callable[[], Any], *, key: Any = None) -> tuple[Any, bool]:
    """Load the finished sweep point ``directory/name.json`` or compute and store it.

    Args:
      directory: the experiment's points folder.
      name: file stem (letters, digits, ``_.-``); must stay inside ``directory``.
      compute: ``() -> JSON-able value`` (arrays are converted to lists).
      key: anything JSON-able describing the point's inputs; a stored point with
        another key, another library version (:func:`code_digest`) or a bad checksum
        is recomputed.

    Returns:
      ``(value, reused)`` — ``value`` is the JSON round trip in both cases.
    """
    path = safe_join(directory, f"{name}.json")
    want = fingerprint({"key": key, "library": code_digest()})
    stored = read_checked_json(path)
    if isinstance(stored, dict) and stored.get("key") == want and "value" in stored:
        return stored["value"], True
    value = compute()
    out = write_checked_json(path, {"key": want, "value": value})
    return out["value"], False


def save_arrays(path: PathLike, arrays: dict, *, key: Any = None) -> Path:
    """Atomically save named arrays as ``.npz`` (no pickle) with a checksum and a ``key``."""
    import io

    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype == object:
            raise InvalidArgumentError(f"save_arrays: array {k!r} has dtype object; only numeric arrays are stored")
    digest = _arrays_digest(arrays)
    meta = json.dumps({"key": fingerprint(key), "sha256": digest})
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.array(meta), **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_arrays(path: PathLike, *, key: Any = None) -> Optional[dict]:
    """Arrays saved by :func:`save_arrays` with the same ``key``, or ``None`` (missing, corrupted, other key)."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            arrays = {k: np.array(z[k]) for k in z.files if k != "__meta__"}
    except Exception:  # zip / CRC / JSON / key errors: never trust the file
        return None
    if meta.get("key") != fingerprint(key) or meta.get("sha256") != _arrays_digest(arrays):
        return None
    return arrays


def _arrays_digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        v = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{v.dtype.str}|{v.shape}|".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def _file_sha(path: Path) -> Optional[str]:
    try:
        return _sha256(path.read_bytes())
    except OSError:
        return None


def tree_digest(tree: Any) -> str:
    """SHA-256 of a pytree's structure and leaf bytes (PRNG keys by their implementation and key data)."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    # static fields may hold functions: drop their memory addresses, which change per process
    h.update(re.sub(r" at 0x[0-9a-fA-F]+", "", str(treedef)).encode())
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            h.update(str(jax.random.key_impl(leaf)).encode())
            leaf = jax.random.key_data(leaf)
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class PointStore:
    """Atomic per-point files ``point-IIII.npz`` in ``folder``, keyed by ``ident`` + the point's own identity.

    ``folder=None`` stores nothing (every point is computed).  Used by the resumable
    sweeps of :mod:`noisejax.sweeps`; ``reused`` counts the points loaded.
    """

    def __init__(self, folder: Optional[Any], ident: dict):
        self.folder = None
        if folder is not None:
            try:
                self.folder = os.fspath(folder)
                os.makedirs(self.folder, exist_ok=True)
            except (TypeError, OSError) as e:
                raise InvalidArgumentError(f"store must be a writable folder, got {folder!r} ({e})") from None
        self.ident = {**ident, "library": code_digest()} if folder is not None else ident
        self.reused = 0

    def get_or_compute(self, i: int, point_ident: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
        if self.folder is None:
            return compute(), False
        path = safe_join(self.folder, f"point-{i:04d}.npz")
        key = {**self.ident, **point_ident, "index": i}
        stored = load_arrays(path, key=key)
        if stored is not None:
            self.reused += 1
            return stored, True
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        save_arrays(path, arrays, key=key)
        return arrays, False
