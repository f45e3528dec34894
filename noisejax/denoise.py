"""Denoisers for noisy weights ``w̃ = w + n``, ``n ~ N(0, σ_n²)`` (Shao, Liew & Gündüz 2023).

Every estimator is ONE frozen dataclass pytree with one call,
``est(noisy, noise_power, *, wnr_db=None) -> denoised``: it maps a *noisy parameter
pytree* and the *known noise power* to a denoised pytree.  Its parameters (``lam``,
``beta``, learned coefficients) are pytree leaves, so a grid of estimators is one
``vmap``; :func:`estimator` builds one by name.  A leaf filter chooses the leaves (default
:func:`noisejax.noise.default_leaf_filter`: normalization parameters and
``batch_stats`` are left untouched, as they are sent noise-free).  The noise power
is a scalar or the per-leaf tree returned by :func:`noisejax.noise.noise_power`
(``None`` leaves are skipped as well).  Statistics are taken per *group*: the
whole leaf (a "layer", default) or, with ``per_channel=True``, each output channel
(last axis) of leaves with two or more dimensions.

Estimators (per group ``g``, ``σ²`` its noise power):

* :class:`ML` — maximum likelihood, ``ŵ = w̃``.
* :class:`MMSE` — Gaussian prior ``N(μ_g, σ_g²)``: ``ŵ = μ_g + η/(η+1)·(w̃ − μ_g)``,
  ``η = σ_g²/σ²``.  Without side information ``μ_g = mean(w̃_g)`` and
  ``σ_g² = max(var(w̃_g) − σ², 0)``; with ``prior=clean_prior(clean)`` the clean
  weights' statistics are used.
* :class:`CompensatedMMSE` — the authors' compensated estimator ("MMSE_pb"):
  ``θ = η/(η+1−λ')``, ``ρ = σ_g²·β/(η+1−λ')``, ``ŵ = θ·w̃ + ρ``; ``(λ'=1, β=0)`` is ML
  exactly.  ``λ'`` and ``β`` are pytree leaves, so a grid is a ``vmap``
  (:func:`compensated_grid`).
* :class:`MMSEpb` — the authors' compensated MMSE exactly as published (their NoisyNN
  code): one *global* signal variance ``σ_W²`` (the clean weights' variance over all
  selected leaves, :func:`global_signal_var` — side information, one number), ``η = σ_W²/σ²``,
  ``c = η/(η+1−λ')``, ``d = σ_W²·β/(η+1−λ')``, ``ŵ = c·w̃ + d`` for every (λ', β): no
  fallback, so ``c`` and ``d`` change sign where ``η+1−λ' < 0`` (low WNR, λ' > 1).
  :class:`CompensatedMMSE` with ``prior=Prior(var=σ_W² on every leaf)`` equals it wherever
  ``η+1−λ' > 0``; see :class:`MMSEpb` for the differences.
* :class:`LearnedDenoiser` — a WNR-conditioned affine map per group, trained with
  optax on the expected loss of the denoised network (:func:`train_learned`)::

      ŵ = a_g·(w̃ + σ·c_g)
      log a_g = (s_g0 + s_g1·τ)·log(1 − ν_g) + B·tanh(A_g·φ/B),   c_g = B·tanh(C_g·φ/B)
      φ = [ν_g, ν_g·τ, ν_g², ν_g²·τ],  τ = (WNR − center)/half_width,  ν_g = σ²/var(w̃_g) ∈ [0, 1]

  ``1 − ν_g`` is the (zero-mean prior) MMSE gain estimated from the noisy weights, so
  the exponent ``s`` interpolates between ML (``s = 0``) and MMSE (``s = 1``) and
  beyond; ``σ·c_g`` is a compensation shift like the compensated estimator's ``ρ``.
  All coefficients zero is ML, which is where training starts by default.

  Optionally (``init_learned(..., projection=True)``) each weight matrix, viewed as
  ``(fan_in, C)``, is first corrected along a learned per-layer direction ``u``::

      w̃_j ← w̃_j − (u·w̃_j − t_j)·u/‖u‖²,     t_j = u·w_j  (clean; one number per output channel)

  which removes the noise's *common-mode* component ``u·n_j`` — for non-negative
  inputs (pixels, sigmoid/ReLU activations) ``u`` ≈ the mean input, and ``u·n_j`` is
  the per-neuron offset the noise adds to the mean pre-activation.  The targets
  ``t_j`` are side information (``C`` numbers per layer, like a bias), set from the
  clean weights by :func:`retarget`.

  The blind counterpart (``init_learned(..., common_mode=True)``) needs no clean
  number: the components ``c̃_j = û·w̃_j`` are shrunk towards their layer mean with
  the Gaussian-prior MMSE gain estimated across the ``C`` channels, raised to a
  learned WNR-conditioned exponent (see :class:`CommonModeMMSE`)::

      ĉ_j = mean(c̃) + g^(e_0 + e_1·τ)·(c̃_j − mean(c̃)),   g = max(var(c̃) − σ², 0)/var(c̃)

* :class:`CommonModeMMSE` — that blind common-mode MMSE alone (direction ``1/√F`` or
  given), with no learned coefficient.  Noise along a unit direction has variance
  ``σ²`` whatever the direction, while trained layers fed by non-negative inputs
  have similar mean pre-activations across neurons, so the common mode is where
  a prior across channels removes most noise.
* :class:`Recalibrated` — any estimator followed by a re-estimation of the model's
  BatchNorm statistics on unlabeled calibration inputs (e.g. with
  :func:`noisejax.flax.recalibrate_batch_stats`): the noise-free normalization
  re-centres and re-scales each channel the noise has moved.


Example::

    >>> from noisejax import denoise, noise
    >>> pw = noise.noise_power(params, 0.0)
    >>> noisy = noise.add_weight_noise(params, 0.0, key=jax.random.key(0))
    >>> hat = denoise.MMSE()(noisy, pw)
    >>> grid = denoise.compensated_grid([0.5, 1.0], [-1.0, 0.0])   # 4 (λ', β) points
    >>> outs = jax.vmap(lambda e: e(noisy, pw))(grid)               # leaves gain a leading 4
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from noisejax import _struct as struct

from noisejax import _validate
from noisejax import noise as _noise
from noisejax import train as _train
from noisejax.errors import InvalidArgumentError, ShapeMismatchError

__all__ = [
    "Prior",
    "clean_prior",
    "group_stats",
    "ML",
    "MMSE",
    "CompensatedMMSE",
    "compensated_grid",
    "global_signal_var",
    "MMSEpb",
    "mmse_pb_grid",
    "CommonModeMMSE",
    "Recalibrated",
    "LearnedDenoiser",
    "init_learned",
    "retarget",
    "gate_learned",
    "ungate_learned",
    "learned_objective",
    "train_learned",
    "ESTIMATORS",
    "estimator",
]

Array = jax.Array
PyTree = Any
LeafFilter = _noise.LeafFilter
_N_FEATURES = 4
_MIN_GAIN = 1e-4


# ----------------------------------------------------------------------------------
# helpers: selected leaves, groups, statistics
# ----------------------------------------------------------------------------------


def _reduce_axes(leaf: Array, per_channel: bool) -> Optional[tuple[int, ...]]:
    """Axes a group's statistics reduce over (``None``: the whole leaf)."""
    if per_channel and leaf.ndim >= 2:
        return tuple(range(leaf.ndim - 1))
    return None


