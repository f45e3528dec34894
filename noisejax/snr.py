"""Signal-to-noise ratio: the one definition noisejax uses everywhere.

Statistics are over noise realizations for a fixed input: ``m_i = E[y_i]`` is the
mean of output ``i`` (a neuron, for one input of a batch) and ``v_i = Var[y_i]`` its
noise variance — what :func:`noisejax.simulate.monte_carlo` estimates and
:func:`noisejax.moments.predict` predicts.

* **Per output** — :func:`snr` and :func:`snr_db`::

      SNR_i = m_i² / v_i,        SNR_i [dB] = 10·log10(m_i² / v_i)

* **Layer summary** — :func:`layer_snr_db` (:func:`layer_snr` as a ratio), one number for a layer (its outputs
  and, for a batch, its inputs)::

      SNR_layer [dB] = 10·log10( Σ_i m_i² / Σ_i v_i )

  the signal power over the noise power of the whole layer.  It is *not* the mean
  of the per-output dB values: an output whose mean is near zero has a per-output
  SNR near −∞ dB and would dominate such a mean (on a trained sigmoid MLP the two
  differ by 50 dB), while it carries almost no signal power.

Every place that reports an SNR uses these functions: the properties of
:class:`Statistics` (``snr``, ``snr_db``, ``layer_snr_db``) that
``MCResult`` (:mod:`noisejax.simulate`) and :class:`noisejax.moments.LayerMoments`
have, the output SNR of :class:`noisejax.train.NoisyEval` and
:func:`noisejax.mitigate.output_snr` (:func:`layer_snr` with ``count``: the unbiased
Monte Carlo estimator), the ``noisejax propagate`` / ``noisejax demo`` tables and
JSON, and the experiments.

Zero noise gives ``+inf`` (``nan`` where the mean is zero too); nothing is clipped.
The functions take JAX arrays (and work under ``jit``/``vmap``) or NumPy arrays
(then they compute in NumPy, float64 stays float64, and no JAX op is dispatched).

Example::

    >>> import jax.numpy as jnp
    >>> from noisejax import snr
    >>> mean, var = jnp.array([1.0, 0.01]), jnp.array([0.01, 0.01])
    >>> snr.snr_db(mean, var)                # per output: 20 dB and -20 dB
    Array([ 20., -20.], dtype=float32)
    >>> snr.layer_snr_db(mean, var)          # 10·log10(1.0001 / 0.02) ≈ 17 dB
    Array(16.99..., dtype=float32)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DEFINITION", "snr", "snr_db", "layer_snr", "layer_snr_db", "layer_snr_db_stderr_bound", "Statistics"]

#: One-line statement of the definition (echoed by the CLI's JSON output).
DEFINITION = "per output: 10*log10(mean^2/var); layer: 10*log10(sum(mean^2)/sum(var)) over the layer's outputs and inputs"

Axis = Optional[Union[int, Sequence[int]]]


def _xp(*arrays: Any):
    """NumPy for NumPy/Python inputs, ``jax.numpy`` as soon as one input is a JAX array (or tracer)."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _errstate(xp):
    return np.errstate(divide="ignore", invalid="ignore") if xp is np else contextlib.nullcontext()


def snr(mean: Any, var: Any) -> Any:
    """Per-output SNR ``mean² / var`` (elementwise, same shape as ``mean``)."""
    xp = _xp(mean, var)
    with _errstate(xp):
        return xp.square(mean) / var


def snr_db(mean: Any, var: Any) -> Any:
    """Per-output SNR in dB, ``10·log10(mean² / var)`` (elementwise)."""
    xp = _xp(mean, var)
    with _errstate(xp):
        return 10.0 * xp.log10(snr(mean, var))


def _axis(axis: Axis) -> Optional[tuple[int, ...]]:
    if axis is None:
        return None
    return (axis,) if isinstance(axis, int) else tuple(axis)


