"""Training and evaluating networks under noise, with optax: the one training loop of noisejax.

Every trainer of the package is an objective handed to the loop of this module:
:func:`fit` (host-driven, chunked, cached compilation) for whole trainings —
:mod:`noisejax.layers` networks under noise, the Flax models of
:mod:`noisejax.study.models`, the learned weight denoiser of :mod:`noisejax.denoise` —
and :func:`scan_steps`, the same optax step in a :func:`jax.lax.scan`, for steps
inside a larger compiled program (the devices and the server of
:mod:`noisejax.federated`).  :func:`fit` runs its chunks with :func:`scan_steps`.

Three objectives for :mod:`noisejax.layers` networks, all
``objective(params, x, y, key) -> scalar`` on a batch:

* :func:`plain_loss` — the noise-free loss ``L(net(x), y)``.
* :func:`noise_aware_loss` — noise sampled in the forward pass (any mix of the four
  neuron-noise types and/or a weight perturbation), averaged over
  ``n_realizations`` realizations per step with :func:`jax.vmap`::

      (1/R) Σ_r L(net_{ξ_r}(x; w + ε_r), y),    key_r = fold_in(key, r)

  Weight noise is applied straight-through (``w + stop_gradient(w̃ − w)``), so
  the gradient is that of the perturbed network w.r.t. the clean weights (works
  for quantization too).
* :func:`moment_loss` — no sampling: the analytic (differentiable) output moments
  of :func:`noisejax.moments.propagate` give ``L(E[y], y) + λ · mean_b Σ_k Var[y_k]``.

:func:`fit` runs any objective with an optax optimizer inside a jitted
:func:`jax.lax.scan` (step ``t`` uses ``fold_in(key, t)``: minibatch from
``fold_in(·, 0)``, noise from ``fold_in(·, 1)``; how minibatches are drawn is a
sampler: :class:`Minibatches` or :class:`Epochs`), reporting compile and run time
separately.  Evaluation: :func:`accuracy` (THE accuracy of the package) and
:func:`make_evaluator`, a compiled function for accuracy and output statistics over
noise realizations, with the noise intensities as traced arguments (one compile
serves a whole intensity sweep).

Example::

    >>> import jax, optax
    >>> from noisejax import data, layers, noise, train
    >>> ds = data.load_digits()
    >>> net = layers.mlp([64, 32, 10], "sigmoid", "linear")
    >>> _, p0 = net.init(jax.random.key(0), (64,))
    >>> nz = noise.NeuronNoise(add_uncorrelated=0.05)
    >>> res = train.fit(train.noise_aware_loss(net, noise=nz, n_realizations=8), p0,
    ...                 ds.x_train, ds.y_train, key=jax.random.key(1), steps=500, batch_size=128)
    >>> ev = train.make_evaluator(net, n_realizations=32)
    >>> acc = ev(res.params, ds.x_test, ds.y_test, noise=nz, key=jax.random.key(2)).mean_accuracy
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from noisejax import _struct as struct
from jax import lax

from noisejax import _backend, _validate, layers
from noisejax import snr as _snr
from noisejax.errors import InvalidArgumentError, ShapeMismatchError
from noisejax.simulate import realization_keys

__all__ = [
    "LOSSES",
    "softmax_cross_entropy",
    "mean_squared_error",
    "PlainLoss",
    "NoiseAwareLoss",
    "MomentLoss",
    "plain_loss",
    "noise_aware_loss",
    "moment_loss",
    "Minibatches",
    "Epochs",
    "TrainResult",
    "optax_step",
    "scan_steps",
    "fit",
    "train_plain",
    "accuracy",
    "NoisyEval",
    "make_evaluator",
]

Array = jax.Array
PyTree = Any
Objective = Callable[[PyTree, Array, Array, Array], Array]


# ----------------------------------------------------------------------------------
# Losses on network outputs
# ----------------------------------------------------------------------------------


def softmax_cross_entropy(outputs: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy; ``outputs (B, K)`` are logits, ``labels (B,)`` ints."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels))


def mean_squared_error(outputs: Array, labels: Array) -> Array:
    """Mean over the batch of ``Σ_k (outputs_k − onehot(labels)_k)²``."""
    target = jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype)
    return jnp.mean(jnp.sum(jnp.square(outputs - target), axis=-1))


LOSSES: dict[str, Callable[[Array, Array], Array]] = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "mse": mean_squared_error,
}


def _loss_fn(loss: Union[str, Callable]) -> Callable[[Array, Array], Array]:
    if callable(loss):
        return loss
    _validate.check_choice("loss", loss, tuple(LOSSES))
    return LOSSES[loss]


def _check_weight_noise(weight_noise) -> None:
    if weight_noise is not None and not callable(getattr(weight_noise, "apply", None)):
        raise InvalidArgumentError(
            "weight_noise must have .apply(params, key=...) (e.g. noise.AdditiveWeightNoise(wnr_db)) or be None"
        )


def _perturb_weights(params: PyTree, weight_noise, key: Array) -> PyTree:
    """``w + stop_gradient(w̃ − w)``: the sample is a constant for the gradient."""
    noisy = weight_noise.apply(params, key=key)
    return jax.tree_util.tree_map(lambda w, wn: w + lax.stop_gradient(wn - w), params, noisy)


# ----------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------


def _hashable(fn: Callable) -> Callable:
    """``fn`` itself when hashable (functions are, by identity); else a wrapper with an identity of its own.

    Static fields of the objectives and the compile cache of :func:`fit` key on these
    callables; an unhashable callable object still works, compiled anew for each call.
    """
    try:
        hash(fn)
        return fn
    except TypeError:
        return lambda *args, **kwargs: fn(*args, **kwargs)


@struct.dataclass
class PlainLoss:
    """Noise-free objective ``L(net(x), y)`` (build with :func:`plain_loss`)."""

    net: layers.Layer = struct.field(pytree_node=False)
    loss: Callable = struct.field(pytree_node=False)

    def __call__(self, params, x, y, key=None):
        return self.loss(layers.apply_batch(self.net, params, x), y)


@struct.dataclass
class NoiseAwareLoss:
    """Loss averaged over sampled noise realizations (build with :func:`noise_aware_loss`).

    ``noise`` and ``weight_noise`` are pytree leaves: objectives that differ only in
    intensities share one compiled training step.
    """

    noise: Any
    weight_noise: Any
    net: layers.Layer = struct.field(pytree_node=False)
    loss: Callable = struct.field(pytree_node=False)
    n_realizations: int = struct.field(pytree_node=False, default=8)

    def __call__(self, params, x, y, key):
        def one(kr):
            p = params
            if self.weight_noise is not None:
                p = _perturb_weights(params, self.weight_noise, jax.random.fold_in(kr, 1))
            return self.loss(layers.apply_batch(self.net, p, x, key=jax.random.fold_in(kr, 0), noise=self.noise), y)

        return jnp.mean(jax.vmap(one)(realization_keys(key, jnp.arange(self.n_realizations))))


@struct.dataclass
class MomentLoss:
    """``L(E[y], y) + penalty · mean_b Σ_k Var[y_k]`` (build with :func:`moment_loss`)."""

    noise: Any
    penalty: Array
    net: layers.Layer = struct.field(pytree_node=False)
    loss: Callable = struct.field(pytree_node=False)
    method: str = struct.field(pytree_node=False, default="gaussian")
    covariance: str = struct.field(pytree_node=False, default="factored")

    def output_moments(self, params, x):
        """``(mean (B, K), var (B, K))`` of the output for a batch ``x``."""
        from noisejax import moments as _moments

        def one(xi):
            out = _moments.propagate(self.net, params, xi, noise=self.noise, method=self.method,
                                     covariance=self.covariance)[-1]
            return out.mean, out.var

        return jax.vmap(one)(x)

    def __call__(self, params, x, y, key=None):
        mean, var = self.output_moments(params, x)
        return self.loss(mean, y) + self.penalty * jnp.mean(jnp.sum(var, axis=-1))


def _check_net(net) -> None:
    if not isinstance(net, layers.Layer):
        raise InvalidArgumentError(f"net must be a noisejax.layers.Layer, got {type(net).__name__}")


def _check_noise(noise) -> layers.NoiseArg:
    from noisejax.hardware import AnalogHardware  # the site noise of hardware.AnalogDense layers
    from noisejax.noise import NeuronNoise

    kinds = (NeuronNoise, AnalogHardware)
    if noise is None or isinstance(noise, kinds):
        return noise
    if isinstance(noise, (list, tuple)) and all(n is None or isinstance(n, kinds) for n in noise):
        return tuple(noise)
    raise InvalidArgumentError(
        f"noise must be None, a NeuronNoise / AnalogHardware or a sequence of them (one per site), got {type(noise).__name__}"
    )


def plain_loss(net: layers.Layer, *, loss: Union[str, Callable] = "softmax_cross_entropy") -> PlainLoss:
    """Noise-free objective ``L(net(x), y)``; ``key`` is ignored."""
    _check_net(net)
    return PlainLoss(net, _hashable(_loss_fn(loss)))


def noise_aware_loss(
    net: layers.Layer,
    *,
    noise: layers.NoiseArg = None,
    weight_noise=None,
    n_realizations: int = 8,
    loss: Union[str, Callable] = "softmax_cross_entropy",
) -> NoiseAwareLoss:
    """Loss averaged over ``n_realizations`` noisy forward passes (vmapped).

    ``(1/R) Σ_r L(net_{ξ_r}(x; w + ε_r), y)``.  Realization ``r`` uses
    ``k_r = fold_in(key, r)``: neuron noise from ``fold_in(k_r, 0)`` (per input
    ``b``: ``fold_in(·, b)``, see :func:`noisejax.layers.apply_batch`), weight noise
    from ``fold_in(k_r, 1)``, applied straight-through.

    Args:
      noise: neuron noise, one :class:`~noisejax.noise.NeuronNoise` for all sites or
        one per site (as for ``net.apply``).
      weight_noise: e.g. :class:`~noisejax.noise.AdditiveWeightNoise`, or ``None``.
      n_realizations: realizations per step ``R >= 1``.
      loss: ``"softmax_cross_entropy"`` (outputs are logits), ``"mse"`` or
        ``loss(outputs (B, K), labels (B,)) -> scalar``.

    Example::

        >>> obj = noise_aware_loss(net, noise=NeuronNoise(mul_correlated=0.3), n_realizations=8)
        >>> obj(params, x, y, jax.random.key(0))   # scalar
    """
    _check_net(net)
    n_realizations = _validate.check_int("n_realizations", n_realizations, minimum=1)
    _check_weight_noise(weight_noise)
    return NoiseAwareLoss(_check_noise(noise), weight_noise, net, _hashable(_loss_fn(loss)), n_realizations)


def moment_loss(
    net: layers.Layer,
    *,
    noise: layers.NoiseArg,
    penalty: float = 1.0,
    method: str = "gaussian",
    covariance: str = "factored",
    loss: Union[str, Callable] = "softmax_cross_entropy",
) -> MomentLoss:
    """``L(E[y], y) + penalty · mean_b Σ_k Var[y_k]`` from the analytic moments, no sampling.

    ``E[y]`` and ``Var[y]`` are the output moments of :func:`noisejax.moments.propagate`
    (differentiable; ``method`` ``"gaussian"`` or ``"linearized"``, ``covariance``
    ``"factored"``, ``"lowrank"`` or ``"full"``).  ``key`` is ignored.

    Example::

        >>> obj = moment_loss(net, noise=NeuronNoise(add_uncorrelated=0.1), penalty=0.5)
    """
    _check_net(net)
    _validate.check_real_number("penalty", penalty)
    if float(np.min(np.asarray(penalty))) < 0:
        raise InvalidArgumentError(f"penalty must be >= 0, got {penalty}")
    from noisejax import moments as _moments

    _validate.check_choice("method", method, _moments.METHODS)
    _validate.check_choice("covariance", covariance, _moments.COVARIANCES)
    return MomentLoss(_check_noise(noise), jnp.asarray(penalty, jnp.float32), net, _hashable(_loss_fn(loss)), method,
                      covariance)


# ----------------------------------------------------------------------------------
# Minibatch samplers
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Minibatches:
    """``batch_size`` examples per step, drawn from ``fold_in(fold_in(key, t), 0)`` for step ``t``.

    ``replace=True`` (the default of :func:`fit`): indices uniform with replacement
    (``jax.random.randint``); ``replace=False``: ``jax.random.choice(..., replace=False)``
    (``batch_size`` at most the number of examples).
    """

    batch_size: int
    replace: bool = True

    def indices(self, key: Array, start: Array, chunk: int, n: int) -> Array:
        """``(chunk, batch_size)`` example indices of steps ``start .. start + chunk − 1``."""

        def one(t):
            k = jax.random.fold_in(jax.random.fold_in(key, t), 0)
            if self.replace:
                return jax.random.randint(k, (self.batch_size,), 0, n)
            return jax.random.choice(k, n, (self.batch_size,), replace=False)

        return jax.vmap(one)(start + jnp.arange(chunk, dtype=jnp.int32))


@dataclasses.dataclass(frozen=True)
class Epochs:
    """Epochs of ``⌊n / batch_size⌋`` steps: epoch ``e`` visits ``permutation(fold_in(key, e + key_offset), n)``
    in consecutive batches (the ``n mod batch_size`` last permuted examples are skipped).

    ``key_offset`` lets a recipe keep its key schedule (:func:`noisejax.study.models.train`
    shuffles epoch ``e`` with ``fold_in(key, e + 1)``: ``key`` itself initialized the model).
    """

    batch_size: int
    key_offset: int = 0

    def indices(self, key: Array, start: Array, chunk: int, n: int) -> Array:
        """``(chunk, batch_size)`` example indices of steps ``start .. start + chunk − 1`` (``start`` a multiple of ``chunk``)."""
        per_epoch = max(1, n // self.batch_size)
        # epochs a chunk spans: exactly chunk/per_epoch when chunks are whole epochs
        span = chunk // per_epoch if chunk % per_epoch == 0 else (chunk - 1) // per_epoch + 2
        first = start // per_epoch
        perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(key, e + self.key_offset), n))(
            first + jnp.arange(span, dtype=jnp.int32)
        )
        t = start + jnp.arange(chunk, dtype=jnp.int32)
        cols = (t % per_epoch)[:, None] * self.batch_size + jnp.arange(self.batch_size, dtype=jnp.int32)[None, :]
        return perms[(t // per_epoch - first)[:, None], cols]


# ----------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`fit`.

    Attributes:
      params: trained parameters.
      losses: ``(steps,)`` NumPy array, the objective at each step (before its update).
      compile_seconds: time to trace and compile the training step.
      run_seconds: wall time of the steps themselves.
      state: the final non-trained state (e.g. BatchNorm statistics) of a stateful
        objective, ``None`` otherwise.
    """

    params: PyTree
    losses: np.ndarray
    compile_seconds: float
    run_seconds: float
    state: Any = None

    @property
    def seconds_per_step(self) -> float:
        return self.run_seconds / max(len(self.losses), 1)


