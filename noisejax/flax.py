"""Flax interop: neuron noise in *unmodified* Flax models, weight noise in Flax parameters.

Neuron noise (``y → y·(1 + ξ_MU + ξ_MC) + ξ_AU + ξ_AC``, see
:func:`noisejax.noise.apply_neuron_noise`) is added to the **output** of every call
of the chosen module types — the model's code is not touched:

* Linen — through :func:`flax.linen.intercept_methods`: :func:`noisy_linen` (a
  context manager around ``model.apply``), :func:`apply_with_neuron_noise` (one
  call) or :func:`neuron_noise_interceptor` (the bare interceptor).
* NNX — :func:`noisy_nnx` temporarily gives the chosen sub-module *instances* (not
  their classes) a noisy ``__call__``; :func:`call_with_neuron_noise_nnx` is the
  one-call form.  The model and its state are restored on exit.

Noise goes on the intercepted module's output: to put it after an activation,
intercept a module that computes the activation (interception cannot reach a
bare ``jax.nn.sigmoid`` between modules).

**Keys.** Call ``c`` (0, 1, ... in trace order) of the method ``m`` of the module at
path ``p`` draws for floating output leaf ``l`` with
``fold_in(key, crc32(f"{p}:{m}:{c}:{l}") & 0x7fffffff)``, then ``fold_in(·, b)`` for
flattened example ``b`` (as :func:`noisejax.layers.apply_batch`).  Draws are deterministic, distinct per call site, do not
depend on which other sites are noisy, and work under ``jit``/``vmap`` (e.g.
``jax.vmap`` over keys for Monte Carlo).

**Examples.** The leading ``batch_axes`` (default 1) axes of an output are
examples; the rest are features.  Correlated draws are shared over the features
of each example (or over ``NeuronNoise.correlated_axes`` of them), uncorrelated
draws are independent per element — the per-example convention of
:func:`noisejax.layers.apply_batch`.

Normalization statistics: :func:`recalibrate_batch_stats` recomputes every linen
``BatchNorm``'s running mean and variance on calibration inputs for the weights at
hand (e.g. noisy or denoised ones), keeping its noise-free scale and bias.

Weight noise: :func:`add_weight_noise_linen` / :func:`perturb_weights_linen`
perturb ``variables["params"]`` and leave other collections (``batch_stats``...)
untouched; :func:`add_weight_noise_nnx` / :func:`perturb_weights_nnx` return a
perturbed copy of an NNX model (``nnx.split``/``nnx.merge`` over ``nnx.Param``).

Example::

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from noisejax import noise, flax as njf
    >>> model = nn.Sequential([nn.Dense(8), nn.sigmoid, nn.Dense(2)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((5, 3)))
    >>> nz = noise.NeuronNoise(add_uncorrelated=1e-2)
    >>> y = njf.apply_with_neuron_noise(model, variables, jnp.ones((5, 3)), noise=nz, key=jax.random.key(1))
    >>> with njf.noisy_linen(nz, key=jax.random.key(1)) as sites:
    ...     y2 = model.apply(variables, jnp.ones((5, 3)))
    >>> [s.path for s in sites]
    ['layers_0', 'layers_2']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from noisejax import _validate
from noisejax import noise as _noise
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.noise import NeuronNoise

__all__ = [
    "Site",
    "neuron_noise_interceptor",
    "noisy_linen",
    "apply_with_neuron_noise",
    "noisy_nnx",
    "call_with_neuron_noise_nnx",
    "add_weight_noise_linen",
    "perturb_weights_linen",
    "add_weight_noise_nnx",
    "perturb_weights_nnx",
    "recalibrate_batch_stats",
]

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Site:
    """One intercepted call: module path (``"/"``-joined, ``""`` for the root), method
    name, call index (0, 1, ... per path and method, in trace order) and the module."""

    path: str
    method: str
    call: int
    module: Any = dataclasses.field(repr=False, compare=False)


NoiseSpec = Union[NeuronNoise, Callable[[Site], Optional[NeuronNoise]]]


# ----------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------


def _check_key(key: Any) -> None:
    if isinstance(key, jax.core.Tracer):
        return
    if not isinstance(key, jax.Array):
        raise InvalidArgumentError(f"key must be a JAX PRNG key (jax.random.key(seed)), got {type(key).__name__}")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise InvalidArgumentError(f"key must be a single PRNG key, got a key array of shape {key.shape}")
    elif not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise InvalidArgumentError(f"key must be a JAX PRNG key, got an array of dtype {key.dtype} and shape {key.shape}")


def _check_common(noise: Any, key: Any, module_types: Any, methods: Any, batch_axes: Any, base: type) -> tuple:
    if not (isinstance(noise, NeuronNoise) or callable(noise)):
        raise InvalidArgumentError(
            f"noise must be a noisejax.noise.NeuronNoise or a callable Site -> NeuronNoise | None, got {type(noise).__name__}"
        )
    _check_key(key)
    if isinstance(module_types, type):
        module_types = (module_types,)
    module_types = tuple(module_types)
    if not module_types or not all(isinstance(t, type) and issubclass(t, base) for t in module_types):
        raise InvalidArgumentError(f"module_types must be a non-empty tuple of {base.__module__}.{base.__name__} subclasses, got {module_types!r}")
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    if not methods or not all(isinstance(m, str) for m in methods):
        raise InvalidArgumentError(f"methods must be a non-empty tuple of method names, got {methods!r}")
    batch_axes = _validate.check_int("batch_axes", batch_axes, minimum=0)
    return module_types, methods, batch_axes


def _site_hash(path: str, method: str, call: int, leaf: int) -> int:
    """31-bit CRC of the site's name: one ``fold_in`` (one threefry block to compile) per site."""
    return zlib.crc32(f"{path}:{method}:{call}:{leaf}".encode()) & 0x7FFFFFFF


