"""Training and evaluating :mod:`noisejax.layers` networks under noise, with optax.

Three objectives, all ``objective(params, x, y, key) -> scalar`` on a batch:

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
``fold_in(·, 0)``, noise from ``fold_in(·, 1)``), reporting compile and run time
separately.  :func:`make_evaluator` returns a compiled function for accuracy and
output statistics over noise realizations, with the noise intensities as traced
arguments (one compile serves a whole intensity sweep).

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
import time
from collections import OrderedDict
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from noisejax import _struct as struct
from jax import lax

from noisejax import _validate, layers
from noisejax import snr as _snr
from noisejax.errors import InvalidArgumentError, ShapeMismatchError

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
    "TrainResult",
    "fit",
    "train_plain",
    "train_noise_aware",
    "train_moment_regularized",
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


class _Static:
    """Hold a static object (a network, a loss) compared and hashed by identity.

    Lets objectives be pytrees whose intensities are traced leaves while the
    network stays in the tree structure, so :func:`fit` reuses one compiled step
    for every intensity.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Static) and other.value is self.value

    def __repr__(self) -> str:
        return f"_Static({type(self.value).__name__})"


@struct.dataclass
class PlainLoss:
    """Noise-free objective ``L(net(x), y)`` (build with :func:`plain_loss`)."""

    _net: _Static = struct.field(pytree_node=False)
    _loss: _Static = struct.field(pytree_node=False)

    def __call__(self, params, x, y, key=None):
        return self._loss.value(layers.apply_batch(self._net.value, params, x), y)


@struct.dataclass
class NoiseAwareLoss:
    """Loss averaged over sampled noise realizations (build with :func:`noise_aware_loss`).

    ``noise`` and ``weight_noise`` are pytree leaves: objectives that differ only in
    intensities share one compiled training step.
    """

    noise: Any
    weight_noise: Any
    _net: _Static = struct.field(pytree_node=False)
    _loss: _Static = struct.field(pytree_node=False)
    n_realizations: int = struct.field(pytree_node=False, default=8)

    def __call__(self, params, x, y, key):
        net, lf = self._net.value, self._loss.value

        def one(r):
            kr = jax.random.fold_in(key, r)
            p = params
            if self.weight_noise is not None:
                p = _perturb_weights(params, self.weight_noise, jax.random.fold_in(kr, 1))
            return lf(layers.apply_batch(net, p, x, key=jax.random.fold_in(kr, 0), noise=self.noise), y)

        return jnp.mean(jax.vmap(one)(jnp.arange(self.n_realizations)))


@struct.dataclass
class MomentLoss:
    """``L(E[y], y) + penalty · mean_b Σ_k Var[y_k]`` (build with :func:`moment_loss`)."""

    noise: Any
    penalty: Array
    _net: _Static = struct.field(pytree_node=False)
    _loss: _Static = struct.field(pytree_node=False)
    method: str = struct.field(pytree_node=False, default="gaussian")
    covariance: str = struct.field(pytree_node=False, default="factored")

    def output_moments(self, params, x):
        """``(mean (B, K), var (B, K))`` of the output for a batch ``x``."""
        from noisejax import moments as _moments

        net = self._net.value

        def one(xi):
            out = _moments.propagate(net, params, xi, noise=self.noise, method=self.method, covariance=self.covariance)[-1]
            return out.mean, out.var

        return jax.vmap(one)(x)

    def __call__(self, params, x, y, key=None):
        mean, var = self.output_moments(params, x)
        return self._loss.value(mean, y) + self.penalty * jnp.mean(jnp.sum(var, axis=-1))


@struct.dataclass
class _Closure:
    """A user objective without array leaves, carried as a static field."""

    fn: _Static = struct.field(pytree_node=False)

    def __call__(self, params, x, y, key):
        return self.fn.value(params, x, y, key)


def _check_net(net) -> None:
    if not isinstance(net, layers.Layer):
        raise InvalidArgumentError(f"net must be a noisejax.layers.Layer, got {type(net).__name__}")


def _check_noise(noise) -> layers.NoiseArg:
    from noisejax.noise import NeuronNoise

    if noise is None or isinstance(noise, NeuronNoise):
        return noise
    if isinstance(noise, (list, tuple)) and all(n is None or isinstance(n, NeuronNoise) for n in noise):
        return tuple(noise)
    raise InvalidArgumentError(f"noise must be None, a NeuronNoise or a sequence of them (one per site), got {type(noise).__name__}")


