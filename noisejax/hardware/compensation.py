r"""Global drift compensation: one digital gain per crossbar tile.

aihwkit's ``GlobalDriftCompensation`` reads the tile out with the one-hot inputs
(``eye(in)``) right after programming and again at time ``t``, and multiplies the tile's
outputs by the ratio of the two readouts::

    readout(W) = max(mean_ij |Y_ij|, 1e-4),   Y = forward(eye(in), W)
    α(t)       = readout(W_programmed) / readout(W_t)

``mvm`` given: the readout goes through that (noisy, quantized) forward — aihwkit's
default, which under-compensates when the output noise is comparable to the weights
(``mean|W + noise|`` is dominated by the noise, pulling the ratio towards 1).
``mvm=None``: the exact readout ``mean|W|`` (both readouts noise-free).

Being pure functions of the reference weights and the current weights, a gain computed
here always belongs to the programming and time it was computed from — there is no stored
gain that could survive a re-programming.

Example::

    >>> state = pcm.program(W, key=k1)
    >>> W_t = pcm.read(state, 3.15e7, key=k2)
    >>> alpha = drift_compensation(state.weights, W_t)                      # exact readout
    >>> alpha_hw = drift_compensation(state.weights, W_t, mvm=AnalogMVM(), key=k3)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.hardware.mvm import AnalogMVM
from noisejax.hardware.tiles import TileGrid, TileShape, check_tile

__all__ = ["READOUT_FLOOR", "compensation_readout", "drift_compensation"]

Array = jax.Array
#: aihwkit's ``clamp(mean|Y|, min=0.0001)``
READOUT_FLOOR = 1e-4


def compensation_readout(W: Array, *, mvm: Optional[AnalogMVM] = None, key: Optional[Array] = None,
                         tile: TileShape = None) -> Array:
    """``max(mean|forward(eye(in), W)|, 1e-4)`` per crossbar tile.

    Args:
      W: weights ``(in, out)``.
      mvm: the forward of the readout; ``None`` reads exactly (``mean|W|``).
      key: needed with ``mvm``; tile ``j`` (row-major) uses ``fold_in(key, j)``.
      tile: crossbar size (``None``: one crossbar).

    Returns:
      A scalar (``tile=None``) or ``(Ti, To)``.
    """
    W = jnp.asarray(W)
    if W.ndim != 2:
        raise ShapeMismatchError(f"compensation_readout: W must be 2-D (in, out), got shape {tuple(W.shape)}")
    if mvm is not None and not isinstance(mvm, AnalogMVM):
        raise InvalidArgumentError(f"mvm must be an AnalogMVM or None (exact readout), got {type(mvm).__name__}")
    if mvm is not None and key is None:
        raise InvalidArgumentError("compensation_readout(..., mvm=...) needs key=: the readout forward is noisy")
    grid = TileGrid.of(W.shape, check_tile(tile))
    vals = []
    for j, (_, _, si, so) in enumerate(grid.blocks()):
        block = W[si, so]
        if mvm is not None:
            block = mvm.one_hot(block, key=jax.random.fold_in(key, j))
        vals.append(jnp.maximum(jnp.mean(jnp.abs(block)), READOUT_FLOOR))
    out = jnp.stack(vals).reshape(grid.shape)
    return out[0, 0] if tile is None else out


def drift_compensation(reference: Array, W_t: Array, *, mvm: Optional[AnalogMVM] = None, key: Optional[Array] = None,
                       tile: TileShape = None) -> Array:
    """Gain ``α = readout(reference) / readout(W_t)`` of each tile.

    Args:
      reference: the weights the baseline is read from — the programmed weights
        (``PCMState.weights``), as aihwkit reads the baseline right after programming.
      W_t: the weights now (e.g. ``PCMNoise.read(state, t, key=...)``).
      mvm: readout forward (``None``: exact readout).
      key: with ``mvm``: ``fold_in(key, 0)`` reads the reference, ``fold_in(key, 1)`` ``W_t``.
        To share one baseline draw across times (as aihwkit does), compute it once with
        :func:`compensation_readout` and divide by the readout at each time.
      tile: crossbar size (``None``: one crossbar, a scalar gain).

    Returns:
      A scalar or ``(Ti, To)``; multiply the outputs of the tiles by it.
    """
    reference, W_t = jnp.asarray(reference), jnp.asarray(W_t)
    if reference.shape != W_t.shape:
        raise ShapeMismatchError(f"reference {tuple(reference.shape)} and W_t {tuple(W_t.shape)} must have the same shape")
    k0 = k1 = None
    if key is not None:
        k0, k1 = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    return (compensation_readout(reference, mvm=mvm, key=k0, tile=tile)
            / compensation_readout(W_t, mvm=mvm, key=k1, tile=tile))
