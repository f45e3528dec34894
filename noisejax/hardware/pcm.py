r"""Phase-change memory (PCM) weights: programming noise, drift and read noise.

The statistical model of IBM's 1-million-device PCM array (Nandakumar et al., ICECS 2019;
Joshi et al., Nat. Commun. 2020) with the defaults of aihwkit 1.1.0's
``PCMLikeNoiseModel`` and ``SinglePairConductanceConverter``.  Conductances are in µS,
times in seconds; ``gr = g / g_max``.

* **Mapping** (per crossbar tile): ``s = g_max / max|W|`` and a differential pair
  ``g+ = clip(W s, 0, g_max)``, ``g− = clip(−W s, 0, g_max)``.
* **Programming** (both devices, the "off" one too)::

      σ_p(g) = prog_noise_scale · (c0 + c1 gr + c2 gr²) · g_max / prog_coeff_g_max
      g_prog = max(g + σ_p ξ, 0)

* **Drift exponent**, drawn once at programming from the *target* ``g``
  (``gr`` clipped at ``g_rel_min = 1e-7``)::

      μ_ν = clip(−0.0155 ln gr + 0.0244, 0.049, 0.1)
      σ_ν = clip(−0.0125 ln gr − 0.0059, 0.008, 0.045)
      ν   = drift_scale · |μ_ν + σ_ν ξ|

* **Reading** ``t`` seconds after programming, ``t' = t + t0``::

      g_d = g_prog (t'/t0)^(−ν)
      q   = min(q_max, 0.0088 / max(1e-3, (g_prog/g_max)^0.65))
      σ_r = read_noise_scale · q · sqrt(ln((t' + t_read) / (2 t_read)))
      g_t = max(g_d + |g_d| σ_r ξ, 0),      W_t = (g+_t − g−_t) / s

* **Re-split** (``resplit=True``, aihwkit's behaviour): aihwkit stores the programmed
  *weights* ``w_p = (g+_prog − g−_prog)/s`` and, at every drift call, converts them back
  to conductances with a new scale ``s' = g_max / max|w_p|`` and one device per pair
  (``g+' = clip(w_p s', 0, g_max)``, the other 0); the drift exponents drawn at
  programming (``ν+``, ``ν−``) stay attached to the ``+``/``−`` slots and the read noise
  uses ``g' / g_max``.  So the off device's programming noise only survives in the net
  weight, only one device per pair drifts and is read, and a weight whose programming
  flipped its sign drifts with the exponent drawn for a zero target (``μ_ν = 0.1``,
  ``σ_ν = 0.045``).  ``resplit=False`` keeps both programmed devices (the physical pair).

Every coefficient is an array leaf of :class:`PCMNoise`, so a sweep over a coefficient
(or another device, e.g. a state-independent model with ``prog_coeff=(σ, 0, 0)``,
``nu_*_slope=0``, ``read_exponent=0``) is a :func:`jax.vmap` over a stacked ``PCMNoise``.

:meth:`PCMNoise.program` draws one programming (a :class:`PCMState`), and
:meth:`PCMNoise.read` the weights at time ``t`` from that state — a pure function of
the state, so it can only read the programming it is given, and realizations × times
are two ``vmap`` axes (programming drawn once per realization, shared by its times).
:meth:`PCMNoise.weight_moments` gives the exact per-weight mean and variance of ``W_t``
(and of the programmed weights) without sampling, for the analytic path.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from noisejax import hardware as hw
    >>> pcm = hw.PCMNoise()
    >>> W = jax.random.normal(jax.random.key(0), (64, 32)) * 0.1
    >>> state = pcm.program(W, key=jax.random.key(1))          # one programming
    >>> times = jnp.array([1.0, 3600.0, 86400.0])
    >>> W_t = jax.vmap(lambda t, i: pcm.read(state, t, key=jax.random.fold_in(jax.random.key(2), i)))(
    ...     times, jnp.arange(3))
    >>> W_t.shape
    (3, 64, 32)
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from noisejax import _struct as struct
from jax.scipy.special import log_ndtr, ndtr

from noisejax import _validate
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.hardware.tiles import TileGrid, TileShape

__all__ = ["PCMNoise", "PCMState", "PCMMoments", "SECONDS"]

Array = jax.Array

#: Reading times of the aihwkit PCM studies (s): 1 s, 1 h, 1 day, 1 month (30 d), 1 year, 10 years
SECONDS: dict[str, float] = {
    "1 s": 1.0,
    "1 h": 3600.0,
    "1 day": 86400.0,
    "1 month": 30 * 86400.0,
    "1 year": 365 * 86400.0,
    "10 years": 3650 * 86400.0,
}

_ZERO_CLIP = 1e-7  # aihwkit's clamp of max|W| when computing the scale
_POSITIVE = ("g_max", "prog_coeff_g_max", "g_rel_min", "t0", "t_read", "read_floor")
_NONNEGATIVE = ("prog_noise_scale", "drift_scale", "read_noise_scale", "read_q", "read_q_max")


def _leaf(value: Any) -> Any:
    """Concrete numbers/tuples → float arrays; tracers and jax placeholders pass through."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, np.ndarray, np.number, tuple, list)):
        return jnp.asarray(value, dtype=jnp.result_type(float))
    return value


