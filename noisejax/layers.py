"""Composable noisy layers in the stax style.

Every layer is a :class:`Layer`: a named tuple of pure functions

* ``init(key, in_shape) -> (out_shape, params)`` — shapes are those of *one example*
  (no batch axis);
* ``apply(params, x, *, key=None, noise=None) -> y`` — the sampling rule, for one
  example; batches and realizations are added with :func:`jax.vmap`
  (see :func:`apply_batch` and :mod:`noisejax.simulate`);
plus static metadata: ``n_sites`` (how many :func:`NoiseSite` sites the layer
contains) and ``spec``, a typed, hashable description of the layer (frozen
dataclasses: :class:`DenseSpec`, :class:`ConvSpec`, :class:`FlattenSpec`,
:class:`ActivationSpec`, :class:`NoiseSiteSpec`, :class:`SerialSpec`), so that a
``Layer`` is hashable and can key compiled programs.

The analytic moments of any network come from its ``apply`` itself: the moment
interpretation of :mod:`noisejax.interpret` reads the jaxpr of ``apply`` with the
per-primitive rules of :mod:`noisejax.rules` (:func:`noisejax.moments.predict`),
so a layer needs no separate moment rule and Monte Carlo and analytic prediction
always describe the same network.  :func:`NoiseSite` marks its site in that
jaxpr (:func:`noisejax.interpret.mark`).  (The noise *site* is a layer; the noise
*model* applied there is :class:`noisejax.noise.NeuronNoise`.)

:func:`serial` composes layers.  The ``noise`` argument of a composed network is
either one :class:`noisejax.noise.NeuronNoise` (applied at every site) or a
sequence with one entry (or ``None``) per site, in order.

Example — the paper's noisy MLP, ``y_l = f(y_{l-1} W_l + b_l)·(1+ξ_MU+ξ_MC) + ξ_AU + ξ_AC``::

    >>> import jax, jax.numpy as jnp
    >>> from noisejax import layers, noise
    >>> net = layers.mlp([64, 100, 10], "sigmoid")
    >>> out_shape, params = net.init(jax.random.key(0), (64,))
    >>> y, per_layer = net.apply(params, jnp.ones(64), key=jax.random.key(1),
    ...                          noise=noise.NeuronNoise(add_uncorrelated=1e-3), return_layers=True)
    >>> [h.shape for h in per_layer]
    [(100,), (10,)]
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from noisejax import _validate
from noisejax._jaxpr import mark as _mark
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.noise import NeuronNoise as _NeuronNoiseModel
from noisejax.noise import LocalWeightNoise as _LocalWeightNoise
from noisejax.noise import apply_neuron_noise

__all__ = [
    "Layer",
    "DenseSpec",
    "ConvSpec",
    "FlattenSpec",
    "ActivationSpec",
    "NoiseSiteSpec",
    "SerialSpec",
    "Dense",
    "WeightNoiseDense",
    "Conv",
    "Flatten",
    "Elementwise",
    "Linear",
    "Sigmoid",
    "Tanh",
    "Relu",
    "Erf",
    "NoiseSite",
    "serial",
    "activation",
    "ACTIVATIONS",
    "mlp",
    "from_weights",
    "apply_batch",
    "split_noise",
]

Array = jax.Array
Shape = tuple[int, ...]
NoiseArg = Union[None, _NeuronNoiseModel, Sequence[Optional[_NeuronNoiseModel]]]


# ----------------------------------------------------------------------------------
# Typed layer specs
# ----------------------------------------------------------------------------------


class _Spec:
    """Base of the layer specs: frozen, hashable; ``spec["name"]`` still reads a field (deprecated)."""

    kind: str = ""

    def __getitem__(self, name: str) -> Any:
        warnings.warn("layer specs are typed: read spec.<field> instead of spec[<field>]", DeprecationWarning, stacklevel=2)
        if name == "kind":
            return self.kind
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        """``spec[name]`` or ``default`` (deprecated dict access)."""
        try:
            return self[name]
        except KeyError:
            return default


@dataclasses.dataclass(frozen=True)
class DenseSpec(_Spec):
    """A fully connected layer, :func:`Dense`: ``out_dim`` outputs.

    ``weight_noise="local"`` for :func:`WeightNoiseDense` (its weights are a noise site),
    ``"analog"`` for :func:`noisejax.hardware.AnalogDense` (a crossbar: its product is one).
    """

    out_dim: int
    weight_noise: Optional[str] = None
    kind = "dense"


@dataclasses.dataclass(frozen=True)
class ActivationSpec(_Spec):
    """An elementwise activation: its ``name`` (``"sigmoid"``, ``"linear"``...) and function ``fn``.

    ``slope`` is the linear neuron's α (:func:`Linear`), ``None`` for the others.
    Hashed and compared by ``fn``'s identity: two ``Linear(0.5)`` layers have equal
    names and slopes but distinct specs.
    """

    name: str
    fn: Callable[[Array], Array]
    slope: Optional[float] = None
    kind = "activation"


@dataclasses.dataclass(frozen=True)
class SerialSpec(_Spec):
    """:func:`serial`: the ``children``'s specs, a tuple in network order (a tree of specs)."""

    children: tuple
    kind = "serial"


