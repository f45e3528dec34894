"""Noisy federated training with a server-side denoiser (Shao, Liew & Gündüz 2023, noisy training).

Protocol of one round (``M`` devices, ``K`` active):

1. ``K`` devices are drawn without replacement; each starts from the global
   variables and takes local optax steps on its own (non-IID) shard — the ``K``
   devices are trained together with :func:`jax.vmap`.
2. The server receives ``S̃ = Σ_k Δ_k + n`` with ``Δ_k`` the devices' updates and
   ``n ~ N(0, σ_n²)``, ``σ_n² = P(Σ_k Δ_k)/10^(WNR/10)`` (``P`` the update power or
   variance, :func:`noisejax.noise.noise_power`).  Leaves the leaf filter skips —
   normalization parameters and ``batch_stats`` — arrive noise-free.
3. The server denoises ``S̃`` and applies the average ``Ŝ/K`` to the global variables.

Server denoisers (``FederatedConfig.denoiser``):

* ``"ml"``: ``Ŝ = S̃``.
* ``"mmse"``: Gaussian-prior MMSE per layer, statistics from ``S̃`` and σ_n².
* ``"compensated"``: the compensated MMSE whose ``(λ', β)`` is chosen each round on
  the server's validation data (lowest validation loss over the grid, one vmapped
  evaluation; the grid contains ML).
* ``"learned"``: a :class:`noisejax.denoise.LearnedDenoiser` (per-layer WNR-conditioned
  affine map) whose coefficients are trained with optax on the validation loss of
  the updated model, a few Adam steps per round, warm-started from the previous round.

:func:`run` trains all WNR points and seeds of one denoiser in **one compiled call**
(``vmap`` over (WNR, seed) pairs, ``lax.scan`` over rounds).

Example::

    >>> cfg = FederatedConfig(n_devices=10, n_active=2, rounds=5, denoiser="mmse")
    >>> out = run(module, variables, dataset, cfg, wnr_db=[0.0, 10.0], key=jax.random.key(0))
    >>> out["test_accuracy"].shape     # (W, seeds, n_evals)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from noisejax import _validate, denoise
from noisejax import noise as _noise
from noisejax import train as _train
from noisejax.errors import InvalidArgumentError

__all__ = ["DENOISERS", "FederatedConfig", "label_shards", "run"]

PyTree = Any
DENOISERS = ("ml", "mmse", "compensated", "learned")


@dataclass(frozen=True)
class FederatedConfig:
    """Federated protocol, local training and server denoiser.

    Attributes:
      n_devices, n_active: M and K.
      rounds: communication rounds.  eval_every: rounds between test evaluations.
      shards_per_device: label-sorted shards per device (non-IID split).
      local_epochs, local_batch, local_lr, local_optimizer: local training ("adam" with a
        fresh state each round, or plain "sgd").
      reference, scope: WNR definition on the update ("power": mean square).
      denoiser: one of :data:`DENOISERS`.
      grid_lams, grid_betas: compensated-MMSE grid (selected on validation each round).
      learned_steps, learned_lr: server Adam steps per round for ``"learned"``.
      learned_init: initial MMSE exponent of the learned denoiser (1: start at MMSE, 0: at ML).
      learned_train: coefficient groups the server trains (the others stay at their
        initial values; the compensation shift is frozen by default because a shift of
        ``c·σ_n`` at a low WNR is too large for a few greedy steps to handle safely).
      learned_wnr_range: normalization range of the learned denoiser's WNR feature.
      val_batch: validation examples used by the server per round (all if larger).
      noise_free: skip the channel noise (reference run).
    """

    n_devices: int = 20
    n_active: int = 4
    rounds: int = 60
    eval_every: int = 5
    shards_per_device: int = 2
    local_epochs: int = 2
    local_batch: int = 16
    local_lr: float = 3e-3
    local_optimizer: str = "adam"
    reference: str = "power"
    scope: str = "global"
    denoiser: str = "ml"
    grid_lams: tuple[float, ...] = (0.0, 0.5, 0.9, 1.0)
    grid_betas: tuple[float, ...] = (-1.0, -0.3, -0.1, 0.0, 0.1)
    learned_steps: int = 10
    learned_lr: float = 0.1
    learned_init: float = 1.0
    learned_train: tuple[str, ...] = ("mmse_exponent", "log_scale")
    learned_wnr_range: tuple[float, float] = (-20.0, 20.0)
    val_batch: int = 512
    noise_free: bool = False

    def __post_init__(self):
        for name in ("n_devices", "n_active", "rounds", "eval_every", "shards_per_device", "local_epochs",
                     "local_batch", "learned_steps", "val_batch"):
            _validate.check_int(f"FederatedConfig.{name}", getattr(self, name), minimum=1)
        if self.n_active > self.n_devices:
            raise InvalidArgumentError(
                f"FederatedConfig.n_active must be <= n_devices ({self.n_devices}), got {self.n_active}"
            )
        if self.rounds % self.eval_every:
            raise InvalidArgumentError(
                f"FederatedConfig.rounds ({self.rounds}) must be a multiple of eval_every ({self.eval_every})"
            )
        _validate.check_choice("FederatedConfig.denoiser", self.denoiser, DENOISERS)
        _validate.check_choice("FederatedConfig.local_optimizer", self.local_optimizer, ("adam", "sgd"))
        _validate.check_choice("FederatedConfig.reference", self.reference, ("variance", "power"))
        _validate.check_choice("FederatedConfig.scope", self.scope, ("global", "per_layer"))


def label_shards(y: np.ndarray, n_devices: int, shards_per_device: int, *, seed: int = 0) -> np.ndarray:
    """Non-IID split: sort by label, cut into ``n_devices·shards_per_device`` equal shards, deal them out.

    Returns an int array ``(n_devices, shards_per_device·shard_size)`` of example
    indices (the ``n mod n_shards`` last examples in label order are dropped), so each
    device sees about ``shards_per_device`` labels.
    """
    n_devices = _validate.check_int("n_devices", n_devices, minimum=1)
    shards_per_device = _validate.check_int("shards_per_device", shards_per_device, minimum=1)
    y = np.asarray(y)
    n_shards = n_devices * shards_per_device
    size = len(y) // n_shards
    if size < 1:
        raise InvalidArgumentError(f"{len(y)} examples cannot fill {n_shards} shards")
    order = np.argsort(y, kind="stable")[: n_shards * size].reshape(n_shards, size)
    perm = np.random.default_rng(seed).permutation(n_shards)
    return order[perm].reshape(n_devices, shards_per_device * size)


def _split_variables(variables: PyTree) -> tuple[PyTree, PyTree]:
    params = variables["params"]
    return params, {k: v for k, v in variables.items() if k != "params"}


def _tree_add(a, b, scale=1.0):
    return jax.tree_util.tree_map(lambda x, y: x + scale * y, a, b)


def _apply_train(module: nn.Module, variables: PyTree, x: jax.Array):
    if "batch_stats" in variables:
        out, upd = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return out, {"batch_stats": upd["batch_stats"]}
    return module.apply(variables, x, train=True), {}


def _loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _server_optimizer(cfg: FederatedConfig) -> optax.GradientTransformation:
    """Adam on the learned denoiser's coefficient groups ``cfg.learned_train``; the others frozen."""
    return optax.multi_transform(
        {"train": optax.adam(cfg.learned_lr), "freeze": optax.set_to_zero()},
        lambda den: jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if any(getattr(p, "key", None) in cfg.learned_train for p in path) else "freeze",
            den,
        ),
    )


