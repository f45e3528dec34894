"""Analytic moment propagation: every layer's mean and noise covariance, without sampling.

Each layer of :mod:`noisejax.layers` carries a *moment rule* next to its sampling
rule (``Layer.moments``); :func:`noisejax.layers.serial` composes them, so one
network definition serves Monte Carlo (:mod:`noisejax.simulate`) and analytic
prediction (this module).  A rule maps the moments of a layer's input to those of
its output, for one example::

    rule(params, state: LayerMoments, *, noise=None, method="gaussian",
         quad_nodes=32, weight_noise_var=None) -> LayerMoments

Statistics are over noise realizations for a fixed input (the quantity
:func:`noisejax.simulate.monte_carlo` estimates).

Representation
--------------
:class:`LayerMoments` holds the mean ``m`` and the covariance ``C`` of a layer's
features in one of three forms (the static field ``covariance``):

* ``"factored"`` (default) — ``C = diag(d) + F Fᵀ``.  ``F`` has one column per
  *latent noise source* whose effect is shared by several neurons: one per
  correlated source of every noise site (``ξ_AC``, ``ξ_MC``), and — because a
  linear layer mixes neurons — one per neuron of the previous layer for the
  uncorrelated noise that passed through it (``W`` turns ``diag(d)`` into
  ``Wᵀ diag(√d)`` columns).  Exact at any depth in the linear regime
  (correlated noise from layer 1 arriving at layer 3 included); the number of
  columns grows by the fan-in at each linear layer.  The block a Dense layer
  creates is kept *lazy*, ``diag(l) Wᵀ diag(√d)`` with the shared ``W`` and two
  per-example scales, until the next linear layer multiplies it out, so a
  layer costs ``O(fan_in·fan_out)`` per example plus one shared-weight matrix
  product per block.
* ``"lowrank"`` — ``C = diag(d) + F Fᵀ`` with one column per *correlated* source
  only: a linear layer maps the independent part as ``d' = (W∘W)ᵀ d``
  (the paper's ``Σ_j W_ij² σ_j²``) and drops the cross-neuron covariance it
  creates.  Exact for noise that crossed at most one linear layer, a mean-field
  approximation beyond (error ``O(1/√N)`` for random weights, large for
  structured ones — see the tests); cost ``O(fan_in·fan_out·(1 + R))``.
* ``"full"`` — the dense ``n × n`` covariance (small widths).

``factored`` and ``full`` are the same mathematics (identical results up to
rounding); ``lowrank`` is the cheap approximation.

Rules
-----
* **Linear layers** (Dense, Conv): ``x = W y + b`` gives ``m' = W m + b``,
  ``C' = W C Wᵀ`` — exact.  Additive weight noise ``W̃ = W + N`` with i.i.d.
  ``N_ij ~ N(0, σ²)`` (independent of everything else) adds
  ``σ² Σ_j E[y_j²] = σ² Σ_j (m_j² + C_jj)`` to each pre-activation variance
  (``+ σ_b²`` for bias noise) and nothing off the diagonal:
  ``E[N_ij y_j N_kl y_l] = δ_ik δ_jl σ² E[y_j²]`` and ``E[N_ij y_j z] = 0``.
* **Activations** ``y = f(x)`` — two methods:

  - ``"linearized"`` (the paper's first order): ``m' = f(m)``,
    ``C' = J C J`` with ``J = diag f'(m)``.
  - ``"gaussian"``: the pre-activation is taken Gaussian, ``x_i ~ N(m_i, v_i)``;
    ``m'_i = E f(x_i)`` and ``C'_ii = Var f(x_i)`` exactly (closed forms for linear,
    ReLU and erf, Gauss–Hermite quadrature for any other ``f``, sigmoid and tanh
    included — with a Taylor expansion for tiny and a trapezoid rule for wide
    pre-activation spreads, see ``_quadrature_stats``), and the covariance with every other Gaussian quantity ``z``
    (other neurons, latent sources) follows Stein's lemma / Price's theorem
    ``cov(f(x_i), z) = E[f'(x_i)] cov(x_i, z)``: the factors are scaled by the
    *gain* ``g_i = E f'(x_i)``, off-diagonal entries by ``g_i g_k``, and the
    independent part becomes ``d'_i = Var f(x_i) − g_i² Σ_r F_ir²`` (>= 0: the
    first Hermite term of ``f`` carries ``g_i² v_i``, higher ones are non-negative).

* **Neuron noise sites** ``z = y ∘ (1 + ξ_MU + s ξ_MC) + ξ_AU + a ξ_AC`` with
  ``ξ`` independent of ``y`` and of each other, zero mean, ``Var ξ_MU,i = D_MU,i``,
  ``Var ξ_AU,i = D_AU,i``, ``s_i = √D_MC,i``, ``a_i = √D_AC,i`` and the correlated
  draws shared within a group ``γ(i)`` (``NeuronNoise.correlated_axes``; one group
  by default).  Exact second-moment algebra: all cross terms vanish because each
  ``ξ`` has zero mean and is independent of the rest, so::

      E[z] = m
      Cov(z_i, z_k) = C_ik                                           (signal noise)
                    + δ_ik D_MU,i E[y_i²]                              (ξ_MU: E[y_i² ξ_i²])
                    + [γ(i)=γ(k)] s_i s_k (C_ik + m_i m_k)             (ξ_MC: E[y_i y_k] D_MC)
                    + δ_ik D_AU,i + [γ(i)=γ(k)] a_i a_k                (additive)

  with ``E[y_i²] = m_i² + C_ii`` — the second moment of the *noisy* activation,
  not ``f(m)²``.  Note ``ξ_MC`` both adds a rank-one term with loading ``s∘m``
  and amplifies the incoming covariance by ``(1 + D_MC)`` (a product of two
  random quantities).  In factored form: ``d' = d(1 + s²) + D_MU (m² + v) + D_AU``
  and ``F' = [F, (s∘1_γ) ⊗ F, s∘m∘1_γ, a∘1_γ]`` (``F √(1 + D_MC)`` when ``D_MC`` is a
  scalar and there is one group).

Example::

    >>> import jax, jax.numpy as jnp
    >>> from noisejax import layers, moments, noise
    >>> net = layers.mlp([8, 16, 4], "sigmoid")
    >>> _, params = net.init(jax.random.key(0), (8,))
    >>> per_layer = moments.predict(net, params, jnp.ones(8), noise=noise.NeuronNoise(add_uncorrelated=1e-3))
    >>> [(m.mean.shape, m.var.shape) for m in per_layer]
    [((16,), (16,)), ((4,), (4,))]
"""