def plain_loss(net: layers.Layer, *, loss: Union[str, Callable] = "softmax_cross_entropy") -> PlainLoss:
    """Noise-free objective ``L(net(x), y)``; ``key`` is ignored."""
    _check_net(net)
    return PlainLoss(_Static(net), _Static(_loss_fn(loss)))


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
    return NoiseAwareLoss(_check_noise(noise), weight_noise, _Static(net), _Static(_loss_fn(loss)), n_realizations)


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
    return MomentLoss(
        _check_noise(noise), jnp.asarray(penalty, jnp.float32), _Static(net), _Static(_loss_fn(loss)), method, covariance
    )


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
    """

    params: PyTree
    losses: np.ndarray
    compile_seconds: float
    run_seconds: float

    @property
    def seconds_per_step(self) -> float:
        return self.run_seconds / max(len(self.losses), 1)


def _check_data(x, y) -> tuple[Array, Array]:
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
_COMPILED_MAX = 32
_DEFAULT_OPTIMIZER: list = []


def _default_optimizer() -> optax.GradientTransformation:
    if not _DEFAULT_OPTIMIZER:  # one object, so default calls share compiled steps
        _DEFAULT_OPTIMIZER.append(optax.adam(1e-2))
    return _DEFAULT_OPTIMIZER[0]


def _make_run_chunk(opt, batch_size: Optional[int], chunk: int, objective_def):
    def run_chunk(objective_leaves, carry, start, steps, key, x, y):
        # the objective travels as leaves: rebuilding it here (from tracers) keeps
        # dataclass validators away from jax's lowering placeholders
        objective = jax.tree_util.tree_unflatten(objective_def, objective_leaves)
        n = x.shape[0]

        def step(c, t):
            p, s = c
            kt = jax.random.fold_in(key, t)
            if batch_size is None:
                xb, yb = x, y
            else:
                idx = jax.random.randint(jax.random.fold_in(kt, 0), (batch_size,), 0, n)
                xb, yb = x[idx], y[idx]
            value, grads = jax.value_and_grad(objective)(p, xb, yb, jax.random.fold_in(kt, 1))
            updates, s_new = opt.update(grads, s, p)
            p_new = optax.apply_updates(p, updates)
            active = t < steps
            keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
            return (jax.tree_util.tree_map(keep, p_new, p), jax.tree_util.tree_map(keep, s_new, s)), value

        return lax.scan(step, carry, start + jnp.arange(chunk, dtype=jnp.int32))

    return jax.jit(run_chunk)


def _compiled_chunk(opt, batch_size, chunk, objective_def, args) -> tuple[Any, float]:
    """Compiled chunk for these argument types (cached), and the seconds spent compiling."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    sig = (
        _Static(opt),
        batch_size,
        chunk,
        objective_def,
        treedef,
        tuple((tuple(l.shape), str(l.dtype), bool(getattr(l, "weak_type", False))) for l in leaves),
    )
    try:
        hit = _COMPILED.get(sig)
    except TypeError:  # an unhashable static field somewhere: compile without caching
        sig, hit = None, None
    if hit is not None:
        _COMPILED.move_to_end(sig)
        return hit, 0.0
    t0 = time.perf_counter()
    compiled = _make_run_chunk(opt, batch_size, chunk, objective_def).lower(*args).compile()
    seconds = time.perf_counter() - t0
    if sig is not None:
        _COMPILED[sig] = compiled
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return compiled, seconds