@dataclasses.dataclass(frozen=True)
class ConvSpec(_Spec):
    """A 2-D convolution, :func:`Conv`, with ``out_chan`` output channels."""

    out_chan: int
    kind = "conv"


@dataclasses.dataclass(frozen=True)
class FlattenSpec(_Spec):
    """:func:`Flatten` (no parameter)."""

    kind = "flatten"


@dataclasses.dataclass(frozen=True)
class NoiseSiteSpec(_Spec):
    """A neuron-noise site, :func:`NoiseSite`: where a :class:`noisejax.noise.NeuronNoise` applies."""

    kind = "neuron_noise"


Spec = Union[DenseSpec, ConvSpec, FlattenSpec, ActivationSpec, NoiseSiteSpec, SerialSpec]


class Layer(NamedTuple):
    """A layer: pure ``init``/``apply`` with static metadata (``n_sites``, ``spec``).

    Hashable (its functions by identity, its spec by value): a network can be a
    static argument or a cache key of compiled programs.
    """

    init: Callable[[Array, Shape], tuple[Shape, Any]]
    apply: Callable[..., Array]
    n_sites: int = 0
    spec: Optional[Spec] = None


# ----------------------------------------------------------------------------------
# Affine layers
# ----------------------------------------------------------------------------------


def _lecun_normal(key, shape, fan_in, dtype):
    return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)


def Dense(out_dim: int, *, use_bias: bool = True, W_init: Optional[Callable] = None, b_init: Optional[Callable] = None) -> Layer:
    """Fully connected layer ``y = x W + b`` on the last axis; ``W`` is ``(fan_in, out_dim)``.

    Params: ``{"W": (fan_in, out_dim), "b": (out_dim,)}`` (``b`` omitted without bias).
    """
    out_dim = _validate.check_int("Dense.out_dim", out_dim, minimum=1)

    def init(key, in_shape):
        fan_in = in_shape[-1]
        kw, kb = jax.random.split(key)
        W = W_init(kw, (fan_in, out_dim)) if W_init else _lecun_normal(kw, (fan_in, out_dim), fan_in, jnp.float32)
        params = {"W": W}
        if use_bias:
            params["b"] = b_init(kb, (out_dim,)) if b_init else jnp.zeros((out_dim,), jnp.float32)
        return tuple(in_shape[:-1]) + (out_dim,), params

    def apply(params, x, *, key=None, noise=None):
        _validate.check_input("x", x, params["W"].shape[0], finite=False)  # static checks only
        y = x @ params["W"]
        if "b" in params:
            y = y + params["b"]
        return y

    return Layer(init, apply, 0, DenseSpec(out_dim))


def WeightNoiseDense(out_dim: int, *, use_bias: bool = True) -> Layer:
    """Dense layer with additive Gaussian weight noise, sampled by local reparameterization.

    Same params as :func:`Dense`.  Its ``noise`` (one site) is a
    :class:`noisejax.noise.LocalWeightNoise`; for one example ``y``::

        z = y W + b + sqrt((y∘y) σ_W² + σ_b²) ∘ ξ,   ξ ~ N(0, I)

    which has the distribution of ``y W̃ + b̃`` with ``W̃ = W + N(0, σ_W²)`` for
    that example.  Statistics per example (means, variances, accuracy averaged over
    inputs) are exact; correlations *between examples* that a shared ``W̃`` would
    create are not represented — sample the weights with
    :func:`noisejax.noise.add_weight_noise` when those matter.  With ``noise=None``
    it is a plain :func:`Dense`.
    """
    dense = Dense(out_dim, use_bias=use_bias)

    def apply(params, x, *, key=None, noise=None):
        # the marks tell the moment interpretation which parameters carry this site's noise
        marked = {"W": _mark(params["W"], "local_weight")}
        if "b" in params:
            marked["b"] = _mark(params["b"], "local_bias")
        z = dense.apply(marked, x)
        if not isinstance(noise, _LocalWeightNoise):
            return z
        if key is None:
            raise InvalidArgumentError("WeightNoiseDense with noise= needs key=")
        var = jnp.square(x) @ jnp.broadcast_to(jnp.asarray(noise.variance, z.dtype), params["W"].shape)
        if "b" in params:
            var = var + jnp.asarray(_bias_variance(noise), z.dtype)
        return z + jnp.sqrt(var) * jax.random.normal(key, z.shape, z.dtype)

    return Layer(dense.init, apply, 1, DenseSpec(out_dim, weight_noise="local"))


