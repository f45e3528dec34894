"""Tests of noisejax.federated: non-IID split, validation, a noise-free run learns, noisy runs work."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import federated, noise
from noisejax.study import models
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


def test_batchnorm_resnet_federated_path():
    """ResNet-1D with BatchNorm: batch_stats flow through the rounds; norm parameters arrive noise-free."""
    cfg = models.ModelConfig(kind="resnet1d", dataset="digits", stage_channels=(4, 8), blocks_per_stage=1)
    ds = models.load_dataset(cfg)
    module = models.build(cfg)
    variables = module.init(jax.random.key(0), jnp.asarray(ds.x_train[:2]))
    assert "batch_stats" in variables
    fed = federated.FederatedConfig(
        n_devices=4, n_active=4, rounds=4, eval_every=4, shards_per_device=20, local_epochs=4, local_batch=32,
        local_lr=2e-2, grid_lams=(0.5, 1.0), grid_betas=(-0.1, 0.0), denoiser="compensated",
    )
    out = federated.run(module, variables, ds, dataclasses.replace(fed, noise_free=True), wnr_db=[0.0], key=jax.random.key(0))
    assert out["test_accuracy"][0, 0, -1] > 0.35  # chance is 0.1 (measured 0.51)
    noisy = federated.run(module, variables, ds, fed, wnr_db=[-10.0, 30.0], key=jax.random.key(0))
    acc = noisy["test_accuracy"]
    assert np.all(np.isfinite(acc)) and acc[1, 0, -1] > 0.35  # 30 dB: as noise-free (measured 0.50)
    assert acc[0, 0, -1] < acc[1, 0, -1]  # -10 dB hurts (measured 0.11)
    # the channel noise never touches normalization parameters or batch statistics
    s = jax.tree_util.tree_map(jnp.ones_like, variables)
    s_noisy = noise.add_weight_noise(s, -10.0, key=jax.random.key(1), reference=fed.reference, scope=fed.scope)
    flat = jax.tree_util.tree_flatten_with_path(s_noisy)[0]
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        if "BatchNorm" in name or "batch_stats" in name:
            np.testing.assert_array_equal(np.asarray(leaf), 1.0, err_msg=name)
    assert any(not np.allclose(np.asarray(leaf), 1.0) for path, leaf in flat if "Conv" in jax.tree_util.keystr(path))


_DEVICES_SCRIPT = r"""
import dataclasses, sys
import jax, numpy as np
from noisejax import federated, rng
from noisejax.study import models
cfg = models.ModelConfig(kind="mlp", dataset="digits", widths=(8,), activation="relu")
ds = models.load_dataset(cfg)
module = models.build(cfg)
variables = models.init(module, jax.random.key(0), ds.x_train[:2], train=False)
fed = federated.FederatedConfig(n_devices=4, n_active=2, rounds=2, eval_every=1, shards_per_device=5, local_epochs=1,
                                local_batch=32, local_lr=0.3, local_optimizer="sgd", denoiser="mmse")
assert len(jax.devices()) == int(sys.argv[2]), jax.devices()
out = federated.run(module, variables, ds, fed, wnr_db=[-20.0, -10.0, 0.0], key=rng.key(5), n_seeds=1)
np.save(sys.argv[1], out["test_accuracy"])
"""


def test_runs_split_over_devices_give_the_same_accuracies(tmp_path, on_host_devices):
    """3 runs on 1 CPU device vs split over 2 (padded to 4): the same accuracies, bitwise."""
    res = {}
    for n_dev in (1, 2):
        out = tmp_path / f"acc_{n_dev}.npy"
        on_host_devices(_DEVICES_SCRIPT, n_dev, out, n_dev)
        res[n_dev] = np.load(out)
    assert res[1].shape == (3, 1, 2)
    np.testing.assert_array_equal(res[1], res[2])