from __future__ import annotations

import math
import weakref
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from noisejax import _struct as struct
from jax import lax

from noisejax import _validate
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.noise import NeuronNoise

__all__ = [
    "METHODS",
    "COVARIANCES",
    "LayerMoments",
    "NoisyParam",
    "initial_moments",
    "activation_moments",
    "dense_rule",
    "conv_rule",
    "flatten_rule",
    "activation_rule",
    "neuron_noise_rule",
    "with_weight_noise",
    "propagate",
    "predict",
    "output_variance",
]

Array = jax.Array
PyTree = Any

METHODS: tuple[str, ...] = ("gaussian", "linearized")
COVARIANCES: tuple[str, ...] = ("factored", "lowrank", "full")
_DEFAULT_QUAD = 64
_ERF_NODES = 48


# ----------------------------------------------------------------------------------
# Representation
# ----------------------------------------------------------------------------------


@struct.dataclass
class LayerMoments:
    """Mean and noise covariance of one layer's features (one example, or a batch).

    Attributes:
      mean: ``E[y]``, shape ``(*features)`` (``(B, *features)`` for a batch).
      diag: the independent part ``d`` of the variance, same shape as ``mean``;
        ``None`` means statically zero.  Unused (``None``) when ``covariance="full"``.
      factors: ``F`` of shape ``(*features, K)``; the covariance is
        ``diag(d) + F Fᵀ``.  Column ``r`` is the covariance of the features with a
        unit-variance latent noise source.  ``None`` means ``K = 0``.
      cov: ``(n, n)`` covariance of the flattened features (``covariance="full"``);
        ``None`` means zero.
      covariance: static; ``"factored"``, ``"lowrank"`` or ``"full"`` (see the module doc).
      lazy: ``(l, A, r)``, more factor columns ``diag(l) A diag(r)`` kept unmultiplied
        (``A`` is a layer's ``Wᵀ``, shared by the examples of a batch); ``None``: none.

    Derived: ``var`` (per-feature noise variance, the quantity Monte Carlo
    estimates), ``std``, ``snr`` (``mean²/var``), ``snr_db``, ``n_factors``.
    """

    mean: Array
    diag: Optional[Array] = None
    factors: Optional[Array] = None
    cov: Optional[Array] = None
    covariance: str = struct.field(pytree_node=False, default="factored")
    lazy: Optional[tuple] = None

    @property
    def var(self) -> Array:
        """Per-feature variance ``C_ii``, same shape as ``mean``."""
        if self.covariance == "full":
            if self.cov is None:
                return jnp.zeros_like(self.mean)
            return jnp.diagonal(self.cov, axis1=-2, axis2=-1).reshape(self.mean.shape)
        v = jnp.zeros_like(self.mean) if self.diag is None else self.diag
        if self.factors is not None:
            v = v + jnp.sum(jnp.square(self.factors), axis=-1)
        if self.lazy is not None:
            v = v + _lazy_var(self.lazy).reshape(self.mean.shape)
        return v

    @property
    def std(self) -> Array:
        return jnp.sqrt(self.var)

    @property
    def snr(self) -> Array:
        return jnp.square(self.mean) / self.var

    @property
    def snr_db(self) -> Array:
        return 10.0 * jnp.log10(self.snr)

    @property
    def n_factors(self) -> int:
        """Number of low-rank columns ``K`` (0 without factors or in full mode)."""
        k = 0 if self.factors is None else int(self.factors.shape[-1])
        return k + (0 if self.lazy is None else int(self.lazy[2].shape[-1]))

    def covariance_matrix(self) -> Array:
        """Dense ``(n, n)`` covariance of the flattened features of ONE example (vmap for a batch)."""
        n = self.mean.size
        if self.covariance == "full":
            return jnp.zeros((n, n), self.mean.dtype) if self.cov is None else self.cov
        c = jnp.zeros((n, n), self.mean.dtype)
        if self.diag is not None:
            c = c + jnp.diag(self.diag.reshape(n))
        factors = _materialize(self).factors
        if factors is not None:
            f = factors.reshape(n, -1)
            c = c + f @ f.T
        return c

    def compact(self) -> "LayerMoments":
        """Same ``mean``/``var``, covariance structure dropped (``diag = var``; for small outputs)."""
        return LayerMoments(self.mean, self.var, None, None, "lowrank", None)


@struct.dataclass
class NoisyParam:
    """A parameter leaf with the variance of the additive i.i.d. noise on its entries.

    Moment rules of linear layers accept ``NoisyParam`` in place of ``W`` or ``b``
    (see :func:`with_weight_noise`); ``noise_var`` is a scalar or broadcastable to
    ``value``.
    """

    value: Array
    noise_var: Array


def initial_moments(x: Array, covariance: str = "factored") -> LayerMoments:
    """Moments of a noise-free input ``x`` (one example): mean ``x``, no covariance."""
    _validate.check_choice("covariance", covariance, COVARIANCES)
    return LayerMoments(jnp.asarray(x), None, None, None, covariance)


# ----------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------