def group_stats(w: Array, *, per_channel: bool = False) -> tuple[Array, Array]:
    """Mean and (population) variance of ``w`` per group, broadcastable to ``w``."""
    axes = _reduce_axes(w, per_channel)
    return jnp.mean(w, axis=axes, keepdims=True), jnp.var(w, axis=axes, keepdims=True)


def _flatten_power(noise_power: Any, treedef) -> list:
    """Per-leaf noise power list (``None`` = skip) from a scalar or a noise_power tree."""
    if noise_power is None:
        raise InvalidArgumentError("noise_power must be a scalar or a tree from noise.noise_power, got None")
    if isinstance(noise_power, (int, float)) or (hasattr(noise_power, "ndim") and noise_power.ndim == 0):
        _validate.check_variance("noise_power", noise_power)
        return [noise_power] * treedef.num_leaves
    try:
        return treedef.flatten_up_to(noise_power)
    except (ValueError, TypeError) as exc:
        raise ShapeMismatchError(f"noise_power tree does not match the parameter tree: {exc}") from None


def _map_groups(
    fn: Callable[..., Array],
    noisy: PyTree,
    noise_power: Any,
    leaf_filter: LeafFilter,
    *extra: PyTree,
) -> PyTree:
    """Apply ``fn(leaf, power, *extra_leaves, index)`` to selected leaves, keep the others."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(noisy)
    powers = _flatten_power(noise_power, treedef)
    extra_leaves = [treedef.flatten_up_to(t) if t is not None else [None] * len(powers) for t in extra]
    out = []
    for k, ((path, leaf), p) in enumerate(zip(leaves_with_path, powers)):
        if p is None or not leaf_filter(path, leaf):
            out.append(leaf)
        else:
            p = jnp.asarray(p, leaf.dtype)
            out.append(fn(leaf, p, *[e[k] for e in extra_leaves], k))
    return jax.tree_util.tree_unflatten(treedef, out)


def _safe_div(a: Array, b: Array) -> Array:
    return a / jnp.where(b == 0, 1.0, b)


# ----------------------------------------------------------------------------------
# priors (side information)
# ----------------------------------------------------------------------------------


@struct.dataclass
class Prior:
    """Clean-weight statistics per group: ``mean`` and ``var`` trees (``None`` on skipped leaves)."""

    mean: PyTree
    var: PyTree
    per_channel: bool = struct.field(pytree_node=False, default=False)


@functools.partial(jax.jit, static_argnums=1)
def _all_group_stats(leaves: list, per_channel: bool) -> list:
    return [group_stats(leaf, per_channel=per_channel) for leaf in leaves]


def clean_prior(
    clean: PyTree, *, per_channel: bool = False, leaf_filter: LeafFilter = _noise.default_leaf_filter
) -> Prior:
    """Side information for :class:`MMSE` / :class:`CompensatedMMSE`: the clean weights' mean and variance per group."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(clean)
    chosen = [jnp.asarray(leaf) for path, leaf in leaves_with_path if leaf_filter(path, leaf)]
    stats = iter(_all_group_stats(chosen, per_channel))  # one program, not two eager reductions per leaf
    means, variances = [], []
    for path, leaf in leaves_with_path:
        if leaf_filter(path, leaf):
            m, v = next(stats)
            means.append(m)
            variances.append(v)
        else:
            means.append(None)
            variances.append(None)
    return Prior(
        jax.tree_util.tree_unflatten(treedef, means), jax.tree_util.tree_unflatten(treedef, variances), per_channel
    )


def _prior_leaves(prior: Optional[Prior], per_channel: bool):
    if prior is None:
        return None, None
    if prior.per_channel != per_channel:
        raise InvalidArgumentError(
            f"prior was computed with per_channel={prior.per_channel} but the estimator uses per_channel={per_channel}"
        )
    return prior.mean, prior.var


def _noisy_stats(w: Array, p: Array, per_channel: bool) -> tuple[Array, Array]:
    """``μ = mean(w̃)``, ``σ_w² = max(var(w̃) − σ², 0)`` per group."""
    m, v = group_stats(w, per_channel=per_channel)
    return m, jnp.maximum(v - p, 0.0)


# ----------------------------------------------------------------------------------
# closed-form estimators (one frozen dataclass each, called as est(noisy, noise_power, wnr_db=...))
# ----------------------------------------------------------------------------------


@struct.dataclass
class ML:
    """Maximum likelihood: ``ŵ = w̃`` (``ML()(noisy, noise_power) is noisy``)."""

    name: str = struct.field(pytree_node=False, default="ml")

    def __call__(self, noisy: PyTree, noise_power: Any = None, *, wnr_db: Any = None) -> PyTree:
        return noisy


@struct.dataclass
class MMSE:
    """Posterior mean under a Gaussian prior per group: ``ŵ = μ + σ_w²/(σ_w²+σ²)·(w̃ − μ)``.

    ``MMSE(prior=None, per_channel=False, leaf_filter=...)(noisy, noise_power)``.

    Attributes:
      prior: ``None`` estimates ``μ = mean(w̃)``, ``σ_w² = max(var(w̃) − σ², 0)`` from the
        noisy weights (no side information); a :class:`Prior` (:func:`clean_prior`)
        supplies the clean statistics.
      per_channel: statistics per output channel instead of per leaf.
      leaf_filter: which leaves to denoise.

    Example::

        >>> hat = denoise.MMSE()(noisy, noise.noise_power(params, 0.0))
    """

    prior: Optional[Prior] = None
    per_channel: bool = struct.field(pytree_node=False, default=False)
    leaf_filter: LeafFilter = struct.field(pytree_node=False, default=_noise.default_leaf_filter)
    name: str = struct.field(pytree_node=False, default="mmse")

    def __call__(self, noisy: PyTree, noise_power: Any, *, wnr_db: Any = None) -> PyTree:
        mean_tree, var_tree = _prior_leaves(self.prior, self.per_channel)

        def fn(w, p, m, v, _k):
            if m is None:
                m, v = _noisy_stats(w, p, self.per_channel)
            theta = _safe_div(v, v + p)
            theta = jnp.where(p > 0, theta, 1.0)
            return (m + theta * (w - m)).astype(w.dtype)

        return _map_groups(fn, noisy, noise_power, self.leaf_filter, mean_tree, var_tree)


