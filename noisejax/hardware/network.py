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
counterpart, :func:`moment_params` + :func:`drift_moments`, gives every layer's mean and
variance through :mod:`noisejax.moments` (the weights as
:class:`~noisejax.moments.NoisyParam` with their exact per-weight variance, the
periphery as additive variances).  :class:`DriftedWeights` is the weight perturbation
for hardware-aware training with :func:`noisejax.train.noise_aware_loss`.

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
import weakref
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from noisejax import _validate, layers
from noisejax import moments as _moments
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.hardware.compensation import compensation_readout
from noisejax.hardware.mvm import AnalogMVM
from noisejax.hardware.pcm import PCMMoments, PCMNoise, PCMState, _folded_normal_mean
from noisejax.hardware.tiles import DEFAULT_TILE, TileGrid, TileShape, check_tile

__all__ = [
    "COMPENSATIONS",
    "AnalogHardware",
    "AnalogDense",
    "program_params",
    "read_params",
    "drift_forward",
    "moment_params",
    "drift_moments",
    "DriftedWeights",
]

Array = jax.Array
PyTree = Any
#: drift compensation: through the (noisy) periphery as aihwkit, exact readout, or none
COMPENSATIONS: tuple[str, ...] = ("readout", "exact", "none")


@struct.dataclass
class AnalogHardware:
    """The analog hardware a network runs on: devices, periphery, mapping, compensation.

    Pass it as the ``noise`` of a network built with :func:`AnalogDense` layers (other
    sites ignore it) and to :func:`program_params` / :func:`read_params`.

    Attributes:
      pcm: the device model (:class:`~noisejax.hardware.pcm.PCMNoise`).
      mvm: the periphery (:class:`~noisejax.hardware.mvm.AnalogMVM`); ``None`` computes
        the products exactly (devices only).
      compensation: static; ``"readout"`` (aihwkit's global drift compensation, read out
        through ``mvm``), ``"exact"`` (noise-free readouts) or ``"none"``.
      tile: static; crossbar size ``(max_in, max_out)`` (aihwkit: 512 × 512), ``None``: one
        crossbar per layer.
    """

    pcm: PCMNoise = struct.field(default_factory=PCMNoise)
    mvm: Optional[AnalogMVM] = struct.field(default_factory=AnalogMVM)
    compensation: str = struct.field(pytree_node=False, default="readout")
    tile: Optional[tuple[int, int]] = struct.field(pytree_node=False, default=DEFAULT_TILE)

    def __post_init__(self):
        if isinstance(self.compensation, str):
            _validate.check_choice("AnalogHardware.compensation", self.compensation, COMPENSATIONS)
        if isinstance(self.tile, (tuple, list)) or self.tile is None:
            object.__setattr__(self, "tile", check_tile(self.tile, "AnalogHardware.tile"))
        if not isinstance(self.pcm, PCMNoise):
            raise InvalidArgumentError(f"AnalogHardware.pcm must be a PCMNoise, got {type(self.pcm).__name__}")
        if self.mvm is not None and not isinstance(self.mvm, AnalogMVM):
            raise InvalidArgumentError(f"AnalogHardware.mvm must be an AnalogMVM or None, got {type(self.mvm).__name__}")


# ----------------------------------------------------------------------------------
# Affine layers in params pytrees
# ----------------------------------------------------------------------------------


def _is_affine(d: Any) -> bool:
    if not isinstance(d, dict) or "W" not in d:
        return False
    W = d["W"]
    if isinstance(W, (PCMState, _moments.NoisyParam)):
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


def _unwrap(leaf):
    if isinstance(leaf, _moments.NoisyParam):
        return leaf.value, leaf.noise_var
    return leaf, None