def fit(
    objective: Objective,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    key: Array,
    optimizer: Optional[optax.GradientTransformation] = None,
    steps: int = 500,
    batch_size: Optional[int] = None,
    chunk: int = 100,
    progress: bool = False,
    description: str = "training",
) -> TrainResult:
    """Minimize ``objective`` with optax for ``steps`` steps.

    Step ``t`` (0-based) uses ``k_t = fold_in(key, t)``: a minibatch of
    ``batch_size`` indices drawn with replacement from ``fold_in(k_t, 0)`` (the full
    set when ``batch_size`` is ``None``) and ``objective(params, xb, yb, fold_in(k_t, 1))``.
    Steps run ``chunk`` at a time in one compiled :func:`jax.lax.scan` (steps past
    ``steps`` in the last chunk are masked), so the result does not depend on ``chunk``.

    The compiled chunk is cached by the optimizer object, ``batch_size``, ``chunk``
    and the structure/shapes of the arguments: objectives built by
    :func:`noise_aware_loss` / :func:`moment_loss` that differ only in intensities
    (pytree leaves) reuse it — pass the same ``optimizer`` object to benefit.

    Args:
      objective: ``objective(params, x, y, key) -> scalar`` (see :func:`plain_loss`,
        :func:`noise_aware_loss`, :func:`moment_loss`; any callable works, the
        built-in ones are pytrees).
      params: initial parameters (e.g. ``net.init(key, in_shape)[1]``).
      x, y: training inputs ``(n, *in_shape)`` and integer labels ``(n,)``.
      optimizer: default ``optax.adam(1e-2)``.
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
    if batch_size is not None:
        batch_size = _validate.check_int("batch_size", batch_size, minimum=1)
    if not callable(objective):
        raise InvalidArgumentError("objective must be callable: objective(params, x, y, key) -> scalar")
    if not all(isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for leaf in jax.tree_util.tree_leaves(objective)):
        objective = _Closure(_Static(objective))  # a plain function: static, cached by identity
    opt = _default_optimizer() if optimizer is None else optimizer
    if not isinstance(opt, optax.GradientTransformation):
        raise InvalidArgumentError(f"optimizer must be an optax.GradientTransformation, got {type(opt).__name__}")
    carry = (params, opt.init(params))
    steps_arr = jnp.int32(steps)
    obj_leaves, obj_def = jax.tree_util.tree_flatten(objective)
    compiled, compile_s = _compiled_chunk(opt, batch_size, chunk, obj_def, (obj_leaves, carry, jnp.int32(0), steps_arr, key, x, y))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=description, unit="step", leave=False)
    losses = []
    t0 = time.perf_counter()
    try:
        for start in range(0, steps, chunk):
            carry, vals = compiled(obj_leaves, carry, jnp.int32(start), steps_arr, key, x, y)
            losses.append(vals)
            if bar is not None:
                jax.block_until_ready(vals)
                bar.update(min(chunk, steps - start))
        carry = jax.block_until_ready(carry)
    finally:
        if bar is not None:
            bar.close()
    run_s = time.perf_counter() - t0
    losses = np.concatenate([np.asarray(v) for v in losses])[:steps]
    return TrainResult(carry[0], losses, compile_s, run_s)


def train_plain(net: layers.Layer, params: PyTree, x: Array, y: Array, *, key: Array, loss="softmax_cross_entropy", **fit_kwargs) -> TrainResult:
    """:func:`fit` with :func:`plain_loss`."""
    return fit(plain_loss(net, loss=loss), params, x, y, key=key, **fit_kwargs)


def train_noise_aware(
    net: layers.Layer,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    key: Array,
    noise: layers.NoiseArg = None,
    weight_noise=None,
    n_realizations: int = 8,
    loss="softmax_cross_entropy",
    **fit_kwargs,
) -> TrainResult:
    """:func:`fit` with :func:`noise_aware_loss`."""
    objective = noise_aware_loss(net, noise=noise, weight_noise=weight_noise, n_realizations=n_realizations, loss=loss)
    return fit(objective, params, x, y, key=key, **fit_kwargs)


def train_moment_regularized(
    net: layers.Layer,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    key: Array,
    noise: layers.NoiseArg,
    penalty: float = 1.0,
    method: str = "gaussian",
    covariance: str = "factored",
    loss="softmax_cross_entropy",
    **fit_kwargs,
) -> TrainResult:
    """:func:`fit` with :func:`moment_loss` (``key`` only draws minibatches)."""
    objective = moment_loss(net, noise=noise, penalty=penalty, method=method, covariance=covariance, loss=loss)
    return fit(objective, params, x, y, key=key, **fit_kwargs)


# ----------------------------------------------------------------------------------
# Evaluation under noise
# ----------------------------------------------------------------------------------


@struct.dataclass
class NoisyEval:
    """Accuracy and output statistics over noise realizations for a fixed input set.

    Attributes:
      accuracy: ``(R,)`` test accuracy of each realization.
      output_mean: ``(B, K)`` mean output over realizations.
      output_var: ``(B, K)`` variance over realizations (``ddof=1``).
    """

    accuracy: Array
    output_mean: Array
    output_var: Array

    @property
    def mean_accuracy(self) -> Array:
        """Accuracy under noise: the mean over realizations."""
        return jnp.mean(self.accuracy)

    @property
    def snr(self) -> Array:
        """Output SNR ``Σ mean² / Σ var`` over inputs and outputs.

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
        def one(r):
            kr = jax.random.fold_in(key, r)
            p = params if weight_noise is None else weight_noise.apply(params, key=jax.random.fold_in(kr, 1))
            return layers.apply_batch(net, p, x, key=jax.random.fold_in(kr, 0), noise=noise)

        outs = jax.vmap(one)(jnp.arange(R))  # (R, B, K)
        acc = jnp.mean(jnp.argmax(outs, axis=-1) == y[None, :], axis=-1)
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