def _as_float_leaf(owner: str, field: str, value: Any, check=_validate.check_real_number) -> Any:
    check(f"{owner}.{field}", value)
    if isinstance(value, (int, float, np.ndarray, np.number)):
        return jnp.asarray(value, jnp.result_type(float))
    return value


@struct.dataclass
class CompensatedMMSE:
    """The authors' compensated MMSE: ``ŵ = θ·w̃ + ρ``, ``θ = η/(η+1−λ')``, ``ρ = σ_w²·β/(η+1−λ')``.

    ``η = σ_w²/σ²`` per group, ``σ_w²`` estimated as in :class:`MMSE` (or from ``prior``).
    ``λ'=1, β=0`` gives ``θ = 1, ρ = 0`` — ML, bit for bit.  Where ``η + 1 − λ' <= 0``
    (or σ² = 0) the limit ``λ' → 1`` is used: ``θ = 1``, ``ρ = β·σ²``.  ``lam`` and
    ``beta`` are pytree leaves: a grid (:func:`compensated_grid`) is a ``vmap``.

    Example::

        >>> hat = denoise.CompensatedMMSE(lam=0.9, beta=-0.5)(noisy, pw)
    """

    lam: Array = 1.0
    beta: Array = 0.0
    prior: Optional[Prior] = None
    per_channel: bool = struct.field(pytree_node=False, default=False)
    leaf_filter: LeafFilter = struct.field(pytree_node=False, default=_noise.default_leaf_filter)
    name: str = struct.field(pytree_node=False, default="compensated")

    def __post_init__(self):
        for field in ("lam", "beta"):
            object.__setattr__(self, field, _as_float_leaf("CompensatedMMSE", field, getattr(self, field)))

    def __call__(self, noisy: PyTree, noise_power: Any, *, wnr_db: Any = None) -> PyTree:
        _, var_tree = _prior_leaves(self.prior, self.per_channel)

        def fn(w, p, v, _k):
            if v is None:
                _, v = _noisy_stats(w, p, self.per_channel)
            lam_, beta_ = jnp.asarray(self.lam, w.dtype), jnp.asarray(self.beta, w.dtype)
            eta = _safe_div(v, p)
            denom = eta + (1.0 - lam_)  # (1 - λ') first: λ' = 1 gives θ = η/η = 1 exactly
            ok = (denom > 0) & (p > 0)
            theta = jnp.where(ok, _safe_div(eta, denom), 1.0)
            rho = jnp.where(ok, _safe_div(v * beta_, denom), beta_ * p)
            return (theta * w + rho).astype(w.dtype)

        return _map_groups(fn, noisy, noise_power, self.leaf_filter, var_tree)


def global_signal_var(clean: PyTree, *, leaf_filter: LeafFilter = _noise.default_leaf_filter) -> Array:
    """The authors' signal variance: the variance of all selected clean leaves concatenated.

    ``σ_W² = mean((w − w̄)²)`` over every entry of every leaf ``leaf_filter`` selects
    (population variance; with ``N`` entries it differs from the unbiased one by
    ``1/N``, below 10⁻⁴ relative for any network with 10⁴ weights).  This is one
    number of side information (a statistic of the clean weights), the ``var_W`` of
    the authors' code; use it as ``signal_var`` of :class:`MMSEpb`.  Their noise
    power is ``noise.noise_power(clean, wnr_db, reference="power", scope="global")``.

    Example::

        >>> sv = denoise.global_signal_var(params)
        >>> pw = noise.noise_power(params, -15.0, reference="power", scope="global")
        >>> hat = denoise.MMSEpb(lam=1.2, beta=-0.5, signal_var=sv)(noisy, pw)
    """
    leaves, mask, _ = _noise._selected(clean, leaf_filter)
    chosen = [jnp.asarray(leaf) for leaf, m in zip(leaves, mask) if m]
    if not chosen:
        raise InvalidArgumentError("leaf_filter selected no leaf of clean; no signal variance to compute")
    return _signal_var(chosen)


@jax.jit
def _signal_var(leaves: list) -> Array:
    return _noise._reference_power(leaves, "variance")


