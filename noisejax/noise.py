"""Noise models: noisy neurons and noisy weights.

Two families, each a frozen dataclass pytree whose *intensities are array leaves*
(so a sweep over intensities is a :func:`jax.vmap`) and whose structural options
are static fields:

* :class:`NeuronNoise` — the four Gaussian neuron-noise types of Semenova, Larger &
  Brunner (2022)::

      y  ->  y · (1 + ξ_MU + ξ_MC) + ξ_AU + ξ_AC

  with variances ``mul_uncorrelated`` (D_MU), ``mul_correlated`` (D_MC),
  ``add_uncorrelated`` (D_AU), ``add_correlated`` (D_AC).  "Uncorrelated" draws are
  independent per neuron; "correlated" draws are one value shared over
  ``correlated_axes`` of the layer (default: all feature axes), for each
  realization and each input.  A variance left as ``None`` is *statically* zero:
  no random numbers are drawn for it.

* Weight perturbations applied to any parameter pytree (Shao, Liew & Gündüz 2023):
  :class:`AdditiveWeightNoise` (``w̃ = w + n`` at a WNR in dB),
  :class:`MultiplicativeWeightNoise` (device variation ``w̃ = w·(1 + ε)``) and
  :class:`Quantization` (uniform, b bits).  A *leaf filter* chooses the leaves; the
  default skips normalization parameters, running statistics, buffers and non-floating
  leaves, in Flax trees and in PyTorch flat ``state_dict`` names alike
  (:func:`default_leaf_filter`; :func:`state_dict_leaf_filter` also looks at a module's
  contents); :func:`selected_leaves` lists what a filter picks.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from noisejax import noise
    >>> nn = noise.NeuronNoise(add_uncorrelated=1e-2, mul_correlated=1e-3)
    >>> y = jnp.ones(5)
    >>> noise.apply_neuron_noise(y, nn, key=jax.random.key(0)).shape
    (5,)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from noisejax import _struct as struct

from noisejax import _validate
from noisejax.errors import InvalidArgumentError

__all__ = [
    "NeuronNoise",
    "apply_neuron_noise",
    "LeafFilter",
    "default_leaf_filter",
    "state_dict_leaf_filter",
    "selected_leaves",
    "LeafSelection",
    "path_names",
    "wnr_to_noise_power",
    "noise_power",
    "AdditiveWeightNoise",
    "MultiplicativeWeightNoise",
    "Quantization",
    "add_weight_noise",
    "measured_wnr_db",
    "LocalWeightNoise",
]

Array = jax.Array
PyTree = Any
LeafFilter = Callable[[tuple, Any], bool]

# Fold-in tags of the four neuron noise types: each type's draws do not depend on
# which other types are present.
_TAG_MU, _TAG_MC, _TAG_AU, _TAG_AC = 0, 1, 2, 3


def _as_leaf(value: Any) -> Any:
    """Turn concrete Python / NumPy numbers into float arrays; leave arrays and tracers alone."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, np.ndarray, np.number)):
        return jax.device_put(np.asarray(value, dtype=jnp.result_type(float)))  # no conversion program to compile
    return value  # jax arrays, tracers, and placeholders jax puts in pytrees (ArgInfo, sentinels)


