"""Gaussian expectations of elementwise functions: the numerics behind every activation's moment rule.

For ``x ~ N(μ, v)`` and an elementwise ``f``, :func:`activation_moments` returns
``E f(x)``, ``Var f(x)`` and the Stein gain ``E f'(x)`` (``cov(f(x), z) = E f'(x) ·
cov(x, z)`` for every ``z`` jointly Gaussian with ``x``):

* closed forms for linear, ReLU (``max(x, 0)``), ``erf``, ``exp`` (log-normal) and
  ``x²``;
* any other ``f``: Gauss–Hermite quadrature, with a second-order Taylor expansion
  for tiny spreads (float32 cannot resolve ``f(μ + σz) − f(μ)`` there) and a
  trapezoid rule for wide spreads (steep ``f``), see :func:`_quadrature_stats`;
* ``method="linearized"``: the first-order ``f(μ)``, ``f'(μ)² v``, ``f'(μ)``.

Example::

    >>> from noisejax.quadrature import activation_moments
    >>> activation_moments(jax.nn.relu, jnp.array(0.), jnp.array(1.), kind="relu")[0]  # 1/√(2π)
    Array(0.3989423, dtype=float32)
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from noisejax.errors import InvalidArgumentError

__all__ = ["METHODS", "KINDS", "activation_moments"]

Array = jax.Array

METHODS: tuple[str, ...] = ("gaussian", "linearized")
#: closed forms: ``linear`` (with ``slope``), ``relu``, ``erf``, ``exp``, ``square``
KINDS: tuple[str, ...] = ("linear", "relu", "erf", "exp", "square")
_DEFAULT_QUAD = 64
_ERF_NODES = 48


def _safe_sqrt(x: Array) -> Array:
    """``√max(x, 0)`` with a finite (zero) gradient at 0."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


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
    ``"erf"``, ``"exp"``, ``"square"``); otherwise Gauss–Hermite with ``quad_nodes`` points.

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
    if kind == "exp":
        return _exp_stats(mean, var)
    if kind == "square":
        return jnp.square(mean) + var, 4.0 * jnp.square(mean) * var + 2.0 * jnp.square(var), 2.0 * mean
    return _quadrature_stats(fn, mean, var, quad_nodes)


def _exp_stats(mu, v):
    """Log-normal: ``E = exp(μ + v/2)``, ``Var = expm1(v) exp(2μ + v)``, ``E f' = E``."""
    e = jnp.exp(mu + 0.5 * v)
    return e, jnp.expm1(v) * jnp.square(e), e