@struct.dataclass
class MMSEpb:
    """The authors' compensated MMSE ("MMSE_pb") exactly as published (their NoisyNN code), on every selected leaf::

        η = σ_W²/σ²,   c = η/(η + 1 − λ'),   d = σ_W²·β/(η + 1 − λ'),   ŵ = c·w̃ + d

    Attributes:
      lam, beta: λ' and β (pytree leaves, so a grid vmaps: :func:`mmse_pb_grid`).
      signal_var: σ_W², ONE scalar for the whole model (:func:`global_signal_var` of the
        clean weights, in the authors' setting).
      leaf_filter: which leaves to denoise.

    The noise power σ² is a scalar or the per-leaf tree of :func:`noisejax.noise.noise_power`
    (``None`` leaves are skipped; the authors use one global σ²).  Applied as is for every
    (λ', β): where ``η + 1 − λ' < 0`` (λ' > 1 at low WNR; with zero-mean weights and the
    authors' power reference, below about −12 dB for λ' ≈ 1.06) ``c`` and ``d`` flip sign,
    and ``η + 1 = λ'`` divides by zero (inf/NaN), as in the published formula.
    ``λ' = 1, β = 0`` gives ``c = 1, d = 0`` (ML).

    Compared with :class:`CompensatedMMSE` (noisejax's default):

    * signal variance — :class:`CompensatedMMSE` uses ``σ_w²`` *per leaf*, estimated from
      the noisy weights (``max(var(w̃) − σ², 0)``, no side information) unless a
      :class:`Prior` is given; ``MMSEpb`` one global clean-weight variance;
    * ``η + 1 − λ' ≤ 0`` — :class:`CompensatedMMSE` falls back to the ``λ' → 1`` limit
      ``θ = 1, ρ = β·σ²``; ``MMSEpb`` keeps the formula (sign flip).

    ``CompensatedMMSE(lam=l, beta=b, prior=Prior(var=σ_W² on every selected leaf,
    mean=...))`` therefore equals ``MMSEpb`` wherever ``η + 1 − λ' > 0``
    (``tests/test_denoise.py`` checks both statements).

    Example::

        >>> hat = denoise.MMSEpb(lam=1.0, beta=-0.5, signal_var=denoise.global_signal_var(params))(noisy, pw)
    """

    lam: Array = 1.0
    beta: Array = 0.0
    signal_var: Array = 1.0
    leaf_filter: LeafFilter = struct.field(pytree_node=False, default=_noise.default_leaf_filter)
    name: str = struct.field(pytree_node=False, default="mmse_pb")

    def __post_init__(self):
        for field in ("lam", "beta", "signal_var"):
            check = _validate.check_variance if field == "signal_var" else _validate.check_real_number
            object.__setattr__(self, field, _as_float_leaf("MMSEpb", field, getattr(self, field), check))

    def __call__(self, noisy: PyTree, noise_power: Any, *, wnr_db: Any = None) -> PyTree:
        if jnp.ndim(self.signal_var) != 0:
            raise InvalidArgumentError(
                f"signal_var must be one scalar (the global clean-weight variance), got shape {jnp.shape(self.signal_var)}"
            )

        def fn(w, p, _k):
            dt = w.dtype
            sv, lam_, beta_ = (jnp.asarray(a, dt) for a in (self.signal_var, self.lam, self.beta))
            eta = sv / p
            denom = eta + (1.0 - lam_)  # (1 − λ') first: exact near λ' = 1, where (η + 1) − λ' would cancel
            return ((eta / denom) * w + sv * beta_ / denom).astype(dt)

        return _map_groups(fn, noisy, noise_power, self.leaf_filter)


def _grid_pairs(lams: Sequence[float], betas: Sequence[float], what: str) -> tuple[Array, Array]:
    """All ``(λ', β)`` pairs, λ' major: ``(lams[i // len(betas)], betas[i % len(betas)])``."""
    lam_arr = np.asarray(lams, dtype=np.float64).ravel()
    beta_arr = np.asarray(betas, dtype=np.float64).ravel()
    if lam_arr.size == 0 or beta_arr.size == 0:
        raise InvalidArgumentError(f"{what} needs at least one lam and one beta")
    _validate.check_real_number("lams", lam_arr)
    _validate.check_real_number("betas", beta_arr)
    lam_g, beta_g = np.meshgrid(lam_arr, beta_arr, indexing="ij")
    dtype = jnp.result_type(float)
    return jnp.asarray(lam_g.ravel(), dtype), jnp.asarray(beta_g.ravel(), dtype)


def mmse_pb_grid(
    lams: Sequence[float], betas: Sequence[float], signal_var: Any, *, leaf_filter: LeafFilter = _noise.default_leaf_filter
) -> MMSEpb:
    """All ``(λ', β)`` pairs as one :class:`MMSEpb` with ``(G,)`` leaves (order as :func:`compensated_grid`)."""
    lam, beta = _grid_pairs(lams, betas, "mmse_pb_grid")
    sv = jnp.broadcast_to(jnp.asarray(signal_var, lam.dtype), lam.shape)
    return MMSEpb(lam, beta, sv, leaf_filter)


def compensated_grid(
    lams: Sequence[float],
    betas: Sequence[float],
    *,
    per_channel: bool = False,
    leaf_filter: LeafFilter = _noise.default_leaf_filter,
) -> CompensatedMMSE:
    """All ``len(lams)·len(betas)`` pairs as one :class:`CompensatedMMSE` with ``(G,)`` leaves.

    Point ``i`` is ``(lams[i // len(betas)], betas[i % len(betas)])``.  ``jax.vmap`` over
    the estimator evaluates the whole grid in one call.
    """
    lam, beta = _grid_pairs(lams, betas, "compensated_grid")
    return CompensatedMMSE(lam, beta, None, per_channel, leaf_filter)


# ----------------------------------------------------------------------------------
# blind common-mode MMSE, batch-statistics re-estimation
# ----------------------------------------------------------------------------------


def _unit(u: Array) -> Array:
    return u / jnp.sqrt(jnp.maximum(jnp.sum(u * u), 1e-30))


def _common_mode_shrink(w: Array, p: Array, u: Array, exponent: Any = 1.0, gate: Optional[Array] = None) -> Array:
    """Shrink each output channel's component along ``u`` towards the layer mean.

    ``w`` is viewed as ``(F, C)``; ``c̃ = û·w̃_j``; ``ĉ_j = m + g^e·(c̃_j − m)`` with
    ``m = mean(c̃)``, ``g = max(var(c̃) − p, 0)/var(c̃)``; ``w̃_j += (ĉ_j − c̃_j)·û``
    (times ``gate`` when given: 1 or 0, see :func:`gate_learned`).
    """
    shape = w.shape
    w2 = w.reshape(-1, shape[-1])
    uu = _unit(u.astype(w2.dtype))
    c = uu @ w2
    m, v = jnp.mean(c), jnp.var(c)
    g = jnp.clip(_safe_div(v - p, v), _MIN_GAIN, 1.0)
    c_hat = m + jnp.exp(exponent * jnp.log(g)) * (c - m)
    return (w2 + uu[:, None] * _gated(c_hat - c, gate)[None, :]).reshape(shape)


def _gated(x: Array, gate: Optional[Array]) -> Array:
    """``x`` (no gate), or ``gate·x`` with no gradient to the gate: with a gate of exactly 1 or 0 the
    result is ``x`` or zeros bit for bit, and a gated-off part's coefficients get exactly zero gradients."""
    return x if gate is None else jax.lax.stop_gradient(gate).astype(x.dtype) * x