def AnalogDense(out_dim: int, *, use_bias: bool = True) -> layers.Layer:
    """``y = x W + b`` computed on crossbars when the network's noise is an :class:`AnalogHardware`.

    Same params as :func:`noisejax.layers.Dense`, plus an optional per-tile drift
    compensation ``"gain"`` (from :func:`read_params`), applied to each tile's output
    after the ADC: ``y = Σ_k α_k · MVM(x_k, W_k) + b`` (the bias is digital).  One noise
    site: with ``noise=AnalogHardware(mvm=...)`` the product runs through
    :meth:`AnalogMVM.tiled` (per-example noise from the site's key); with any other noise
    (or ``mvm=None``) it is the exact product with the gains.

    Moment rule (``noise=AnalogHardware``; see :func:`drift_moments`): ``W`` may be a
    :class:`~noisejax.moments.NoisyParam` (per-weight mean and variance); the periphery adds,
    per output of tile ``(k, o)``, ``α² (m_k r)² (σ_out² + δ_out²/12)`` (output noise and
    the ADC's uniform quantization noise), and the DAC is exact for a noise-free input
    (the first layer: the mean uses the quantized input) and uniform noise of variance
    ``(δ_in m_k r)²/12`` on each input otherwise.  ``m_k = max|E x_k|`` and the bound
    management ``r`` (the smallest power of two with ``max|E z| <= r·out_bound``) come
    from the mean.

    Example::

        >>> net = layers.mlp([64, 32, 10], "sigmoid", "linear", noisy=False, dense=AnalogDense)
    """
    dense = layers.Dense(out_dim, use_bias=use_bias)
    dense_rule = _moments.dense_rule(use_bias=use_bias)

    def apply(params, x, *, key=None, noise=None):
        W = params["W"]
        gain = params.get("gain")
        if isinstance(noise, AnalogHardware) and noise.mvm is not None:
            if key is None:
                raise InvalidArgumentError("an AnalogDense site with noise=AnalogHardware(...) needs key=")
            _gain_grid(W.shape, gain, noise.tile)
            y = noise.mvm.tiled(x, W, key=key, tile=noise.tile, gain=gain)
        else:
            _validate.check_input("x", x, W.shape[0], finite=False)
            G = _gain_matrix(W.shape, gain, None)
            y = x @ (W if G is None else W * G.astype(W.dtype))
        if "b" in params:
            y = y + params["b"]
        return y

    def moments(params, state, *, noise=None, weight_noise_var=None, **options):
        W, w_var = _unwrap(params["W"])
        gain = params.get("gain")
        hw = noise if isinstance(noise, AnalogHardware) else None
        tile = hw.tile if hw is not None else None
        G = _gain_matrix(W.shape, gain, tile)
        if hw is None or hw.mvm is None:
            W_eff = W if G is None else W * G
            var_eff = None if w_var is None else (w_var if G is None else w_var * jnp.square(G))
            p = dict(params, W=W_eff if var_eff is None else _moments.NoisyParam(W_eff, var_eff))
            p.pop("gain", None)
            return dense_rule(p, state, weight_noise_var=weight_noise_var, **options)
        return _analog_moments(hw, W, w_var, gain, params.get("b"), state, dense_rule, options)

    spec = {"kind": "dense", "out_dim": out_dim, "analog": True}
    fields = {"init": dense.init, "apply": apply, "n_sites": 1, "spec": spec}
    if "moments" in layers.Layer._fields:  # layers that carry their own moment rule
        fields["moments"] = moments
    return layers.Layer(**fields)


def _deterministic(state: _moments.LayerMoments) -> bool:
    return state.diag is None and state.factors is None and state.lazy is None and state.cov is None