@struct.dataclass
class NeuronNoise:
    """Variances of the four neuron noise types; ``None`` means statically zero.

    Attributes:
      add_uncorrelated: D_AU, additive noise independent per neuron.
      add_correlated: D_AC, additive noise shared by the neurons of a layer.
      mul_uncorrelated: D_MU, multiplicative noise independent per neuron.
      mul_correlated: D_MC, multiplicative noise shared by the neurons of a layer.
      correlated_axes: static; axes of one example's feature array over which a
        correlated draw is shared (``None``: all of them; e.g. ``(0, 1)`` for an
        ``(H, W, C)`` feature map shares over space and draws per channel).

    Each variance may be a scalar or an array broadcastable to the layer's
    features (per-neuron intensities).  Concrete values are validated here
    (finite, >= 0); traced values pass through so the dataclass works under
    ``jit``/``vmap``.

    Example::

        >>> sweep = NeuronNoise(add_uncorrelated=jnp.logspace(-4, -1, 8))
        >>> # jax.vmap(lambda nz: simulate_fn(nz))(sweep) runs all eight intensities.
    """

    add_uncorrelated: Optional[Array] = None
    add_correlated: Optional[Array] = None
    mul_uncorrelated: Optional[Array] = None
    mul_correlated: Optional[Array] = None
    correlated_axes: Optional[tuple[int, ...]] = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        for name in ("add_uncorrelated", "add_correlated", "mul_uncorrelated", "mul_correlated"):
            value = getattr(self, name)
            _validate.check_variance(f"NeuronNoise.{name}", value)
            object.__setattr__(self, name, _as_leaf(value))
        if self.correlated_axes is not None:
            axes = self.correlated_axes
            if isinstance(axes, int):
                axes = (axes,)
            if not all(isinstance(a, int) for a in axes):
                raise InvalidArgumentError(f"NeuronNoise.correlated_axes must be a tuple of ints, got {axes!r}")
            object.__setattr__(self, "correlated_axes", tuple(axes))

    @property
    def is_zero(self) -> bool:
        """True when every variance is statically zero (``None``)."""
        return all(
            v is None for v in (self.add_uncorrelated, self.add_correlated, self.mul_uncorrelated, self.mul_correlated)
        )

    def correlated_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one correlated draw for a feature array of ``shape``."""
        ndim = len(shape)
        if self.correlated_axes is None:
            return (1,) * ndim
        axes = {a % ndim if ndim else 0 for a in self.correlated_axes}
        if any(a >= ndim or a < -ndim for a in self.correlated_axes):
            raise InvalidArgumentError(
                f"NeuronNoise.correlated_axes {self.correlated_axes} out of range for features of shape {tuple(shape)}"
            )
        return tuple(1 if i in axes else s for i, s in enumerate(shape))


def _normal(key: Array, shape: tuple[int, ...], dtype) -> Array:
    from noisejax import rng

    return rng.normal(key, shape, dtype)


def apply_neuron_noise(y: Array, noise: Optional[NeuronNoise], *, key: Array, sampler=_normal) -> Array:
    """Apply neuron noise to the output ``y`` of one layer for one example.

    ``y · (1 + √D_MU ξ₁ + √D_MC ξ₂) + √D_AU ξ₃ + √D_AC ξ₄`` with standard normal
    ξ₁, ξ₃ of ``y.shape`` and ξ₂, ξ₄ of ``noise.correlated_shape(y.shape)``.

    Args:
      y: feature array of one example, any shape (batch via ``vmap``).
      noise: the variances; ``None`` or all-``None`` returns ``y`` unchanged.
      key: PRNG key of this site, realization and example.
      sampler: ``sampler(key, shape, dtype)`` returning standard normals.

    Returns:
      The noisy array, same shape and dtype as ``y``.
    """
    if noise is None or noise.is_zero:
        return y
    dtype = y.dtype
    corr_shape = noise.correlated_shape(y.shape)

    def draw(tag, variance, shape):
        std = jnp.sqrt(jnp.asarray(variance, dtype))
        return std * sampler(jax.random.fold_in(key, tag), shape, dtype)

    out = y
    if noise.mul_uncorrelated is not None or noise.mul_correlated is not None:
        factor = jnp.ones((), dtype)
        if noise.mul_uncorrelated is not None:
            factor = factor + draw(_TAG_MU, noise.mul_uncorrelated, y.shape)
        if noise.mul_correlated is not None:
            factor = factor + draw(_TAG_MC, noise.mul_correlated, corr_shape)
        out = out * factor
    if noise.add_uncorrelated is not None:
        out = out + draw(_TAG_AU, noise.add_uncorrelated, y.shape)
    if noise.add_correlated is not None:
        out = out + draw(_TAG_AC, noise.add_correlated, corr_shape)
    return out


# ----------------------------------------------------------------------------------
# Parameter pytrees: leaf filters
# ----------------------------------------------------------------------------------

# A leaf's *tokens* are the names on its key path, each split at "." — so Flax nested names
# (("params", "BatchNorm_0", "scale")) and PyTorch flat state_dict keys ("layer1.0.bn1.weight")
# are read the same way.
#: a token naming a normalization layer: anything with "norm" (BatchNorm_0, LayerNorm, norm1,
#: layer_norm, GroupNorm), bn / bn1 / bn_x, ln / ln_1 / ln_f (GPT-2), batch_stats (Flax)
_NORM_RE = re.compile(r"norm|^(bn|ln)(\d+|_.*)?$|^batch_stats$", re.IGNORECASE)
#: last tokens of PyTorch buffers that are never weights
_BUFFER_NAMES = frozenset({"running_mean", "running_var", "num_batches_tracked", "position_ids", "token_type_ids",
                           "masked_bias"})
#: containers whose Sequential index 1 is a BatchNorm by convention: the (Conv, BatchNorm) pair of
#: torchvision ResNet's ``downsample`` and of the CIFAR ResNets' ``shortcut`` (e.g. kuangliu/pytorch-cifar)
_CONV_BN_CONTAINERS = frozenset({"downsample", "shortcut"})


def path_names(path: tuple) -> tuple[str, ...]:
    """Readable names of a ``tree_flatten_with_path`` key path."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return tuple(names)


