"""The one safe-file layer: atomic writes, one canonical JSON, one hash, checked files, caches.

Everything noisejax writes to disk goes through this module (no pickle anywhere):

* :func:`atomic_write_bytes` — temporary file in the destination folder, ``fsync``,
  ``os.replace``: a reader sees the old file or the new one, never a partial one.
* :func:`canonical_json` / :func:`fingerprint` — THE canonical JSON of a value
  (:func:`to_jsonable`, sorted keys, no spaces) and its SHA-256 (first 16 hex digits):
  configurations, cache keys and the report's fingerprints all use it.
* :func:`sources_digest` / :func:`code_digest` — SHA-256 of a folder's Python sources
  (the ``noisejax`` package's for :func:`code_digest`): results computed by other code
  are recomputed, never reused.
* :func:`write_checked_json` / :func:`read_checked_json` — JSON with the SHA-256 of its
  canonical form; a missing, truncated or corrupted file reads as ``None``.
* :func:`save_arrays` / :func:`load_arrays` — ``.npz`` (``allow_pickle=False``) with a
  checksum and a key fingerprint; anything that does not verify reads as ``None``.
* :func:`cached_point` — load a finished point or compute and store it;
  :class:`PointStore` the same for numbered array points (resumable sweeps,
  ``noisejax.sweeps.accuracy_sweep(..., store=PointStore(folder))``).
* :func:`save` / :func:`load` / :func:`cached` — parameter pytrees (msgpack, checksummed
  header) and the load-or-build cache of trained models and denoisers.
* :func:`compilation_cache` — JAX's persistent compilation cache for the duration of a command
  (:func:`enable_compilation_cache`, pruned once per command by :func:`prune_compilation_cache`).

Example::

    >>> from noisejax.study import files
    >>> value, reused = files.cached_point("points", "p0", lambda: {"acc": 0.9}, key={"wnr": 0.0})
    >>> tree, info, status = files.cached({"width": 8}, lambda: ({"w": np.ones(3)}, {}), name="demo")
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import _struct
from noisejax.errors import DataFormatError, InvalidArgumentError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "safe_join",
    "to_jsonable",
    "canonical_json",
    "sha256",
    "fingerprint",
    "sources_digest",
    "code_digest",
    "file_sha256",
    "write_checked_json",
    "read_checked_json",
    "cached_point",
    "save_arrays",
    "load_arrays",
    "tree_digest",
    "PointStore",
    "MAGIC",
    "default_cache_dir",
    "save",
    "load",
    "cached",
    "COMPILATION_CACHE_ENV",
    "compilation_cache_dir",
    "enable_compilation_cache",
    "compilation_cache",
    "prune_compilation_cache",
]

PathLike = Union[str, "os.PathLike[str]"]
PyTree = Any


# ----------------------------------------------------------------------------------
# Paths and atomic writes
# ----------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------
# One canonical JSON, one hash
# ----------------------------------------------------------------------------------


def to_jsonable(obj: Any, *, strict: bool = False) -> Any:
    """Plain JSON types from NumPy / JAX arrays, dataclasses, tuples and paths.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict
    JSON).  Anything else is its ``repr`` — or, with ``strict=True``, an
    :class:`~noisejax.errors.InvalidArgumentError` (cache keys must be plain data).
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), strict=strict)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, strict=strict) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), strict=strict) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, strict=strict) for v in obj]
    if hasattr(obj, "__array__") and hasattr(obj, "shape"):
        arr = np.asarray(obj)
        if arr.dtype.kind in "fc":
            arr = arr.astype(np.float64)
        return to_jsonable(arr.tolist(), strict=strict) if arr.ndim else to_jsonable(arr.item(), strict=strict)
    if strict:
        raise InvalidArgumentError(f"config must be JSON-serializable: object of type {type(obj).__name__} is not")
    return repr(obj)


