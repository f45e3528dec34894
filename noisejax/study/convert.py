"""Weight files of dense networks: the ``WEIGHTS.npz`` format, its readers and writer, converters into it.

``WEIGHTS.npz`` (what ``noisejax propagate`` reads, ``noisejax demo --save`` and
``noisejax convert`` write) is a NumPy ``.npz`` archive, no pickle, with

* ``W0, W1, ...`` — layer ``l``'s matrix of shape ``(fan_in, fan_out)``, so a layer is
  ``y = f(x @ W_l + b_l)`` (the layout of :func:`noisejax.layers.Dense` and of Flax's
  ``nn.Dense`` kernel; PyTorch's ``nn.Linear.weight`` is the transpose, ``(out, in)``);
* ``b0, b1, ...`` — optional biases of shape ``(fan_out,)``.

Converters (each returns ``(weights, biases)`` lists ready for
:func:`noisejax.layers.from_weights` and :func:`save_dense`):

* :func:`from_torch_state_dict` — a PyTorch ``state_dict`` of ``nn.Linear`` layers
  (``"<prefix>.weight"`` ``(out, in)``, ``"<prefix>.bias"``), e.g. saved with
  ``np.savez("sd.npz", **{k: v.numpy() for k, v in model.state_dict().items()})``
  or ``safetensors.torch.save_file(model.state_dict(), "sd.safetensors")``;
  read with :func:`load_arrays` (``.npz``) or :func:`read_safetensors`;
* :func:`from_flax_params` — Flax linen params of ``nn.Dense`` layers
  (``{"Dense_0": {"kernel": (in, out), "bias": (out,)}, ...}``, optionally under
  ``"params"``), e.g. saved with ``flax.serialization.to_bytes(variables)``; read
  with :func:`read_flax_msgpack`.

Layer order: ``layers=[prefix, ...]`` when given; otherwise the file's order for
``.npz`` archives and Flax msgpack (both keep the order in which the layers were
created), and the natural order of the names (``fc2`` before ``fc10``) for
safetensors, whose files sort tensors by name.  Consecutive shapes must chain.

Why an own safetensors reader: the format is documented and small (8-byte
little-endian header length, a JSON header of ``{name: {dtype, shape,
data_offsets}}``, raw little-endian bytes), so 40 lines read it with NumPy and every
field is validated; no extra dependency (the tests check it against files written
by the ``safetensors`` package when it is installed).

Example::

    >>> from noisejax.study import convert
    >>> sd = {"fc1.weight": np.ones((4, 3)), "fc1.bias": np.zeros(4), "fc2.weight": np.ones((2, 4))}
    >>> ws, bs = convert.from_torch_state_dict(sd)
    >>> [w.shape for w in ws], [None if b is None else b.shape for b in bs]
    ([(3, 4), (4, 2)], [(4,), None])
    >>> convert.save_dense("weights.npz", ws, bs)   # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
import re
import struct as _struct
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from noisejax.errors import DataFormatError, InvalidArgumentError, ShapeMismatchError
from noisejax.study.files import atomic_write_bytes

__all__ = [
    "SAFETENSORS_DTYPES",
    "save_dense",
    "load_arrays",
    "read_safetensors",
    "read_flax_msgpack",
    "from_torch_state_dict",
    "from_flax_params",
    "looks_like_torch",
]

PathLike = Union[str, "os.PathLike[str]"]
Dense = tuple[list[np.ndarray], list[Optional[np.ndarray]]]

#: safetensors dtype names this reader understands (bfloat16 through ``ml_dtypes``, a JAX dependency).
SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
_MAX_HEADER = 100 * 2**20


def _np_dtype(name: str) -> np.dtype:
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    table = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
             "U8": "u1", "BOOL": "?"}
    return np.dtype(table[name])


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into NumPy arrays, in the file's header order.

    Raises:
      DataFormatError: not a safetensors file (header length, JSON, offsets, sizes
        or an unsupported dtype).
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise DataFormatError(f"{path}: too short for a safetensors file ({len(raw)} bytes)")
    (n,) = _struct.unpack("<Q", raw[:8])
    if n > min(len(raw) - 8, _MAX_HEADER):
        raise DataFormatError(f"{path}: not a safetensors file (header length {n} for a file of {len(raw)} bytes)")
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataFormatError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise DataFormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise DataFormatError(f"{path}: tensor {name!r} lacks dtype / shape / data_offsets") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise DataFormatError(f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(SAFETENSORS_DTYPES)}")
        dt = _np_dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if not (0 <= begin <= end <= len(data)) or end - begin != size or any(s < 0 for s in shape):
            raise DataFormatError(f"{path}: tensor {name!r} has data_offsets {[begin, end]} that do not fit shape {shape}")
        out[name] = np.frombuffer(data[begin:end], dtype=dt).reshape(shape).copy()
    return out


def load_arrays(path: PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive (no pickle), in the archive's order.

    Raises:
      DataFormatError: not an ``.npz`` archive (a single ``.npy`` array included).
    """
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataFormatError(f"{path}: cannot read without pickle ({e})") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError ...
        raise DataFormatError(f"{path}: not a valid .npz archive ({type(e).__name__}: {e})") from None
    if isinstance(z, np.ndarray):
        raise DataFormatError(
            f"{path}: a single .npy array {z.shape}, not an .npz archive; save the layers with "
            "np.savez('weights.npz', W0=..., b0=..., W1=...)"
        )
    try:
        with z:
            return {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:
        raise DataFormatError(f"{path}: not a valid .npz archive ({type(e).__name__}: {e})") from None


def read_flax_msgpack(path: PathLike) -> Any:
    """A Flax pytree saved with ``flax.serialization.to_bytes`` / ``msgpack_serialize`` (nested dicts)."""
    from flax import serialization

    with open(path, "rb") as f:
        raw = f.read()
    try:
        tree = serialization.msgpack_restore(raw)
    except Exception as e:
        raise DataFormatError(f"{path}: not a Flax msgpack file ({type(e).__name__}: {e})") from None
    if not isinstance(tree, dict):
        raise DataFormatError(f"{path}: a Flax msgpack file holding a {type(tree).__name__}, expected a dict of params")
    return tree


def save_dense(path: PathLike, weights: Sequence[Any], biases: Optional[Sequence[Any]] = None) -> str:
    """Write ``W0, b0, W1, ...`` (float32, ``W_l`` of shape ``(fan_in, fan_out)``) to ``path`` (``.npz``, atomically)."""
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise InvalidArgumentError(f"got {len(weights)} weight matrices and {len(biases)} biases")
    _check_chain([np.asarray(w) for w in weights], biases, "weights")
    arrays = {}
    for l, (W, b) in enumerate(zip(weights, biases)):
        arrays[f"W{l}"] = np.asarray(W, np.float32)
        if b is not None:
            arrays[f"b{l}"] = np.asarray(b, np.float32)
    path = os.fspath(path)
    buf = io.BytesIO()  # (np.savez on a name would append .npz to a name without it)
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _check_chain(weights: Sequence[np.ndarray], biases: Sequence[Optional[Any]], names: Any) -> None:
    for l, W in enumerate(weights):
        name = names[l] if isinstance(names, (list, tuple)) else f"W{l}"
        if W.ndim != 2:
            raise ShapeMismatchError(f"{name}: expected a 2-D dense weight, got shape {W.shape}")
        if l and W.shape[0] != weights[l - 1].shape[1]:
            prev = names[l - 1] if isinstance(names, (list, tuple)) else f"W{l - 1}"
            raise ShapeMismatchError(
                f"layers do not chain: {name} takes {W.shape[0]} inputs but {prev} gives {weights[l - 1].shape[1]} "
                "(give the layer order with layers=[...] / --layers)"
            )
        b = biases[l]
        if b is not None and np.shape(b) != (W.shape[1],):
            raise ShapeMismatchError(f"{name}: bias of shape {np.shape(b)}, expected ({W.shape[1]},)")


def _order(prefixes: list[str], layers: Optional[Sequence[str]], natural: bool, what: str) -> list[str]:
    if layers is not None:
        layers = [str(p) for p in layers]
        unknown = [p for p in layers if p not in prefixes]
        if unknown:
            raise InvalidArgumentError(f"layers: {unknown[0]!r} is not a dense layer of the {what}; found {prefixes}")
        return layers
    return sorted(prefixes, key=_natural_key) if natural else prefixes


def looks_like_torch(names: Sequence[str]) -> bool:
    """True when array names look like a PyTorch state_dict (``"<prefix>.weight"``)."""
    return any(str(n).endswith(".weight") for n in names)


def from_torch_state_dict(state: Mapping[str, Any], layers: Optional[Sequence[str]] = None, *, natural_order: bool = False) -> Dense:
    """Dense layers from a PyTorch ``state_dict`` of ``nn.Linear`` layers.

    Args:
      state: ``{"<prefix>.weight": (out, in), "<prefix>.bias": (out,), ...}`` of arrays
        (NumPy, or anything ``np.asarray`` takes).
      layers: the prefixes in network order (default: the mapping's order, or the
        natural order of the names with ``natural_order=True``).
      natural_order: sort prefixes as ``fc2 < fc10`` (for safetensors files).

    Returns:
      ``(weights, biases)`` with ``weights[l] = state[prefix + ".weight"].T`` (float32,
      ``(in, out)``) and ``biases[l]`` or ``None``.

    Raises:
      DataFormatError: entries that are not dense layers (convolutions, BatchNorm
        statistics, ...), a bias without its weight, or no layer at all.
      ShapeMismatchError: layers that do not chain.
    """
    groups: dict[str, dict[str, np.ndarray]] = {}
    other = []
    for name, value in state.items():
        prefix, _, kind = str(name).rpartition(".")
        arr = np.asarray(value)
        if kind == "weight" and arr.ndim == 2 and prefix:
            groups.setdefault(prefix, {})["weight"] = arr
        elif kind == "bias" and arr.ndim == 1 and prefix:
            groups.setdefault(prefix, {})["bias"] = arr
        else:
            other.append(f"{name} {arr.shape}")
    if other:
        raise DataFormatError(
            f"not a stack of nn.Linear layers: {', '.join(other[:4])}{' ...' if len(other) > 4 else ''} "
            "(propagate handles dense layers: '<prefix>.weight' (out, in) and '<prefix>.bias')"
        )
    orphans = [p for p, g in groups.items() if "weight" not in g]
    if orphans:
        raise DataFormatError(f"bias {orphans[0]}.bias has no matching {orphans[0]}.weight")
    if not groups:
        raise DataFormatError("no '<prefix>.weight' matrices found; expected a PyTorch state_dict of nn.Linear layers")
    order = _order(list(groups), layers, natural_order, "state_dict")
    weights = [np.asarray(groups[p]["weight"], np.float32).T for p in order]
    biases = [None if "bias" not in groups[p] else np.asarray(groups[p]["bias"], np.float32) for p in order]
    _check_chain(weights, biases, [f"{p}.weight" for p in order])
    return weights, biases


def _unwrap(v: Any) -> Any:
    # NNX pure state dicts keep an array under "value" (or "raw_value")
    if isinstance(v, Mapping):
        for k in ("value", "raw_value"):
            if k in v and len(v) == 1:
                return v[k]
    return v


def from_flax_params(params: Mapping[str, Any], layers: Optional[Sequence[str]] = None) -> Dense:
    """Dense layers from Flax params (``{"Dense_0": {"kernel": (in, out), "bias": (out,)}, ...}``).

    Args:
      params: the params dict, or the variables dict holding it under ``"params"``
        (other collections are ignored); nested modules are found at any depth and
        named by their path (``"MLP_0/Dense_1"``).
      layers: those paths in network order (default: the dict's order, i.e. the
        order in which Flax created the modules).

    Returns:
      ``(weights, biases)``: each kernel (float32, already ``(in, out)``) and bias or ``None``.

    Raises:
      DataFormatError: a parameter that is not a 2-D kernel or 1-D bias (a convolution,
        a normalization scale...), or no Dense layer at all.
    """
    if isinstance(params, Mapping) and "params" in params and isinstance(params["params"], Mapping):
        params = params["params"]
    found: dict[str, dict[str, np.ndarray]] = {}
    other = []

    def walk(node: Mapping, path: tuple) -> None:
        node = _unwrap(node)
        if not isinstance(node, Mapping):
            other.append("/".join(path))
            return
        leaves = {k: _unwrap(v) for k, v in node.items()}
        if "kernel" in leaves and not isinstance(leaves["kernel"], Mapping):
            name = "/".join(path)
            k = np.asarray(leaves["kernel"])
            if k.ndim != 2:
                other.append(f"{name}/kernel {k.shape}")
            found[name] = {"kernel": k}
            for key, v in leaves.items():
                if key == "bias" and not isinstance(v, Mapping) and np.ndim(v) == 1:
                    found[name]["bias"] = np.asarray(v)
                elif key != "kernel":
                    other.append(f"{name}/{key}")
            return
        for key, v in node.items():
            if isinstance(_unwrap(v), Mapping):
                walk(v, path + (str(key),))
            else:
                other.append("/".join(path + (str(key),)) + f" {np.shape(_unwrap(v))}")

    if not isinstance(params, Mapping):
        raise DataFormatError(f"Flax params must be a dict of modules, got {type(params).__name__}")
    walk(params, ())
    if other:
        raise DataFormatError(
            f"not a stack of nn.Dense layers: {', '.join(other[:4])}{' ...' if len(other) > 4 else ''} "
            "(propagate handles dense layers: a 'kernel' (in, out) and an optional 'bias' per module)"
        )
    if not found:
        raise DataFormatError("no Dense 'kernel' found in the Flax params")
    order = _order(list(found), layers, False, "Flax params")
    weights = [np.asarray(found[p]["kernel"], np.float32) for p in order]
    biases = [np.asarray(found[p]["bias"], np.float32) if "bias" in found[p] else None for p in order]
    _check_chain(weights, biases, [f"{p}/kernel" for p in order])
    return weights, biases