def _tokens(path: tuple) -> tuple[str, ...]:
    return tuple(tok for name in path_names(path) for tok in name.split(".") if tok)


def _skip_reason(path: tuple, leaf: Any) -> Optional[str]:
    """Why :func:`default_leaf_filter` skips a leaf (``None``: it is perturbed)."""
    if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return "not floating point"
    tokens = _tokens(path)
    norm = next((t for t in tokens if _NORM_RE.search(t)), None)
    if norm is not None:
        return f"normalization ({norm})"
    if tokens and tokens[-1] in _BUFFER_NAMES:
        return f"buffer ({tokens[-1]})"
    for prev, tok in zip(tokens, tokens[1:]):
        if tok == "1" and prev in _CONV_BN_CONTAINERS:
            return f"BatchNorm of a Conv-BN pair ({prev}.1)"
    return None


def default_leaf_filter(path: tuple, leaf: Any) -> bool:
    """Perturb floating-point leaves except normalization parameters, statistics and buffers.

    The names on a leaf's key path are split at ``"."`` into tokens, so nested Flax
    trees and flat PyTorch ``state_dict`` keys are read alike.  A leaf is skipped when

    * a token names a normalization layer: it contains ``norm`` (``BatchNorm_0``,
      ``LayerNorm``, ``norm1``, ``layer_norm``, ``GroupNorm``...), or is ``bn``/``bn1``/``bn_*``,
      ``ln``/``ln_1``/``ln_f`` or ``batch_stats``;
    * its last token is a buffer: ``running_mean``, ``running_var``, ``num_batches_tracked``,
      ``position_ids``, ``token_type_ids``, ``masked_bias``;
    * it sits at index ``1`` of a ``downsample`` or ``shortcut`` container — the
      ``Sequential(Conv, BatchNorm)`` of torchvision's ResNet (``layer2.0.downsample.1.weight``)
      and of the CIFAR ResNets (``layer2.0.shortcut.1.weight``);
    * it is not floating point.

    Limits: names alone cannot tell a BatchNorm inside another ``Sequential`` (VGG-BN's
    ``features.1.weight``) or a normalization layer under a name without ``norm``/``bn``/``ln``;
    :func:`state_dict_leaf_filter` looks at the whole tree (sibling ``running_mean``, 1-D
    ``weight``) and catches both.  Check with :func:`selected_leaves`.
    """
    return _skip_reason(path, leaf) is None


@dataclasses.dataclass(frozen=True)
class _ModuleFilter:
    """``base`` plus: skip every leaf of the modules in ``skip`` (hashable: usable as a static field)."""

    base: Callable = default_leaf_filter
    skip: frozenset = frozenset()

    def __call__(self, path: tuple, leaf: Any) -> bool:
        tokens = _tokens(path)
        return bool(self.base(path, leaf)) and ".".join(tokens[:-1]) not in self.skip

    def reason(self, path: tuple) -> Optional[str]:
        module = ".".join(_tokens(path)[:-1])
        return f"normalization module {module} (running statistics or a 1-D weight)" if module in self.skip else None