def _bias_variance(noise: _LocalWeightNoise):
    return noise.variance if noise.bias_variance is None else noise.bias_variance


def Conv(out_chan: int, kernel: tuple[int, int], *, strides=(1, 1), padding: str = "SAME", use_bias: bool = True) -> Layer:
    """2-D convolution on one ``(H, W, C)`` example; ``W`` is ``(kh, kw, C, out_chan)``."""
    out_chan = _validate.check_int("Conv.out_chan", out_chan, minimum=1)
    dn = ("NHWC", "HWIO", "NHWC")

    def init(key, in_shape):
        kw, kb = jax.random.split(key)
        fan_in = in_shape[-1] * kernel[0] * kernel[1]
        W = _lecun_normal(kw, (*kernel, in_shape[-1], out_chan), fan_in, jnp.float32)
        params = {"W": W}
        if use_bias:
            params["b"] = jnp.zeros((out_chan,), jnp.float32)
        out = jax.eval_shape(lambda x: _conv(params, x), jax.ShapeDtypeStruct(tuple(in_shape), jnp.float32))
        return out.shape, params

    def _conv(params, x):
        y = lax.conv_general_dilated(x[None], params["W"], strides, padding, dimension_numbers=dn)[0]
        if "b" in params:
            y = y + params["b"]
        return y

    def apply(params, x, *, key=None, noise=None):
        return _conv(params, x)

    return Layer(init, apply, 0, ConvSpec(out_chan))


def Flatten() -> Layer:
    """Flatten one example to a vector."""

    def init(key, in_shape):
        return (int(math.prod(in_shape)),), ()

    def apply(params, x, *, key=None, noise=None):
        return x.reshape(-1)

    return Layer(init, apply, 0, FlattenSpec())


# ----------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------


def Elementwise(fn: Callable[[Array], Array], name: str = "elementwise", *, slope: Optional[float] = None) -> Layer:
    """Any elementwise activation ``y = fn(x)`` (moments: the rules of the primitives ``fn`` uses).

    ``slope``: recorded in the spec for the linear neuron ``slope·x`` (:func:`Linear`).
    """

    def init(key, in_shape):
        return tuple(in_shape), ()

    def apply(params, x, *, key=None, noise=None):
        return fn(x)

    return Layer(init, apply, 0, ActivationSpec(name, fn, slope))


def Linear(slope: float = 1.0) -> Layer:
    """``f(x) = slope · x`` (the paper's linear neuron with slope α)."""
    _validate.check_real_number("Linear.slope", slope)
    slope = float(slope)
    fn = lambda x: slope * x  # noqa: E731
    return Elementwise(fn, "linear", slope=slope)


def Sigmoid() -> Layer:
    """``f(x) = 1 / (1 + exp(-x))``."""
    return Elementwise(jax.nn.sigmoid, "sigmoid")


def Tanh() -> Layer:
    """``f(x) = tanh(x)``."""
    return Elementwise(jnp.tanh, "tanh")


def Relu() -> Layer:
    """``f(x) = max(x, 0)``."""
    return Elementwise(jax.nn.relu, "relu")


def Erf() -> Layer:
    """``f(x) = erf(x)``."""
    return Elementwise(jax.scipy.special.erf, "erf")


ACTIVATIONS: dict[str, Callable[[], Layer]] = {
    "linear": Linear,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "relu": Relu,
    "erf": Erf,
}