def _analog_moments(hw: AnalogHardware, W, w_var, gain, b, state, dense_rule, options):
    """Moment rule of one analog affine layer (one example); see :func:`AnalogDense`."""
    if not isinstance(state, _moments.LayerMoments):
        raise InvalidArgumentError(f"AnalogDense moments: state must be a LayerMoments, got {type(state).__name__}")
    mvm = hw.mvm
    mu = state.mean
    if mu.ndim != 1 or mu.shape[0] != W.shape[0]:
        raise ShapeMismatchError(f"AnalogDense moments: expected a vector of {W.shape[0]} features, got shape {tuple(mu.shape)}")
    dtype = mu.dtype
    grid = TileGrid.of(W.shape, hw.tile)
    G = _gain_matrix(W.shape, gain, hw.tile)
    g_tiles = jnp.ones(grid.shape, dtype) if gain is None else jnp.broadcast_to(jnp.asarray(gain, dtype), grid.shape)
    ob = jnp.asarray(mvm.out_bound, dtype)
    n_max = jnp.floor(jnp.log2(mvm.bm_limit())) + 1.0  # r never exceeds 2^n_max (first power of two past the limit)
    bm = mvm.bound_management == "iterative"
    det = _deterministic(state)
    out_var_unit = jnp.square(jnp.asarray(mvm.out_noise, dtype)) + jnp.square(mvm.out_step.astype(dtype)) / 12.0
    in_q_var = jnp.square(mvm.inp_step.astype(dtype)) / 12.0

    in_slices, out_slices = grid.in_slices(), grid.out_slices()
    m_k = []
    for si in in_slices:
        m = jnp.max(jnp.abs(mu[si])) if mvm.noise_management == "abs_max" else jnp.ones((), dtype)
        m_k.append(jnp.where(m > 0, m, 1.0))
    r_ko = {}
    for k, si in enumerate(in_slices):
        for o, so in enumerate(out_slices):
            if bm:
                zmax = jnp.max(jnp.abs((mu[si] / m_k[k]) @ W[si, so]))
                n = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(zmax / ob, 1e-30))), 0.0, n_max)
                r_ko[k, o] = jnp.power(2.0, n)
            else:
                r_ko[k, o] = jnp.ones((), dtype)

    # additive variance of the periphery on each output: output noise + ADC
    out_var = jnp.concatenate([
        sum(jnp.square(g_tiles[k, o] * m_k[k] * r_ko[k, o]) * out_var_unit for k in range(len(in_slices)))
        * jnp.ones((so.stop - so.start,), dtype)
        for o, so in enumerate(out_slices)
    ])

    if det:
        # exact DAC: the mean uses the quantized input of each tile pair
        mean_cols, var_cols = [], []
        for o, so in enumerate(out_slices):
            m_o = 0.0
            v_o = 0.0
            for k, si in enumerate(in_slices):
                scale = m_k[k] * r_ko[k, o]
                xq = mvm.dac(mu[si] / scale) * scale
                m_o = m_o + g_tiles[k, o] * (xq @ W[si, so])
                if w_var is not None:
                    wv = jnp.broadcast_to(jnp.asarray(w_var, dtype), W.shape)[si, so]
                    v_o = v_o + jnp.square(g_tiles[k, o]) * (jnp.square(xq) @ wv)
            mean_cols.append(m_o)
            var_cols.append(v_o * jnp.ones_like(m_o))
        mean = jnp.concatenate(mean_cols)
        if b is not None:
            mean = mean + (b.value if isinstance(b, _moments.NoisyParam) else b)
        var = jnp.concatenate(var_cols) + out_var
        if isinstance(b, _moments.NoisyParam):
            var = var + jnp.broadcast_to(jnp.asarray(b.noise_var, dtype), var.shape)
        out = _moments.initial_moments(mean, state.covariance)
        return _moments._add_to_diagonal(out, var)

    # noisy input: DAC as uniform noise (per input tile, the largest reduction of its tiles)
    dac_var = jnp.concatenate([
        in_q_var * jnp.square(m_k[k] * _max_r(r_ko, k, len(out_slices))) * jnp.ones((si.stop - si.start,), dtype)
        for k, si in enumerate(in_slices)
    ])
    state = _moments._add_to_diagonal(state, dac_var)
    W_eff = W if G is None else W * G
    var_eff = None if w_var is None else (w_var if G is None else w_var * jnp.square(G))
    p = {"W": W_eff if var_eff is None else _moments.NoisyParam(W_eff, var_eff)}
    if b is not None:
        p["b"] = b
    out = dense_rule(p, state, **options)
    return _moments._add_to_diagonal(out, out_var)


def _max_r(r_ko: dict, k: int, n_out_tiles: int):
    r = r_ko[k, 0]
    for o in range(1, n_out_tiles):
        r = jnp.maximum(r, r_ko[k, o])
    return r


# ----------------------------------------------------------------------------------
# Analytic path
# ----------------------------------------------------------------------------------


def _analytic_gain(hw: AnalogHardware, st: PCMMoments, grid: TileGrid) -> Optional[Array]:
    """Drift-compensation gain per tile from the exact weight statistics (ratio of expectations)."""
    if hw.compensation == "none":
        return None
    if hw.compensation == "exact" or hw.mvm is None:
        ref, now = st.prog_abs_mean, st.abs_mean
    else:
        mvm = hw.mvm
        c = mvm.dac(jnp.ones((), st.mean.dtype))  # the one-hot input after the DAC
        noise = jnp.square(mvm.out_noise) + jnp.square(mvm.out_step) / 12.0
        ref = _folded_normal_mean(c * st.prog_mean, c * c * st.prog_var + noise)
        now = _folded_normal_mean(c * st.mean, c * c * st.var + noise)
    floor = 1e-4
    return jnp.maximum(grid.reduce(jnp.mean, ref), floor) / jnp.maximum(grid.reduce(jnp.mean, now), floor)