@struct.dataclass
class CommonModeMMSE:
    """Blind MMSE of every output channel's common-mode component (no side information).

    For each selected leaf with two or more dimensions, viewed as ``(F, C)`` (fan-in ×
    output channels, flax layout), the components ``c̃_j = û·w̃_j`` along a unit
    direction ``û`` (default ``1/√F``) are ``c_j + n_j`` with ``n_j ~ N(0, σ²)``.  A
    Gaussian prior across the ``C`` channels, estimated from the noisy components
    themselves, gives the posterior mean::

        ĉ_j = m + g·(c̃_j − m),   m = mean_j c̃_j,   g = max(var_j c̃_j − σ², 0)/var_j c̃_j
        ŵ_j = w̃_j + (ĉ_j − c̃_j)·û

    Components orthogonal to ``û`` and leaves with fewer than two dimensions are
    left as they are (ML).  ``directions`` (pytree leaves) — ``None`` or one entry per
    leaf of ``noisy`` (``None`` for the default direction, else an ``(F,)`` array).

    Example::

        >>> hat = denoise.CommonModeMMSE()(noisy, noise.noise_power(params, 0.0))
    """

    directions: Optional[tuple] = None
    leaf_filter: LeafFilter = struct.field(pytree_node=False, default=_noise.default_leaf_filter)
    name: str = struct.field(pytree_node=False, default="common_mode")

    def __call__(self, noisy: PyTree, noise_power: Any, *, wnr_db: Any = None) -> PyTree:
        directions = self.directions
        leaves = jax.tree_util.tree_leaves(noisy)
        if directions is not None and len(directions) != len(leaves):
            raise ShapeMismatchError(f"directions has {len(directions)} entries, the parameters have {len(leaves)} leaves")

        def fn(w, p, k):
            if w.ndim < 2:
                return w
            f_in = int(np.prod(w.shape[:-1]))
            u = directions[k] if directions is not None and directions[k] is not None else jnp.ones((f_in,), w.dtype)
            if u.shape != (f_in,):
                raise ShapeMismatchError(f"direction of leaf {k} has shape {u.shape}, expected ({f_in},)")
            return _common_mode_shrink(w, p, u).astype(w.dtype)

        return _map_groups(fn, noisy, noise_power, self.leaf_filter)


@struct.dataclass
class Recalibrated:
    """Another estimator followed by a re-estimation of the model's normalization statistics.

    ``Recalibrated(base, data, recalibrate)(noisy, σ², wnr_db=w)`` is
    ``recalibrate(base(noisy, σ², wnr_db=w), data)``, e.g. with
    ``recalibrate = functools.partial(noisejax.flax.recalibrate_batch_stats, module)``
    and ``data`` unlabeled calibration inputs: BatchNorm running statistics are
    recomputed for the *denoised* weights, so each channel is re-centred and
    re-scaled by what the noise did to it.  The noise-free scale and bias of the
    normalization are kept (and the stored running statistics are not needed).
    ``recalibrate`` is static (hashable, e.g. a ``functools.partial`` of a linen
    module); ``data`` and ``base`` are pytree nodes.
    """

    base: Any
    data: Any
    recalibrate: Callable[[PyTree, Any], PyTree] = struct.field(pytree_node=False, default=None)
    name: str = struct.field(pytree_node=False, default="recalibrated")

    def __call__(self, noisy: PyTree, noise_power: Any, *, wnr_db: Any = None) -> PyTree:
        if self.recalibrate is None:
            raise InvalidArgumentError("Recalibrated needs recalibrate= (e.g. noisejax.flax.recalibrate_batch_stats)")
        return self.recalibrate(self.base(noisy, noise_power, wnr_db=wnr_db), self.data)


# ----------------------------------------------------------------------------------
# learned denoiser
# ----------------------------------------------------------------------------------


@struct.dataclass
class LearnedDenoiser:
    """WNR-conditioned affine denoiser per group (see the module docstring).

    Attributes:
      coef: tuple with one entry per parameter leaf: ``None`` (not denoised) or a dict
        ``{"mmse_exponent": (G, 2), "log_scale": (G, 4), "shift": (G, 4)}`` (``G`` groups),
        plus ``"direction": (F,)`` and ``"target": (C,)`` for the optional projection, or
        ``"cm_direction": (F,)`` and ``"cm_exponent": (2,)`` for the blind common mode (both,
        each with a scalar ``"projection_gate"`` / ``"common_mode_gate"`` of 1 or 0, in the
        shared form of :func:`gate_learned`).
      wnr_center, wnr_half_width: static normalization ``τ = (WNR − center)/half_width``.
      per_channel, leaf_filter: static grouping and leaf choice.
      bound: static soft bound ``B`` (tanh) on ``log a`` and ``c``: ``log a = B·tanh(A·φ/B)``,
        ``c = B·tanh(C·φ/B)`` (identity near zero; keeps server-side training stable).

    ``den(noisy, noise_power, wnr_db=w)`` returns the denoised tree (``wnr_db`` is the
    nominal WNR of the noise, a scalar).
    """

    coef: tuple
    wnr_center: float = struct.field(pytree_node=False, default=0.0)
    wnr_half_width: float = struct.field(pytree_node=False, default=10.0)
    per_channel: bool = struct.field(pytree_node=False, default=False)
    leaf_filter: LeafFilter = struct.field(pytree_node=False, default=_noise.default_leaf_filter)
    name: str = struct.field(pytree_node=False, default="learned")
    bound: float = struct.field(pytree_node=False, default=4.0)

    def features(self, wnr_db: Array, nu: Array) -> Array:
        """``φ = [ν, ν·τ, ν², ν²·τ]`` with a trailing axis of 4 (``wnr_db`` broadcast to ``nu``).

        Every feature (and the MMSE-exponent term ``s·log(1 − ν)``) vanishes with the noise
        fraction ν, so the affine map tends to the identity as the WNR grows, whatever
        its coefficients; the optional projection stays (it is exact along ``u``).
        """
        tau = (jnp.asarray(wnr_db) - self.wnr_center) / self.wnr_half_width
        tau = jnp.broadcast_to(tau, nu.shape).astype(nu.dtype)
        nu2 = nu * nu
        return jnp.stack([nu, nu * tau, nu2, nu2 * tau], axis=-1)

    def __call__(self, noisy: PyTree, noise_power: Any, *, wnr_db: Any = None) -> PyTree:
        if wnr_db is None:
            raise InvalidArgumentError("LearnedDenoiser needs wnr_db= (the nominal WNR in dB of the noise)")
        leaves, treedef = jax.tree_util.tree_flatten(noisy)
        if len(self.coef) != len(leaves):
            raise ShapeMismatchError(
                f"LearnedDenoiser has {len(self.coef)} leaf entries, parameters have {len(leaves)} leaves"
            )

        tau = (jnp.asarray(wnr_db) - self.wnr_center) / self.wnr_half_width

        def fn(w, p, _k_unused, k):
            c = self.coef[k]
            if c is None:
                return w
            if "direction" in c:
                w = _project(w, c["direction"], c["target"], c.get("projection_gate"))
            if "cm_direction" in c:  # blind common-mode MMSE with a learned, WNR-conditioned exponent
                w = _common_mode_shrink(w, p, c["cm_direction"], c["cm_exponent"][0] + c["cm_exponent"][1] * tau,
                                        c.get("common_mode_gate"))
            m, v = group_stats(w, per_channel=self.per_channel)
            nu = jnp.clip(_safe_div(p, v), 0.0, 1.0)  # fraction of noise in the observed variance
            phi = self.features(wnr_db, nu.reshape(-1))  # (G, 4)
            shape = m.shape
            bound = self.bound
            expo = c["mmse_exponent"][:, 0] + c["mmse_exponent"][:, 1] * tau  # (G,)
            log_theta = jnp.log(jnp.maximum(1.0 - nu.reshape(-1), _MIN_GAIN))  # log of the MMSE gain
            log_a = expo * log_theta + bound * jnp.tanh(jnp.sum(c["log_scale"] * phi, axis=-1) / bound)
            log_a = log_a.reshape(shape)
            shift = bound * jnp.tanh(jnp.sum(c["shift"] * phi, axis=-1) / bound).reshape(shape)
            out = jnp.exp(log_a) * (w + jnp.sqrt(p) * shift)
            return out.astype(w.dtype)

        return _map_groups(fn, noisy, noise_power, self.leaf_filter, None)