def _check_leaf(name: str, value: Any, positive: bool = False) -> None:
    """Finite; ``>= 0`` for the scales and the positive fields (``> 0`` with ``positive``,
    checked at the entry points: a zero cotangent of a ``PCMNoise`` must be constructible)."""
    if isinstance(value, (tuple, list)):
        value = np.asarray(value)
    _validate.check_real_number(f"PCMNoise.{name}", value)
    if not _validate._is_concrete(value):
        return
    arr = np.asarray(value)
    if name in _POSITIVE and np.any(arr <= 0 if positive else arr < 0):
        raise InvalidArgumentError(f"PCMNoise.{name} must be > 0, got {arr.tolist()}")
    if name in _NONNEGATIVE and np.any(arr < 0):
        raise InvalidArgumentError(f"PCMNoise.{name} must be >= 0, got {arr.tolist()}")


@struct.dataclass
class PCMState:
    """One programming of one weight matrix (the devices' state right after programming).

    Attributes:
      g_pos, g_neg: ``(in, out)`` programmed conductances (µS) of the devices that drift
        (after the re-split when ``PCMNoise.resplit``).
      nu_pos, nu_neg: ``(in, out)`` drift exponents, drawn at programming.
      scale: ``(Ti, To)`` conductance per weight unit of each tile (µS).
      grid: static; the :class:`~noisejax.hardware.tiles.TileGrid` of the matrix.

    ``weights`` are the programmed weights ``(g+ − g−)/s`` (no drift, no read noise).
    """

    g_pos: Array
    g_neg: Array
    nu_pos: Array
    nu_neg: Array
    scale: Array
    grid: TileGrid = struct.field(pytree_node=False)

    @property
    def weights(self) -> Array:
        """Programmed weights ``(g+ − g−) / s``, shape ``(in, out)``."""
        return (self.g_pos - self.g_neg) / self.grid.expand(self.scale)


@struct.dataclass
class PCMMoments:
    """Per-weight statistics over devices (exact, no sampling), all ``(in, out)``.

    Attributes:
      mean, var: of the weight read at time ``t``.
      abs_mean: ``E|W_t|`` (exact with the re-split, a folded-normal approximation without).
      prog_mean, prog_var, prog_abs_mean: of the programmed weights (``PCMState.weights``).
      expected_tile_max: ``(Ti, To)``, ``E max|w_p|`` over each tile (the re-split scale;
        a Gaussian approximation of the extreme).
    """

    mean: Array
    var: Array
    abs_mean: Array
    prog_mean: Array
    prog_var: Array
    prog_abs_mean: Array
    expected_tile_max: Array