def _safe_sqrt(x: Array) -> Array:
    """``√max(x, 0)`` with a finite (zero) gradient at 0."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _cat(a: Optional[Array], b: Optional[Array]) -> Optional[Array]:
    if a is None:
        return b
    if b is None:
        return a
    return jnp.concatenate([a, b.astype(a.dtype)], axis=-1)


def _add(a: Optional[Array], b: Optional[Array]) -> Optional[Array]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _lazy_var(lazy: tuple) -> Array:
    """Row sums of squares of ``diag(l) A diag(r)``: ``l² ∘ (A∘A)(r²)``."""
    left, a, right = lazy
    return jnp.square(left) * jnp.einsum("...nm,...m->...n", jnp.square(a), jnp.square(right))


def _lazy_columns(lazy: tuple) -> Array:
    left, a, right = lazy
    return left[..., :, None] * a * right[..., None, :]


def _materialize(state: "LayerMoments") -> "LayerMoments":
    """Multiply the lazy block out into explicit factor columns (features must be a vector)."""
    if state.lazy is None:
        return state
    return state.replace(factors=_cat(state.factors, _lazy_columns(state.lazy)), lazy=None)


def _unwrap(leaf: Any, default: Any) -> tuple[Array, Optional[Array]]:
    if isinstance(leaf, NoisyParam):
        return leaf.value, leaf.noise_var
    return leaf, default


def _check_state(state: Any, where: str) -> None:
    if not isinstance(state, LayerMoments):
        raise InvalidArgumentError(f"{where}: state must be a LayerMoments, got {type(state).__name__}")


def _add_to_diagonal(state: LayerMoments, extra: Optional[Array]) -> LayerMoments:
    """Add an independent (diagonal) variance term."""
    if extra is None:
        return state
    if state.covariance == "full":
        n = state.mean.size
        e = jnp.diag(jnp.broadcast_to(extra, state.mean.shape).reshape(n))
        return state.replace(cov=_add(state.cov, e))
    return state.replace(diag=_add(state.diag, jnp.broadcast_to(extra, state.mean.shape)))


# ----------------------------------------------------------------------------------
# Linear layers
# ----------------------------------------------------------------------------------


def _linear_rule(
    state: LayerMoments,
    *,
    lin: Callable[[Array], Array],
    lin_sq: Callable[[Array], Array],
    diag_columns: Callable[[Array], Array],
    bias: Optional[Array],
    weight_term: Optional[Array],
) -> LayerMoments:
    """Shared rule of ``x ↦ A x + b`` for one example (``lin = A``, no bias).

    ``lin_sq`` is ``A`` with squared weights (lowrank mode), ``diag_columns(√d)``
    returns ``A diag(√d)`` with shape ``(*out, n_in)`` (factored mode), and
    ``weight_term`` the diagonal variance added by weight noise.
    """
    mode = state.covariance
    state = _materialize(state)
    mean = lin(state.mean)
    if bias is not None:
        mean = mean + bias
    if mode == "full":
        cov = None
        if state.cov is not None:
            cols = jax.vmap(lambda r: lin(r.reshape(state.mean.shape)).reshape(-1))(state.cov)  # (n_in, n_out) = (A C)ᵀ
            cov = jax.vmap(lambda r: lin(r.reshape(state.mean.shape)).reshape(-1))(cols.T)  # A (A C)ᵀ = A C Aᵀ
        out = LayerMoments(mean, None, None, cov, mode)
    else:
        factors = None
        if state.factors is not None:
            factors = jax.vmap(lin, in_axes=-1, out_axes=-1)(state.factors)
        diag = None
        if state.diag is not None:
            if mode == "factored":
                factors = _cat(factors, diag_columns(_safe_sqrt(state.diag)))
            else:
                diag = lin_sq(state.diag)
        out = LayerMoments(mean, diag, factors, None, mode)
    return _add_to_diagonal(out, weight_term)


def dense_rule(*, use_bias: bool = True) -> Callable[..., LayerMoments]:
    """Moment rule of :func:`noisejax.layers.Dense` (``x = y W + b`` on a vector ``y``).

    Exact: ``m' = m W + b``; ``C' = Wᵀ C W`` (factored: ``F' = Wᵀ F`` plus the
    columns ``(W ∘ √d)ᵀ``; lowrank: ``d' = (W∘W)ᵀ d``).  Additive weight noise of
    variance ``σ²`` (``W`` or ``b`` given as :class:`NoisyParam`, or the option
    ``weight_noise_var`` applied to both) adds ``Σ_j σ²_jo E[y_j²] + σ_b²``.
    """
    del use_bias  # the params say whether there is a bias

    def moments(params, state, *, noise=None, weight_noise_var=None, **options):
        _check_state(state, "Dense moments")
        W, w_var = _unwrap(params["W"], weight_noise_var)
        m = state.mean
        if m.ndim != 1 or W.ndim != 2 or m.shape[0] != W.shape[0]:
            raise ShapeMismatchError(
                f"Dense moments: expected a vector of {W.shape[0]} features per example, got shape {tuple(m.shape)}"
            )
        b, b_var = (None, None)
        if "b" in params:
            b, b_var = _unwrap(params["b"], weight_noise_var)
        term = None
        if w_var is not None:
            ey2 = jnp.square(m) + state.var
            term = ey2 @ jnp.broadcast_to(jnp.asarray(w_var, m.dtype), W.shape)
        if b_var is not None and b is not None:
            term = _add(term, jnp.broadcast_to(jnp.asarray(b_var, m.dtype), (W.shape[1],)))
        if state.covariance == "factored":
            # F' = Wᵀ F;  the lazy block diag(l) A diag(r) becomes explicit columns ((W∘l)ᵀ A) diag(r)
            # (one matrix product with the shared A); diag(d) becomes the new lazy block diag(1) Wᵀ diag(√d)
            mean = m @ W if b is None else m @ W + b
            factors = None if state.factors is None else jnp.einsum("ik,io->ok", state.factors, W)
            if state.lazy is not None:
                left, a, right = state.lazy
                factors = _cat(factors, ((W * left[:, None]).T @ a) * right[None, :])
            lazy = None
            if state.diag is not None:
                lazy = (jnp.ones((W.shape[1],), m.dtype), W.T, _safe_sqrt(state.diag))
            return _add_to_diagonal(LayerMoments(mean, None, factors, None, "factored", lazy), term)
        return _linear_rule(
            state,
            lin=lambda y: y @ W,
            lin_sq=lambda d: d @ jnp.square(W),
            diag_columns=lambda s: (W * s[:, None]).T,
            bias=b,
            weight_term=term,
        )

    return moments


def conv_rule(strides: Sequence[int], padding: Any, dimension_numbers: Any = ("NHWC", "HWIO", "NHWC")) -> Callable:
    """Moment rule of :func:`noisejax.layers.Conv` (same algebra as Dense, ``A`` = the convolution).

    Factored mode materializes ``A diag(√d)`` with one column per input feature
    (``H·W·C``), so it suits small feature maps; ``lowrank`` convolves ``d`` with
    ``W∘W``.
    """

    def conv(W, x):
        return lax.conv_general_dilated(x[None], W, tuple(strides), padding, dimension_numbers=dimension_numbers)[0]

    def moments(params, state, *, noise=None, weight_noise_var=None, **options):
        _check_state(state, "Conv moments")
        W, w_var = _unwrap(params["W"], weight_noise_var)
        m = state.mean
        if m.ndim != 3 or m.shape[-1] != W.shape[2]:
            raise ShapeMismatchError(f"Conv moments: expected (H, W, {W.shape[2]}) features, got shape {tuple(m.shape)}")
        b, b_var = (None, None)
        if "b" in params:
            b, b_var = _unwrap(params["b"], weight_noise_var)
        term = None
        if w_var is not None:
            ey2 = jnp.square(m) + state.var
            term = conv(jnp.broadcast_to(jnp.asarray(w_var, m.dtype), W.shape), ey2)
        if b_var is not None and b is not None:
            term = _add(term, jnp.asarray(b_var, m.dtype))

        def diag_columns(s):
            n_in = m.size
            basis = (jnp.eye(n_in, dtype=m.dtype) * s.reshape(n_in)[None, :]).reshape((n_in,) + m.shape)
            cols = jax.vmap(lambda e: conv(W, e))(basis)  # (n_in, *out)
            return jnp.moveaxis(cols, 0, -1)

        return _linear_rule(
            state,
            lin=lambda y: conv(W, y),
            lin_sq=lambda d: conv(jnp.square(W), d),
            diag_columns=diag_columns,
            bias=b,
            weight_term=term,
        )

    return moments


def flatten_rule() -> Callable[..., LayerMoments]:
    """Moment rule of :func:`noisejax.layers.Flatten` (a reshape; ``full`` covariance is already flat)."""

    def moments(params, state, *, noise=None, **options):
        _check_state(state, "Flatten moments")
        state = _materialize(state)
        n = state.mean.size
        return state.replace(
            mean=state.mean.reshape(n),
            diag=None if state.diag is None else state.diag.reshape(n),
            factors=None if state.factors is None else state.factors.reshape(n, state.factors.shape[-1]),
        )

    return moments


# ----------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _hermite(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes/weights with ``E[g(Z)] ≈ Σ w_k g(z_k)`` for ``Z ~ N(0, 1)``."""
    t, w = np.polynomial.hermite.hermgauss(n)
    return t * math.sqrt(2.0), w / math.sqrt(math.pi)


@lru_cache(maxsize=None)
def _legendre01(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes/weights on [0, 1]."""
    t, w = np.polynomial.legendre.leggauss(n)
    return (t + 1.0) / 2.0, w / 2.0


def _derivative(fn: Callable[[Array], Array], x: Array) -> Array:
    """``f'(x)`` of an elementwise ``f``."""
    return jax.jvp(fn, (x,), (jnp.ones_like(x),))[1]


#: below this standard deviation a second-order Taylor expansion replaces the quadrature
#: (float32 cannot resolve ``f(μ + σz) − f(μ)`` for tiny σ; the expansion has no cancellation)
_NARROW_SD = 1e-2
#: above it Gauss–Hermite loses accuracy for steep ``f`` (sigmoid/tanh poles at distance π/σ
#: from the real axis, in units of z); a trapezoid rule with as many points takes over
_WIDE_SD = 2.0
_TRAPEZOID_HALF_WIDTH = 6.0


@lru_cache(maxsize=None)
def _trapezoid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Trapezoid nodes/weights on ``[-6, 6]`` with ``E[g(Z)] ≈ Σ w_k g(z_k)``, ``Z ~ N(0, 1)``.

    For ``g`` analytic in the strip ``|Im z| < d`` the error is ``~exp(-2π d / h)``
    (``h`` the spacing) plus the ``2·10⁻⁹`` Gaussian tail — better than Gauss–Hermite
    with the same ``n`` when ``d`` is small (a steep ``f`` under a wide Gaussian).
    """
    z = np.linspace(-_TRAPEZOID_HALF_WIDTH, _TRAPEZOID_HALF_WIDTH, n)
    w = np.exp(-0.5 * z * z)
    return z, w / w.sum()


def _rule_stats(fn, mu, sd, z, w):
    """``E f``, centred ``Var f`` and Stein's gain ``E[Z (f(μ+σZ) − f(μ))]/σ`` for a quadrature rule.

    ``z``, ``w``: ``(n,)`` or per element ``(..., n)``.
    """
    fx = fn(mu[..., None] + sd[..., None] * z)
    ef = jnp.sum(fx * w, axis=-1)
    vf = jnp.sum(jnp.square(fx - ef[..., None]) * w, axis=-1)
    gain = jnp.sum((fx - fn(mu)[..., None]) * z * w, axis=-1) / sd
    return ef, vf, gain


def _taylor_stats(fn, mu, v):
    """Moments of ``f(x)``, ``x ~ N(μ, v)``, for small ``v`` (Hermite expansion)::

        E f  = f + f2 v / 2
        Var f = f1² v + (f2² / 2 + f1 f3) v²
        E f' = f1 + f3 v / 2

    with ``fk`` the k-th derivative at ``μ``; then ``Var f − (E f')² v = f2² v² / 2 ≥ 0``
    as for the exact moments.
    """
    ones = jnp.ones_like(mu)
    d1 = lambda x: jax.jvp(fn, (x,), (ones,))[1]  # noqa: E731
    d2 = lambda x: jax.jvp(d1, (x,), (ones,))[1]  # noqa: E731
    _, f1 = jax.jvp(fn, (mu,), (ones,))
    f2, f3 = jax.jvp(d2, (mu,), (ones,))
    ef = fn(mu) + 0.5 * f2 * v
    vf = jnp.maximum(jnp.square(f1) * v + (0.5 * jnp.square(f2) + f1 * f3) * jnp.square(v), 0.0)
    return ef, vf, f1 + 0.5 * f3 * v


def _quadrature_stats(fn, mu, v, n):
    """``E f``, ``Var f`` (centred) and ``E f'`` of ``f(x)``, ``x ~ N(μ, v)``, for any elementwise ``f``.

    * ``σ < 10⁻²``: second-order Taylor expansion (:func:`_taylor_stats`) — float32
      quadrature cannot resolve ``f(μ + σz) − f(μ)`` there (e.g. tanh near saturation).
    * ``10⁻² ≤ σ ≤ 2``: ``n``-point Gauss–Hermite.
    * ``σ > 2``: an ``n``-point trapezoid rule on ±6σ (the nodes are chosen per
      element, so the cost is that of one rule), accurate where Gauss–Hermite
      converges slowly for steep ``f``: at σ = 10 the error of ``E f`` is ≈ 1·10⁻⁵
      for sigmoid and ≈ 2·10⁻³ for tanh with n = 64 (Gauss–Hermite: 3·10⁻³, 4·10⁻²),
      ≈ 1·10⁻⁷ and 1·10⁻⁵ with n = 128.

    The gain uses Stein's identity ``E f'(x) = E[(x − μ)(f(x) − f(μ))]/v`` — no
    derivative, so kinks (steps in ``f'``) cost no accuracy.
    """
    sd = _safe_sqrt(v)
    narrow = sd < _NARROW_SD
    wide = sd > _WIDE_SD
    sd_q = jnp.where(narrow, 1.0, sd)  # narrow elements use the expansion; keep the rule finite
    zh, wh = (jnp.asarray(a, mu.dtype) for a in _hermite(int(n)))
    zt, wt = (jnp.asarray(a, mu.dtype) for a in _trapezoid(int(n)))
    wide_ = wide[..., None]
    stats = _rule_stats(fn, mu, sd_q, jnp.where(wide_, zt, zh), jnp.where(wide_, wt, wh))
    taylor = _taylor_stats(fn, mu, jnp.where(narrow, v, 0.0))  # masked: no inf/NaN in unused gradients
    return tuple(jnp.where(narrow, t, q) for t, q in zip(taylor, stats))


def _relu_stats(mu, v):
    """Closed form for ``max(x, 0)``, ``x ~ N(μ, v)`` (``z = μ/σ``)::

    E = μΦ(z) + σφ(z);  Var = σ² [z²Φ(z)Φ(−z) + Φ(z) + zφ(z)(Φ(−z) − Φ(z)) − φ(z)²];  E f' = Φ(z)

    (the variance written without the cancellation of ``E[f²] − E[f]²``).
    """
    ok = v > 1e-12 * jnp.square(mu) + 1e-30
    vs = jnp.where(ok, v, 1.0)
    s = jnp.sqrt(vs)
    z = jnp.where(ok, mu, 0.0) / s
    cdf, ccdf = jax.scipy.special.ndtr(z), jax.scipy.special.ndtr(-z)
    pdf = jnp.exp(-0.5 * jnp.square(z)) / math.sqrt(2 * math.pi)
    ef = mu * cdf + s * pdf
    h = jnp.square(z) * cdf * ccdf + cdf + z * pdf * (ccdf - cdf) - jnp.square(pdf)
    vf = vs * jnp.maximum(h, 0.0)
    step = (mu > 0).astype(mu.dtype)
    return (
        jnp.where(ok, ef, jnp.maximum(mu, 0.0)),
        jnp.where(ok, vf, step * v),
        jnp.where(ok, cdf, step),
    )


def _erf_stats(mu, v):
    """Closed form for ``erf(x)``, ``x ~ N(μ, v)``, with ``q = 1 + 2v``::

    E = erf(μ/√q);  E f' = (2/√π) exp(−μ²/q)/√q;
    Var = (2/π) ∫_0^{arcsin ρ} exp(−h²/(1 + sin θ)) dθ,  h² = 2μ²/q,  ρ = 2v/q

    (``erf(x) = 2Φ(√2x) − 1`` and Plackett's identity
    ``Φ₂(h, h; ρ) − Φ(h)² = ∫_0^ρ φ₂(h, h; r) dr``; no cancellation; the smooth
    integral uses 48-point Gauss–Legendre; at ``μ = 0`` it is Williams' ``(2/π) arcsin ρ``).
    """
    q = 1.0 + 2.0 * v
    ef = jax.scipy.special.erf(mu / jnp.sqrt(q))
    g = (2.0 / math.sqrt(math.pi)) * jnp.exp(-jnp.square(mu) / q) / jnp.sqrt(q)
    h2 = 2.0 * jnp.square(mu) / q
    theta_max = jnp.arcsin(jnp.clip(2.0 * v / q, 0.0, 1.0))
    u, w = _legendre01(_ERF_NODES)
    theta = theta_max[..., None] * jnp.asarray(u, mu.dtype)
    integrand = jnp.exp(-h2[..., None] / (1.0 + jnp.sin(theta)))
    vf = (2.0 / math.pi) * theta_max * (integrand @ jnp.asarray(w, mu.dtype))
    return ef, vf, g


def activation_moments(
    fn: Callable[[Array], Array],
    mean: Array,
    var: Array,
    *,
    method: str = "gaussian",
    kind: Optional[str] = None,
    slope: Optional[float] = None,
    quad_nodes: int = _DEFAULT_QUAD,
) -> tuple[Array, Array, Array]:
    """``(E f(x), Var f(x), gain)`` elementwise for ``x ~ N(mean, var)``.

    ``gain`` is ``E f'(x)`` (gaussian; Stein's lemma gives ``cov(f(x), z) =
    gain · cov(x, z)``) or ``f'(mean)`` (linearized, where ``Var = gain² var``).
    ``kind`` selects a closed form (``"linear"`` with ``slope``, ``"relu"``,
    ``"erf"``); otherwise Gauss–Hermite with ``quad_nodes`` points.

    Example::

        >>> activation_moments(jax.nn.relu, jnp.array(0.), jnp.array(1.), kind="relu")[0]  # 1/√(2π)
        Array(0.3989423, dtype=float32)
    """
    mean = jnp.asarray(mean)
    if not jnp.issubdtype(mean.dtype, jnp.floating):
        mean = mean.astype(jnp.result_type(float))
    var = jnp.asarray(var, mean.dtype)
    if kind == "linear":
        a = jnp.asarray(slope if slope is not None else 1.0, mean.dtype)
        return a * mean, jnp.square(a) * var, jnp.broadcast_to(a, mean.shape)
    if method == "linearized":
        g = _derivative(fn, mean)
        return fn(mean), jnp.square(g) * var, g
    if method != "gaussian":
        raise InvalidArgumentError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if kind == "relu":
        return _relu_stats(mean, var)
    if kind == "erf":
        return _erf_stats(mean, var)
    return _quadrature_stats(fn, mean, var, quad_nodes)


def activation_rule(
    fn: Callable[[Array], Array], *, kind: Optional[str] = None, slope: Optional[float] = None
) -> Callable[..., LayerMoments]:
    """Moment rule of an elementwise activation (options ``method``, ``quad_nodes``).

    Linearized (or linear ``f``): ``m' = f(m)``, ``C' = J C J``.  Gaussian:
    ``m' = E f``, ``C'_ii = Var f``, off-diagonal ``g_i g_k C_ik`` (factors ``g ∘ F``,
    ``d' = Var f − Σ_r (g F_r)²``), see :func:`activation_moments`.
    """
    if kind not in (None, "linear", "relu", "erf"):
        raise InvalidArgumentError(f"activation kind must be None, 'linear', 'relu' or 'erf'; got {kind!r}")

    def moments(params, state, *, noise=None, method="gaussian", quad_nodes=_DEFAULT_QUAD, **options):
        _check_state(state, "activation moments")
        mu = state.mean
        linear_map = kind == "linear" or method == "linearized"
        ef, vf, g = activation_moments(fn, mu, state.var, method=method, kind=kind, slope=slope, quad_nodes=quad_nodes)
        if state.covariance == "full":
            if state.cov is None:
                return state.replace(mean=ef)
            gf = g.reshape(-1)
            cov = state.cov * gf[:, None] * gf[None, :]
            if not linear_map:
                cov = cov - jnp.diag(jnp.diagonal(cov)) + jnp.diag(vf.reshape(-1))
            return state.replace(mean=ef, cov=cov)
        factors = None if state.factors is None else state.factors * g[..., None]
        lazy = None if state.lazy is None else (state.lazy[0] * g.reshape(state.lazy[0].shape),) + tuple(state.lazy[1:])
        if linear_map:  # exact scaling, no subtraction: d' = g² d
            diag = None if state.diag is None else jnp.square(g) * state.diag
        elif state.diag is None and factors is None and lazy is None:
            diag = None
        else:
            corr = 0.0 if factors is None else jnp.sum(jnp.square(factors), axis=-1)
            if lazy is not None:
                corr = corr + _lazy_var(lazy).reshape(mu.shape)
            diag = jnp.maximum(vf - corr, 0.0)
        return state.replace(mean=ef, diag=diag, factors=factors, lazy=lazy)

    return moments


# ----------------------------------------------------------------------------------
# Neuron noise sites
# ----------------------------------------------------------------------------------


def _group_indicator(noise: NeuronNoise, shape: tuple[int, ...], dtype) -> Array:
    """``1_γ``: ``(*shape, G)`` one-hot of each feature's correlated group."""
    cshape = noise.correlated_shape(shape)
    n_groups = int(np.prod(cshape)) if cshape else 1
    idx = jnp.broadcast_to(jnp.arange(n_groups).reshape(cshape), shape)
    return jax.nn.one_hot(idx, n_groups, dtype=dtype)


def neuron_noise_rule() -> Callable[..., LayerMoments]:
    """Moment rule of :func:`noisejax.layers.NeuronNoise` — exact (see the module doc)::

        E z = m
        C' = C + D_MU diag(m² + diag C) + (s sᵀ ∘ Δ) ∘ (C + m mᵀ) + D_AU I + (a aᵀ ∘ Δ)

    with ``s = √D_MC``, ``a = √D_AC``, ``Δ_ik = [γ(i) = γ(k)]`` (same correlated draw).
    """

    def moments(params, state, *, noise=None, **options):
        _check_state(state, "NeuronNoise moments")
        if noise is None or noise.is_zero:
            return state
        if not isinstance(noise, NeuronNoise):
            raise InvalidArgumentError(f"noise for a NeuronNoise site must be a NeuronNoise, got {type(noise).__name__}")
        m = state.mean
        shape, dtype = m.shape, m.dtype

        def bc(x):
            return None if x is None else jnp.broadcast_to(jnp.asarray(x, dtype), shape)

        d_mu, d_au = bc(noise.mul_uncorrelated), bc(noise.add_uncorrelated)
        d_mc, d_ac = bc(noise.mul_correlated), bc(noise.add_correlated)
        var = state.var
        ind = _group_indicator(noise, shape, dtype)  # (*shape, G)
        n_groups = ind.shape[-1]

        if state.covariance == "full":
            n = m.size
            mf, vf_ = m.reshape(n), var.reshape(n)
            c = jnp.zeros((n, n), dtype) if state.cov is None else state.cov
            same = ind.reshape(n, n_groups) @ ind.reshape(n, n_groups).T  # Δ
            new = c
            if d_mc is not None:
                s = _safe_sqrt(d_mc).reshape(n)
                new = new + (s[:, None] * s[None, :] * same) * (c + mf[:, None] * mf[None, :])
            diag = None
            if d_mu is not None:
                diag = d_mu.reshape(n) * (jnp.square(mf) + vf_)
            if d_au is not None:
                diag = _add(diag, d_au.reshape(n))
            if diag is not None:
                new = new + jnp.diag(diag)
            if d_ac is not None:
                a = _safe_sqrt(d_ac).reshape(n)
                new = new + a[:, None] * a[None, :] * same
            return state.replace(cov=new)

        merge = d_mc is not None and jnp.ndim(noise.mul_correlated) == 0 and n_groups == 1
        if d_mc is not None and not merge:
            state = _materialize(state)
        diag, factors, lazy = state.diag, state.factors, state.lazy
        new_diag, new_factors = diag, factors
        if d_mc is not None:
            s = _safe_sqrt(d_mc)
            if diag is not None:
                new_diag = diag * (1.0 + d_mc)
            if merge and lazy is not None:
                lazy = (lazy[0] * jnp.sqrt(1.0 + jnp.asarray(noise.mul_correlated, dtype)),) + tuple(lazy[1:])
            if factors is not None:
                if merge:
                    new_factors = factors * jnp.sqrt(1.0 + jnp.asarray(noise.mul_correlated, dtype))
                else:  # F Fᵀ ∘ (s sᵀ ∘ Δ) = Σ_γ Σ_r (s∘1_γ∘F_r)(s∘1_γ∘F_r)ᵀ
                    load = (s[..., None] * ind)[..., :, None] * factors[..., None, :]
                    new_factors = _cat(factors, load.reshape(shape + (-1,)))
            new_factors = _cat(new_factors, (s * m)[..., None] * ind)
        if d_mu is not None:
            new_diag = _add(new_diag, d_mu * (jnp.square(m) + var))
        if d_au is not None:
            new_diag = _add(new_diag, d_au)
        if d_ac is not None:
            new_factors = _cat(new_factors, _safe_sqrt(d_ac)[..., None] * ind)
        return state.replace(diag=new_diag, factors=new_factors, lazy=lazy)

    return moments


# ----------------------------------------------------------------------------------
# Whole networks
# ----------------------------------------------------------------------------------


def with_weight_noise(params: PyTree, weight_noise_var: PyTree) -> PyTree:
    """Wrap the leaves of ``params`` with their weight-noise variance as :class:`NoisyParam`.

    ``weight_noise_var`` has the structure of ``params`` with a variance (scalar
    or broadcastable array) or ``None`` per leaf — e.g.
    ``noise.noise_power(params, wnr_db)``.  Only Dense and Conv rules read it.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    try:
        variances = treedef.flatten_up_to(weight_noise_var)
    except (ValueError, TypeError) as e:
        raise ShapeMismatchError(f"weight_noise_var must have the structure of params (None to skip a leaf): {e}") from None
    out = [leaf if v is None else NoisyParam(leaf, v) for leaf, v in zip(leaves, variances)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _is_serial(net) -> bool:
    return isinstance(net.spec, dict) and net.spec.get("kind") == "serial"


def propagate(
    net,
    params: PyTree,
    x: Union[Array, LayerMoments],
    *,
    noise=None,
    method: str = "gaussian",
    covariance: str = "factored",
    weight_noise_var: Optional[Array] = None,
    quad_nodes: int = _DEFAULT_QUAD,
) -> tuple[LayerMoments, ...]:
    """Core of :func:`predict` for ONE example, no validation and no jit (compose it freely).

    Returns one :class:`LayerMoments` per top-level child of ``net`` (one per paper
    layer for :func:`noisejax.layers.mlp`).  ``x`` is the input (noise-free) or the
    moments of a noisy input.  ``weight_noise_var`` here is a scalar for every
    Dense/Conv leaf; per-leaf variances go in ``params`` via :func:`with_weight_noise`.
    """
    state = x if isinstance(x, LayerMoments) else initial_moments(x, covariance)
    opts = dict(noise=noise, method=method, quad_nodes=quad_nodes, weight_noise_var=weight_noise_var)
    if _is_serial(net):
        _, outs = net.moments(params, state, return_layers=True, **opts)
        return outs
    return (net.moments(params, state, **opts),)


def _first_linear_ndim(spec: Any) -> tuple[bool, Optional[int]]:
    """``(decided, rank)``: feature rank expected at the input (1 for a leading Dense, 3 for Conv).

    ``decided`` is False while only rank-preserving layers (activations, noise
    sites) were seen; a leading Flatten decides ``None`` (unknown).
    """
    if not isinstance(spec, dict):
        return True, None
    kind = spec.get("kind")
    if kind == "dense":
        return True, 1
    if kind == "conv":
        return True, 3
    if kind == "serial":
        for child in spec.get("children", ()):
            decided, rank = _first_linear_ndim(child)
            if decided:
                return True, rank
        return False, None
    if kind in ("activation", "neuron_noise"):
        return False, None
    return True, None


_JIT_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(net, *, method, covariance, quad_nodes, batched, keep_covariance):
    per_net = _JIT_CACHE.setdefault(net.moments, {})
    key = (method, covariance, quad_nodes, batched, keep_covariance)
    if key not in per_net:

        def one(params, x, noise, w_var):
            outs = propagate(
                net, params, x, noise=noise, method=method, covariance=covariance, weight_noise_var=w_var, quad_nodes=quad_nodes
            )
            return outs if keep_covariance else tuple(o.compact() for o in outs)

        def run(params, x, noise, w_var):
            if batched:
                return jax.vmap(one, in_axes=(None, 0, None, None))(params, x, noise, w_var)
            return one(params, x, noise, w_var)

        per_net[key] = jax.jit(run)
    return per_net[key]


def _check_noise(noise) -> None:
    from noisejax.noise import LocalWeightNoise

    kinds = (NeuronNoise, LocalWeightNoise)
    if noise is None or isinstance(noise, kinds):
        return
    if isinstance(noise, (list, tuple)) and all(n is None or isinstance(n, kinds) for n in noise):
        return
    raise InvalidArgumentError(
        f"noise must be None, a NeuronNoise / LocalWeightNoise or a sequence of them (one per site), got {type(noise).__name__}"
    )


def predict(
    net,
    params: PyTree,
    x: Array,
    *,
    noise=None,
    method: str = "gaussian",
    covariance: str = "factored",
    weight_noise_var: Any = None,
    quad_nodes: int = _DEFAULT_QUAD,
    batched: Optional[bool] = None,
    keep_covariance: bool = False,
) -> tuple[LayerMoments, ...]:
    """Analytic per-layer mean and noise variance of ``net`` for one input or a batch.

    Args:
      net: a :mod:`noisejax.layers` network whose layers all have moment rules,
        e.g. ``layers.mlp(...)`` or ``layers.from_weights(...)[0]``.
      params: its parameters.
      x: one example ``(*in_shape)`` or a batch ``(B, *in_shape)`` (inferred from
        the first Dense/Conv layer; pass ``batched`` otherwise).
      noise: a :class:`~noisejax.noise.NeuronNoise` for every site, or a sequence
        with one entry (or ``None``) per site — as for ``net.apply``.
      method: ``"gaussian"`` (moment matching) or ``"linearized"`` (first order).
      covariance: ``"factored"`` (exact in the linear regime), ``"lowrank"``
        (cheap, one rank per correlated source) or ``"full"``.
      weight_noise_var: additive weight noise: a scalar ``σ²`` for every W and b,
        or a pytree like ``params`` with a variance or ``None`` per leaf (e.g.
        ``noise.noise_power(params, wnr_db)``).
      quad_nodes: Gauss–Hermite points for activations without a closed form.
      batched: whether ``x`` is a batch (default: inferred, see ``x``).
      keep_covariance: also return each layer's covariance structure (``factors``,
        ``lazy`` or ``cov``, per example); by default only ``mean`` and ``var``
        (``diag = var``), which is all a batch needs and much smaller.

    Returns:
      A tuple with one :class:`LayerMoments` per top-level child of ``net``;
      ``.mean`` and ``.var`` have shape ``(width,)`` or ``(B, width)``.  Jit-compiled
      and cached per network; differentiable w.r.t. ``params``, ``x`` and the noise.

    Example::

        >>> res = predict(net, params, X, noise=noise.NeuronNoise(add_uncorrelated=1e-3))
        >>> res[-1].var.shape   # (B, n_out)
    """
    if getattr(net, "moments", None) is None:
        raise InvalidArgumentError("net has no moment rule: every layer needs one (build it with noisejax.layers)")
    _validate.check_choice("method", method, METHODS)
    _validate.check_choice("covariance", covariance, COVARIANCES)
    quad_nodes = _validate.check_int("quad_nodes", quad_nodes, minimum=2)
    _check_noise(noise)
    if not isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
        x = np.asarray(x)
    _validate.check_finite("x", x)
    _validate.check_tree_finite("params", params)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    if batched is None:
        _, rank = _first_linear_ndim(net.spec)
        if rank is None:
            batched = False
        elif x.ndim == rank:
            batched = False
        elif x.ndim == rank + 1:
            batched = True
        else:
            raise ShapeMismatchError(f"x must have {rank} (one example) or {rank + 1} (a batch) dimensions, got shape {tuple(x.shape)}")
    w_scalar = None
    if weight_noise_var is not None:
        if isinstance(weight_noise_var, (int, float)) or (hasattr(weight_noise_var, "ndim") and weight_noise_var.ndim == 0):
            _validate.check_variance("weight_noise_var", weight_noise_var)
            w_scalar = jnp.asarray(weight_noise_var, x.dtype)
        else:
            for leaf in jax.tree_util.tree_leaves(weight_noise_var):
                _validate.check_variance("weight_noise_var", leaf)
            params = with_weight_noise(params, weight_noise_var)
    fn = _compiled(
        net, method=method, covariance=covariance, quad_nodes=quad_nodes, batched=bool(batched), keep_covariance=keep_covariance
    )
    return fn(params, x, noise, w_scalar)


def output_variance(net, params: PyTree, x: Array, *, noise=None, method: str = "gaussian", **kwargs) -> Array:
    """Noise variance of the network's output, ``(n_out,)`` or ``(B, n_out)`` — a differentiable regularizer.

    Example (noise-aware training)::

        >>> loss = ce(params) + lam * output_variance(net, params, X, noise=nz).mean()
        >>> jax.grad(lambda p: output_variance(net, p, X, noise=nz).sum())(params)
    """
    return predict(net, params, x, noise=noise, method=method, **kwargs)[-1].var
