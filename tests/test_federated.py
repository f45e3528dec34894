"""Tests of noisejax.federated: non-IID split, validation, a noise-free run learns, noisy runs work."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import federated, models
from noisejax.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def setup():
    cfg = models.ModelConfig(kind="mlp", dataset="digits", widths=(16,), activation="relu")
    ds = models.load_dataset(cfg)
    module = models.build(cfg)
    variables = module.init(jax.random.key(0), jnp.asarray(ds.x_train[:2]))
    base = federated.FederatedConfig(
        n_devices=4, n_active=4, rounds=6, eval_every=3, shards_per_device=5, local_epochs=2, local_batch=32,
        local_lr=0.3, local_optimizer="sgd", learned_steps=2, grid_lams=(0.5, 1.0), grid_betas=(-0.1, 0.0),
    )
    return module, variables, ds, base


def test_label_shards_is_a_non_iid_partition():
    y = np.repeat(np.arange(10), 30)
    rng = np.random.default_rng(0)
    y = y[rng.permutation(len(y))]
    idx = federated.label_shards(y, n_devices=10, shards_per_device=2, seed=1)
    assert idx.shape == (10, 2 * 15)
    flat = idx.ravel()
    assert len(np.unique(flat)) == flat.size  # disjoint
    for row in idx:  # two label-sorted shards of 15 from classes of 30: at most two labels per device
        assert len(np.unique(y[row])) <= 2
    with pytest.raises(InvalidArgumentError, match="shards"):
        federated.label_shards(y[:5], n_devices=10, shards_per_device=2)


def test_config_validation():
    with pytest.raises(InvalidArgumentError, match="n_active"):
        federated.FederatedConfig(n_devices=3, n_active=4)
    with pytest.raises(InvalidArgumentError, match="multiple of eval_every"):
        federated.FederatedConfig(rounds=7, eval_every=5)
    with pytest.raises(InvalidArgumentError, match="denoiser"):
        federated.FederatedConfig(denoiser="oracle")


def test_noise_free_run_learns(setup):
    module, variables, ds, base = setup
    out = federated.run(module, variables, ds, dataclasses.replace(base, noise_free=True), wnr_db=[0.0],
                        key=jax.random.key(0))
    acc = out["test_accuracy"]
    assert acc.shape == (1, 1, 2) and out["rounds"] == [3, 6]
    assert acc[0, 0, -1] > 0.6  # chance is 0.1


@pytest.mark.parametrize("denoiser", ["compensated", "learned"])
def test_noisy_run_with_server_denoiser(setup, denoiser):
    module, variables, ds, base = setup
    cfg = dataclasses.replace(base, denoiser=denoiser, rounds=3, eval_every=3)
    out = federated.run(module, variables, ds, cfg, wnr_db=[-5.0, 30.0], key=jax.random.key(1), n_seeds=2)
    acc = out["test_accuracy"]
    assert acc.shape == (2, 2, 1) and np.all(np.isfinite(acc)) and np.all((acc >= 0) & (acc <= 1))
    assert acc[1].mean() > 0.4  # 30 dB: essentially noise-free, it learns
    # seeds differ (different device draws and noise)
    assert not np.array_equal(acc[0, 0], acc[0, 1]) or not np.array_equal(acc[1, 0], acc[1, 1])
