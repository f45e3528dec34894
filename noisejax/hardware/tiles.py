"""Crossbar tiles: how a weight matrix larger than one array is split.

A layer's ``(in, out)`` weight matrix is mapped onto a grid of crossbars of at most
``tile = (max_in, max_out)`` rows × columns.  As in aihwkit's ``TileModuleArray``,
each dimension is split into ``n = ceil(size / max)`` nearly equal parts (sizes
``base + (i < extra)`` with ``base, extra = divmod(size, n)``).  Every tile has its own
conductance scale, its own noise/bound management and ADC, and its own drift
compensation gain; the partial sums of the tiles along the input axis are added
digitally.

Example::

    >>> grid = TileGrid.of((784, 256), (512, 512))
    >>> grid.in_sizes, grid.out_sizes, grid.shape
    ((392, 392), (256,), (2, 1))
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from noisejax.errors import InvalidArgumentError

__all__ = ["TileShape", "DEFAULT_TILE", "split_sizes", "TileGrid"]

#: ``(max_in, max_out)`` of one crossbar, or ``None`` for "never split"
TileShape = Optional[tuple[int, int]]
#: aihwkit 1.1.0's ``MappingParameter(max_input_size=512, max_output_size=512)``
DEFAULT_TILE: tuple[int, int] = (512, 512)


def split_sizes(size: int, max_size: Optional[int]) -> tuple[int, ...]:
    """Sizes of the parts of ``size`` rows split into crossbars of at most ``max_size``.

    ``ceil(size / max_size)`` parts whose sizes differ by at most one (aihwkit's split);
    ``max_size`` ``None`` or ``<= 0`` keeps one part.
    """
    if max_size is None or max_size <= 0 or size <= max_size:
        return (int(size),)
    return _parts(size, -(-size // max_size))


def _parts(size: int, n: int) -> tuple[int, ...]:
    """``size`` split into ``n`` parts ``base + (i < extra)``, ``base, extra = divmod(size, n)``."""
    base, extra = divmod(int(size), int(n))
    return tuple(base + (i < extra) for i in range(int(n)))


def check_tile(tile: TileShape, what: str = "tile") -> TileShape:
    """Validate a tile shape (``None`` or two positive integers)."""
    if tile is None:
        return None
    if (not isinstance(tile, (tuple, list)) or len(tile) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in tile)):
        raise InvalidArgumentError(f"{what} must be None or (max_in, max_out) with two integers >= 1, got {tile!r}")
    return (int(tile[0]), int(tile[1]))


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """The static split of one ``(in, out)`` matrix into crossbars (hashable).

    Attributes:
      in_sizes: rows of each tile along the input axis.
      out_sizes: columns of each tile along the output axis.
    """

    in_sizes: tuple[int, ...]
    out_sizes: tuple[int, ...]

    @classmethod
    def of(cls, shape: tuple[int, ...], tile: TileShape = None) -> "TileGrid":
        """The grid of a matrix of ``shape = (in, out)`` on crossbars of ``tile``."""
        if len(shape) != 2:
            raise InvalidArgumentError(f"a crossbar holds a 2-D (in, out) matrix, got shape {tuple(shape)}")
        tile = check_tile(tile)
        max_in, max_out = (None, None) if tile is None else tile
        return cls(split_sizes(int(shape[0]), max_in), split_sizes(int(shape[1]), max_out))

    @classmethod
    def from_counts(cls, shape: tuple[int, ...], counts: tuple[int, int]) -> "TileGrid":
        """The grid with ``counts = (Ti, To)`` tiles (aihwkit's split depends only on the count)."""
        (n_in, n_out), (ti, to) = shape, counts
        if not (1 <= ti <= n_in and 1 <= to <= n_out):
            raise InvalidArgumentError(f"cannot split a {n_in} x {n_out} matrix into {ti} x {to} tiles")
        return cls(_parts(n_in, ti), _parts(n_out, to))

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_in_tiles, n_out_tiles)``."""
        return (len(self.in_sizes), len(self.out_sizes))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (sum(self.in_sizes), sum(self.out_sizes))

    def _edges(self, sizes):
        e = np.concatenate([[0], np.cumsum(sizes)])
        return [slice(int(a), int(b)) for a, b in zip(e[:-1], e[1:])]

    def blocks(self) -> Iterator[tuple[int, int, slice, slice]]:
        """``(k, o, rows, cols)`` for every tile (row-major over the grid)."""
        for k, si in enumerate(self._edges(self.in_sizes)):
            for o, so in enumerate(self._edges(self.out_sizes)):
                yield k, o, si, so

    def in_slices(self) -> list[slice]:
        return self._edges(self.in_sizes)

    def out_slices(self) -> list[slice]:
        return self._edges(self.out_sizes)

    def reduce(self, fn, a: jax.Array) -> jax.Array:
        """``fn`` (e.g. ``jnp.max``) of each tile of the ``(in, out)`` array ``a`` → ``(Ti, To)``."""
        vals = [fn(a[si, so]) for _, _, si, so in self.blocks()]
        return jnp.stack(vals).reshape(self.shape)

    def expand(self, v: jax.Array) -> jax.Array:
        """Broadcast per-tile values ``(Ti, To)`` to the ``(in, out)`` matrix."""
        v = jnp.asarray(v)
        if v.shape == ():
            return jnp.broadcast_to(v, self.matrix_shape)
        rows = jnp.repeat(v, np.asarray(self.in_sizes), axis=0, total_repeat_length=self.matrix_shape[0])
        return jnp.repeat(rows, np.asarray(self.out_sizes), axis=1, total_repeat_length=self.matrix_shape[1])
