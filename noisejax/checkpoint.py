"""Safe on-disk cache of parameter pytrees (no pickle).

File format (one file per entry)::

    MAGIC (16 bytes) | header length (8 bytes, little endian) | header (JSON, UTF-8) | payload

* ``payload`` is :func:`flax.serialization.msgpack_serialize` of the tree's state dict
  (NumPy arrays as msgpack extension types; msgpack executes no code when read).
* ``header`` holds ``{"sha256": ..., "size": ..., "metadata": {...}}``; the payload's
  length and SHA-256 are checked on every load, so a truncated or corrupted file is
  detected (:class:`noisejax.errors.DataFormatError`) and never trusted.

Writes are atomic: the bytes go to a temporary file in the destination folder, are
flushed and ``fsync``-ed, then moved over the destination with :func:`os.replace`; a
reader sees either the old file or the new one, never a partial one.

:func:`cached` is the load-or-build helper the experiments use: the file name is a
hash of the (JSON-serializable) configuration, a corrupted file is rebuilt and
rewritten, and the stored configuration is compared with the requested one.

Example::

    >>> from noisejax import checkpoint
    >>> tree, meta, status = checkpoint.cached({"width": 8}, lambda: ({"w": np.ones(3)}, {}), name="demo")
    >>> status in ("loaded", "built", "rebuilt")
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import jax
import numpy as np

from noisejax import _struct
from noisejax.errors import DataFormatError, InvalidArgumentError
from noisejax.store import atomic_write_bytes  # noqa: F401  (also re-exported here)

__all__ = [
    "MAGIC", "default_cache_dir", "config_hash", "save", "load", "cached",
    "COMPILATION_CACHE_ENV", "compilation_cache_dir", "enable_compilation_cache",
]


def _serialization():
    """``flax.serialization`` (imported on first use: the command line's fast paths never need it)."""
    from flax import serialization

    _struct.register_serialization()  # noisejax's dataclass pytrees, by field name as with flax.struct
    return serialization

PyTree = Any
PathLike = Union[str, "os.PathLike[str]"]

MAGIC = b"NOISEJAX-CKPT-1\n"
_LEN_BYTES = 8
_MAX_HEADER = 1 << 20


def default_cache_dir() -> Path:
    """``$NOISEJAX_CACHE`` if set, else ``~/.cache/noisejax``."""
    env = os.environ.get("NOISEJAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "noisejax"


#: Environment variable: the folder of JAX's persistent compilation cache, or ``off``.
COMPILATION_CACHE_ENV = "NOISEJAX_COMPILATION_CACHE"
_COMPILATION_CACHE_MAX_BYTES = 1 << 30


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


def enable_compilation_cache() -> Optional[Path]:
    """Turn on JAX's persistent compilation cache in :func:`compilation_cache_dir`.

    The second run of the same command loads its compiled programs from disk instead
    of compiling them (every program, however fast it compiled; at most 1 GiB,
    least recently used entries go first).  Leaves a cache folder the user configured
    for JAX (``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir``) alone.
    Returns the folder in use, or ``None``.  Called by the ``noisejax`` command line
    (``propagate``, ``demo``, ``reproduce``), not on import.
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
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", _COMPILATION_CACHE_MAX_BYTES)
    return path


def _canonical_json(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    except TypeError as exc:
        raise InvalidArgumentError(f"config must be JSON-serializable: {exc}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def config_hash(config: Any, *, length: int = 16) -> str:
    """Hex SHA-256 (first ``length`` digits) of the canonical JSON of ``config``."""
    return hashlib.sha256(_canonical_json(config).encode()).hexdigest()[:length]


def _to_numpy(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: np.asarray(x) if hasattr(x, "shape") else x, tree)


def save(path: PathLike, tree: PyTree, *, metadata: Optional[dict] = None) -> Path:
    """Atomically write ``tree`` (and JSON ``metadata``) to ``path``; returns the path."""
    path = Path(path)
    serialization = _serialization()
    payload = serialization.msgpack_serialize(serialization.to_state_dict(_to_numpy(tree)))
    header = _canonical_json(
        {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload), "metadata": metadata or {}}
    ).encode()
    blob = MAGIC + len(header).to_bytes(_LEN_BYTES, "little") + header + payload
    atomic_write_bytes(path, blob)
    return path



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
    if hashlib.sha256(payload).hexdigest() != digest:
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
      config: JSON-serializable description; its hash names the file
        ``{cache_dir}/{name}-{hash}.msgpack``.
      build: ``() -> (tree, metadata)`` called when there is no valid entry.
      cache_dir: folder (default :func:`default_cache_dir`).
      name: file name prefix.
      target: optional structure to restore into.

    Returns:
      ``(tree, metadata, status)`` with status ``"loaded"``, ``"built"`` (no file) or
      ``"rebuilt"`` (the file was corrupted or belonged to another config; a warning
      is issued and the file is replaced).
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / f"{name}-{config_hash(config)}.msgpack"
    config_json = _canonical_json(config)
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
    tree = _to_numpy(tree)
    return tree, info, status