def canonical_json(obj: Any, *, strict: bool = False) -> str:
    """THE canonical JSON of ``obj``: :func:`to_jsonable`, sorted keys, no spaces."""
    return json.dumps(to_jsonable(obj, strict=strict), sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256(data: Union[str, bytes]) -> str:
    """Hex SHA-256 of ``data`` (text is UTF-8 encoded)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def fingerprint(obj: Any, *, length: int = 16) -> str:
    """SHA-256 (first ``length`` hex digits) of the canonical JSON of ``obj`` (a config, a point's inputs...)."""
    return sha256(canonical_json(obj))[:length]


def sources_digest(folder: PathLike) -> str:
    """Short SHA-256 of the ``*.py`` files under ``folder`` (relative names and contents; no ``__pycache__``)."""
    root = Path(folder).resolve()
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """:func:`sources_digest` of the installed ``noisejax`` package.

    Part of every stored point's key (and of the report's fingerprints), so results
    computed by another version of the library are recomputed, never reused.
    """
    return sources_digest(Path(__file__).resolve().parents[1])


def file_sha256(path: PathLike) -> Optional[str]:
    """SHA-256 of a file's bytes, ``None`` when it cannot be read."""
    try:
        return sha256(Path(path).read_bytes())
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


# ----------------------------------------------------------------------------------
# Checked JSON and arrays
# ----------------------------------------------------------------------------------


def write_checked_json(path: PathLike, payload: Any) -> Any:
    """Atomically write ``{"sha256": ..., "payload": payload}``; returns the JSON round trip of ``payload``.

    The returned value is exactly what :func:`read_checked_json` will give back, so
    callers can use it in place of the freshly computed one (results identical
    whether a value was computed now or loaded later).
    """
    plain = to_jsonable(payload)
    body = canonical_json(plain)
    text = json.dumps({"sha256": sha256(body), "payload": plain}, indent=1, sort_keys=True, allow_nan=False)
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
        obj = json.loads(Path(path).read_bytes().decode())
        payload = obj["payload"]
        if not isinstance(obj.get("sha256"), str) or sha256(canonical_json(payload)) != obj["sha256"]:
            return None
        return payload
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def cached_point(directory: PathLike, name: str, compute: Callable[[], Any], *, key: Any = None) -> tuple[Any, bool]:
    """Load the finished point ``directory/name.json`` or compute and store it.

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
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype == object:
            raise InvalidArgumentError(f"save_arrays: array {k!r} has dtype object; only numeric arrays are stored")
    meta = json.dumps({"key": fingerprint(key), "sha256": _arrays_digest(arrays)})
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


class PointStore:
    """Atomic per-point files ``point-IIII.npz`` in ``folder``: the resumable points of a sweep.

    The sweeps of :mod:`noisejax.sweeps` take one as ``store=`` and call
    ``store.bind(identity, data)`` (what every point depends on: a JSON-able dict and a
    pytree of arrays — data, clean weights, key — digested with :func:`tree_digest`),
    then ``get_or_compute(i, ident, compute, data)`` per point: point ``i`` is loaded
    when its file is intact and was stored for the same identity, library version
    (:func:`code_digest`), ``ident`` and ``data``; otherwise it is computed and stored.
    ``reused`` counts the points loaded.

    Example::

        >>> res = sweeps.accuracy_sweep(..., store=PointStore("points/sweep"))
    """

    def __init__(self, folder: Any, ident: Optional[dict] = None):
        try:
            self.folder = os.fspath(folder)
            os.makedirs(self.folder, exist_ok=True)
        except (TypeError, OSError) as e:
            raise InvalidArgumentError(f"store must be a writable folder, got {folder!r} ({e})") from None
        self.ident = {**(ident or {}), "library": code_digest()}
        self.reused = 0

    def bind(self, identity: dict, data: Any = None) -> "PointStore":
        """A store on the same folder whose points are also keyed by ``identity`` and the digest of ``data``."""
        return PointStore(self.folder, {**self.ident, **identity, "data": tree_digest(data)})

    def get_or_compute(self, i: int, ident: dict, compute: Callable[[], dict], data: Any = None) -> tuple[dict, bool]:
        """Point ``i``: ``(arrays, reused)``; ``compute() -> {name: array}`` runs when no valid file exists."""
        path = safe_join(self.folder, f"point-{i:04d}.npz")
        key = {**self.ident, **ident, "point_data": tree_digest(data), "index": i}
        stored = load_arrays(path, key=key)
        if stored is not None:
            self.reused += 1
            return stored, True
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        save_arrays(path, arrays, key=key)
        return arrays, False


# ----------------------------------------------------------------------------------
# Parameter pytrees (msgpack) and the load-or-build cache
# ----------------------------------------------------------------------------------

#: First bytes of a parameter file written by :func:`save`.  File layout::
#:
#:     MAGIC (16 bytes) | header length (8 bytes, little endian) | header (JSON) | payload
#:
#: ``payload`` is :func:`flax.serialization.msgpack_serialize` of the tree's state dict
#: (msgpack executes no code when read); ``header`` holds ``{"sha256", "size", "metadata"}``,
#: checked on every load.
MAGIC = b"NOISEJAX-CKPT-1\n"
_LEN_BYTES = 8
_MAX_HEADER = 1 << 20


def _serialization():
    """``flax.serialization`` (imported on first use: the command line's fast paths never need it)."""
    from flax import serialization

    _struct.register_serialization()  # noisejax's dataclass pytrees, by field name as with flax.struct
    return serialization


def default_cache_dir() -> Path:
    """``$NOISEJAX_CACHE`` if set, else ``~/.cache/noisejax``."""
    env = os.environ.get("NOISEJAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "noisejax"


def _to_numpy(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: np.asarray(x) if hasattr(x, "shape") else x, tree)


def save(path: PathLike, tree: PyTree, *, metadata: Optional[dict] = None) -> Path:
    """Atomically write ``tree`` (and JSON ``metadata``) to ``path``; returns the path."""
    serialization = _serialization()
    payload = serialization.msgpack_serialize(serialization.to_state_dict(_to_numpy(tree)))
    header = canonical_json({"sha256": sha256(payload), "size": len(payload), "metadata": metadata or {}},
                            strict=True).encode()
    atomic_write_bytes(path, MAGIC + len(header).to_bytes(_LEN_BYTES, "little") + header + payload)
    return Path(path)


def load(path: PathLike, target: Optional[PyTree] = None) -> tuple[PyTree, dict]:
    """Read and verify a file written by :func:`save`; returns ``(tree, metadata)``.

    Without ``target`` the tree is the nested dict of NumPy arrays that was stored;
    with ``target`` it is restored into ``target``'s structure.

    Raises:
      FileNotFoundError: no such file.
      DataFormatError: wrong magic, truncated, bad header, size or checksum mismatch.
    """
    path = Path(path)
    blob = path.read_bytes()
    start = len(MAGIC) + _LEN_BYTES
    if len(blob) < start or blob[: len(MAGIC)] != MAGIC:
        raise DataFormatError(f"{path}: not a noisejax checkpoint (bad magic number)")
    n_header = int.from_bytes(blob[len(MAGIC) : start], "little")
    if n_header > _MAX_HEADER or start + n_header > len(blob):
        raise DataFormatError(f"{path}: truncated or corrupted header (length {n_header})")
    try:
        header = json.loads(blob[start : start + n_header].decode())
        digest, size, metadata = header["sha256"], int(header["size"]), header["metadata"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DataFormatError(f"{path}: corrupted header") from None
    payload = blob[start + n_header :]
    if len(payload) != size:
        raise DataFormatError(f"{path}: payload has {len(payload)} bytes, header says {size} (truncated?)")
    if sha256(payload) != digest:
        raise DataFormatError(f"{path}: checksum mismatch (corrupted file)")
    serialization = _serialization()
    try:
        state = serialization.msgpack_restore(payload)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise DataFormatError(f"{path}: undecodable payload ({type(exc).__name__})") from None
    if target is not None:
        state = serialization.from_state_dict(target, state)
    return state, metadata


def cached(
    config: Any,
    build: Callable[[], tuple[PyTree, dict]],
    *,
    cache_dir: Optional[PathLike] = None,
    name: str = "model",
    target: Optional[PyTree] = None,
) -> tuple[PyTree, dict, str]:
    """Load the entry for ``config`` or build and store it.

    Args:
      config: JSON-serializable description; its :func:`fingerprint` names the file
        ``{cache_dir}/{name}-{fingerprint}.msgpack``.
      build: ``() -> (tree, metadata)`` called when there is no valid entry.
      cache_dir: folder (default :func:`default_cache_dir`).
      name: file name prefix.
      target: optional structure to restore into.

    Returns:
      ``(tree, metadata, status)`` with status ``"loaded"``, ``"built"`` (no file) or
      ``"rebuilt"`` (the file was corrupted or belonged to another config; a warning
      is issued and the file is replaced).
    """
    config_json = canonical_json(config, strict=True)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / f"{name}-{sha256(config_json)[:16]}.msgpack"
    status = "built"
    if path.exists():
        try:
            tree, meta = load(path, target)
            if meta.get("config_json") == config_json:
                return tree, meta.get("info", {}), "loaded"
            warnings.warn(f"{path}: stored config differs from the requested one; rebuilding", stacklevel=2)
        except DataFormatError as exc:
            warnings.warn(f"{exc}; rebuilding", stacklevel=2)
        status = "rebuilt"
    tree, info = build()
    save(path, tree, metadata={"config_json": config_json, "info": info})
    return _to_numpy(tree), info, status


# ----------------------------------------------------------------------------------
# JAX's persistent compilation cache (the command line's)
# ----------------------------------------------------------------------------------

#: Environment variable: the folder of JAX's persistent compilation cache, or ``off``.
COMPILATION_CACHE_ENV = "NOISEJAX_COMPILATION_CACHE"
_COMPILATION_CACHE_MAX_BYTES = 1 << 30
_CACHE_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"  # JAX's file names: <key>-cache, <key>-atime


def compilation_cache_dir() -> Optional[Path]:
    """Folder of the command line's compiled programs; ``None`` when switched off.

    ``$NOISEJAX_COMPILATION_CACHE`` if set (``off``, ``0``, ``false`` or empty: no
    cache), else ``default_cache_dir() / "jax-compilation"`` (``~/.cache/noisejax/...``,
    or under ``$NOISEJAX_CACHE``).  Safe to delete at any time: it only holds
    executables XLA compiled for this machine, keyed by the program, the JAX version
    and the compiler options; a missing or stale entry is compiled again.
    """
    env = os.environ.get(COMPILATION_CACHE_ENV)
    if env is not None:
        if env.strip().lower() in ("", "0", "off", "false", "no", "none"):
            return None
        return Path(env).expanduser()
    return default_cache_dir() / "jax-compilation"


_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


def prune_compilation_cache(path: PathLike, max_bytes: int = _COMPILATION_CACHE_MAX_BYTES) -> int:
    """Delete the least recently used entries of a compilation-cache folder until it holds at most ``max_bytes``.

    Recency is a file's last access or modification time, whichever is later.  One
    scan of the folder: called once when a command starts (:func:`compilation_cache`),
    not on every write — JAX's own size limit (``jax_compilation_cache_max_size``)
    scans the whole folder on every compiled program it writes, which made a
    2 900-entry folder cost ≈ 0.3 s per newly compiled program (0.09 ms per entry on a
    2-core CPU).  Returns the number of entries deleted; entries another process
    deletes meanwhile are skipped.

    Example::

        >>> prune_compilation_cache(compilation_cache_dir(), max_bytes=256 << 20)
    """
    max_bytes = int(max_bytes)
    if max_bytes < 0:
        raise InvalidArgumentError(f"max_bytes must be >= 0, got {max_bytes}")
    entries, total = [], 0
    try:
        with os.scandir(path) as it:
            for e in it:
                if not e.name.endswith(_CACHE_SUFFIX):
                    continue
                try:
                    st = e.stat()
                except OSError:
                    continue
                entries.append((max(st.st_atime, st.st_mtime), e.path, st.st_size))
                total += st.st_size
    except OSError:
        return 0
    removed = 0
    for _, entry, size in sorted(entries):
        if total <= max_bytes:
            break
        for victim in (entry, entry[: -len(_CACHE_SUFFIX)] + _ATIME_SUFFIX):  # JAX's LRU stamp, if any
            try:
                os.unlink(victim)
            except OSError:
                pass
        total -= size
        removed += 1
    return removed


def enable_compilation_cache() -> Optional[Path]:
    """Turn on JAX's persistent compilation cache in :func:`compilation_cache_dir`, for the rest of the process.

    The second run of the same command loads its compiled programs from disk instead
    of compiling them (every program, however fast it compiled).  The folder is first
    pruned to 1 GiB (:func:`prune_compilation_cache`, least recently used entries
    first).  Leaves a cache folder the user configured for JAX
    (``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir``) alone.  Returns the
    folder in use, or ``None``.  The command line uses :func:`compilation_cache`, which
    switches the cache off again when the command returns.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = compilation_cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warnings.warn(f"compilation cache disabled: cannot create {path} ({exc})")
        return None
    prune_compilation_cache(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@contextlib.contextmanager
def compilation_cache() -> Iterator[Optional[Path]]:
    """:func:`enable_compilation_cache` for the duration of a ``with`` block (the command line's commands).

    On exit the JAX settings it changed are restored and JAX's cache is reset, so a
    caller that runs a command in its own process (``noisejax.cli.main([...])``, a test)
    does not go on writing every program it compiles afterwards to disk.  Yields the
    folder in use, or ``None``.

    Example::

        >>> with compilation_cache():
        ...     run_the_command()
    """
    before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    path = enable_compilation_cache()
    changed = bool(path) and not before["jax_compilation_cache_dir"]
    try:
        yield path
    finally:
        if changed:
            for name, value in before.items():
                jax.config.update(name, value)
            from jax.experimental.compilation_cache import compilation_cache as _jax_cache

            _jax_cache.reset_cache()