def _make_local_train(module: nn.Module, cfg: FederatedConfig, n_local: int):
    """One device's local training: ``local_epochs`` epochs of its shard, optax steps of :func:`noisejax.train.scan_steps`."""
    steps_per_epoch = max(1, n_local // cfg.local_batch)
    batch = min(cfg.local_batch, n_local)
    local_opt = optax.adam(cfg.local_lr) if cfg.local_optimizer == "adam" else optax.sgd(cfg.local_lr)

    def local_train(global_vars, idx, key, xtr, ytr):
        params, rest = _split_variables(global_vars)

        def epoch_batches(e):
            perm = jax.random.permutation(jax.random.fold_in(key, e), n_local)[: steps_per_epoch * batch]
            return idx[perm].reshape(steps_per_epoch, batch)

        batches = jax.vmap(epoch_batches)(jnp.arange(cfg.local_epochs)).reshape(-1, batch)

        def loss(p, rest, b):
            out, new_rest = _apply_train(module, {"params": p, **rest}, xtr[b])
            return _loss(out, ytr[b]), {**rest, **new_rest}

        (params, _, rest), _ = _train.scan_steps(loss, local_opt, params, local_opt.init(params), rest, batches)
        return {"params": params, **rest}

    return local_train


def _make_server_denoise(module: nn.Module, cfg: FederatedConfig):
    """The server's denoiser of the received sum of updates: ``(global, S̃, σ², wnr, den, xv, yv) -> (Ŝ, den)``."""
    grid = denoise.compensated_grid(cfg.grid_lams, cfg.grid_betas)
    server_opt = _server_optimizer(cfg)
    K = cfg.n_active

    def server_denoise(global_vars, s_noisy, pw, wnr, den, xv, yv):
        if cfg.denoiser == "ml":
            return s_noisy, den
        if cfg.denoiser == "mmse":
            return denoise.MMSE()(s_noisy, pw), den

        def val_loss(s_hat):
            cand = _tree_add(global_vars, s_hat, 1.0 / K)
            return _loss(module.apply(cand, xv, train=False), yv)

        if cfg.denoiser == "compensated":
            losses = jax.lax.map(lambda e: val_loss(e(s_noisy, pw)), grid)
            best = jnp.argmin(losses)
            chosen = jax.tree_util.tree_map(lambda a: a[best], grid)
            return chosen(s_noisy, pw), den
        # learned: a few Adam steps on the validation loss, warm-started from the last round
        obj = lambda d: val_loss(d(s_noisy, pw, wnr_db=wnr))  # noqa: E731
        (new, _, _), _ = _train.scan_steps(lambda d, st, _: (obj(d), st), server_opt, den, server_opt.init(den),
                                           length=cfg.learned_steps)
        # safeguard: keep the new coefficients only if they lower the validation loss
        better = jnp.nan_to_num(obj(new), nan=jnp.inf) < jnp.nan_to_num(obj(den), nan=jnp.inf)
        den = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), new, den)
        return den(s_noisy, pw, wnr_db=wnr), den

    return server_denoise