def _project(w: Array, u: Array, target: Array, gate: Optional[Array] = None) -> Array:
    """Set each output channel's component along ``u`` to ``target``: ``w_j ← w_j − (w_jᵀu − t_j)·u/‖u‖²``.

    ``w`` is viewed as ``(F, C)`` (fan-in × output channels, flax layout), ``u`` is ``(F,)``
    and ``target`` ``(C,)``; the correction is multiplied by ``gate`` when given (1 or 0,
    see :func:`gate_learned`).
    """
    shape = w.shape
    w2 = w.reshape(-1, shape[-1])
    uu = u / jnp.maximum(jnp.sum(u * u), 1e-30)
    w2 = w2 - uu[:, None] * _gated(u @ w2 - target, gate)[None, :]
    return w2.reshape(shape)


def retarget(denoiser: "LearnedDenoiser", clean: PyTree) -> "LearnedDenoiser":
    """Set every projection target to the clean weights' component along its direction.

    ``target_j = u·w_j`` (clean ``w``); used during training (so the projection is exact
    along ``u`` whatever ``u`` has become) and to store the side information.
    """
    leaves = jax.tree_util.tree_leaves(clean)
    coef = []
    for c, leaf in zip(denoiser.coef, leaves):
        if c is not None and "direction" in c:
            w2 = jnp.asarray(leaf).reshape(-1, leaf.shape[-1]).astype(c["direction"].dtype)
            c = dict(c, target=c["direction"] @ jax.lax.stop_gradient(w2))
        coef.append(c)
    return denoiser.replace(coef=tuple(coef))


# the optional parts of a learned denoiser's leaf entry: gate key -> the coefficients it switches
_GATED_PARTS = {"projection_gate": ("direction", "target"), "common_mode_gate": ("cm_direction", "cm_exponent")}


def gate_learned(denoisers: Sequence["LearnedDenoiser"]) -> tuple["LearnedDenoiser", ...]:
    """The same learned denoisers in one coefficient structure: one compiled training serves them all.

    Every leaf entry of every returned denoiser has the union of the optional parts over
    ``denoisers`` (the projection's ``direction``/``target``, the blind common mode's
    ``cm_direction``/``cm_exponent``), each with a gate (``projection_gate``,
    ``common_mode_gate``): 1 where the denoiser has the part, 0 where it lacks it (the part's
    values then come from the first denoiser that has it). A gate multiplies its part's
    correction with no gradient to the gate: a gate of 0 adds exact zeros and the switched-off
    coefficients get exactly zero gradients (Adam leaves them where they are), a gate of 1
    computes the part as before, so a gated denoiser's output is the plain one's bit for bit
    (tested, eager and jit). Trained with :func:`train_learned` and mapped back with
    :func:`ungate_learned`, the variants share one structure and hence one compiled program
    (``noisy_inference``'s MLP: 11.1 s of compiling for its three variants -> 5.1 s; its
    ResNet-1D: 22.5 -> 11.8 s). The training's numbers agree with a plain training's to the
    rounding of a differently fused program (gradients within a few float32 ulps; 6 SGD steps
    within 1e-5, tested); Adam, which scales each coordinate's step by its gradient's size,
    can turn that rounding into a step of ± the learning rate for a coefficient whose gradient
    is itself rounding noise.

    Args:
      denoisers: :class:`LearnedDenoiser` s of the same parameter tree (same leaf entries,
        groups and static fields), e.g. :func:`init_learned` with ``projection=True``,
        ``common_mode=True`` and neither.

    Returns:
      one gated :class:`LearnedDenoiser` per input, in order, all with one tree structure.

    Example::

        >>> plain, proj = init_learned(params), init_learned(params, projection=True)
        >>> g_plain, g_proj = gate_learned([plain, proj])
        >>> den, _ = train_learned(g_plain, params, loss_fn, data, key=key)
        >>> den = ungate_learned(den)   # the structure of ``plain`` again
    """
    dens = list(denoisers)
    if not dens or not all(isinstance(d, LearnedDenoiser) for d in dens):
        raise InvalidArgumentError("gate_learned needs a non-empty sequence of LearnedDenoiser")
    first = dens[0]
    statics = lambda d: (len(d.coef), tuple(c is None for c in d.coef), d.wnr_center, d.wnr_half_width,  # noqa: E731
                         d.per_channel, d.leaf_filter, d.name, d.bound)
    for i, d in enumerate(dens[1:], 1):
        if statics(d) != statics(first):
            raise InvalidArgumentError(
                f"gate_learned: denoisers[{i}] differs from denoisers[0] in its leaf entries or static fields "
                "(leaf count, WNR range, per_channel, leaf_filter, name, bound); build them from the same parameters"
            )
    for i, d in enumerate(dens):
        if any(c is not None and any(g in c for g in _GATED_PARTS) for c in d.coef):
            raise InvalidArgumentError(f"gate_learned: denoisers[{i}] is already gated; ungate_learned it first")
    out = [[] for _ in dens]
    for entries in zip(*(d.coef for d in dens)):
        if entries[0] is None:
            for o in out:
                o.append(None)
            continue
        union = {}
        for part in _GATED_PARTS.values():
            src = next((e for e in entries if part[0] in e), None)
            if src is not None:
                union.update({name: src[name] for name in part})
        for o, e in zip(out, entries):
            base = {name: v for name, v in e.items() if name not in _GATED_PARTS}
            g = dict(union, **base)
            for gate, part in _GATED_PARTS.items():
                if part[0] in union:
                    g[gate] = jnp.asarray(1.0 if part[0] in e else 0.0, e["log_scale"].dtype)
            o.append(g)
    return tuple(d.replace(coef=tuple(c)) for d, c in zip(dens, out))