def optax_step(loss: Callable, optimizer: optax.GradientTransformation, params: PyTree, opt_state: Any, *args):
    """One optax step: ``(value, aux), g = value_and_grad(loss, has_aux=True)(params, *args)``, then the update.

    Returns ``(params', opt_state', value, aux)`` with ``params' = params + optimizer.update(g, ...)``.
    The one optax update of the package (:func:`scan_steps`, :func:`fit`).
    """
    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, *args)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value, aux


def scan_steps(
    loss: Callable,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: Any,
    state: Any = None,
    xs: Any = None,
    *,
    length: Optional[int] = None,
    active: Optional[Array] = None,
):
    """Optax steps in one :func:`jax.lax.scan`, for use inside jitted code (vmap it freely).

    Step ``i``: ``(value, state') = loss(params, state, x_i)`` with ``x_i = xs[i]``
    (``None`` when ``xs`` is ``None``: give ``length``), the gradient taken w.r.t.
    ``params`` only, then one :func:`optax_step`.  ``state`` carries what is not trained
    (BatchNorm statistics; ``None`` if nothing).  With ``active`` (a ``(steps,)`` bool
    array) an inactive step leaves ``params``, ``opt_state`` and ``state`` unchanged.

    Returns:
      ``((params, opt_state, state), values)`` with ``values`` the ``(steps,)`` losses
      (each before its step's update).

    Example::

        >>> loss = lambda p, st, b: (jnp.mean((x[b] @ p - y[b]) ** 2), st)
        >>> (p, s, _), losses = scan_steps(loss, opt, p0, opt.init(p0), None, batches)
    """

    def step(carry, inp):
        p, s, st = carry
        x, on = inp
        new = optax_step(loss, optimizer, p, s, st, x)
        new_carry, value = (new[0], new[1], new[3]), new[2]
        if on is not None:
            new_carry = jax.tree_util.tree_map(lambda a, b: jnp.where(on, a, b), new_carry, carry)
        return new_carry, value

    return lax.scan(step, (params, opt_state, state), (xs, active), length=length)


