"""Frozen dataclass pytrees with static fields, without importing Flax.

A drop-in for the two names of ``flax.struct`` the package uses, so that the core
modules (noise models, Monte Carlo, moments) load without Flax (≈ 0.15 s of import
time on the command line's path)::

    from noisejax import _struct as struct

    @struct.dataclass
    class Spec:
        scale: jax.Array                                        # a leaf
        mode: str = struct.field(pytree_node=False, default="a")  # static (aux data)

Same semantics as ``flax.struct.dataclass``: a frozen :mod:`dataclasses` class,
registered with :func:`jax.tree_util.register_dataclass` (fields with
``pytree_node=False`` are static, part of the tree structure; unflattening calls
the constructor, so ``__post_init__`` runs), a ``.replace(**updates)`` method, and
Flax serialization state (``flax.serialization.to_state_dict``: the data fields by
name), registered once Flax's serialization module is used
(:func:`register_serialization`, called by :mod:`noisejax.study.files`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax

__all__ = ["dataclass", "field", "register_serialization"]

_CLASSES: list = []  # every class made here, with its data fields
_REGISTERED: set = set()


def field(pytree_node: bool = True, *, metadata: Any = None, **kwargs: Any):
    """``dataclasses.field`` with a ``pytree_node`` flag (``False``: static, not a leaf)."""
    return dataclasses.field(metadata={**(metadata or {}), "pytree_node": pytree_node}, **kwargs)


def dataclass(clz=None, **kwargs: Any):
    """Frozen dataclass registered as a pytree; see the module docstring."""
    if clz is None:
        return lambda c: dataclass(c, **kwargs)
    if "_noisejax_struct" in clz.__dict__:
        return clz
    kwargs.setdefault("frozen", True)
    data_clz = dataclasses.dataclass(**kwargs)(clz)
    data_fields, meta_fields = [], []
    for f in dataclasses.fields(data_clz):
        (data_fields if f.metadata.get("pytree_node", True) else meta_fields).append(f.name)

    def replace(self, **updates):
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **updates)

    data_clz.replace = replace
    jax.tree_util.register_dataclass(data_clz, data_fields, meta_fields)
    data_clz._noisejax_struct = True
    _CLASSES.append((data_clz, tuple(data_fields)))
    if "flax.serialization" in sys.modules:
        register_serialization()
    return data_clz


def register_serialization() -> None:
    """Register every class made here with ``flax.serialization`` (idempotent; imports Flax)."""
    from flax import serialization

    for clz, data_fields in _CLASSES:
        if clz in _REGISTERED:
            continue
        serialization.register_serialization_state(clz, *_state_fns(clz, data_fields))
        _REGISTERED.add(clz)


def _state_fns(clz, data_fields):
    from flax import serialization

    def to_state_dict(x):
        return {name: serialization.to_state_dict(getattr(x, name)) for name in data_fields}

    def from_state_dict(x, state):
        state = dict(state)
        updates = {}
        for name in data_fields:
            if name not in state:
                raise ValueError(
                    f"Missing field {name} in state dict while restoring an instance of {clz.__name__}, "
                    f"at path {serialization.current_path()}"
                )
            updates[name] = serialization.from_state_dict(getattr(x, name), state.pop(name), name=name)
        if state:
            raise ValueError(
                f'Unknown field(s) "{",".join(state)}" in state dict while restoring an instance of '
                f"{clz.__name__} at path {serialization.current_path()}"
            )
        return x.replace(**updates)

    return to_state_dict, from_state_dict
