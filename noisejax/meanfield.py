"""Mean-field theory of noise accumulation: one scalar recursion per layer.

Semenova, Larger & Brunner (2022) predict the noise of deep networks from a few
numbers per layer.  The noise of a layer is split into a part **correlated**
across its neurons (``K``: the covariance of two distinct neurons) and an
**uncorrelated** remainder (``U``: per-neuron variance ``v = K + U``).  A linear
layer with fan-in ``N`` whose entries have mean ``M1`` and mean square ``M2`` maps
them, for weights independent of the signal, to the pre-activation noise::

    K_x = N² M1² K + N M1² U          (Σ_j W_ij Σ_l W_kl C_jl, i ≠ k)
    U_x = N (M2 − M1²) U              (the rest of Σ_j W_ij² C_jj)

— the mean of the connection matrix carries correlated noise, its mean square
the uncorrelated noise.  Trained layers whose row sums ``r_i = Σ_j W_ji`` spread
(mean near 0, output layers) need one more number, ``⟨r²⟩``: correlated noise
reaches neuron ``i`` as ``r_i² K``, so ``U_x`` gains ``(⟨r²⟩ − N² M1²) K``
(:class:`LayerStatistics` ``row_sum_mean_square``).  The activation scales them by its gain ``g`` (``f'`` at
the noise-free signal, *linearized*), and the noise site of the layer adds (exact
second moments, see :mod:`noisejax.moments`)::

    K' = (1 + D_MC) ⟨g⟩² K_x + D_MC ⟨m⟩² + D_AC
    U' = (1 + D_MC) (⟨g²⟩ (K_x + U_x) − ⟨g⟩² K_x) + D_MU (⟨m²⟩ + ⟨g²⟩(K_x + U_x)) + D_MC (⟨m²⟩ − ⟨m⟩²) + D_AU

with ``⟨·⟩`` averages over the layer's neurons (``m`` the output means).

**Symmetric networks** (all ``W_ij = c/N``): every neuron of a layer sees the same
pre-activation, so its noise is fully correlated; with ``s`` the pre-activation
noise variance, ``a`` its mean and ``(μ, V, g)`` the activation's moments at
``x ~ N(a, s)``::

    a_n = c m_{n-1} + b,           s_n = c² (K_{n-1} + U_{n-1}/N)
    K_n = (1 + D_MC) V_n + D_MC μ_n² + D_AC,   U_n = D_MU (μ_n² + V_n) + D_AU,   m_n = μ_n

Linearized (``V = g² s``) the map ``s_n → s_{n+1}`` is affine with slope
``A = c² g² (1 + D_MC + D_MU/N)``: the noise converges geometrically to the
depth → ∞ limit ``s* = B/(1 − A)`` when ``A < 1`` (accumulation suppressed; for the
linear activation ``f = αx`` and ``c = 1``: ``α < 1/√(1 + D_MC + D_MU/N)``, i.e.
slope below 1 for weak multiplicative noise) and grows without bound when
``A >= 1``.

Example::

    >>> from noisejax import meanfield, noise
    >>> nz = noise.NeuronNoise(add_uncorrelated=1e-3, add_correlated=1e-4)
    >>> r = meanfield.symmetric(50, width=16, activation="linear:0.8", noise=nz)
    >>> lim = meanfield.symmetric_limit(width=16, activation="linear:0.8", noise=nz)
    >>> bool(abs(r.var[-1] / lim.var - 1) < 1e-4), bool(lim.bounded)
    (True, True)
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from noisejax import _struct as struct
from jax import lax

from noisejax import _validate
from noisejax import layers as _layers
from noisejax import moments as _moments
from noisejax import snr as _snr
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.noise import NeuronNoise

__all__ = [
    "MeanField",
    "MeanFieldLimit",
    "LayerStatistics",
    "symmetric_network",
    "symmetric",
    "symmetric_limit",
    "critical_slope",
    "layer_statistics",
    "recursion",
]

Array = jax.Array


@struct.dataclass
class MeanField:
    """Per-layer mean-field prediction, arrays of shape ``(depth,)``.

    Attributes:
      mean: output mean of a neuron (symmetric) or ``⟨m⟩`` over the layer.
      var: noise variance of a neuron ``K + U`` (averaged over the layer).
      correlated: ``K``, covariance of two distinct neurons.
      uncorrelated: ``U = var − K``.
    """

    mean: Array
    var: Array
    correlated: Array
    uncorrelated: Array

    @property
    def snr_db(self) -> Array:
        """Per-neuron ``10·log10(mean² / var)`` (:func:`noisejax.snr.snr_db`)."""
        return _snr.snr_db(self.mean, self.var)


@struct.dataclass
class MeanFieldLimit:
    """Depth → ∞ limit of a symmetric network.

    Attributes:
      mean, var, correlated, uncorrelated: scalars at the fixed point
        (``inf`` variances when not bounded).
      pre_activation_var: ``s*``.
      slope: ``A = ∂s_{n+1}/∂s_n`` at the fixed point (the per-layer noise gain).
      mean_slope: ``∂a_{n+1}/∂a_n`` (stability of the noise-free signal).
      bounded: ``A < 1`` and ``|mean_slope| < 1`` — noise accumulation is suppressed.
    """

    mean: Array
    var: Array
    correlated: Array
    uncorrelated: Array
    pre_activation_var: Array
    slope: Array
    mean_slope: Array
    bounded: Array


@struct.dataclass
class LayerStatistics:
    """The numbers mean-field theory keeps from one trained layer.

    Attributes:
      fan_in: static ``N``.
      w_mean: ``M1``, mean of the connection matrix entries.
      w_mean_square: ``M2``, mean of their squares.
      gain_mean, gain_mean_square: ``⟨g⟩``, ``⟨g²⟩`` of the activation slope at the
        noise-free signal.
      out_mean, out_mean_square: ``⟨m⟩``, ``⟨m²⟩`` of the noise-free outputs.
      row_sum_mean_square: optional ``⟨r_i²⟩`` with ``r_i = Σ_j W_ji`` (the summed
        weights into neuron ``i``); ``None`` takes ``r_i = N·M1`` for every ``i``
        (the pure M1/M2 theory).  Trained layers whose row sums spread around a
        mean near 0 need it: correlated noise then reaches each neuron as
        ``r_i² K``, on average ``⟨r²⟩ K ≫ (N M1)² K``.
    """

    w_mean: Array
    w_mean_square: Array
    gain_mean: Array
    gain_mean_square: Array
    out_mean: Array
    out_mean_square: Array
    row_sum_mean_square: Optional[Array] = None
    fan_in: int = struct.field(pytree_node=False, default=1)


# ----------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------

_ZERO = NeuronNoise()


def _per_layer_noise(noise, depth: int) -> list:
    if noise is None or isinstance(noise, NeuronNoise):
        return [noise or _ZERO] * depth
    noise = list(noise)
    if len(noise) != depth:
        raise InvalidArgumentError(f"noise has {len(noise)} entries; expected one per layer ({depth})")
    if not all(n is None or isinstance(n, NeuronNoise) for n in noise):
        raise InvalidArgumentError("noise entries must be NeuronNoise or None")
    return [n or _ZERO for n in noise]


def _d(noise: NeuronNoise) -> tuple[Array, Array, Array, Array]:
    """Scalar (layer-averaged) ``D_AU, D_AC, D_MU, D_MC``."""

    def one(v):
        return jnp.asarray(0.0) if v is None else jnp.mean(jnp.asarray(v))

    return one(noise.add_uncorrelated), one(noise.add_correlated), one(noise.mul_uncorrelated), one(noise.mul_correlated)


def _activation(activation: Union[str, _layers.Layer]):
    """``(fn, kind, slope)`` of an activation name or layer."""
    layer = _layers.activation(activation) if isinstance(activation, str) else activation
    spec = getattr(layer, "spec", None)
    if not isinstance(spec, _layers.ActivationSpec):
        raise InvalidArgumentError(f"activation must be a name or an activation Layer, got {activation!r}")
    if spec.name == "linear":
        return spec.fn, "linear", 1.0 if spec.slope is None else spec.slope
    if spec.name in ("relu", "erf"):
        return spec.fn, spec.name, None
    return spec.fn, None, None


def _site(noise: NeuronNoise, mu: Array, v: Array) -> tuple[Array, Array]:
    """``(K, U)`` after a noise site whose input is fully correlated with variance ``v``."""
    d_au, d_ac, d_mu, d_mc = _d(noise)
    k = (1.0 + d_mc) * v + d_mc * jnp.square(mu) + d_ac
    u = d_mu * (jnp.square(mu) + v) + d_au
    return k, u


# ----------------------------------------------------------------------------------
# Symmetric networks
# ----------------------------------------------------------------------------------


def symmetric_network(
    in_dim: int,
    width: int,
    depth: int,
    *,
    coupling: float = 1.0,
    activation: Union[str, _layers.Layer] = "linear",
    bias: float = 0.0,
) -> tuple[_layers.Layer, tuple]:
    """A deep symmetric network: every ``W_ij = coupling / fan_in``, every bias ``bias``.

    Returns ``(net, params)`` from :func:`noisejax.layers.from_weights` (one paper
    layer ``serial(Dense, f, NoiseSite)`` per depth step).
    """
    in_dim = _validate.check_int("in_dim", in_dim, minimum=1)
    width = _validate.check_int("width", width, minimum=1)
    depth = _validate.check_int("depth", depth, minimum=1)
    _validate.check_real_number("coupling", coupling)
    _validate.check_real_number("bias", bias)
    widths = [in_dim] + [width] * depth
    Ws = [jnp.full((widths[i], widths[i + 1]), coupling / widths[i], jnp.float32) for i in range(depth)]
    bs = [jnp.full((widths[i + 1],), bias, jnp.float32) for i in range(depth)]
    return _layers.from_weights(Ws, bs, activation)


def _symmetric_step(fn, kind, slope, method, quad_nodes, coupling, bias, width, noise, state):
    """One layer: ``(m, K, U) → (m', K', U')`` plus the activation's ``(a, s, g)``."""
    m, k, u = state
    a = coupling * m + bias
    s = jnp.square(coupling) * (k + u / width)
    mu, v, g = _moments.activation_moments(fn, a, s, method=method, kind=kind, slope=slope, quad_nodes=quad_nodes)
    k2, u2 = _site(noise, mu, v)
    return (mu, k2, u2), (a, s, g)


def symmetric(
    depth: int,
    *,
    width: int,
    coupling: float = 1.0,
    activation: Union[str, _layers.Layer] = "linear",
    noise: Union[None, NeuronNoise, Sequence[Optional[NeuronNoise]]] = None,
    x_mean: float = 1.0,
    bias: float = 0.0,
    method: str = "linearized",
    quad_nodes: int = 64,
) -> MeanField:
    """Noise per layer of a symmetric network (``W_ij = coupling/N``), layers ``1..depth``.

    Args:
      depth: number of layers.
      width: neurons per layer ``N``.
      coupling: ``c`` (rows of ``W`` sum to ``c``).
      activation: name (``"linear:0.8"``, ``"sigmoid"``...) or activation Layer.
      noise: one NeuronNoise for every layer or one per layer (scalar intensities;
        arrays are averaged).
      x_mean: mean of the (noise-free) input features, so layer 1's pre-activation
        is ``c · x_mean + bias``.
      method: ``"linearized"`` or ``"gaussian"`` (activation moments of
        :func:`noisejax.moments.activation_moments`).

    Returns:
      :class:`MeanField` with arrays of shape ``(depth,)``; exact for a symmetric
      network in the linear regime (it equals :func:`noisejax.moments.predict` on
      :func:`symmetric_network` with ``method="linearized"``).
    """
    depth = _validate.check_int("depth", depth, minimum=1)
    width = _validate.check_int("width", width, minimum=1)
    _validate.check_choice("method", method, _moments.METHODS)
    fn, kind, slope = _activation(activation)
    noises = _per_layer_noise(noise, depth)
    dtype = jnp.result_type(float)
    state = (jnp.asarray(x_mean, dtype), jnp.zeros((), dtype), jnp.zeros((), dtype))
    means, ks, us = [], [], []
    for n in range(depth):
        state, _ = _symmetric_step(fn, kind, slope, method, quad_nodes, coupling, bias, width, noises[n], state)
        means.append(state[0])
        ks.append(state[1])
        us.append(state[2])
    k, u = jnp.stack(ks), jnp.stack(us)
    return MeanField(jnp.stack(means), k + u, k, u)


def symmetric_limit(
    *,
    width: int,
    coupling: float = 1.0,
    activation: Union[str, _layers.Layer] = "linear",
    noise: Optional[NeuronNoise] = None,
    x_mean: float = 1.0,
    bias: float = 0.0,
    method: str = "linearized",
    quad_nodes: int = 64,
    n_iter: int = 2000,
) -> MeanFieldLimit:
    """Depth → ∞ limit of :func:`symmetric` (same ``noise`` at every layer).

    The noise-free mean is iterated ``n_iter`` times to its fixed point
    ``a* = c f(a*) + b``; for ``linearized`` the noise recursion is then affine,
    ``s' = A s + B``, and ``s* = B/(1 − A)`` exactly; for ``gaussian`` the joint
    map of ``(a, s)`` is iterated.  ``slope`` is ``A = ∂s'/∂s`` at the fixed
    point; the variance is ``inf`` unless ``bounded`` (``A < 1`` and a stable mean).
    """
    width = _validate.check_int("width", width, minimum=1)
    n_iter = _validate.check_int("n_iter", n_iter, minimum=1)
    _validate.check_choice("method", method, _moments.METHODS)
    if noise is not None and not isinstance(noise, NeuronNoise):
        raise InvalidArgumentError("symmetric_limit: noise must be one NeuronNoise (the same at every layer)")
    fn, kind, slope_ = _activation(activation)
    nz = noise or _ZERO
    dtype = jnp.result_type(float)
    c = jnp.asarray(coupling, dtype)

    def pre_map(a, s):
        """``(a, s) → (a', s')``: pre-activation mean and noise variance of the next layer."""
        mu, v, _ = _moments.activation_moments(fn, a, s, method=method, kind=kind, slope=slope_, quad_nodes=quad_nodes)
        k, u = _site(nz, mu, v)
        return c * mu + bias, jnp.square(c) * (k + u / width)

    a0 = c * jnp.asarray(x_mean, dtype) + bias
    if method == "linearized":
        a_star = lax.fori_loop(0, n_iter, lambda i, a: pre_map(a, jnp.zeros((), dtype))[0], a0)
        s_fn = lambda s: pre_map(a_star, s)[1]  # noqa: E731  (affine in s)
        b_off = s_fn(jnp.zeros((), dtype))
        a_sl = jax.jacfwd(s_fn)(jnp.zeros((), dtype))
        s_star = jnp.where(a_sl < 1, b_off / jnp.where(a_sl < 1, 1 - a_sl, 1.0), jnp.inf)
    else:
        a_star, s_star = lax.fori_loop(0, n_iter, lambda i, st: pre_map(*st), (a0, jnp.zeros((), dtype)))
        a_sl = jax.jacfwd(lambda s: pre_map(a_star, s)[1])(s_star)
    mean_sl = jax.jacfwd(lambda a: pre_map(a, s_star)[0])(a_star)
    bounded = (a_sl < 1) & (jnp.abs(mean_sl) < 1) & jnp.isfinite(s_star)
    s_eval = jnp.where(bounded, s_star, 0.0)
    mu, v, _ = _moments.activation_moments(fn, a_star, s_eval, method=method, kind=kind, slope=slope_, quad_nodes=quad_nodes)
    k, u = _site(nz, mu, v)
    inf = jnp.asarray(jnp.inf, dtype)
    return MeanFieldLimit(
        mean=mu,
        var=jnp.where(bounded, k + u, inf),
        correlated=jnp.where(bounded, k, inf),
        uncorrelated=jnp.where(bounded, u, inf),
        pre_activation_var=jnp.where(bounded, s_star, inf),
        slope=a_sl,
        mean_slope=mean_sl,
        bounded=bounded,
    )


def critical_slope(*, width: int, coupling: float = 1.0, noise: Optional[NeuronNoise] = None) -> Array:
    """Largest activation slope ``α`` for which noise accumulation is suppressed (linearized).

    ``A = c² α² (1 + D_MC + D_MU/N) < 1  ⇔  α < 1 / (|c| √(1 + D_MC + D_MU/N))``;
    ``1/|c|`` without multiplicative noise — the paper's "slope below 1" for ``c = 1``.
    """
    width = _validate.check_int("width", width, minimum=1)
    _, _, d_mu, d_mc = _d(noise or _ZERO)
    return 1.0 / (jnp.abs(jnp.asarray(coupling, jnp.result_type(float))) * jnp.sqrt(1.0 + d_mc + d_mu / width))


# ----------------------------------------------------------------------------------
# Trained networks
# ----------------------------------------------------------------------------------


def layer_statistics(net: _layers.Layer, params, x: Array) -> tuple[LayerStatistics, ...]:
    """Mean-field statistics of a paper MLP (top-level children ``serial(Dense, f, ...)``).

    Weight statistics come from each ``W``; gains ``f'`` and output means from the
    noise-free forward pass of ONE input ``x`` (vmap for a batch).
    """
    spec = getattr(net, "spec", None)
    if not isinstance(spec, _layers.SerialSpec):
        raise InvalidArgumentError("layer_statistics needs a serial network of paper layers (layers.mlp / from_weights)")
    stats = []
    y = jnp.asarray(x)
    for blk_spec, blk_params in zip(spec.children, params):
        kids = blk_spec.children if isinstance(blk_spec, _layers.SerialSpec) else ()
        if len(kids) < 2 or not isinstance(kids[0], _layers.DenseSpec) or not isinstance(kids[1], _layers.ActivationSpec):
            raise InvalidArgumentError("layer_statistics: each top-level layer must be serial(Dense, activation, ...)")
        W = blk_params[0]["W"]
        if y.shape[-1] != W.shape[0]:
            raise ShapeMismatchError(f"x has {y.shape[-1]} features; the first layer expects {W.shape[0]}")
        pre = y @ W + (blk_params[0]["b"] if "b" in blk_params[0] else 0.0)
        fn = kids[1].fn
        out = fn(pre)
        g = jax.jvp(fn, (pre,), (jnp.ones_like(pre),))[1]
        stats.append(
            LayerStatistics(
                w_mean=jnp.mean(W),
                w_mean_square=jnp.mean(jnp.square(W)),
                gain_mean=jnp.mean(g),
                gain_mean_square=jnp.mean(jnp.square(g)),
                out_mean=jnp.mean(out),
                out_mean_square=jnp.mean(jnp.square(out)),
                row_sum_mean_square=jnp.mean(jnp.square(jnp.sum(W, axis=0))),
                fan_in=int(W.shape[0]),
            )
        )
        y = out
    return tuple(stats)


def recursion(stats: Sequence[LayerStatistics], noise=None, *, row_sums: bool = True) -> MeanField:
    """Mean-field noise per layer from :class:`LayerStatistics` (see the module doc).

    With the statistics of a symmetric network it reproduces :func:`symmetric`
    (linearized) exactly; for trained networks it is an approximation (weights
    taken independent of the signal and of each other).  ``row_sums=True`` uses
    ``row_sum_mean_square`` where given: the spread of the row sums adds
    ``(⟨r²⟩ − (N M1)²) K`` to the independent part of the pre-activation noise.
    """
    stats = list(stats)
    if not stats:
        raise InvalidArgumentError("stats is empty; expected one LayerStatistics per layer")
    noises = _per_layer_noise(noise, len(stats))
    k = u = jnp.zeros((), jnp.result_type(float))
    means, ks, us = [], [], []
    for st, nz in zip(stats, noises):
        n = st.fan_in
        m1, m2 = st.w_mean, st.w_mean_square
        k_x = n * n * m1 * m1 * k + n * m1 * m1 * u
        u_x = n * (m2 - m1 * m1) * u
        if row_sums and st.row_sum_mean_square is not None:
            u_x = u_x + (st.row_sum_mean_square - n * n * m1 * m1) * k
        v_f = st.gain_mean_square * (k_x + u_x)
        k_f = jnp.square(st.gain_mean) * k_x
        d_au, d_ac, d_mu, d_mc = _d(nz)
        k = (1.0 + d_mc) * k_f + d_mc * jnp.square(st.out_mean) + d_ac
        u = (
            (1.0 + d_mc) * (v_f - k_f)
            + d_mu * (st.out_mean_square + v_f)
            + d_mc * (st.out_mean_square - jnp.square(st.out_mean))
            + d_au
        )
        means.append(st.out_mean)
        ks.append(k)
        us.append(u)
    k, u = jnp.stack(ks), jnp.stack(us)
    return MeanField(jnp.stack(means), k + u, k, u)