def _check_data(x, y) -> tuple[Any, Optional[Array]]:
    """``x`` an array (or a pytree of arrays) with a leading example axis, ``y`` integer labels or ``None``."""
    if y is None:
        x = jax.tree_util.tree_map(jnp.asarray, x)
        sizes = {int(a.shape[0]) if a.ndim else -1 for a in jax.tree_util.tree_leaves(x)}
        if len(sizes) != 1 or -1 in sizes or 0 in sizes:
            raise ShapeMismatchError(f"data arrays must share one non-empty leading axis, got sizes {sorted(sizes)}")
        for a in jax.tree_util.tree_leaves(x):
            _validate.check_finite("x", np.asarray(a))
        return x, None
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ShapeMismatchError(f"x must be (n, ...) and y (n,) with the same n; got {tuple(x.shape)} and {tuple(y.shape)}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise InvalidArgumentError(f"y must hold integer class labels, got dtype {y.dtype}")
    if x.shape[0] == 0:
        raise ShapeMismatchError("x is empty; expected at least one example")
    _validate.check_finite("x", np.asarray(x))
    return x, y


_COMPILED: "OrderedDict[Any, Any]" = OrderedDict()
_COMPILED_LOCK = threading.Lock()  # fits may run in threads (``reproduce`` runs experiments side by side)
_COMPILED_MAX = 32
_BAR_EVERY = 25  # steps between progress-bar updates
_DEFAULT_OPTIMIZER: list = []


def _default_optimizer() -> optax.GradientTransformation:
    if not _DEFAULT_OPTIMIZER:  # one object, so default calls share compiled steps
        _DEFAULT_OPTIMIZER.append(optax.adam(1e-2))
    return _DEFAULT_OPTIMIZER[0]


def _make_run_chunk(opt, sampler, chunk: int, stateful: bool, masked: bool, objective_def, direct: bool = False):
    """``run_chunk(...)``: ``chunk`` steps in one :func:`scan_steps`; with ``direct`` (``chunk == 1``) one step, no loop."""

    def run_chunk(objective_leaves, carry, start, steps, key, x, y):
        # the objective travels as leaves: rebuilding it here (from tracers) keeps
        # dataclass validators away from jax's lowering placeholders
        objective = jax.tree_util.tree_unflatten(objective_def, objective_leaves)
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        ts = start + jnp.arange(chunk, dtype=jnp.int32)
        idx = None if sampler is None else sampler.indices(key, start, chunk, n)

        def loss(p, st, inp):
            t, i = inp
            xb, yb = (x, y) if i is None else jax.tree_util.tree_map(lambda a: a[i], (x, y))
            k = jax.random.fold_in(jax.random.fold_in(key, t), 1)
            if stateful:
                return objective(p, st, xb, yb, k)
            return objective(p, xb, yb, k), st

        if direct:
            params, opt_state, value, state = optax_step(loss, opt, *carry, (ts[0], None if idx is None else idx[0]))
            return (params, opt_state, state), value[None]
        return scan_steps(loss, opt, *carry, xs=(ts, idx), active=(ts < steps) if masked else None)

    return jax.jit(run_chunk)


def _compiled_chunk(opt, sampler, chunk, stateful, masked, objective_def, args) -> tuple[Any, float, int]:
    """Compiled chunk for these argument types (cached), the seconds spent compiling, and the steps it runs.

    One step runs without a loop when ``chunk`` is 1, and also — whatever ``chunk`` — when
    the step contains a 2-D convolution on the CPU (:func:`noisejax._backend.loops_slow_down`:
    XLA:CPU runs a 2-D convolution's kernel gradient 30–100× slower inside ``lax.scan``).
    """
    leaves, treedef = jax.tree_util.tree_flatten(args)
    sig = (opt, sampler, chunk, stateful, masked, objective_def, treedef,
           tuple((tuple(l.shape), str(l.dtype), bool(getattr(l, "weak_type", False))) for l in leaves))
    with _COMPILED_LOCK:
        hit = _COMPILED.get(sig)
        if hit is not None:
            _COMPILED.move_to_end(sig)
            return hit[0], 0.0, hit[1]
    t0 = time.perf_counter()
    traced = None if chunk == 1 else _make_run_chunk(opt, sampler, chunk, stateful, masked, objective_def).trace(*args)
    if traced is None or _backend.loops_slow_down(traced.jaxpr):  # one step, no loop
        traced = _make_run_chunk(opt, sampler, 1, stateful, False, objective_def, direct=True).trace(*args)
        chunk = 1
    compiled = traced.lower().compile()
    seconds = time.perf_counter() - t0
    with _COMPILED_LOCK:
        _COMPILED[sig] = (compiled, chunk)
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return compiled, seconds, chunk


def _sampler(batch_size: Optional[int], sampler: Any):
    if sampler is None:
        if batch_size is None:
            return None
        return Minibatches(_validate.check_int("batch_size", batch_size, minimum=1))
    if batch_size is not None:
        raise InvalidArgumentError("give batch_size= or sampler=, not both (a sampler has its own batch_size)")
    if not callable(getattr(sampler, "indices", None)):
        raise InvalidArgumentError(f"sampler must be a noisejax.train.Minibatches or Epochs, got {type(sampler).__name__}")
    _validate.check_int("sampler.batch_size", sampler.batch_size, minimum=1)
    return sampler


def fit(
    objective: Objective,
    params: PyTree,
    x: Any,
    y: Optional[Array] = None,
    *,
    key: Array,
    optimizer: Optional[optax.GradientTransformation] = None,
    steps: int = 500,
    batch_size: Optional[int] = None,
    sampler: Any = None,
    state: Any = None,
    chunk: int = 100,
    progress: bool = False,
    description: str = "training",
) -> TrainResult:
    """Minimize ``objective`` with optax for ``steps`` steps.

    Step ``t`` (0-based) uses ``k_t = fold_in(key, t)``: a minibatch of
    ``batch_size`` indices drawn with replacement from ``fold_in(k_t, 0)`` (the full
    set when ``batch_size`` is ``None``; another ``sampler`` draws them otherwise) and
    ``objective(params, xb, yb, fold_in(k_t, 1))``.  Steps run ``chunk`` at a time in
    one compiled :func:`scan_steps` (steps past ``steps`` in the last chunk are
    masked), so the result does not depend on ``chunk``.  On the CPU an objective with a 2-D
    convolution runs one compiled step per dispatch instead (``chunk`` is then ignored):
    XLA:CPU runs a 2-D convolution's kernel gradient 30–100× slower inside ``lax.scan``
    (:mod:`noisejax._backend`).

    The compiled chunk is cached by the optimizer object, the sampler, ``chunk`` and
    the structure/shapes of the arguments: objectives built by
    :func:`noise_aware_loss` / :func:`moment_loss` that differ only in intensities
    (pytree leaves) reuse it — pass the same ``optimizer`` object to benefit.

    Args:
      objective: ``objective(params, x, y, key) -> scalar`` (see :func:`plain_loss`,
        :func:`noise_aware_loss`, :func:`moment_loss`; any callable works, the
        built-in ones are pytrees).  With ``state``:
        ``objective(params, state, x, y, key) -> (scalar, new_state)``.
      params: initial parameters (e.g. ``net.init(key, in_shape)[1]``).
      x, y: training inputs ``(n, *in_shape)`` and integer labels ``(n,)``; or ``x`` a
        tuple of arrays with one leading axis ``n`` and ``y=None`` (the objective then
        gets the tuple's minibatch and ``None``).
      optimizer: default ``optax.adam(1e-2)``.
      batch_size, sampler: minibatches (:class:`Minibatches`, :class:`Epochs`); one of
        the two, ``batch_size=b`` meaning ``Minibatches(b)``.
      state: initial non-trained state carried from step to step (e.g. BatchNorm
        statistics), returned as :attr:`TrainResult.state`.
      progress: tqdm bar over chunks.

    Returns:
      :class:`TrainResult` (``compile_seconds`` is 0 on a cache hit).

    Example::

        >>> res = fit(plain_loss(net), params, x, y, key=jax.random.key(0), steps=300, batch_size=64)
        >>> res.losses[-1] < res.losses[0]
    """
    x, y = _check_data(x, y)
    steps = _validate.check_int("steps", steps, minimum=1)
    chunk = min(_validate.check_int("chunk", chunk, minimum=1), steps)
    sampler = _sampler(batch_size, sampler)
    if not callable(objective):
        raise InvalidArgumentError("objective must be callable: objective(params, x, y, key) -> scalar")
    if not all(isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for leaf in jax.tree_util.tree_leaves(objective)):
        objective = jax.tree_util.Partial(_hashable(objective))  # a plain function: static, cached by identity
    opt = _default_optimizer() if optimizer is None else optimizer
    if not isinstance(opt, optax.GradientTransformation):
        raise InvalidArgumentError(f"optimizer must be an optax.GradientTransformation, got {type(opt).__name__}")
    carry = (params, opt.init(params), state)
    steps_arr = jnp.int32(steps)
    obj_leaves, obj_def = jax.tree_util.tree_flatten(objective)
    # the last chunk is masked past `steps` (no mask when every chunk is full)
    compiled, compile_s, chunk = _compiled_chunk(opt, sampler, chunk, state is not None, steps % chunk != 0, obj_def,
                                                 (obj_leaves, carry, jnp.int32(0), steps_arr, key, x, y))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=description, unit="step", leave=False)
    losses = []
    t0 = time.perf_counter()
    shown = 0
    try:
        for start in range(0, steps, chunk):
            carry, vals = compiled(obj_leaves, carry, jnp.int32(start), steps_arr, key, x, y)
            losses.append(vals)
            done = min(start + chunk, steps)
            if bar is not None and (done - shown >= _BAR_EVERY or done == steps):  # waiting each step would stall dispatch
                jax.block_until_ready(vals)
                bar.update(done - shown)
                shown = done
        carry = jax.block_until_ready(carry)
    finally:
        if bar is not None:
            bar.close()
    run_s = time.perf_counter() - t0
    losses = np.concatenate([np.asarray(v) for v in losses])[:steps]
    return TrainResult(carry[0], losses, compile_s, run_s, carry[2])