def _noisy_leaf(y: Array, noise: NeuronNoise, key: Array, batch_axes: int, site: Site) -> Array:
    if y.ndim < batch_axes:
        raise ShapeMismatchError(
            f"output of {site.path or '<root>'}.{site.method} has shape {y.shape}, fewer than batch_axes={batch_axes} axes"
        )
    features = y.shape[batch_axes:]
    flat = y.reshape((-1, *features))
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(flat.shape[0], dtype=jnp.uint32))
    out = jax.vmap(lambda yb, kb: _noise.apply_neuron_noise(yb, noise, key=kb))(flat, keys)
    return out.reshape(y.shape)


class _Injector:
    """Trace-time state of one noisy context: call counters and the list of sites."""

    def __init__(self, noise: NoiseSpec, key: Array, batch_axes: int):
        self.noise, self.key, self.batch_axes = noise, key, batch_axes
        self.counts: dict[tuple[str, str], int] = {}
        self.sites: list[Site] = []

    def __call__(self, path: str, method: str, module: Any, out: Any) -> Any:
        call = self.counts.get((path, method), 0)
        self.counts[(path, method)] = call + 1
        site = Site(path, method, call, module)
        nz = self.noise if isinstance(self.noise, NeuronNoise) else self.noise(site)
        if nz is None:
            return out
        if not isinstance(nz, NeuronNoise):
            raise InvalidArgumentError(f"noise callable must return a NeuronNoise or None for site {path!r}, got {type(nz).__name__}")
        self.sites.append(site)
        if nz.is_zero:
            return out
        leaves, treedef = jax.tree_util.tree_flatten(out)
        noisy = [
            _noisy_leaf(leaf, nz, jax.random.fold_in(self.key, _site_hash(path, method, call, i)), self.batch_axes, site)
            if isinstance(leaf, (jax.Array, jax.core.Tracer)) and jnp.issubdtype(leaf.dtype, jnp.inexact)
            else leaf
            for i, leaf in enumerate(leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, noisy)


# ----------------------------------------------------------------------------------
# Linen
# ----------------------------------------------------------------------------------


def _linen_interceptor(injector: _Injector, module_types: tuple, methods: tuple) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name not in methods or not isinstance(context.module, module_types):
            return out
        path = "/".join(str(p) for p in context.module.path)
        return injector(path, context.method_name, context.module, out)

    return interceptor


def neuron_noise_interceptor(
    noise: NoiseSpec,
    *,
    key: Array,
    module_types: Sequence[type] = (nn.Dense,),
    methods: Sequence[str] = ("__call__",),
    batch_axes: int = 1,
    sites: Optional[list] = None,
) -> Callable:
    """A :func:`flax.linen.intercept_methods` interceptor adding neuron noise.

    Every call of a method in ``methods`` of a module that is an instance of one of
    ``module_types`` has its output ``y`` (each floating leaf, shape
    ``(*batch, *features)`` with ``len(batch) == batch_axes``) replaced by
    ``y·(1+ξ_MU+ξ_MC) + ξ_AU + ξ_AC`` with the variances of ``noise`` — or of
    ``noise(site)`` when ``noise`` is a callable (return ``None`` to skip a site).
    Intercepted sites are appended to ``sites`` (a list) when given.

    Build a fresh interceptor for each traced ``apply``: call counters live in it.
    """
    module_types, methods, batch_axes = _check_common(noise, key, module_types, methods, batch_axes, nn.Module)
    injector = _Injector(noise, key, batch_axes)
    if sites is not None:
        injector.sites = sites
    return _linen_interceptor(injector, module_types, methods)


@contextlib.contextmanager
def noisy_linen(
    noise: NoiseSpec,
    *,
    key: Array,
    module_types: Sequence[type] = (nn.Dense,),
    methods: Sequence[str] = ("__call__",),
    batch_axes: int = 1,
) -> Iterator[list[Site]]:
    """Context manager: linen ``apply`` calls inside it get neuron noise on chosen modules.

    Yields the list of intercepted :class:`Site` s (filled while the model runs).
    Arguments as in :func:`neuron_noise_interceptor`.  Use one context per traced
    ``apply`` (inside the function you ``jit``/``vmap``), so each trace counts its
    calls from zero.

    Example::

        >>> def realization(k):
        ...     with noisy_linen(NeuronNoise(add_uncorrelated=1e-2), key=k):
        ...         return model.apply(variables, x)
        >>> ys = jax.vmap(realization)(jax.random.split(key, 1000))
    """
    sites: list[Site] = []
    interceptor = neuron_noise_interceptor(
        noise, key=key, module_types=module_types, methods=methods, batch_axes=batch_axes, sites=sites
    )
    with nn.intercept_methods(interceptor):
        yield sites


def apply_with_neuron_noise(
    model: nn.Module,
    variables: PyTree,
    *args: Any,
    noise: NoiseSpec,
    key: Array,
    module_types: Sequence[type] = (nn.Dense,),
    methods: Sequence[str] = ("__call__",),
    batch_axes: int = 1,
    **apply_kwargs: Any,
) -> Any:
    """``model.apply(variables, *args, **apply_kwargs)`` with neuron noise on chosen modules.

    Pure in ``(variables, args, key)``: ``jax.vmap`` over ``key`` gives Monte Carlo
    realizations.  See :func:`neuron_noise_interceptor` for the noise placement.

    Example::

        >>> y = apply_with_neuron_noise(model, variables, x, noise=NeuronNoise(mul_correlated=1e-3),
        ...                             key=jax.random.key(0), module_types=(nn.Dense, nn.Conv))
    """
    with noisy_linen(noise, key=key, module_types=module_types, methods=methods, batch_axes=batch_axes):
        return model.apply(variables, *args, **apply_kwargs)


# ----------------------------------------------------------------------------------
# NNX
# ----------------------------------------------------------------------------------

# id(instance) -> (injector, path) for instances inside a noisy_nnx context.
_NNX_ACTIVE: dict[int, tuple[_Injector, str]] = {}


@functools.lru_cache(maxsize=None)
def _noisy_subclass(cls: type, methods: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose ``methods`` add noise for instances in ``_NNX_ACTIVE``."""

    def make(name):
        orig = getattr(cls, name)

        @functools.wraps(orig)
        def method(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            entry = _NNX_ACTIVE.get(id(self))
            if entry is None:
                return out
            injector, path = entry
            return injector(path, name, self, out)

        return method

    for name in methods:
        if not callable(getattr(cls, name, None)):
            raise InvalidArgumentError(f"methods: {cls.__name__} has no method {name!r}")
    namespace = {name: make(name) for name in methods}
    namespace["__module__"] = cls.__module__
    namespace["__qualname__"] = f"Noisy{cls.__qualname__}"
    kwargs = {"pytree": cls._pytree__is_pytree} if hasattr(cls, "_pytree__is_pytree") else {}
    return type(cls)(f"Noisy{cls.__name__}", (cls,), namespace, **kwargs)


@contextlib.contextmanager
def noisy_nnx(
    model: nnx.Module,
    noise: NoiseSpec,
    *,
    key: Array,
    module_types: Sequence[type] = (nnx.Linear,),
    methods: Sequence[str] = ("__call__",),
    batch_axes: int = 1,
) -> Iterator[list[Site]]:
    """Context manager: calls of ``model`` inside it get neuron noise on chosen sub-modules.

    Every sub-module of ``model`` (found with :func:`flax.nnx.iter_modules`, the root
    included) that is an instance of one of ``module_types`` gets, for the duration of
    the context, a noisy version of each method in ``methods``: its output receives
    ``y·(1+ξ_MU+ξ_MC) + ξ_AU + ξ_AC`` exactly as in :func:`neuron_noise_interceptor`
    (same keys, same per-example convention).  Only these instances change — other
    models and the classes are untouched — and they get their original class back on
    exit.  Yields the list of intercepted :class:`Site` s.

    Do not ``nnx.split``/``nnx.jit`` the model *inside* the context; put the context
    inside the function you transform instead::

        >>> def realization(k):
        ...     with noisy_nnx(model, NeuronNoise(add_uncorrelated=1e-2), key=k):
        ...         return model(x)
        >>> ys = jax.vmap(realization)(jax.random.split(key, 1000))
    """
    if not isinstance(model, nnx.Module):
        raise InvalidArgumentError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    module_types, methods, batch_axes = _check_common(noise, key, module_types, methods, batch_axes, nnx.Module)
    injector = _Injector(noise, key, batch_axes)
    chosen = [
        ("/".join(str(p) for p in path), m) for path, m in nnx.iter_modules(model) if isinstance(m, module_types)
    ]
    for _, m in chosen:
        if id(m) in _NNX_ACTIVE:
            raise InvalidArgumentError(f"noisy_nnx contexts cannot be nested on the same module ({type(m).__name__})")
    swapped = []
    try:
        for path, m in chosen:
            cls = type(m)
            sub = _noisy_subclass(cls, methods)
            swapped.append((m, cls))
            _NNX_ACTIVE[id(m)] = (injector, path)
            object.__setattr__(m, "__class__", sub)
        yield injector.sites
    finally:
        for m, cls in swapped:
            object.__setattr__(m, "__class__", cls)
            _NNX_ACTIVE.pop(id(m), None)


def call_with_neuron_noise_nnx(
    model: nnx.Module,
    *args: Any,
    noise: NoiseSpec,
    key: Array,
    module_types: Sequence[type] = (nnx.Linear,),
    methods: Sequence[str] = ("__call__",),
    batch_axes: int = 1,
    **kwargs: Any,
) -> Any:
    """``model(*args, **kwargs)`` with neuron noise on chosen sub-modules (see :func:`noisy_nnx`).

    Example::

        >>> ys = jax.vmap(lambda k: call_with_neuron_noise_nnx(model, x, noise=nz, key=k))(keys)
    """
    with noisy_nnx(model, noise, key=key, module_types=module_types, methods=methods, batch_axes=batch_axes):
        return model(*args, **kwargs)


# ----------------------------------------------------------------------------------
# Weight noise
# ----------------------------------------------------------------------------------


def _check_perturbation(perturbation: Any, key: Any) -> None:
    if not callable(getattr(perturbation, "apply", None)):
        raise InvalidArgumentError(
            "perturbation must have .apply(params, key=...) (AdditiveWeightNoise, MultiplicativeWeightNoise, "
            f"Quantization), got {type(perturbation).__name__}"
        )
    if key is None:
        if isinstance(perturbation, (_noise.AdditiveWeightNoise, _noise.MultiplicativeWeightNoise)):
            raise InvalidArgumentError(f"key= is required for {type(perturbation).__name__}")
    else:
        _check_key(key)


def _replace_collection(variables: Any, collection: str, value: PyTree) -> Any:
    if isinstance(variables, flax.core.FrozenDict):
        return variables.copy({collection: value})
    out = dict(variables)
    out[collection] = value
    return out


def _linen_collection(variables: Any, collection: str) -> PyTree:
    if not hasattr(variables, "keys") or collection not in variables:
        keys = list(variables.keys()) if hasattr(variables, "keys") else type(variables).__name__
        raise InvalidArgumentError(f"variables must be a linen variables dict with a {collection!r} collection, got {keys}")
    return variables[collection]


def perturb_weights_linen(variables: PyTree, perturbation: Any, *, key: Optional[Array] = None, collection: str = "params") -> PyTree:
    """Apply a weight perturbation (``AdditiveWeightNoise``, ``MultiplicativeWeightNoise``,
    ``Quantization``) to ``variables[collection]``; other collections are returned as is."""
    _check_perturbation(perturbation, key)
    params = _linen_collection(variables, collection)
    return _replace_collection(variables, collection, perturbation.apply(params, key=key))


def add_weight_noise_linen(
    variables: PyTree,
    wnr_db: Array,
    *,
    key: Array,
    reference: str = "variance",
    scope: str = "global",
    leaf_filter: _noise.LeafFilter = _noise.default_leaf_filter,
    collection: str = "params",
) -> PyTree:
    """Additive Gaussian weight noise at ``wnr_db`` on ``variables[collection]``.

    ``w̃ = w + n``, ``n ~ N(0, σ_n²)``, ``σ_n² = P_ref / 10^(WNR/10)`` — see
    :func:`noisejax.noise.add_weight_noise`.  ``batch_stats`` and any other
    collection are untouched; the default leaf filter also skips norm parameters.

    Example::

        >>> noisy = add_weight_noise_linen(variables, 10.0, key=jax.random.key(0))
        >>> model.apply(noisy, x)
    """
    _check_key(key)
    params = _linen_collection(variables, collection)
    noisy = _noise.add_weight_noise(params, wnr_db, key=key, reference=reference, scope=scope, leaf_filter=leaf_filter)
    return _replace_collection(variables, collection, noisy)


def _nnx_perturb(model: nnx.Module, variable_type: Any, fn: Callable[[PyTree], PyTree]) -> nnx.Module:
    if not isinstance(model, nnx.Module):
        raise InvalidArgumentError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    graphdef, selected, rest = nnx.split(model, variable_type, ...)
    if not jax.tree_util.tree_leaves(selected):
        raise InvalidArgumentError(f"model has no {getattr(variable_type, '__name__', variable_type)} variables to perturb")
    return nnx.merge(graphdef, fn(selected), rest)


def perturb_weights_nnx(model: nnx.Module, perturbation: Any, *, key: Optional[Array] = None, variable_type: Any = nnx.Param) -> nnx.Module:
    """A copy of ``model`` whose ``variable_type`` variables went through ``perturbation.apply``.

    The original model is unchanged; ``BatchStat`` and other variables are copied as is.
    """
    _check_perturbation(perturbation, key)
    return _nnx_perturb(model, variable_type, lambda params: perturbation.apply(params, key=key))


def add_weight_noise_nnx(
    model: nnx.Module,
    wnr_db: Array,
    *,
    key: Array,
    reference: str = "variance",
    scope: str = "global",
    leaf_filter: _noise.LeafFilter = _noise.default_leaf_filter,
    variable_type: Any = nnx.Param,
) -> nnx.Module:
    """A copy of ``model`` with additive weight noise at ``wnr_db`` on its ``nnx.Param`` s.

    ``nnx.split(model, variable_type, ...)`` → :func:`noisejax.noise.add_weight_noise`
    → ``nnx.merge``; batch statistics are untouched and the default leaf filter skips
    norm parameters (paths with ``norm``/``bn``).  Works inside ``jit``/``vmap``.

    Example::

        >>> noisy_model = add_weight_noise_nnx(model, 10.0, key=jax.random.key(0))
        >>> noisy_model(x)
    """
    _check_key(key)
    return _nnx_perturb(
        model,
        variable_type,
        lambda params: _noise.add_weight_noise(params, wnr_db, key=key, reference=reference, scope=scope, leaf_filter=leaf_filter),
    )


# ----------------------------------------------------------------------------------
# BatchNorm statistics re-estimation
# ----------------------------------------------------------------------------------


def _bn_axes(ndim: int, axis: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    feature = tuple(a % ndim for a in ((axis,) if isinstance(axis, int) else axis))
    return feature, tuple(i for i in range(ndim) if i not in feature)


def recalibrate_batch_stats(module: nn.Module, variables: PyTree, x: Any, **apply_kwargs: Any) -> PyTree:
    """Re-estimate every ``nn.BatchNorm``'s running statistics on inputs ``x``.

    One forward pass of ``module.apply(variables, x, **apply_kwargs)`` in which each
    BatchNorm normalizes with the statistics of its own input over ``x``::

        μ_c = mean(h_c),   σ_c² = mean((h_c − μ_c)²),   y_c = γ_c·(h_c − μ_c)/√(σ_c² + ε) + β_c

    (reduction over every axis but the feature axes), so later layers see
    recalibrated activations; the returned variables carry these ``μ, σ²`` as
    ``batch_stats`` and are otherwise ``variables``.  ``γ, β`` stay as they are.
    After weight noise this re-centres and re-scales each channel by what the noise
    did to it (unlabeled calibration data suffices).  Pure and traceable: ``jit`` and
    ``vmap`` over noise realizations work.  Statistics are per host (no ``axis_name``
    reduction); masked BatchNorm calls are not supported.

    Args:
      module: a linen module containing ``nn.BatchNorm`` layers.
      variables: its variables, with a ``"batch_stats"`` collection.
      x: calibration inputs ``(N, ...)``.
      apply_kwargs: passed to ``module.apply`` (e.g. ``train=False``).

    Example::

        >>> noisy = add_weight_noise_linen(variables, 10.0, key=jax.random.key(0))
        >>> fixed = recalibrate_batch_stats(model, noisy, x_calibration)
        >>> model.apply(fixed, x_test)
    """
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(f"module must be a flax.linen.Module, got {type(module).__name__}")
    stats = _linen_collection(variables, "batch_stats")
    records: dict = {}

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if not (isinstance(m, nn.BatchNorm) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        if kwargs.get("mask") is not None:
            raise InvalidArgumentError(f"recalibrate_batch_stats: masked BatchNorm at {'/'.join(m.path)} is not supported")
        h = jnp.asarray(args[0])
        feature, red = _bn_axes(h.ndim, m.axis)
        hf = h.astype(jnp.promote_types(h.dtype, jnp.float32))
        mean = jnp.mean(hf, axis=red, keepdims=True)
        var = jnp.mean(jnp.square(hf - mean), axis=red, keepdims=True)
        y = (hf - mean) * jax.lax.rsqrt(var + m.epsilon)
        fshape = tuple(h.shape[a] for a in feature)
        bshape = tuple(h.shape[i] if i in feature else 1 for i in range(h.ndim))
        if m.use_scale:
            y = y * m.get_variable("params", "scale").reshape(bshape)
        if m.use_bias:
            y = y + m.get_variable("params", "bias").reshape(bshape)
        records[tuple(m.path)] = {"mean": mean.reshape(fshape), "var": var.reshape(fshape)}
        return y.astype(m.dtype or h.dtype)

    with nn.intercept_methods(interceptor):
        module.apply(variables, x, **apply_kwargs)
    if not records:
        raise InvalidArgumentError("recalibrate_batch_stats: the model called no nn.BatchNorm layer")

    def replace(path, leaf):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        rec = records.get(names[:-1])
        if rec is None or names[-1] not in rec:
            return leaf
        return rec[names[-1]].astype(leaf.dtype).reshape(leaf.shape)

    return _replace_collection(variables, "batch_stats", jax.tree_util.tree_map_with_path(replace, stats))
