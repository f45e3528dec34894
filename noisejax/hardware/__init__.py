"""Analog in-memory hardware: PCM devices, crossbar periphery, drift compensation.

The flagship use of IBM's aihwkit — program a trained network onto phase-change memory
and follow its accuracy for 1 s … 10 years after programming, with the crossbar's DAC,
ADC and output noise in the loop — as pure functions with a realization axis *and* a
time axis (the programming is drawn once per realization and shared by its times), plus
an analytic prediction of every layer's mean and variance.

One concept per module:

* :mod:`~noisejax.hardware.pcm` — :class:`PCMNoise` (programming noise, drift, read noise;
  every coefficient a pytree leaf), :class:`PCMState`, exact per-weight moments;
* :mod:`~noisejax.hardware.mvm` — :class:`AnalogMVM` (DAC/ADC, output noise, noise and
  bound management) for one crossbar and tiled;
* :mod:`~noisejax.hardware.compensation` — global drift compensation (through the
  periphery, as aihwkit, or exact);
* :mod:`~noisejax.hardware.tiles` — splitting layers larger than a crossbar;
* :mod:`~noisejax.hardware.chip` — any JAX model on the chip (:class:`AnalogHardware` as the
  product model of :func:`noisejax.noisy`/:func:`noisejax.analytic` at matmul sites,
  :class:`PCMWeights` — the devices read at ``t`` — as their weight model);
* :mod:`~noisejax.hardware.network` — whole :mod:`noisejax.layers` networks
  (:func:`AnalogDense`, :func:`drift_forward`, :func:`drift_moments`, :class:`DriftedWeights`
  for hardware-aware training), on the same mechanism.

Where noisejax differs from aihwkit 1.1.0 (everything else follows its defaults; checked
against aihwkit's own inference tile in ``benchmarks/aihwkit_agreement.py``):

* bound management is decided per input row (as RPUCuda does); aihwkit's pure-torch tile
  halves the input of *every* row of a batch when any row clips;
* ``drift_compensation(..., mvm=None)`` reads both the baseline and the current weights
  exactly; aihwkit's ``GlobalDriftCompensationWithExactReference`` makes only the baseline
  exact and still reads the drifted tile through its noisy forward;
* a programming is a value (:class:`PCMState`), reading and compensation are pure functions
  of it: a new programming always draws new devices and drift exponents, a gain always
  belongs to the programming and time it was computed from, and reading cannot reach an
  older programming (aihwkit's ``drift_analog_weights`` reuses the stored programming, keeps
  the previous gain after ``program_analog_weights`` until the next drift call, and drifts the
  old programmed weights after ``set_weights``);
* the re-split of the programmed weights into one device per pair before drifting is
  reproduced (``PCMNoise(resplit=True)``, the default); ``resplit=False`` is the physical pair.

Example (one weight matrix)::

    >>> import jax
    >>> from noisejax import hardware as hw
    >>> k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    >>> W = jax.random.normal(k1, (64, 10)) * 0.1
    >>> pcm = hw.PCMNoise()                          # coefficients are leaves
    >>> state = pcm.program(W, key=k1)               # state.weights: the programmed weights
    >>> W_t = pcm.read(state, 86400.0, key=k2)       # one day later (vmap over t)
    >>> mvm = hw.AnalogMVM()                         # aihwkit 1.1.0 periphery
    >>> y = mvm(jax.numpy.ones((5, 64)), W_t, key=k3)
    >>> alpha = hw.drift_compensation(state.weights, W_t, mvm=mvm, key=k4)   # mvm=None: exact readout

Any JAX model (a Flax CNN, unmodified), Monte Carlo and analytic, a day after programming::

    >>> chip = hw.AnalogHardware()
    >>> kw = dict(weight=chip.weights(86400.0), neuron=chip, sites="matmuls")
    >>> y = noisejax.noisy(model.apply, **kw)(k1, variables, x)          # one realization
    >>> pred = noisejax.analytic(model.apply, **kw)(variables, x)        # mean and variance
"""

from __future__ import annotations

from noisejax.hardware.chip import COMPENSATIONS, AnalogHardware, PCMWeights, crossbar_leaves
from noisejax.hardware.compensation import READOUT_FLOOR, compensation_readout, drift_compensation
from noisejax.hardware.mvm import AnalogMVM, quantize
from noisejax.hardware.network import (
    AnalogDense,
    DriftedWeights,
    drift_forward,
    drift_moments,
    program_params,
    read_params,
)
from noisejax.hardware.pcm import SECONDS, PCMMoments, PCMNoise, PCMState
from noisejax.hardware.tiles import DEFAULT_TILE, TileGrid, split_sizes

__all__ = [
    "PCMNoise",
    "PCMState",
    "PCMMoments",
    "SECONDS",
    "AnalogMVM",
    "quantize",
    "compensation_readout",
    "drift_compensation",
    "READOUT_FLOOR",
    "DEFAULT_TILE",
    "TileGrid",
    "split_sizes",
    "COMPENSATIONS",
    "AnalogHardware",
    "PCMWeights",
    "crossbar_leaves",
    "AnalogDense",
    "program_params",
    "read_params",
    "drift_forward",
    "drift_moments",
    "DriftedWeights",
]