@lru_cache(maxsize=None)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def _phi(x):
    return jnp.exp(-0.5 * jnp.square(x)) / math.sqrt(2.0 * math.pi)


def _exp_abs_normal(mu, sd, a):
    """``E[exp(−a|Y|)]`` for ``Y ~ N(μ, sd²)``, ``a >= 0`` (closed form, log-space)::

        e^{−aμ + a²sd²/2} Φ(μ/sd − a sd) + e^{aμ + a²sd²/2} Φ(−μ/sd − a sd)
    """
    sd = jnp.maximum(sd, 1e-12)
    half = 0.5 * jnp.square(a * sd)
    return jnp.exp(-a * mu + half + log_ndtr(mu / sd - a * sd)) + jnp.exp(a * mu + half + log_ndtr(-mu / sd - a * sd))


def _rect_moments(s):
    """``(E[max(1 + sξ, 0)], E[max(1 + sξ, 0)²])`` for ``ξ ~ N(0, 1)``, ``s >= 0``."""
    s = jnp.maximum(s, 1e-12)
    z = 1.0 / s
    cdf, pdf = ndtr(z), _phi(z)
    return cdf + s * pdf, (1.0 + jnp.square(s)) * cdf + s * pdf


@struct.dataclass
class PCMNoise:
    """PCM programming noise, drift and read noise; every coefficient is a pytree leaf.

    Defaults: aihwkit 1.1.0 ``PCMLikeNoiseModel`` (fitted on IBM's PCM array) with
    ``g_max = 25 µS``.  ``resplit`` (static) reproduces aihwkit's re-split of the
    programmed weights into one device per pair before drifting (see the module doc);
    ``False`` drifts and reads both programmed devices.

    Attributes:
      g_max: conductance of ``max|W|`` of a tile (µS).
      prog_coeff: ``(c0, c1, c2, ...)``, ``σ_p = Σ_i c_i gr^i · g_max / prog_coeff_g_max``.
      prog_coeff_g_max: the ``g_max`` the coefficients were fitted at (25 µS).
      prog_noise_scale, drift_scale, read_noise_scale: multipliers (aihwkit's ``*_scale``).
      nu_mean_slope, nu_mean_offset, nu_mean_min, nu_mean_max: ``μ_ν`` fit and clip.
      nu_std_slope, nu_std_offset, nu_std_min, nu_std_max: ``σ_ν`` fit and clip.
      g_rel_min: clip of ``gr`` before the logarithms of the drift fit.
      t0: first reading time of the drift fit (s); ``t`` counts from the end of programming.
      t_read: the 1/f noise fit's read duration (s).
      read_q, read_exponent, read_floor, read_q_max:
        ``q = min(read_q_max, read_q / max(read_floor, gr^read_exponent))``.
    """

    g_max: Array = 25.0
    prog_coeff: Array = (0.26348, 1.9650, -1.1731)
    prog_coeff_g_max: Array = 25.0
    prog_noise_scale: Array = 1.0
    nu_mean_slope: Array = -0.0155
    nu_mean_offset: Array = 0.0244
    nu_mean_min: Array = 0.049
    nu_mean_max: Array = 0.1
    nu_std_slope: Array = -0.0125
    nu_std_offset: Array = -0.0059
    nu_std_min: Array = 0.008
    nu_std_max: Array = 0.045
    drift_scale: Array = 1.0
    g_rel_min: Array = 1e-7
    t0: Array = 20.0
    t_read: Array = 250e-9
    read_q: Array = 0.0088
    read_exponent: Array = 0.65
    read_floor: Array = 1e-3
    read_q_max: Array = 0.2
    read_noise_scale: Array = 1.0
    resplit: bool = struct.field(pytree_node=False, default=True)

    def __post_init__(self):
        for f in self.__dataclass_fields__:
            if f == "resplit":
                continue
            value = getattr(self, f)
            _check_leaf(f, value)
            object.__setattr__(self, f, _leaf(value))
        if not isinstance(self.resplit, bool):
            raise InvalidArgumentError(f"PCMNoise.resplit must be True or False, got {self.resplit!r}")

    def _check_positive(self) -> None:
        for name in _POSITIVE:
            _check_leaf(name, getattr(self, name), positive=True)

    # ------------------------------------------------------------------ the fits

    def programming_sigma(self, g: Array) -> Array:
        """``σ_p(g)`` (µS) of programming a device to the target ``g`` (µS)."""
        gr = g / self.g_max
        coeff = jnp.atleast_1d(self.prog_coeff)
        poly = jnp.polyval(coeff[::-1], gr)  # Σ c_i gr^i
        return self.prog_noise_scale * poly * self.g_max / self.prog_coeff_g_max

    def drift_stats(self, g: Array) -> tuple[Array, Array]:
        """``(μ_ν, σ_ν)`` of the drift exponent of a device programmed to the target ``g``."""
        lg = jnp.log(jnp.maximum(jnp.abs(g / self.g_max), self.g_rel_min))
        mu = jnp.clip(self.nu_mean_slope * lg + self.nu_mean_offset, self.nu_mean_min, self.nu_mean_max)
        sd = jnp.clip(self.nu_std_slope * lg + self.nu_std_offset, self.nu_std_min, self.nu_std_max)
        return mu, sd

    def read_q_factor(self, g: Array) -> Array:
        """``q(g) = min(q_max, read_q / max(read_floor, (|g|/g_max)^read_exponent))``."""
        gr = jnp.abs(g) / self.g_max
        return jnp.minimum(self.read_q / jnp.maximum(jnp.power(gr, self.read_exponent), self.read_floor), self.read_q_max)

    def read_growth(self, t: Array) -> Array:
        """``sqrt(ln((t + t0 + t_read) / (2 t_read)))``: the 1/f noise accumulated at ``t``."""
        tp = jnp.asarray(t) + self.t0
        return jnp.sqrt(jnp.log((tp + self.t_read) / (2.0 * self.t_read)))

    def drift_log_factor(self, t: Array) -> Array:
        """``a = drift_scale · ln((t + t0)/t0)``, so a device drifts by ``exp(−a |·|)``."""
        return self.drift_scale * jnp.log((jnp.asarray(t) + self.t0) / self.t0)

    # ------------------------------------------------------------------ sampling

    def program(self, W: Array, *, key: Array, tile: TileShape = None) -> PCMState:
        """Program ``W`` (``(in, out)``) once: map to conductance pairs, add programming
        noise to both devices, draw their drift exponents (one realization).

        Args:
          W: target weights ``(in, out)``.
          key: PRNG key of this programming (``fold_in(key, 0..3)``: programming noise of
            ``g+``/``g−``, drift exponents of ``g+``/``g−``).
          tile: ``(max_in, max_out)`` crossbar size; larger matrices are split into tiles,
            each with its own scale ``s = g_max / max|W_tile|``.  ``None``: one crossbar.

        Returns:
          :class:`PCMState` (``state.weights`` are the programmed weights).
        """
        W = jnp.asarray(W)
        if W.ndim != 2:
            raise ShapeMismatchError(f"PCMNoise.program: W must be a 2-D (in, out) matrix, got shape {tuple(W.shape)}")
        if not jnp.issubdtype(W.dtype, jnp.floating):
            raise InvalidArgumentError(f"PCMNoise.program: W must be floating point, got dtype {W.dtype}")
        self._check_positive()
        grid = TileGrid.of(W.shape, tile)
        dtype = W.dtype
        g_max = jnp.asarray(self.g_max, dtype)

        def to_pairs(w):
            scale = g_max / jnp.maximum(grid.reduce(jnp.max, jnp.abs(w)), _ZERO_CLIP)
            gs = w * grid.expand(scale)
            return jnp.clip(gs, 0.0, g_max), jnp.clip(-gs, 0.0, g_max), scale

        gp_t, gn_t, scale = to_pairs(W)
        normal = lambda i: jax.random.normal(jax.random.fold_in(key, i), W.shape, dtype)  # noqa: E731
        g_pos = jnp.maximum(gp_t + self.programming_sigma(gp_t).astype(dtype) * normal(0), 0.0)
        g_neg = jnp.maximum(gn_t + self.programming_sigma(gn_t).astype(dtype) * normal(1), 0.0)
        mu_p, sd_p = self.drift_stats(gp_t)
        mu_n, sd_n = self.drift_stats(gn_t)
        nu_pos = (self.drift_scale * jnp.abs(mu_p + sd_p * normal(2))).astype(dtype)
        nu_neg = (self.drift_scale * jnp.abs(mu_n + sd_n * normal(3))).astype(dtype)
        if self.resplit:
            w_prog = (g_pos - g_neg) / grid.expand(scale)
            g_pos, g_neg, scale = to_pairs(w_prog)
        return PCMState(g_pos, g_neg, nu_pos, nu_neg, scale.astype(dtype), grid)

    def read(self, state: PCMState, t: Array, *, key: Array) -> Array:
        """Weights ``t`` seconds after the programming ``state`` (drift + 1/f read noise).

        Pure in ``state``: it reads exactly the programming it is given.  ``t`` is a
        scalar (``vmap`` over times); ``key`` draws the read noise (``fold_in(key, 0/1)``
        for ``g+``/``g−``).  Returns ``(in, out)``.
        """
        if not isinstance(state, PCMState):
            raise InvalidArgumentError(f"PCMNoise.read: state must be a PCMState from PCMNoise.program, got {type(state).__name__}")
        _validate.check_real_number("t", t)
        if _validate._is_concrete(t) and np.any(np.asarray(t) < 0):
            raise InvalidArgumentError(f"t must be >= 0 seconds after programming, got {np.asarray(t).tolist()}")
        dtype = state.g_pos.dtype
        t = jnp.asarray(t, dtype)
        tau = (t + self.t0) / self.t0
        growth = self.read_growth(t)

        def device(g, nu, i):
            g_d = g * jnp.power(tau, -nu)
            sig = self.read_noise_scale * self.read_q_factor(g) * growth
            xi = jax.random.normal(jax.random.fold_in(key, i), g.shape, dtype)
            return jnp.maximum(g_d + jnp.abs(g_d) * sig.astype(dtype) * xi, 0.0)

        g_t = device(state.g_pos, state.nu_pos, 0) - device(state.g_neg, state.nu_neg, 1)
        return g_t / state.grid.expand(state.scale)

    # ------------------------------------------------------------------ statistics

    def _atoms(self, g: Array, nodes: int) -> tuple[Array, Array]:
        """The programmed conductance ``max(g + σ_p ξ, 0)`` as a discrete distribution.

        An exact atom at 0 (probability ``Φ(−g/σ_p)``) plus ``nodes`` Gauss–Legendre
        atoms of the Gaussian's positive part on ``ξ ∈ [max(−g/σ_p, −8), 8]``.
        Returns ``(values, probs)`` of shape ``(*g.shape, nodes + 1)``.
        """
        sd = self.programming_sigma(g)
        sd_safe = jnp.maximum(sd, 1e-12 * self.g_max)
        lo = jnp.maximum(-g / sd_safe, -8.0)
        hi = 8.0
        z, w = (jnp.asarray(a, g.dtype) for a in _legendre(int(nodes)))
        half = (hi - lo)[..., None] / 2.0
        xi = lo[..., None] + half * (z + 1.0)
        probs = half * w * _phi(xi)
        values = jnp.maximum(g[..., None] + sd[..., None] * xi, 0.0)
        p0 = ndtr(-g / sd_safe)[..., None]
        return (jnp.concatenate([jnp.zeros_like(p0), values], -1), jnp.concatenate([p0, probs], -1))

    def weight_moments(self, W: Array, t: Array, *, tile: TileShape = None, nodes: int = 24,
                       chunk: int = 64) -> PCMMoments:
        """Exact per-weight statistics of :meth:`read` ``(program(W), t)`` over devices.

        Conditional on the programmed conductance, drift and read noise are independent
        and have closed forms: ``E[(t'/t0)^(−kν)] = E[exp(−k a|Y|)]`` for
        ``Y ~ N(μ_ν, σ_ν²)`` and ``E[max(1 + σ_r ξ, 0)^k]`` (rectified Gaussian moments),
        ``k = 1, 2``.  The programmed conductance ``max(g + σ_p ξ, 0)`` is integrated with
        an exact atom at 0 plus ``nodes`` Gauss–Legendre points (its read noise depends
        on it).  With the re-split the two devices of a pair are integrated jointly
        (``(nodes + 1)²`` points per weight, ``chunk`` input rows at a time) and the
        random re-split scale ``g_max / max|w_p|`` is replaced by its expectation
        (``expected_tile_max``, from a Gaussian approximation of each ``w_p``).

        ``t`` is a scalar (``vmap`` over times).  Returns :class:`PCMMoments`.
        """
        W = jnp.asarray(W)
        if W.ndim != 2:
            raise ShapeMismatchError(f"PCMNoise.weight_moments: W must be 2-D (in, out), got shape {tuple(W.shape)}")
        nodes = _validate.check_int("nodes", nodes, minimum=2)
        chunk = _validate.check_int("chunk", chunk, minimum=1)
        self._check_positive()
        return _weight_moments(self, W, jnp.asarray(t), TileGrid.of(W.shape, tile), nodes, chunk)

    def _weight_moments(self, W: Array, t: Array, grid: TileGrid, nodes: int, chunk: int) -> PCMMoments:
        """The body of :meth:`weight_moments` (jitted with static grid, nodes and chunk)."""
        dtype = W.dtype if jnp.issubdtype(W.dtype, jnp.floating) else jnp.float32
        W = W.astype(dtype)
        g_max = jnp.asarray(self.g_max, dtype)
        scale = grid.expand(g_max / jnp.maximum(grid.reduce(jnp.max, jnp.abs(W)), _ZERO_CLIP))
        gs = W * scale
        gp, gn = jnp.clip(gs, 0.0, g_max), jnp.clip(-gs, 0.0, g_max)
        a = self.drift_log_factor(jnp.asarray(t, dtype))
        growth = self.read_growth(jnp.asarray(t, dtype))

        def drift_factors(g):
            mu, sd = self.drift_stats(g)
            return _exp_abs_normal(mu, sd, a), _exp_abs_normal(mu, sd, 2.0 * a)

        d1p, d2p = drift_factors(gp)
        d1n, d2n = drift_factors(gn)
        vp, pp = self._atoms(gp, nodes)
        vn, pn = self._atoms(gn, nodes)
        # programmed weights: 1-D sums per device
        m1p, m2p = jnp.sum(pp * vp, -1), jnp.sum(pp * vp * vp, -1)
        m1n, m2n = jnp.sum(pn * vn, -1), jnp.sum(pn * vn * vn, -1)
        prog_mean = (m1p - m1n) / scale
        prog_var = jnp.maximum(m2p - m1p**2 + m2n - m1n**2, 0.0) / scale**2
        e_max = grid.reduce(_expected_max_abs_flat, jnp.stack([prog_mean, jnp.sqrt(prog_var)], -1))

        if self.resplit:
            ref = grid.expand(e_max) * scale  # E max|w_p| in µS of the original scale

            def rows(args):
                vp_, pp_, vn_, pn_, d1p_, d2p_, d1n_, d2n_, ref_ = args
                diff = vp_[..., :, None] - vn_[..., None, :]  # (out, n+1, n+1) µS
                prob = pp_[..., :, None] * pn_[..., None, :]
                pos = diff > 0
                d1 = jnp.where(pos, d1p_[..., None, None], d1n_[..., None, None])
                d2 = jnp.where(pos, d2p_[..., None, None], d2n_[..., None, None])
                c = jnp.abs(diff) / ref_[..., None, None] * g_max  # re-split conductance
                r1, r2 = _rect_moments(self.read_noise_scale * self.read_q_factor(c) * growth)
                e1 = jnp.sum(prob * diff * d1 * r1, (-2, -1))
                e2 = jnp.sum(prob * diff * diff * d2 * r2, (-2, -1))
                ea = jnp.sum(prob * jnp.abs(diff) * d1 * r1, (-2, -1))
                pa = jnp.sum(prob * jnp.abs(diff), (-2, -1))
                return e1, e2, ea, pa

            e1, e2, ea, pa = jax.lax.map(rows, (vp, pp, vn, pn, d1p, d2p, d1n, d2n, ref),
                                         batch_size=max(1, min(int(chunk), W.shape[0])))
            mean = e1 / scale
            var = jnp.maximum(e2 - e1**2, 0.0) / scale**2
            abs_mean = ea / scale
            prog_abs = pa / scale
        else:
            def device(v, p, d1, d2):
                r1, r2 = _rect_moments(self.read_noise_scale * self.read_q_factor(v) * growth[..., None])
                e1 = d1 * jnp.sum(p * v * r1, -1)
                e2 = d2 * jnp.sum(p * v * v * r2, -1)
                return e1, e2

            e1p, e2p = device(vp, pp, d1p, d2p)
            e1n, e2n = device(vn, pn, d1n, d2n)
            mean = (e1p - e1n) / scale
            var = jnp.maximum(e2p - e1p**2 + e2n - e1n**2, 0.0) / scale**2
            abs_mean = _folded_normal_mean(mean, var)
            prog_abs = jnp.sum(pp[..., :, None] * pn[..., None, :] * jnp.abs(vp[..., :, None] - vn[..., None, :]),
                               (-2, -1)) / scale
        return PCMMoments(mean, var, abs_mean, prog_mean, prog_var, prog_abs, e_max)


