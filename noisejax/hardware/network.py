r"""Whole :mod:`noisejax.layers` networks on analog PCM crossbars.

One mechanism: the affine layers of the network are :func:`AnalogDense` layers — a
``Dense`` whose one noise *site* runs the product through the crossbar periphery when
the network's ``noise`` argument is an :class:`AnalogHardware` (digital otherwise) —
and the weights are replaced, per realization and time, by what the devices hold:

1. :func:`program_params` programs every affine layer (a dict with a 2-D ``"W"``) once:
   its :class:`~noisejax.hardware.pcm.PCMState` and, for drift compensation, the baseline
   readout taken right after programming.
2. :func:`read_params` turns that programming into ordinary params at time ``t``:
   ``{"W": W_t, "b": b, "gain": α(t)}`` with the drift-compensation gain of each tile.
3. ``net.apply(params_t, x, key=k, noise=hardware)`` (or :func:`noisejax.layers.apply_batch`).

:func:`drift_forward` does the three for one realization and all times (programming
drawn once, shared by the times: realizations × times are ``vmap`` axes).  The analytic
counterpart, :func:`drift_moments`, gives every layer's mean and variance through the
moment interpretation (:func:`noisejax.moments.predict`) with the mechanism any JAX model
uses (:mod:`noisejax.hardware.chip`): the weights from the weight model
:class:`~noisejax.hardware.chip.PCMWeights` (exact per-weight mean and variance at ``t``),
the product that takes an ``AnalogDense``'s marked weights computed by the
:class:`AnalogHardware` product model (the periphery's variances).  :class:`DriftedWeights`
is the weight perturbation for hardware-aware training with :func:`noisejax.train.noise_aware_loss`.

Keys: programming of affine layer ``j`` (in flattening order of the params) uses
``fold_in(fold_in(key, j), 0)`` and its baseline readout ``fold_in(·, 1)``; reading at
time index ``i`` in :func:`drift_forward` uses ``fold_in(fold_in(key, 1), i)``, the
forward pass ``fold_in(fold_in(key, 2), i)``.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from noisejax import hardware as hw, layers
    >>> net = layers.mlp([64, 32, 10], "sigmoid", "linear", noisy=False, dense=hw.AnalogDense)
    >>> _, params = net.init(jax.random.key(0), (64,))
    >>> chip = hw.AnalogHardware()                       # PCM + aihwkit periphery + readout compensation
    >>> times = jnp.array([1.0, 3600.0, 3.15e7])
    >>> one = lambda k: hw.drift_forward(net, params, jnp.ones((4, 64)), times, key=k, hardware=chip)
    >>> out = jax.vmap(one)(jax.random.split(jax.random.key(1), 8))   # (8 realizations, 3 times, 4, 10)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from noisejax import _struct as struct

from noisejax import _validate, layers
from noisejax import moments as _moments
from noisejax._jaxpr import mark as _mark
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.hardware.chip import AnalogHardware
from noisejax.hardware.compensation import compensation_readout
from noisejax.hardware.pcm import PCMState
from noisejax.hardware.tiles import TileGrid, TileShape

__all__ = [
    "AnalogDense",
    "program_params",
    "read_params",
    "drift_forward",
    "drift_moments",
    "DriftedWeights",
]

Array = jax.Array
PyTree = Any
#: the tag of the mark on an AnalogDense's weights (the product taking them is the crossbar)
CROSSBAR_TAG = "crossbar"


# ----------------------------------------------------------------------------------
# Affine layers in params pytrees
# ----------------------------------------------------------------------------------


def _is_affine(d: Any) -> bool:
    if not isinstance(d, dict) or "W" not in d:
        return False
    W = d["W"]
    if isinstance(W, PCMState):
        return True
    return getattr(W, "ndim", None) == 2


def _map_affine(params: PyTree, fn: Callable[[int, dict], dict]) -> PyTree:
    """Replace every affine dict (a dict with a 2-D ``"W"``) by ``fn(j, dict)``; ``j`` counts them in order."""
    counter = [0]

    def walk(node):
        if _is_affine(node):
            j = counter[0]
            counter[0] += 1
            return fn(j, node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, (tuple, list)):
            return type(node)(walk(v) for v in node)
        return node

    out = walk(params)
    if counter[0] == 0:
        raise InvalidArgumentError("params hold no affine layer (a dict with a 2-D 'W'); nothing to map onto crossbars")
    return out


def _check_hardware(hardware: Any, where: str) -> AnalogHardware:
    if not isinstance(hardware, AnalogHardware):
        raise InvalidArgumentError(f"{where}: hardware must be an AnalogHardware, got {type(hardware).__name__}")
    return hardware


def program_params(hardware: AnalogHardware, params: PyTree, *, key: Array) -> PyTree:
    """Program every affine layer of ``params`` once (one realization of the devices).

    Each affine dict ``{"W", "b"?}`` becomes ``{"W": PCMState, "b"?, "baseline": readout}``
    (``baseline``: the drift-compensation readout of the programmed weights, per tile;
    absent with ``compensation="none"``).  Layer ``j`` programs with
    ``fold_in(fold_in(key, j), 0)`` and reads its baseline with ``fold_in(·, 1)``.
    """
    hw = _check_hardware(hardware, "program_params")

    def one(j, d):
        kj = jax.random.fold_in(key, j)
        state = hw.pcm.program(d["W"], key=jax.random.fold_in(kj, 0), tile=hw.tile)
        out = dict(d, W=state)
        if hw.compensation != "none":
            mvm = hw.mvm if hw.compensation == "readout" else None
            out["baseline"] = compensation_readout(state.weights, mvm=mvm, key=jax.random.fold_in(kj, 1), tile=hw.tile)
        return out

    return _map_affine(params, one)


def read_params(hardware: AnalogHardware, programmed: PyTree, t: Array, *, key: Array) -> PyTree:
    """The params of the network ``t`` seconds after the programming ``programmed``.

    Each programmed dict becomes ``{"W": W_t, "b"?, "gain": α}`` with ``W_t`` from
    :meth:`PCMNoise.read` (``fold_in(fold_in(key, j), 0)``) and ``α = baseline / readout(W_t)``
    per tile (readout through ``hardware.mvm`` with ``fold_in(·, 1)`` for ``"readout"``,
    exact for ``"exact"``; no ``gain`` for ``"none"``).  The gain is computed from the
    baseline stored with *this* programming and the weights read now: it cannot be stale.
    """
    hw = _check_hardware(hardware, "read_params")

    def one(j, d):
        state = d["W"]
        if not isinstance(state, PCMState):
            raise InvalidArgumentError("read_params: programmed must come from program_params (a PCMState at each 'W')")
        kj = jax.random.fold_in(key, j)
        W_t = hw.pcm.read(state, t, key=jax.random.fold_in(kj, 0))
        out = {k: v for k, v in d.items() if k not in ("W", "baseline")}
        out["W"] = W_t
        if hw.compensation != "none":
            if "baseline" not in d:
                raise InvalidArgumentError("read_params: the programming has no baseline; program with the same hardware")
            mvm = hw.mvm if hw.compensation == "readout" else None
            now = compensation_readout(W_t, mvm=mvm, key=jax.random.fold_in(kj, 1), tile=hw.tile)
            out["gain"] = d["baseline"] / now
        return out

    return _map_affine(programmed, one)


def drift_forward(net: layers.Layer, params: PyTree, x: Array, times: Array, *, key: Array,
                  hardware: AnalogHardware, return_layers: bool = False):
    """One realization (one programming) of ``net`` on the hardware, at every time.

    Args:
      net: a :mod:`noisejax.layers` network whose affine layers are :func:`AnalogDense`.
      params: its (trained) params.
      x: a batch of inputs ``(B, *in_shape)``.
      times: ``(T,)`` seconds after programming.
      key: this realization's key (see the module doc for how it is split).
      hardware: the :class:`AnalogHardware`.
      return_layers: also return every top-level layer's output.

    Returns:
      ``(T, B, n_out)`` outputs (and the per-layer outputs, each ``(T, B, width)``).
      ``jax.vmap`` over keys for realizations.
    """
    hw = _check_hardware(hardware, "drift_forward")
    if _validate._is_concrete(times):
        _validate.check_real_number("times", times)
        if np.any(np.asarray(times) < 0):
            raise InvalidArgumentError(f"times must be >= 0 seconds after programming, got {np.asarray(times).tolist()}")
    times = jnp.asarray(times)
    if times.ndim != 1:
        raise ShapeMismatchError(f"times must be a 1-D array of seconds, got shape {tuple(times.shape)}")
    programmed = program_params(hw, params, key=jax.random.fold_in(key, 0))
    k_read, k_fwd = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

    def at(i, t):
        p_t = read_params(hw, programmed, t, key=jax.random.fold_in(k_read, i))
        return layers.apply_batch(net, p_t, x, key=jax.random.fold_in(k_fwd, i), noise=hw, return_layers=return_layers)

    return jax.vmap(at)(jnp.arange(times.shape[0]), times)


# ----------------------------------------------------------------------------------
# The analog affine layer
# ----------------------------------------------------------------------------------


def _gain_grid(W_shape, gain, tile: TileShape) -> Optional[TileGrid]:
    """The tile grid the gain refers to (``None`` for a scalar gain or no gain)."""
    if gain is None or jnp.ndim(gain) == 0:
        return None
    if jnp.ndim(gain) != 2:
        raise ShapeMismatchError(f"gain must be a scalar or (Ti, To), got shape {tuple(jnp.shape(gain))}")
    grid = TileGrid.from_counts(tuple(W_shape), tuple(int(s) for s in jnp.shape(gain)))
    if tile is not None and grid != TileGrid.of(tuple(W_shape), tile):
        raise ShapeMismatchError(f"gain has shape {tuple(jnp.shape(gain))}; tiles of {tile} give {TileGrid.of(tuple(W_shape), tile).shape}")
    return grid


def _gain_matrix(W_shape, gain, tile: TileShape):
    grid = _gain_grid(W_shape, gain, tile)
    if gain is None:
        return None
    return jnp.asarray(gain) if grid is None else grid.expand(gain)


def AnalogDense(out_dim: int, *, use_bias: bool = True) -> layers.Layer:
    """``y = x W + b`` computed on crossbars when the network's noise is an :class:`AnalogHardware`.

    Same params as :func:`noisejax.layers.Dense`, plus an optional per-tile drift
    compensation ``"gain"`` (from :func:`read_params`), applied to each tile's output
    after the ADC: ``y = Σ_k α_k · MVM(x_k, W_k) + b`` (the bias is digital).  One noise
    site: with ``noise=AnalogHardware(mvm=...)`` the product runs through
    :meth:`AnalogHardware.product` (:meth:`AnalogMVM.tiled`, per-example noise from the
    site's key); with any other noise (or ``mvm=None``) it is the exact product with the gains.

    The weights are marked (:func:`noisejax.mark`, tag ``"crossbar"``): in the moment
    interpretation (:func:`noisejax.moments.predict`, :func:`drift_moments`) the product
    taking them is computed by the layer's product model — :class:`AnalogHardware`'s moment
    rule, the same as at any model's matmul sites (:mod:`noisejax.hardware.chip`).

    Example::

        >>> net = layers.mlp([64, 32, 10], "sigmoid", "linear", noisy=False, dense=AnalogDense)
    """
    dense = layers.Dense(out_dim, use_bias=use_bias)

    def apply(params, x, *, key=None, noise=None):
        W = _mark(params["W"], CROSSBAR_TAG)
        gain = params.get("gain")
        if isinstance(noise, AnalogHardware) and noise.mvm is not None:
            if key is None:
                raise InvalidArgumentError("an AnalogDense site with noise=AnalogHardware(...) needs key=")
            _gain_grid(W.shape, gain, noise.tile)
            y = noise.product(x, W, key=key, gain=gain)
        else:
            _validate.check_input("x", x, W.shape[0], finite=False)
            G = _gain_matrix(W.shape, gain, None)
            y = x @ (W if G is None else W * G.astype(W.dtype))
        if "b" in params:
            y = y + params["b"]
        return y

    return layers.Layer(dense.init, apply, 1, layers.DenseSpec(out_dim, weight_noise="analog"))


def drift_moments(net: layers.Layer, params: PyTree, x: Array, t: Array, *, hardware: AnalogHardware,
                  method: str = "gaussian", covariance: str = "factored", nodes: int = 24,
                  keep_covariance: bool = False) -> tuple:
    """Analytic per-layer mean and variance of ``net`` on the hardware at time ``t``.

    Statistics over realizations (programming, drift, read noise, output noise,
    quantization) for each fixed input, as :func:`drift_forward` samples them:
    :func:`noisejax.moments.predict` with ``weight=hardware.weights(t)`` (the devices) and
    ``noise=hardware`` (the crossbars at the :func:`AnalogDense` products).

    Args:
      net, params: as for :func:`drift_forward`.
      x: one input or a batch ``(B, *in_shape)``.
      t: a scalar time (``vmap`` over times).
      hardware: the :class:`AnalogHardware`.
      method, covariance: of :func:`noisejax.moments.predict`.
      nodes: Gauss–Legendre points per device (see :meth:`PCMNoise.weight_moments`).
      keep_covariance: keep each layer's covariance structure (``covariance_matrix()``
        per example, e.g. the logits' covariance for an accuracy prediction).

    Returns:
      One :class:`~noisejax.moments.LayerMoments` per top-level layer (``mean``/``var``,
      ``(B, width)`` for a batch).

    Validity: the weight statistics are exact except the re-split scale (its
    expectation); the periphery terms assume no ADC clipping after bound management
    (``|E z| + 3 sd < r · out_bound``), pre-ADC noise of at least half an ADC step
    (``out_noise = 0.06`` vs ``δ_out = 0.047``: always), and for noisy inputs a spread of at
    least half a DAC step (``δ_in m ≈ 0.016 m``), with ``m = max|x|`` taken at the mean;
    the drift-compensation gain is the ratio of expected readouts (its fluctuation over
    realizations, ``O(1/√(in·out))``, is neglected); activations use the Gaussian closure of
    :mod:`noisejax.rules`.
    """
    hw = _check_hardware(hardware, "drift_moments")
    nodes = _validate.check_int("nodes", nodes, minimum=2)
    return _moments.predict(net, params, x, noise=hw, weight=hw.weights(t, nodes=nodes), method=method,
                            covariance=covariance, keep_covariance=keep_covariance)


# ----------------------------------------------------------------------------------
# Hardware-aware training
# ----------------------------------------------------------------------------------


@struct.dataclass
class DriftedWeights:
    """Weight perturbation for hardware-aware training: program, then read at a random time.

    ``apply(params, key=k)`` programs every affine ``W`` with ``hardware.pcm`` and reads it
    at one time ``t`` (the same for all layers) drawn log-uniformly in
    ``[10^log10_t_min, 10^log10_t_max]`` seconds, then applies the exact drift compensation
    as a per-tile scale of the weights (unless ``hardware.compensation == "none"``).  Use as
    ``weight_noise`` of :func:`noisejax.train.noise_aware_loss` (straight-through), with
    ``noise=hardware`` for the periphery in the forward pass.

    Keys: ``t`` from ``fold_in(key, 0)``; layer ``j`` programs with
    ``fold_in(fold_in(fold_in(key, 1), j), 0)`` and reads with ``fold_in(·, 1)``.
    """

    hardware: AnalogHardware = struct.field(default_factory=AnalogHardware)
    log10_t_min: Array = 0.0
    log10_t_max: Array = math.log10(3650 * 86400.0)

    def apply(self, params: PyTree, *, key: Array) -> PyTree:
        hw = self.hardware
        u = jax.random.uniform(jax.random.fold_in(key, 0), ())
        t = jnp.power(10.0, self.log10_t_min + u * (self.log10_t_max - self.log10_t_min))
        k_layers = jax.random.fold_in(key, 1)

        def one(j, d):
            W = d["W"]
            kj = jax.random.fold_in(k_layers, j)
            state = hw.pcm.program(W, key=jax.random.fold_in(kj, 0), tile=hw.tile)
            W_t = hw.pcm.read(state, t, key=jax.random.fold_in(kj, 1))
            if hw.compensation != "none":
                gain = compensation_readout(state.weights, tile=hw.tile) / compensation_readout(W_t, tile=hw.tile)
                W_t = W_t * (TileGrid.of(W.shape, hw.tile).expand(gain) if hw.tile is not None else gain)
            return dict(d, W=W_t.astype(W.dtype))

        return _map_affine(params, one)