def layer_snr(mean: Any, var: Any, axis: Axis = None, *, count: Any = None) -> Any:
    """Layer summary ``Σ mean² / Σ var`` (a ratio, not dB).

    Args:
      mean, var: arrays of the same shape, e.g. ``(width,)`` or ``(B, width)``.
      axis: the axes summed over (default: all, a scalar result).  Keep a leading
        sweep axis of ``(S, B, width)`` statistics with ``axis=(1, 2)``.
      count: when ``mean`` and ``var`` are sample statistics of ``count``
        realizations, the signal power is estimated without bias as
        ``Σ (mean² − var/count)`` (a sample mean carries ``var/count`` of noise
        power; it matters when few realizations meet a weak signal).  ``None``:
        the plug-in ``Σ mean²``.

    Returns:
      The ratio, shape of ``mean`` without ``axis``.
    """
    xp = _xp(mean, var)
    ax = _axis(axis)
    noise_power = xp.sum(var, axis=ax)
    signal = xp.sum(xp.square(mean), axis=ax)
    if count is not None:
        signal = signal - noise_power / count
    with _errstate(xp):
        return signal / noise_power


def layer_snr_db(mean: Any, var: Any, axis: Axis = None, *, count: Any = None) -> Any:
    """Layer summary in dB, ``10·log10(Σ mean² / Σ var)`` (arguments of :func:`layer_snr`)."""
    xp = _xp(mean, var)
    with _errstate(xp):
        return 10.0 * xp.log10(layer_snr(mean, var, axis, count=count))


def layer_snr_db_stderr_bound(mean: Any, var: Any, count: Any, axis: Axis = None) -> Any:
    """Upper bound of the standard error of a Monte Carlo :func:`layer_snr_db` (dB).

    With ``n = count`` realizations, ``S = Σ m_i²`` and ``N = Σ v_i``, first-order
    error propagation gives ``δdB = 10/ln 10 · (δS/S − δN/N)``.  The standard
    deviation of a sum is at most the sum of the standard deviations, whatever the
    correlation between outputs, so::

        sd(Ŝ) ≤ 2 Σ_i |m_i| √(v_i / n)           (sampling error of the means)
        sd(N̂) ≤ √(2/(n−1)) · N                    (Gaussian noise: sd(v̂_i) = v_i √(2/(n−1)))
        sd(dB) ≤ 10/ln 10 · (sd(Ŝ)/S + sd(N̂)/N)

    A conservative figure (tight when the outputs' noise is fully correlated);
    heavy-tailed noise (multiplicative noise) has a larger variance error than the
    Gaussian ``√(2/(n−1))``.
    """
    xp = _xp(mean, var)
    ax = _axis(axis)
    n = float(count) if xp is np else jnp.asarray(count, jnp.result_type(mean, jnp.float32))
    signal = xp.sum(xp.square(mean), axis=ax)
    d_signal = 2.0 * xp.sum(xp.abs(mean) * xp.sqrt(var / n), axis=ax)
    with _errstate(xp):
        return (10.0 / math.log(10.0)) * (d_signal / signal + xp.sqrt(2.0 / (n - 1.0)))


class Statistics:
    """Mixin: the SNRs of this module for a class with ``mean`` and ``var`` (pytrees of the same structure).

    Each property maps its definition over the leaves (one result per leaf, e.g. per
    layer of ``return_layers`` outputs).
    """

    mean: Any
    var: Any

    @property
    def std(self) -> Any:
        """Noise standard deviation ``√var`` per entry."""
        return jax.tree_util.tree_map(jnp.sqrt, self.var)

    @property
    def snr(self) -> Any:
        """Per output: ``mean² / var`` (:func:`snr`)."""
        return jax.tree_util.tree_map(snr, self.mean, self.var)

    @property
    def snr_db(self) -> Any:
        """Per output, in dB: ``10·log10(mean² / var)`` (:func:`snr_db`)."""
        return jax.tree_util.tree_map(snr_db, self.mean, self.var)

    @property
    def layer_snr_db(self) -> Any:
        """Per leaf: the layer summary ``10·log10(Σ mean² / Σ var)`` (:func:`layer_snr_db`)."""
        return jax.tree_util.tree_map(layer_snr_db, self.mean, self.var)