_weight_moments = jax.jit(PCMNoise._weight_moments, static_argnums=(3, 4, 5))


def _folded_normal_mean(mean: Array, var: Array) -> Array:
    """``E|X|`` for ``X ~ N(mean, var)``."""
    sd = jnp.sqrt(jnp.maximum(var, 1e-30))
    z = mean / sd
    return sd * math.sqrt(2.0 / math.pi) * jnp.exp(-0.5 * z * z) + mean * (1.0 - 2.0 * ndtr(-z))


def _expected_max_abs_flat(ms: Array, n_grid: int = 257) -> Array:
    """``E max_i |X_i|`` for independent ``X_i ~ N(μ_i, σ_i²)`` (``ms[..., 0] = μ``, ``ms[..., 1] = σ``).

    ``F(m) = Π_i P(|X_i| <= m)``; ``E max = lo + ∫_lo^hi (1 − F(m)) dm`` on a trapezoid grid
    from below the largest ``|μ_i|`` (where ``F ≈ 0``) to ``max(|μ_i| + 8σ_i)``.
    """
    mu = jnp.abs(ms[..., 0]).reshape(-1)
    sd = jnp.maximum(ms[..., 1].reshape(-1), 1e-12)
    top = jnp.argmax(mu)
    lo = jnp.maximum(mu[top] - 8.0 * sd[top], 0.0)
    hi = jnp.max(mu + 8.0 * sd)
    m = jnp.linspace(lo, hi, n_grid)

    def log_cdf(mi):
        p = ndtr((mi - mu) / sd) - ndtr((-mi - mu) / sd)
        return jnp.sum(jnp.log(jnp.maximum(p, 1e-30)))

    surv = 1.0 - jnp.exp(jax.lax.map(log_cdf, m))
    return lo + jnp.sum(0.5 * (surv[1:] + surv[:-1]) * jnp.diff(m))