def state_dict_leaf_filter(params: PyTree, base: LeafFilter = default_leaf_filter) -> LeafFilter:
    """A leaf filter for ``params`` that also recognizes normalization modules by their *contents*.

    Besides what ``base`` skips, every leaf of a module (its key path without the last
    token) is skipped when that module has a ``running_mean`` or ``running_var`` leaf (a
    BatchNorm, whatever its name or index, e.g. VGG-BN's ``features.1``) or a 1-D
    ``weight`` leaf (a LayerNorm / GroupNorm / BatchNorm affine scale: PyTorch's Linear,
    Conv and Embedding weights have two or more dimensions).  The result is hashable.

    Example::

        >>> filt = noise.state_dict_leaf_filter(state_dict)
        >>> noisy = noise.add_weight_noise(state_dict, 10.0, key=key, leaf_filter=filt)
    """
    skip = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        tokens = _tokens(path)
        if not tokens:
            continue
        module, last = ".".join(tokens[:-1]), tokens[-1]
        if last in ("running_mean", "running_var") or (last == "weight" and np.ndim(leaf) == 1):
            skip.add(module)
    return _ModuleFilter(base, frozenset(skip))


class LeafSelection(NamedTuple):
    """One row of :func:`selected_leaves`."""

    name: str
    shape: tuple
    dtype: str
    selected: bool
    reason: str  # why it is skipped ("" when selected)


def selected_leaves(params: PyTree, leaf_filter: LeafFilter = default_leaf_filter) -> tuple[LeafSelection, ...]:
    """Every leaf of ``params`` with whether weight noise (``leaf_filter``) will perturb it, and why not.

    Names are ``jax.tree_util.keystr``-like paths joined with ``/`` (a flat PyTorch key
    stays as it is).  Run it before a study to see what the filter chose.

    Example::

        >>> for row in noise.selected_leaves({"conv1.weight": w, "bn1.weight": g, "bn1.running_mean": m}):
        ...     print(row.name, row.selected, row.reason or "-")
        bn1.running_mean False normalization (bn1)
        bn1.weight False normalization (bn1)
        conv1.weight True -
    """
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        sel = bool(leaf_filter(path, leaf))
        reason = ""
        if not sel:
            if isinstance(leaf_filter, _ModuleFilter):
                reason = _skip_reason(path, leaf) or leaf_filter.reason(path) or "leaf_filter"
            elif leaf_filter is default_leaf_filter:
                reason = _skip_reason(path, leaf) or ""
            else:
                reason = "leaf_filter"
        dtype = str(getattr(leaf, "dtype", type(leaf).__name__))
        rows.append(LeafSelection("/".join(path_names(path)), tuple(np.shape(leaf)), dtype, sel, reason))
    return tuple(rows)


def _map_selected(params: PyTree, leaf_filter: LeafFilter, f: Callable[[int, Any], Any]) -> PyTree:
    """Replace every selected leaf by ``f(k, leaf)`` (``k``: its flattening index)."""
    leaves, mask, treedef = _selected(params, leaf_filter)
    out = [f(k, leaf) if m else leaf for k, (leaf, m) in enumerate(zip(leaves, mask))]
    return jax.tree_util.tree_unflatten(treedef, out)


def _selected(params: PyTree, leaf_filter: LeafFilter):
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    mask = [bool(leaf_filter(path, leaf)) for path, leaf in leaves_with_path]
    leaves = [leaf for _, leaf in leaves_with_path]
    return leaves, mask, treedef


# ----------------------------------------------------------------------------------
# Additive weight noise at a WNR
# ----------------------------------------------------------------------------------

_REFERENCES = ("variance", "power")
_SCOPES = ("global", "per_layer")


def wnr_to_noise_power(reference_power: Array, wnr_db: Array) -> Array:
    """``σ_n² = P_ref / 10^(WNR/10)``."""
    return reference_power / (10.0 ** (jnp.asarray(wnr_db) / 10.0))


def _reference_power(leaves: list, reference: str) -> Array:
    """Variance or mean square of the concatenation of ``leaves``."""
    n = sum(leaf.size for leaf in leaves)
    if reference == "power":
        return sum(jnp.sum(jnp.square(leaf)) for leaf in leaves) / n
    mean = sum(jnp.sum(leaf) for leaf in leaves) / n
    return sum(jnp.sum(jnp.square(leaf - mean)) for leaf in leaves) / n