def moment_params(hardware: AnalogHardware, params: PyTree, t: Array, *, nodes: int = 24) -> PyTree:
    """Params for the analytic path at time ``t``: each affine ``W`` becomes a
    :class:`~noisejax.moments.NoisyParam` with the exact per-weight mean and variance of
    :meth:`PCMNoise.read` (:meth:`PCMNoise.weight_moments`), plus the analytic ``gain``
    (ratio of the expected readouts; ``"readout"`` uses a folded-normal model of the
    noisy readout).  ``t`` is a scalar (``vmap`` over times).
    """
    hw = _check_hardware(hardware, "moment_params")

    def one(j, d):
        W = d["W"]
        if isinstance(W, (PCMState, _moments.NoisyParam)):
            raise InvalidArgumentError("moment_params: expects the trained params (plain arrays at 'W')")
        grid = TileGrid.of(W.shape, hw.tile)
        st = hw.pcm.weight_moments(W, t, tile=hw.tile, nodes=nodes)
        out = dict(d, W=_moments.NoisyParam(st.mean, st.var))
        gain = _analytic_gain(hw, st, grid)
        if gain is not None:
            out["gain"] = gain if hw.tile is not None else gain[0, 0]
        return out

    return _map_affine(params, one)


def drift_moments(net: layers.Layer, params: PyTree, x: Array, t: Array, *, hardware: AnalogHardware,
                  method: str = "gaussian", covariance: str = "factored", nodes: int = 24,
                  keep_covariance: bool = False) -> tuple:
    """Analytic per-layer mean and variance of ``net`` on the hardware at time ``t``.

    Statistics over realizations (programming, drift, read noise, output noise,
    quantization) for each fixed input, as :func:`drift_forward` samples them.

    Args:
      net, params: as for :func:`drift_forward`.
      x: one input or a batch ``(B, *in_shape)`` (a batch when ``x.ndim`` exceeds the
        first layer's input rank).
      t: a scalar time (``vmap`` over times).
      hardware: the :class:`AnalogHardware`.
      method, covariance: of :func:`noisejax.moments.propagate`.
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
    :mod:`noisejax.moments`.
    """
    hw = _check_hardware(hardware, "drift_moments")
    if getattr(net, "moments", None) is None:
        raise InvalidArgumentError("net has no moment rule: every layer needs one (build it with noisejax.layers)")
    _validate.check_choice("method", method, _moments.METHODS)
    _validate.check_choice("covariance", covariance, _moments.COVARIANCES)
    nodes = _validate.check_int("nodes", nodes, minimum=2)
    x = jnp.asarray(x)
    first = _map_affine_first_shape(params)
    batched = x.ndim == 2 and x.shape[-1] == first[0]
    return _compiled_moments(net, method, covariance, nodes, batched, bool(keep_covariance))(params, x, jnp.asarray(t), hw)


def _map_affine_first_shape(params: PyTree) -> tuple[int, int]:
    shapes = []
    _map_affine(params, lambda j, d: shapes.append(tuple(jnp.shape(d["W"]))) or d)
    return shapes[0]


_MOMENTS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_moments(net, method, covariance, nodes, batched, keep):
    """One jitted analytic pass per network and options (cached like :func:`noisejax.moments.predict`)."""
    per_net = _MOMENTS_CACHE.setdefault(net.moments, {})
    key = (method, covariance, nodes, batched, keep)
    if key not in per_net:

        def run(params, x, t, hw):
            p = moment_params(hw, params, t, nodes=nodes)

            def one(xi):
                outs = _moments.propagate(net, p, xi, noise=hw, method=method, covariance=covariance)
                return outs if keep else tuple(o.compact() for o in outs)

            return jax.vmap(one)(x) if batched else one(x)

        per_net[key] = jax.jit(run)
    return per_net[key]


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