def activation(name: str) -> Layer:
    """Activation layer from a name: ``linear``, ``linear:SLOPE``, ``sigmoid``, ``tanh``, ``relu``, ``erf``."""
    if not isinstance(name, str):
        raise InvalidArgumentError(f"activation name must be a string, got {name!r}")
    base, _, arg = name.strip().lower().partition(":")
    if base not in ACTIVATIONS:
        raise InvalidArgumentError(
            f"unknown activation {name!r}; expected one of linear, linear:SLOPE, sigmoid, tanh, relu, erf"
        )
    if base == "linear" and arg:
        try:
            slope = float(arg)
        except ValueError:
            raise InvalidArgumentError(f"activation {name!r}: SLOPE must be a number") from None
        if not math.isfinite(slope):
            raise InvalidArgumentError(f"activation {name!r}: SLOPE must be finite")
        return Linear(slope)
    if arg:
        raise InvalidArgumentError(f"activation {name!r}: only 'linear' takes a parameter")
    return ACTIVATIONS[base]()


# ----------------------------------------------------------------------------------
# Noise site
# ----------------------------------------------------------------------------------


def NoiseSite() -> Layer:
    """A neuron-noise site: ``y → y·(1 + ξ_MU + ξ_MC) + ξ_AU + ξ_AC``.

    The variances come from the ``noise`` argument of ``apply`` (one
    :class:`noisejax.noise.NeuronNoise` per site); ``key`` must be given when
    ``noise`` is not statically zero.
    """

    def init(key, in_shape):
        return tuple(in_shape), ()

    def apply(params, x, *, key=None, noise=None):
        x = _mark(x, "neuron")  # the site, for the moment interpretation
        if not isinstance(noise, _NeuronNoiseModel) or noise.is_zero:
            return x
        if key is None:
            raise InvalidArgumentError("apply(..., noise=...) needs key=: a noisy forward pass draws random numbers")
        return apply_neuron_noise(x, noise, key=key)

    return Layer(init, apply, 1, NoiseSiteSpec())


# ----------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------


def split_noise(noise: NoiseArg, counts: Sequence[int]) -> list:
    """Distribute a network's ``noise`` argument over children with ``counts`` sites each.

    One noise object (a :class:`~noisejax.noise.NeuronNoise`, a
    :class:`~noisejax.noise.LocalWeightNoise`, or ``None``) is shared by every child
    — each site uses it only if it is of the site's own type; a list or tuple is cut
    into consecutive runs of the given lengths (one entry per site).
    """
    if not isinstance(noise, (list, tuple)):
        return [noise] * len(counts)
    noise = list(noise)
    if len(noise) != sum(counts):
        raise InvalidArgumentError(f"noise has {len(noise)} entries; this network has {sum(counts)} noise sites")
    out, start = [], 0
    for c in counts:
        part = noise[start : start + c]
        out.append(part[0] if c == 1 else (tuple(part) if c else None))
        start += c
    return out


def _child_key(key, i):
    return None if key is None else jax.random.fold_in(key, i)


def serial(*layers: Layer) -> Layer:
    """Compose layers in sequence.

    ``apply(params, x, *, key=None, noise=None, return_layers=False)``: child ``i``
    gets ``fold_in(key, i)``; with ``return_layers=True`` returns ``(y, outputs)``
    where ``outputs`` holds every child's output.
    """
    if not layers or not all(isinstance(layer, Layer) for layer in layers):
        raise InvalidArgumentError("serial(...) needs one or more Layer objects")
    counts = [layer.n_sites for layer in layers]

    def init(key, in_shape):
        params, shape = [], tuple(in_shape)
        for i, layer in enumerate(layers):
            shape, p = layer.init(jax.random.fold_in(key, i), shape)
            params.append(p)
        return shape, tuple(params)

    def _check_params(params):
        if not isinstance(params, (tuple, list)) or len(params) != len(layers):
            raise ShapeMismatchError(
                f"params must be a tuple of {len(layers)} entries (one per layer), got {type(params).__name__}"
                + (f" of length {len(params)}" if isinstance(params, (tuple, list)) else "")
            )

    def apply(params, x, *, key=None, noise=None, return_layers=False):
        _check_params(params)
        _validate.check_finite("x", x)  # concrete inputs only (eager calls); skipped under jit
        outs = []
        for i, (layer, p, nz) in enumerate(zip(layers, params, split_noise(noise, counts))):
            x = layer.apply(p, x, key=_child_key(key, i), noise=nz)
            outs.append(x)
        return (x, tuple(outs)) if return_layers else x

    return Layer(init, apply, sum(counts), SerialSpec(tuple(l.spec for l in layers)))