def _make_run_one(module: nn.Module, cfg: FederatedConfig, n_local: int):
    local_train = _make_local_train(module, cfg, n_local)
    server_denoise = _make_server_denoise(module, cfg)
    filt = _noise.default_leaf_filter
    K = cfg.n_active

    def one_round(carry, r, *, key, wnr, shards, xtr, ytr, xv, yv):
        global_vars, den = carry
        kr = jax.random.fold_in(key, r)
        active = jax.random.choice(jax.random.fold_in(kr, 0), cfg.n_devices, (K,), replace=False)
        dev_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(kr, 1), i))(active)
        local = jax.vmap(local_train, in_axes=(None, 0, 0, None, None))(global_vars, shards[active], dev_keys, xtr, ytr)
        s = jax.tree_util.tree_map(lambda l, g: jnp.sum(l - g[None], axis=0), local, global_vars)
        if cfg.noise_free:
            s_hat = s
        else:
            pw = _noise.noise_power(s, wnr, reference=cfg.reference, scope=cfg.scope, leaf_filter=filt)
            s_noisy = _noise.add_weight_noise(
                s, wnr, key=jax.random.fold_in(kr, 2), reference=cfg.reference, scope=cfg.scope, leaf_filter=filt
            )
            s_hat, den = server_denoise(global_vars, s_noisy, pw, wnr, den, xv, yv)
        return (_tree_add(global_vars, s_hat, 1.0 / K), den), None

    def run_one(wnr, key, variables0, den0, shards, xtr, ytr, xv, yv, xte, yte):
        rnd = lambda c, r: one_round(c, r, key=key, wnr=wnr, shards=shards, xtr=xtr, ytr=ytr, xv=xv, yv=yv)  # noqa: E731

        def block(carry, b):
            carry, _ = jax.lax.scan(rnd, carry, b * cfg.eval_every + jnp.arange(cfg.eval_every))
            return carry, _train.accuracy(module.apply(carry[0], xte, train=False), yte)

        _, acc = jax.lax.scan(block, (variables0, den0), jnp.arange(cfg.rounds // cfg.eval_every))
        return acc

    return run_one


def run(
    module: nn.Module,
    variables: PyTree,
    dataset: Any,
    cfg: FederatedConfig,
    *,
    wnr_db: Sequence[float],
    key: jax.Array,
    n_seeds: int = 1,
    split_seed: int = 0,
    devices: Optional[Sequence[jax.Device]] = None,
) -> dict:
    """Federated training for every WNR in ``wnr_db`` and ``n_seeds`` seeds, in one compiled call.

    The ``W·n_seeds`` runs are independent: they are split over ``devices`` (default: this
    process's devices, :func:`jax.local_devices`) with a :class:`~jax.sharding.NamedSharding`
    of the run axis, so several CPU devices (``--xla_force_host_platform_device_count``) or
    accelerators run them side by side.  A run's result does not depend on the device count.

    Args:
      module: a linen module called as ``module.apply(variables, x, train=...)``.
      variables: initial variables (``{"params": ..., "batch_stats": ...}``).
      dataset: a :class:`noisejax.data.Dataset`; devices split its training set,
        the server uses its validation set, accuracy is measured on its test set.
      cfg: the protocol.
      wnr_db: WNR points (dB) of the update channel (ignored if ``cfg.noise_free``).
      key: base key; seed ``s`` uses ``fold_in(key, s)`` for every WNR point.
      n_seeds: independent runs per WNR point.
      split_seed: seed of the non-IID split (the same for all runs).
      devices: the devices the runs are split over (the run count is padded to a multiple).

    Returns:
      ``{"test_accuracy": (W, n_seeds, rounds/eval_every), "rounds": [...], "seconds": s}``.
    """
    n_seeds = _validate.check_int("n_seeds", n_seeds, minimum=1)
    wnr = np.asarray(wnr_db, dtype=np.float32).ravel()
    _validate.check_real_number("wnr_db", wnr)
    if wnr.size == 0:
        raise InvalidArgumentError("wnr_db must hold at least one WNR point")
    shards = jnp.asarray(label_shards(dataset.y_train, cfg.n_devices, cfg.shards_per_device, seed=split_seed))
    run_one = _make_run_one(module, cfg, int(shards.shape[1]))
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    den0 = denoise.init_learned(variables, wnr_range=cfg.learned_wnr_range, mmse_exponent=cfg.learned_init)
    nv = min(cfg.val_batch, len(dataset.y_val))
    arrays = [jnp.asarray(a) for a in (dataset.x_train, dataset.y_train, dataset.x_val[:nv], dataset.y_val[:nv],
                                       dataset.x_test, dataset.y_test)]
    n_runs = wnr.size * n_seeds
    devices = list(jax.local_devices() if devices is None else devices)
    # run i: WNR point i // n_seeds, seed i % n_seeds; padded (repeating the last run) to a multiple of the devices
    run_ids = np.minimum(np.arange(-(-n_runs // len(devices)) * len(devices)), n_runs - 1)
    w_all = jnp.asarray(np.repeat(wnr, n_seeds)[run_ids])
    k_all = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.asarray(run_ids % n_seeds))
    mesh = Mesh(np.asarray(devices), ("runs",))
    w_all, k_all = jax.device_put((w_all, k_all), NamedSharding(mesh, P("runs")))
    variables, den0, shards, arrays = jax.device_put((variables, den0, shards, arrays), NamedSharding(mesh, P()))

    @jax.jit
    def all_runs(w_all, k_all, variables, den0, shards, *arrays):
        return jax.vmap(run_one, in_axes=(0, 0) + (None,) * 9)(w_all, k_all, variables, den0, shards, *arrays)

    t0 = time.perf_counter()
    acc = np.asarray(all_runs(w_all, k_all, variables, den0, shards, *arrays))[:n_runs]
    seconds = time.perf_counter() - t0
    acc = acc.reshape(wnr.size, n_seeds, -1)
    return {
        "test_accuracy": acc,
        "rounds": [cfg.eval_every * (i + 1) for i in range(acc.shape[-1])],
        "seconds": seconds,
    }
