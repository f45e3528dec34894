r"""The analog matrix-vector product of a crossbar with its periphery (DAC, ADC, noise).

aihwkit 1.1.0's default forward pass (``IOParameters()``, ``AnalogMVType.ONE_PASS``), for
each input row ``x`` (``in`` features) and a crossbar holding ``W`` (``in × out``)::

    m   = max|x|                     noise management (ABS_MAX; 1 for an all-zero row)
    r   = 1                          bound-management reduction
    repeat:
        x_q = clip(δ_in · round(x / (m r δ_in)), −b_in, b_in)    DAC, δ_in = 2 b_in res_in
        z   = x_q W + σ_out ξ_k                                   output noise (fresh each pass)
        z_q = δ_out · round(z / δ_out)                            ADC,  δ_out = 2 b_out res_out
        stop if all |z_q| <= b_out, or r > min(max_bm_factor, max_bm_res / δ_in)
        r   = 2 r                                                 iterative bound management
    y = clip(z_q, −b_out, b_out) · m · r

Defaults: ``b_in = 1``, ``res_in = 1/126`` (7 bits), ``b_out = 12``, ``res_out = 1/510``
(9 bits), ``σ_out = 0.06``, ``max_bm_factor = 1000``, ``max_bm_res = 0.25`` — so at most
five passes (``r = 16``).  A resolution ``> 1`` is read as a number of states
(``1/res``), ``<= 0`` switches quantization off (as in aihwkit).  Bound management is
decided per input row, as in RPUCuda (aihwkit's pure-torch tile tests the whole batch at
once and halves every row's input when any row clips).

Every parameter is a pytree leaf (sweeps ``vmap``); the management modes are static.
Gradients (hardware-aware training) are straight-through: the surrogate ``y ≈ x W``,
with zero gradient for outputs clipped by the ADC in the final pass (aihwkit's
``UniformQuantize`` and ``clamp``).

Example::

    >>> import jax, jax.numpy as jnp
    >>> from noisejax import hardware as hw
    >>> mvm = hw.AnalogMVM()
    >>> W = jax.random.normal(jax.random.key(0), (64, 10)) * 0.1
    >>> x = jax.random.uniform(jax.random.key(1), (5, 64))
    >>> y = mvm(x, W, key=jax.random.key(2))       # (5, 10) noisy, quantized x @ W
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from noisejax import _struct as struct
from jax import lax

from noisejax import _validate
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.hardware.tiles import DEFAULT_TILE, TileGrid, TileShape, check_tile

__all__ = ["AnalogMVM", "quantize"]

Array = jax.Array
_NM = ("abs_max", "none")
_BM = ("iterative", "none")


def _leaf(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, np.ndarray, np.number)):
        return jnp.asarray(value, dtype=jnp.result_type(float))
    return value


def _step(res: Array, bound: Array) -> Array:
    """Quantization step ``2 · bound · res`` (``res > 1``: a number of states, ``1/res``; 0: off)."""
    res = jnp.asarray(res)
    res = jnp.where(res > 1.0, 1.0 / jnp.where(res > 1.0, res, 1.0), res)
    return jnp.maximum(2.0 * bound * res, 0.0)


def _bound(bound: Array) -> Array:
    """The clipping range; ``<= 0`` means unbounded (as in aihwkit)."""
    bound = jnp.asarray(bound)
    return jnp.where(bound > 0, bound, jnp.inf)


def quantize(v: Array, res: Array, bound: Array) -> Array:
    """``δ · round(v / δ)`` with ``δ = 2 · bound · res`` (aihwkit's ``UniformQuantize``, round half to even).

    No clipping (the caller clips); ``res <= 0`` returns ``v``.  Straight-through gradient.
    """
    step = _step(res, bound).astype(v.dtype)
    safe = jnp.where(step > 0, step, 1.0)
    q = jnp.where(step > 0, jnp.round(v / safe) * safe, v)
    return v + lax.stop_gradient(q - v)


@struct.dataclass
class AnalogMVM:
    """DAC → analog product → output noise → ADC, with noise and bound management.

    Attributes (aihwkit 1.1.0 ``IOParameters`` defaults; all array leaves):
      inp_bound, inp_res: DAC range ``±inp_bound`` and resolution (step ``2·inp_bound·inp_res``).
      out_bound, out_res: ADC range and resolution.  A bound ``<= 0`` means no clipping
        and no quantization; a resolution ``<= 0`` no quantization.
      out_noise: std of the Gaussian noise added to each output before the ADC.
      max_bm_factor, max_bm_res: limits of the iterative bound management.
      noise_management: static, ``"abs_max"`` (scale each row by ``max|x|``) or ``"none"``.
      bound_management: static, ``"iterative"`` or ``"none"``.
    """

    inp_bound: Array = 1.0
    inp_res: Array = 1.0 / 126.0
    out_bound: Array = 12.0
    out_res: Array = 1.0 / 510.0
    out_noise: Array = 0.06
    max_bm_factor: Array = 1000.0
    max_bm_res: Array = 0.25
    noise_management: str = struct.field(pytree_node=False, default="abs_max")
    bound_management: str = struct.field(pytree_node=False, default="iterative")

    def __post_init__(self):
        for name in ("inp_bound", "inp_res", "out_bound", "out_res", "out_noise", "max_bm_factor", "max_bm_res"):
            value = getattr(self, name)
            _validate.check_real_number(f"AnalogMVM.{name}", value)
            if _validate._is_concrete(value) and name == "out_noise" and np.any(np.asarray(value) < 0):
                raise InvalidArgumentError(f"AnalogMVM.out_noise must be >= 0, got {np.asarray(value).tolist()}")
            object.__setattr__(self, name, _leaf(value))
        if isinstance(self.noise_management, str):
            _validate.check_choice("AnalogMVM.noise_management", self.noise_management, _NM)
        if isinstance(self.bound_management, str):
            _validate.check_choice("AnalogMVM.bound_management", self.bound_management, _BM)

    # ------------------------------------------------------------------ pieces

    @property
    def inp_step(self) -> Array:
        """DAC step ``2 · inp_bound · inp_res`` (in units of the managed input)."""
        return _step(self.inp_res, self.inp_bound)

    @property
    def out_step(self) -> Array:
        """ADC step ``2 · out_bound · out_res``."""
        return _step(self.out_res, self.out_bound)

    def bm_limit(self) -> Array:
        """Largest reduction tried: passes stop once ``r > min(max_bm_factor, max_bm_res / δ_in)``."""
        step = self.inp_step
        by_res = jnp.where(step > 0, self.max_bm_res / jnp.where(step > 0, step, 1.0), jnp.inf)
        return jnp.minimum(self.max_bm_factor, by_res)

    def dac(self, v: Array) -> Array:
        """``clip(Q_in(v), ±inp_bound)`` of an already managed input."""
        b = _bound(self.inp_bound).astype(jnp.result_type(v))
        return jnp.clip(quantize(v, self.inp_res, self.inp_bound), -b, b)

    def _passes(self, product: Callable[[Array], Array], rows: int, n_out: int, dtype, key) -> tuple[Array, Array, Array]:
        """Run the bound-management passes; ``product(r)`` is ``dac(x/(m r)) @ W`` for ``r (B, 1)``.

        Returns ``(z_clipped (B, out), r (B, 1), inside (B, out))`` — ``inside`` marks
        outputs the final ADC did not clip.
        """
        ob = _bound(self.out_bound).astype(dtype)

        def one_pass(r, k):
            z = product(r)
            z = z + jnp.asarray(self.out_noise, dtype) * jax.random.normal(jax.random.fold_in(key, k), (rows, n_out), dtype)
            zq = quantize(z, self.out_res, self.out_bound)
            inside = jnp.abs(lax.stop_gradient(zq)) <= ob
            return jnp.clip(zq, -ob, ob), inside

        r0 = jnp.ones((rows, 1), dtype)
        y0, in0 = one_pass(r0, 0)
        if self.bound_management == "none":
            return y0, r0, in0
        limit = self.bm_limit().astype(dtype)
        done0 = jnp.all(in0, -1) | (r0[:, 0] > limit)

        def cond(s):
            return ~jnp.all(s[3])

        def body(s):
            k, r, y, done, inside = s
            r_new = jnp.where(done[:, None], r, 2.0 * r)
            y_new, in_new = one_pass(r_new, k + 1)
            y = jnp.where(done[:, None], y, y_new)
            inside = jnp.where(done[:, None], inside, in_new)
            done = done | jnp.all(in_new, -1) | (r_new[:, 0] > limit)
            return k + 1, r_new, y, done, inside

        _, r, y, _, inside = lax.while_loop(cond, body, (jnp.int32(0), r0, y0, done0, in0))
        return y, r, inside

    # ------------------------------------------------------------------ entry points

    def __call__(self, x: Array, W: Array, *, key: Array) -> Array:
        """One crossbar: ``y ≈ x @ W`` through DAC, output noise, ADC and the managements.

        Args:
          x: inputs ``(..., in)`` (each row managed on its own).
          W: the weights on the crossbar ``(in, out)``.
          key: PRNG key; pass ``k`` of the bound management draws the output noise of all
            rows with ``fold_in(key, k)``.

        Returns:
          ``(..., out)``.
        """
        x, W = _check(x, W)
        lead = x.shape[:-1]
        x2 = x.reshape((-1, x.shape[-1]))
        y = _mvm(self, x2, W, key)
        return y.reshape(lead + (W.shape[1],))

    def one_hot(self, W: Array, *, key: Array) -> Array:
        """``self(eye(in), W, key=key)`` — the outputs for the one-hot inputs — without the product.

        Row ``i`` is ``Q_in(1/r_i)·W_i`` plus noise through the ADC (identical draws), so
        the drift-compensation readout costs ``O(in · out)``.  Returns ``(in, out)``.
        """
        W = jnp.asarray(W)
        if W.ndim != 2:
            raise ShapeMismatchError(f"AnalogMVM.one_hot: W must be 2-D (in, out), got shape {tuple(W.shape)}")
        dtype = W.dtype

        def product(r):
            return self.dac(1.0 / r) * W  # m = max|e_i| = 1

        y, r, _ = self._passes(product, W.shape[0], W.shape[1], dtype, key)
        return y * r

    def tiled(self, x: Array, W: Array, *, key: Array, tile: TileShape = DEFAULT_TILE,
              gain: Optional[Array] = None) -> Array:
        """``x @ W`` on a grid of crossbars of at most ``tile = (max_in, max_out)``.

        Tile ``(k, o)`` (input block ``k``, output block ``o``, row-major index
        ``k·To + o``) runs :meth:`__call__` on its own inputs with
        ``fold_in(key, k·To + o)``; its output is multiplied by ``gain[k, o]`` (a drift
        compensation gain, applied digitally after the ADC) and the input blocks are
        summed digitally.  ``gain``: ``None``, a scalar or ``(Ti, To)``.
        """
        x, W = _check(x, W)
        grid = TileGrid.of(W.shape, check_tile(tile))
        gain = None if gain is None else jnp.asarray(gain)
        if gain is not None and gain.shape not in ((), grid.shape):
            raise ShapeMismatchError(f"gain must be a scalar or have the tile grid's shape {grid.shape}, got {gain.shape}")
        n_out_tiles = grid.shape[1]
        cols = []
        for o, so in enumerate(grid.out_slices()):
            acc = None
            for k, si in enumerate(grid.in_slices()):
                y = self(x[..., si], W[si, so], key=jax.random.fold_in(key, k * n_out_tiles + o))
                if gain is not None:
                    y = y * (gain if gain.ndim == 0 else gain[k, o]).astype(y.dtype)
                acc = y if acc is None else acc + y
            cols.append(acc)
        return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _check(x, W):
    W = jnp.asarray(W)
    if W.ndim != 2:
        raise ShapeMismatchError(f"AnalogMVM: W must be 2-D (in, out), got shape {tuple(W.shape)}")
    _validate.check_input("x", x, W.shape[0], what="the crossbar's W", finite=False)
    return jnp.asarray(x), W


def _forward(mvm: AnalogMVM, x2: Array, W: Array, key: Array):
    dtype = jnp.result_type(x2.dtype, W.dtype)
    x2, W = x2.astype(dtype), W.astype(dtype)
    if mvm.noise_management == "abs_max":
        m = jnp.max(jnp.abs(x2), axis=-1, keepdims=True)
        m = jnp.where(m > 0, m, 1.0)
    else:
        m = jnp.ones((x2.shape[0], 1), dtype)

    def product(r):
        return mvm.dac(x2 / (m * r)) @ W

    y, r, inside = mvm._passes(product, x2.shape[0], W.shape[1], dtype, key)
    return y * (m * r), inside


@jax.custom_vjp
def _mvm(mvm, x2, W, key):
    return _forward(mvm, x2, W, key)[0]


def _mvm_fwd(mvm, x2, W, key):
    y, inside = _forward(mvm, x2, W, key)
    return y, (mvm, x2, W, inside)


def _mvm_bwd(res, g):
    mvm, x2, W, inside = res
    g = jnp.where(inside, g, 0.0)
    return None, g @ W.T, x2.T @ g, None


_mvm.defvjp(_mvm_fwd, _mvm_bwd)