def train_plain(net: layers.Layer, params: PyTree, x: Array, y: Array, *, key: Array, loss="softmax_cross_entropy", **fit_kwargs) -> TrainResult:
    """:func:`fit` with :func:`plain_loss`."""
    return fit(plain_loss(net, loss=loss), params, x, y, key=key, **fit_kwargs)


# ----------------------------------------------------------------------------------
# Evaluation under noise
# ----------------------------------------------------------------------------------


def accuracy(logits: Array, labels: Array) -> Array:
    """Fraction of correct argmax predictions — THE accuracy of noisejax.

    ``logits (..., B, K)``, ``labels (B,)`` → ``(...)``: ``mean_b [argmax_k logits_bk = labels_b]``
    (a scalar for one batch; ``(R,)`` for ``R`` realizations stacked in front).

    Example::

        >>> float(accuracy(jnp.array([[2.0, 1.0], [0.0, 3.0]]), jnp.array([0, 0])))
        0.5
    """
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels, axis=-1)


@struct.dataclass
class NoisyEval:
    """Accuracy and output statistics over noise realizations for a fixed input set.

    Attributes:
      accuracy: ``(R,)`` test accuracy of each realization.
      output_mean: ``(B, K)`` mean output over realizations.
      output_var: ``(B, K)`` variance over realizations (``ddof=1``).

    The derived statistics work on JAX or NumPy leaves alike (``jax.tree_util.tree_map(np.asarray, ev)``
    gives them in NumPy, without small compiled programs).
    """

    accuracy: Array
    output_mean: Array
    output_var: Array

    @property
    def mean_accuracy(self) -> Array:
        """Accuracy under noise: the mean over realizations."""
        return self.accuracy.mean()

    @property
    def accuracy_std(self) -> Array:
        """Spread of the accuracy over realizations (population std, ``ddof=0``)."""
        return self.accuracy.std()

    @property
    def snr(self) -> Array:
        """Output SNR ``Σ mean² / Σ var`` over inputs and outputs (:func:`noisejax.snr.layer_snr`).

        ``Σ mean²`` is estimated without bias as ``Σ (m̂² − v̂/R)`` (the sample mean of
        ``R`` realizations carries ``var/R`` of noise power), so that few realizations
        do not pull the SNR of a weak signal towards ``R``.
        """
        R = self.accuracy.shape[0]
        return _snr.layer_snr(self.output_mean, self.output_var, count=R if R > 1 else None)