def ungate_learned(denoiser: "LearnedDenoiser") -> "LearnedDenoiser":
    """Drop the gates of :func:`gate_learned` and the parts they switch off (outside ``jit``).

    Example::

        >>> den = ungate_learned(gate_learned([init_learned(params)])[0])   # == init_learned(params)
    """
    coef = []
    for k, c in enumerate(denoiser.coef):
        if c is None:
            coef.append(None)
            continue
        c = dict(c)
        for gate, part in _GATED_PARTS.items():
            if gate not in c:
                continue
            value = float(np.asarray(c.pop(gate)))
            if value not in (0.0, 1.0):
                raise InvalidArgumentError(f"ungate_learned: coef[{k}][{gate!r}] must be 0 or 1, got {value}")
            if value == 0.0:
                for name in part:
                    c.pop(name, None)
        coef.append(c)
    return denoiser.replace(coef=tuple(coef))


def _n_groups(leaf: Any, per_channel: bool) -> int:
    return int(leaf.shape[-1]) if (per_channel and leaf.ndim >= 2) else 1


def init_learned(
    params: PyTree,
    *,
    wnr_range: tuple[float, float] = (-10.0, 20.0),
    per_channel: bool = False,
    leaf_filter: LeafFilter = _noise.default_leaf_filter,
    mmse_exponent: float = 0.0,
    projection: bool = False,
    common_mode: bool = False,
) -> LearnedDenoiser:
    """A :class:`LearnedDenoiser` for trees shaped like ``params``.

    All coefficients start at zero (ML) except the constant MMSE exponent
    ``s_g0 = mmse_exponent`` (``1.0`` starts at the no-side-information MMSE).  With
    ``projection=True`` leaves with two or more dimensions also get a common-mode
    projection (direction ``u = 1/√F``, targets ``u·w_j`` from ``params``, which must
    then be the *clean* parameters).  With ``common_mode=True`` they get the blind
    common-mode MMSE instead (direction ``u = 1/√F``, exponent ``1 + 0·τ``: training
    starts at :func:`common_mode`), which uses no clean number.
    """
    if projection and common_mode:
        raise InvalidArgumentError("init_learned: choose projection=True (side information) or common_mode=True (blind), not both")
    lo, hi = (float(x) for x in wnr_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise InvalidArgumentError(f"wnr_range must be (low, high) with high > low, got {wnr_range!r}")
    coef = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if leaf_filter(path, leaf):
            g = _n_groups(leaf, per_channel)
            zeros = jnp.zeros((g, _N_FEATURES), jnp.result_type(float))
            expo = jnp.zeros((g, 2), zeros.dtype).at[:, 0].set(mmse_exponent)
            entry = {"mmse_exponent": expo, "log_scale": zeros, "shift": zeros}
            if projection and leaf.ndim >= 2:
                w2 = jnp.asarray(leaf, zeros.dtype).reshape(-1, leaf.shape[-1])
                u = jnp.full((w2.shape[0],), 1.0 / math.sqrt(w2.shape[0]), zeros.dtype)
                entry["direction"] = u
                entry["target"] = u @ w2  # the clean weights' component along u (side information)
            if common_mode and leaf.ndim >= 2:
                f_in = int(np.prod(leaf.shape[:-1]))
                entry["cm_direction"] = jnp.full((f_in,), 1.0 / math.sqrt(f_in), zeros.dtype)
                entry["cm_exponent"] = jnp.array([1.0, 0.0], zeros.dtype)
            coef.append(entry)
        else:
            coef.append(None)
    return LearnedDenoiser(tuple(coef), (lo + hi) / 2, (hi - lo) / 2, per_channel, leaf_filter)


def learned_objective(
    denoiser: LearnedDenoiser,
    clean: PyTree,
    loss_fn: Callable[[PyTree, Any], Array],
    batch: Any,
    *,
    key: Array,
    n_draws: int,
    wnr_range: tuple[float, float],
    reference: str = "variance",
    scope: str = "global",
) -> Array:
    """Monte Carlo estimate of ``E_{WNR~U(range), n}[ loss_fn(denoiser(clean + n), batch) ]``.

    ``n_draws`` noise realizations (each with its own WNR drawn uniformly in
    ``wnr_range``) are evaluated side by side (``vmap``); realization ``i`` uses
    ``fold_in(key, i)``.  The noise is reparameterized (``w + σ·ε``), so the
    gradient with respect to ``denoiser`` flows through the denoised network only.
    """
    lo, hi = wnr_range

    def one(i):
        k = jax.random.fold_in(key, i)
        wnr = jax.random.uniform(jax.random.fold_in(k, 0), (), minval=lo, maxval=hi)
        pw = _noise.noise_power(clean, wnr, reference=reference, scope=scope, leaf_filter=denoiser.leaf_filter)
        noisy = _noise.add_weight_noise(
            clean, wnr, key=jax.random.fold_in(k, 1), reference=reference, scope=scope, leaf_filter=denoiser.leaf_filter
        )
        return loss_fn(denoiser(noisy, pw, wnr_db=wnr), batch)

    denoiser = retarget(denoiser, clean)  # projection targets follow their directions
    # draws vmapped, not one after the other (lax.map): inside a loop, XLA:CPU runs the convolutions'
    # kernel gradients through its naive emitter (noisejax._backend); vmapped, a ResNet-1D's training
    # step also compiles faster (the "common" variant of noisy_inference: 4.4 s -> 3.6 s)
    return jnp.mean(jax.vmap(one)(jnp.arange(n_draws)))


@struct.dataclass
class _LearnedLoss:
    """:func:`learned_objective` as an objective of :func:`noisejax.train.fit` (the clean weights are a leaf)."""

    clean: PyTree
    loss_fn: Callable = struct.field(pytree_node=False)
    n_draws: int = struct.field(pytree_node=False)
    wnr_range: tuple = struct.field(pytree_node=False)
    reference: str = struct.field(pytree_node=False, default="variance")
    scope: str = struct.field(pytree_node=False, default="global")

    def __call__(self, denoiser, batch, _labels, key):
        return learned_objective(denoiser, self.clean, self.loss_fn, batch, key=key, n_draws=self.n_draws,
                                 wnr_range=self.wnr_range, reference=self.reference, scope=self.scope)


@functools.lru_cache(maxsize=16)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    """One optax.adam object per learning rate: :func:`noisejax.train.fit` caches its compiled program by the
    optimizer object, so trainings of one structure (e.g. :func:`gate_learned` variants) compile once."""
    return optax.adam(learning_rate)


def train_learned(
    denoiser: LearnedDenoiser,
    clean: PyTree,
    loss_fn: Callable[[PyTree, Any], Array],
    data: tuple[Array, ...],
    *,
    key: Array,
    steps: int = 200,
    n_draws: int = 8,
    batch_size: int = 128,
    learning_rate: float = 0.03,
    wnr_range: Optional[tuple[float, float]] = None,
    reference: str = "variance",
    scope: str = "global",
    optimizer: Optional[optax.GradientTransformation] = None,
    progress: bool = False,
) -> tuple[LearnedDenoiser, dict]:
    """Train ``denoiser`` with optax on calibration ``data`` (never the test set), on :func:`noisejax.train.fit`.

    Each step ``t`` draws a minibatch of ``batch_size`` examples without replacement
    from ``data`` (a tuple of arrays with a common leading axis, passed to
    ``loss_fn(params, batch)``; :class:`noisejax.train.Minibatches` with
    ``replace=False``, from ``fold_in(fold_in(key, t), 0)``) and ``n_draws`` noise
    realizations with WNRs uniform in ``wnr_range`` (default: the denoiser's own
    range; from ``fold_in(fold_in(key, t), 1)``) and takes one Adam step on
    :func:`learned_objective`.

    Returns:
      ``(trained, history)`` with ``history = {"loss": [...], "seconds": s}`` (the
      per-step objective on that step's minibatch and draws; compile and run seconds).
    """
    steps = _validate.check_int("steps", steps, minimum=1)
    n_draws = _validate.check_int("n_draws", n_draws, minimum=1)
    batch_size = _validate.check_int("batch_size", batch_size, minimum=1)
    n = int(data[0].shape[0])
    if any(int(d.shape[0]) != n for d in data):
        raise ShapeMismatchError("all calibration arrays must share their leading dimension")
    if wnr_range is None:
        wnr_range = (denoiser.wnr_center - denoiser.wnr_half_width, denoiser.wnr_center + denoiser.wnr_half_width)
    objective = _LearnedLoss(clean, loss_fn, n_draws, tuple(float(w) for w in wnr_range), reference, scope)
    res = _train.fit(objective, denoiser, tuple(jnp.asarray(d) for d in data), None, key=key,
                     optimizer=optimizer if optimizer is not None else _adam(float(learning_rate)), steps=steps,
                     sampler=_train.Minibatches(min(batch_size, n), replace=False), progress=progress,
                     description="train denoiser", chunk=1)
    # chunk=1: one compiled step per dispatch. On XLA:CPU a 100-step scan of this objective (a ResNet's
    # gradient per draw) ran 40 % slower than separate steps (noisy_inference: 18.5 s -> 14.2 s in all).
    return retarget(res.params, clean), {"loss": [float(v) for v in res.losses],
                                         "seconds": res.compile_seconds + res.run_seconds}


# ----------------------------------------------------------------------------------
# lookup
# ----------------------------------------------------------------------------------

ESTIMATORS = {
    "ml": ML,
    "mmse": MMSE,
    "compensated": CompensatedMMSE,
    "mmse_pb": MMSEpb,
    "common_mode": CommonModeMMSE,
    "learned": LearnedDenoiser,
}


def estimator(name: str, **kwargs: Any):
    """Build an estimator by name: ``ml``, ``mmse``, ``mmse_side`` (needs ``prior=``),
    ``compensated`` (``lam=``, ``beta=``), ``mmse_pb`` (``lam=``, ``beta=``, ``signal_var=``), ``common_mode`` (optional ``directions=``) or
    ``learned`` (needs ``coef=``, see :func:`init_learned`).

    Example::

        >>> estimator("compensated", lam=1.0, beta=-0.5)
    """
    if name == "mmse_side":
        if kwargs.get("prior") is None:
            raise InvalidArgumentError("estimator 'mmse_side' needs prior= (see denoise.clean_prior)")
        return MMSE(name="mmse_side", **kwargs)
    if name not in ESTIMATORS:
        raise InvalidArgumentError(
            f"unknown estimator {name!r}; expected one of {', '.join(map(repr, [*ESTIMATORS, 'mmse_side']))}"
        )
    if name == "learned" and "coef" not in kwargs:
        raise InvalidArgumentError("estimator 'learned' needs coef= (build one with denoise.init_learned)")
    return ESTIMATORS[name](**kwargs)


# ----------------------------------------------------------------------------------
# deprecated function forms (one estimator form: the dataclasses above)
# ----------------------------------------------------------------------------------

_DEPRECATED = {
    "ml": lambda noisy, noise_power=None, **_: ML()(noisy, noise_power),
    "mmse": lambda noisy, noise_power, **kw: MMSE(**kw)(noisy, noise_power),
    "compensated": lambda noisy, noise_power, **kw: CompensatedMMSE(**kw)(noisy, noise_power),
    "mmse_pb": lambda noisy, noise_power, **kw: MMSEpb(**kw)(noisy, noise_power),
    "common_mode": lambda noisy, noise_power, **kw: CommonModeMMSE(**kw)(noisy, noise_power),
}
_CLASSES = {"ml": "ML", "mmse": "MMSE", "compensated": "CompensatedMMSE", "mmse_pb": "MMSEpb",
            "common_mode": "CommonModeMMSE"}


def __getattr__(name: str):
    if name in _DEPRECATED:
        import warnings

        warnings.warn(f"denoise.{name}(noisy, noise_power, **kw) is deprecated: use denoise.{_CLASSES[name]}(**kw)(noisy, "
                      "noise_power)", DeprecationWarning, stacklevel=2)
        return _DEPRECATED[name]
    raise AttributeError(f"module 'noisejax.denoise' has no attribute {name!r}")