def apply_batch(net: Layer, params, xs: Array, *, key=None, noise: NoiseArg = None, **kwargs):
    """Apply ``net`` to a batch ``xs`` of shape ``(B, *in_shape)``.

    Input ``b`` uses ``fold_in(key, b)``, so each input's noise draws do not depend
    on the batch it is in.
    """
    if key is None:
        return jax.vmap(lambda x: net.apply(params, x, key=None, noise=noise, **kwargs))(xs)
    idx = jnp.arange(xs.shape[0])
    return jax.vmap(lambda x, i: net.apply(params, x, key=jax.random.fold_in(key, i), noise=noise, **kwargs))(xs, idx)


# ----------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------


def _as_activation(act: Union[str, Layer]) -> Layer:
    return act if isinstance(act, Layer) else activation(act)


def mlp(
    widths: Sequence[int],
    activation_name: Union[str, Layer] = "sigmoid",
    activation_out: Union[str, Layer, None] = None,
    *,
    noisy: bool = True,
    use_bias: bool = True,
    dense: Callable[..., Layer] = Dense,
) -> Layer:
    """The paper's MLP: ``widths = [fan_in, h1, ..., out]``.

    Each top-level child is one paper layer ``serial(Dense, f, NoiseSite)``, so
    ``apply(..., return_layers=True)`` returns one output per layer.  The last layer
    uses ``activation_out`` when given.  ``noisy=False`` drops the noise sites.
    ``dense`` builds the affine layers (``dense(width, use_bias=...)``), e.g.
    :func:`noisejax.hardware.AnalogDense` for crossbars.
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise InvalidArgumentError(f"widths must list >= 2 positive sizes (input first), got {widths}")
    blocks = []
    n = len(widths) - 1
    for i, w in enumerate(widths[1:]):
        act = activation_out if (i == n - 1 and activation_out is not None) else activation_name
        parts = [dense(w, use_bias=use_bias), _as_activation(act)]
        if noisy:
            parts.append(NoiseSite())
        blocks.append(serial(*parts))
    return serial(*blocks)


def from_weights(
    weights: Sequence[Array],
    biases: Sequence[Optional[Array]],
    activation_name: Union[str, Layer],
    activation_out: Union[str, Layer, None] = None,
    *,
    noisy: bool = True,
    dense: Callable[..., Layer] = Dense,
) -> tuple[Layer, tuple]:
    """Network and params from given matrices ``W_l (fan_in, fan_out)`` and biases.

    Checks that consecutive shapes chain; returns ``(net, params)`` ready for
    ``net.apply``.  ``dense`` builds the affine layers (as for :func:`mlp`).
    """
    if len(weights) == 0:
        raise InvalidArgumentError("weights is empty; expected at least one matrix W0")
    if len(biases) != len(weights):
        raise InvalidArgumentError(f"got {len(weights)} weight matrices and {len(biases)} bias entries")
    for l, W in enumerate(weights):
        if W.ndim != 2:
            raise ShapeMismatchError(f"W{l} must be 2-D (fan_in, fan_out), got shape {tuple(W.shape)}")
        if l and W.shape[0] != weights[l - 1].shape[1]:
            raise ShapeMismatchError(
                f"W{l} has fan_in {W.shape[0]} but W{l - 1} has fan_out {weights[l - 1].shape[1]}"
            )
        b = biases[l]
        if b is not None and tuple(b.shape) != (W.shape[1],):
            raise ShapeMismatchError(f"b{l} must have shape ({W.shape[1]},), got {tuple(b.shape)}")
    widths = [weights[0].shape[0]] + [W.shape[1] for W in weights]
    blocks, params = [], []
    n = len(weights)
    for l, (W, b) in enumerate(zip(weights, biases)):
        act = activation_out if (l == n - 1 and activation_out is not None) else activation_name
        parts = [dense(widths[l + 1], use_bias=b is not None), _as_activation(act)]
        dense_p = {"W": jax.device_put(W)}  # device_put: no per-shape conversion program to compile
        if b is not None:
            dense_p["b"] = jax.device_put(b)
        block_params = [dense_p, ()]
        if noisy:
            parts.append(NoiseSite())
            block_params.append(())
        blocks.append(serial(*parts))
        params.append(tuple(block_params))
    return serial(*blocks), tuple(params)


def __getattr__(name: str):
    if name == "NeuronNoise":  # the noise-site layer's old name (the noise model is noisejax.noise.NeuronNoise)
        warnings.warn("layers.NeuronNoise() is deprecated: the noise-site layer is layers.NoiseSite() "
                      "(noise.NeuronNoise is the noise model)", DeprecationWarning, stacklevel=2)
        return NoiseSite
    raise AttributeError(f"module 'noisejax.layers' has no attribute {name!r}")