def noise_power(
    params: PyTree,
    wnr_db: Array,
    *,
    reference: str = "variance",
    scope: str = "global",
    leaf_filter: LeafFilter = default_leaf_filter,
) -> PyTree:
    """Noise power σ_n² per leaf for a WNR in dB (``None`` for unselected leaves).

    ``reference='variance'`` uses the weights' variance (the paper's WNR);
    ``'power'`` their mean square (the authors' code).  ``scope='global'`` pools all
    selected leaves into one reference (one σ_n² for the whole model);
    ``'per_layer'`` uses each leaf's own statistics.
    """
    _validate.check_choice("reference", reference, _REFERENCES)
    _validate.check_choice("scope", scope, _SCOPES)
    _validate.check_real_number("wnr_db", wnr_db)
    leaves, mask, treedef = _selected(params, leaf_filter)
    chosen = [leaf for leaf, m in zip(leaves, mask) if m]
    if not chosen:
        raise InvalidArgumentError("leaf_filter selected no leaf of params; nothing to perturb")
    if scope == "global":
        p = wnr_to_noise_power(_reference_power(chosen, reference), wnr_db)
        powers = [p if m else None for m in mask]
    else:
        powers = [wnr_to_noise_power(_reference_power([leaf], reference), wnr_db) if m else None for leaf, m in zip(leaves, mask)]
    return jax.tree_util.tree_unflatten(treedef, powers)


def add_weight_noise(
    params: PyTree,
    wnr_db: Array,
    *,
    key: Array,
    reference: str = "variance",
    scope: str = "global",
    leaf_filter: LeafFilter = default_leaf_filter,
) -> PyTree:
    """``w̃ = w + n``, ``n ~ N(0, σ_n²)`` i.i.d. with σ_n² from :func:`noise_power`.

    Leaf ``k`` (in flattening order) draws with ``fold_in(key, k)``, so selecting a
    different set of leaves does not change the draws of the others.

    Example::

        >>> noisy = add_weight_noise(params, 10.0, key=jax.random.key(1))
    """
    powers = noise_power(params, wnr_db, reference=reference, scope=scope, leaf_filter=leaf_filter)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    power_leaves = treedef.flatten_up_to(powers)
    out = []
    for k, (leaf, p) in enumerate(zip(leaves, power_leaves)):
        if p is None:
            out.append(leaf)
        else:
            n = _normal(jax.random.fold_in(key, k), leaf.shape, leaf.dtype)
            out.append(leaf + jnp.sqrt(p).astype(leaf.dtype) * n)
    return jax.tree_util.tree_unflatten(treedef, out)


def measured_wnr_db(
    clean: PyTree,
    noisy: PyTree,
    *,
    reference: str = "variance",
    leaf_filter: LeafFilter = default_leaf_filter,
) -> Array:
    """Global WNR in dB actually realized between ``clean`` and ``noisy`` (diagnostics)."""
    leaves, mask, _ = _selected(clean, leaf_filter)
    noisy_leaves = jax.tree_util.tree_leaves(noisy)
    chosen = [leaf for leaf, m in zip(leaves, mask) if m]
    diffs = [nl - leaf for nl, leaf, m in zip(noisy_leaves, leaves, mask) if m]
    n = sum(d.size for d in diffs)
    noise_pow = sum(jnp.sum(jnp.square(d)) for d in diffs) / n
    return 10.0 * jnp.log10(_reference_power(chosen, reference) / noise_pow)


@struct.dataclass
class AdditiveWeightNoise:
    """Additive Gaussian weight noise at ``wnr_db`` (a leaf, so WNR sweeps vmap).

    ``reference`` ('variance' | 'power'), ``scope`` ('global' | 'per_layer') and
    ``leaf_filter`` are static.  ``AdditiveWeightNoise(10.).apply(params, key=k)``.
    """

    wnr_db: Array
    reference: str = struct.field(pytree_node=False, default="variance")
    scope: str = struct.field(pytree_node=False, default="global")
    leaf_filter: LeafFilter = struct.field(pytree_node=False, default=default_leaf_filter)

    def __post_init__(self):
        _validate.check_real_number("AdditiveWeightNoise.wnr_db", self.wnr_db)
        if isinstance(self.reference, str):
            _validate.check_choice("reference", self.reference, _REFERENCES)
        if isinstance(self.scope, str):
            _validate.check_choice("scope", self.scope, _SCOPES)
        object.__setattr__(self, "wnr_db", _as_leaf(self.wnr_db))

    def apply(self, params: PyTree, *, key: Array) -> PyTree:
        return add_weight_noise(
            params, self.wnr_db, key=key, reference=self.reference, scope=self.scope, leaf_filter=self.leaf_filter
        )

    def power(self, params: PyTree) -> PyTree:
        """σ_n² per leaf (``None`` where the filter skips)."""
        return noise_power(params, self.wnr_db, reference=self.reference, scope=self.scope, leaf_filter=self.leaf_filter)