def make_evaluator(net: layers.Layer, *, n_realizations: int = 32) -> Callable[..., NoisyEval]:
    """Compiled ``evaluate(params, x, y, *, noise=None, weight_noise=None, key) -> NoisyEval``.

    Realization ``r`` uses ``k_r = fold_in(key, r)`` (neuron noise ``fold_in(k_r, 0)``,
    weight noise ``fold_in(k_r, 1)``), all ``R`` realizations vmapped.  ``noise`` and
    ``weight_noise`` are traced pytrees: changing an intensity does not recompile
    (changing which variances are ``None`` does).  With no noise at all the
    realizations coincide.

    Example::

        >>> ev = make_evaluator(net, n_realizations=64)
        >>> [float(ev(params, x, y, noise=NeuronNoise(add_uncorrelated=d), key=k).mean_accuracy) for d in (0.01, 0.1)]
    """
    R = _validate.check_int("n_realizations", n_realizations, minimum=1)

    @jax.jit
    def _evaluate(params, x, y, noise, weight_noise, key):
        def one(kr):
            p = params if weight_noise is None else weight_noise.apply(params, key=jax.random.fold_in(kr, 1))
            return layers.apply_batch(net, p, x, key=jax.random.fold_in(kr, 0), noise=noise)

        outs = jax.vmap(one)(realization_keys(key, jnp.arange(R)))  # (R, B, K)
        acc = accuracy(outs, y)
        var = jnp.var(outs, axis=0, ddof=1) if R > 1 else jnp.zeros_like(outs[0])
        return NoisyEval(acc, jnp.mean(outs, axis=0), var)

    def evaluate(params, x, y, *, noise: layers.NoiseArg = None, weight_noise=None, key: Optional[Array] = None) -> NoisyEval:
        x, y = _check_data(x, y)
        _check_weight_noise(weight_noise)
        if key is None:
            if not (noise is None or getattr(noise, "is_zero", False)) or weight_noise is not None:
                raise InvalidArgumentError("evaluate(..., noise=...) needs key=: a noisy forward pass draws random numbers")
            key = jax.random.key(0)
        if isinstance(noise, list):
            noise = tuple(noise)
        return _evaluate(params, x, y, noise, weight_noise, key)

    return evaluate