@struct.dataclass
class MultiplicativeWeightNoise:
    """Device-variation noise ``w̃ = w · (1 + ε)``, ``ε ~ N(0, variance)`` i.i.d."""

    variance: Array
    leaf_filter: LeafFilter = struct.field(pytree_node=False, default=default_leaf_filter)

    def __post_init__(self):
        _validate.check_variance("MultiplicativeWeightNoise.variance", self.variance)
        object.__setattr__(self, "variance", _as_leaf(self.variance))

    def apply(self, params: PyTree, *, key: Array) -> PyTree:
        def perturb(k, leaf):
            eps = _normal(jax.random.fold_in(key, k), leaf.shape, leaf.dtype)
            return leaf * (1 + jnp.sqrt(self.variance).astype(leaf.dtype) * eps)

        return _map_selected(params, self.leaf_filter, perturb)


@struct.dataclass
class Quantization:
    """Uniform symmetric quantization of each selected leaf to ``bits`` bits.

    Levels ``{-L..L}·Δ`` with ``L = 2^(bits-1) - 1`` and ``Δ = max|w| / L`` per leaf
    (``bits >= 2``).  With ``stochastic=True`` rounding is unbiased (up or down with
    probability given by the remainder) and needs a key; otherwise deterministic
    round-to-nearest and ``key`` is ignored.
    """

    bits: int = struct.field(pytree_node=False, default=8)
    stochastic: bool = struct.field(pytree_node=False, default=False)
    leaf_filter: LeafFilter = struct.field(pytree_node=False, default=default_leaf_filter)

    def __post_init__(self):
        if isinstance(self.bits, (int,)) and not isinstance(self.bits, bool):
            _validate.check_int("Quantization.bits", self.bits, minimum=2)
        elif not isinstance(self.bits, bool):
            raise InvalidArgumentError(f"Quantization.bits must be an integer >= 2, got {self.bits!r}")

    def apply(self, params: PyTree, *, key: Optional[Array] = None) -> PyTree:
        if self.stochastic and key is None:
            raise InvalidArgumentError("Quantization(stochastic=True).apply needs key=")
        levels = 2 ** (self.bits - 1) - 1

        def quantize(k, leaf):
            step = jnp.max(jnp.abs(leaf)) / levels
            step = jnp.where(step > 0, step, 1.0)
            scaled = leaf / step
            if self.stochastic:
                q = jnp.floor(scaled + jax.random.uniform(jax.random.fold_in(key, k), leaf.shape, leaf.dtype))
            else:
                q = jnp.round(scaled)
            return (jnp.clip(q, -levels, levels) * step).astype(leaf.dtype)

        return _map_selected(params, self.leaf_filter, quantize)

@struct.dataclass
class LocalWeightNoise:
    """Additive Gaussian weight noise of one Dense layer, sampled on the pre-activation.

    ``variance`` is σ_n² of every weight and bias of the layer (a scalar, or an array
    broadcastable to ``W``'s shape for per-weight variances; ``bias_variance``
    defaults to ``variance``).  Used by :func:`noisejax.layers.WeightNoiseDense`:
    for one example ``y``, ``z = y W̃ + b̃`` is drawn directly as
    ``N(y W + b, (y∘y) σ_W² + σ_b²)`` — the local reparameterization, exact in
    distribution per example (layer by layer, given the sampled input) when every
    weight is used once per example — instead of drawing ``W̃``.
    """

    variance: Array
    bias_variance: Optional[Array] = None

    def __post_init__(self):
        _validate.check_variance("LocalWeightNoise.variance", self.variance)
        _validate.check_variance("LocalWeightNoise.bias_variance", self.bias_variance)
        object.__setattr__(self, "variance", _as_leaf(self.variance))
        object.__setattr__(self, "bias_variance", _as_leaf(self.bias_variance))
