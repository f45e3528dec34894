"""Local reparameterization (layers.WeightNoiseDense) is exact in distribution per example:
its per-input output mean and variance equal those of explicitly sampled noisy weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import layers, noise, rng, simulate

N = 20_000
VAR = 0.02


@pytest.fixture(scope="module")
def nets():
    widths = [5, 8, 3]
    plain = layers.mlp(widths, "tanh", "linear")
    local = layers.serial(
        *[layers.serial(layers.WeightNoiseDense(w), layers.activation(a), layers.NoiseSite())
          for w, a in zip(widths[1:], ["tanh", "linear"])]
    )
    _, params = plain.init(jax.random.key(0), (5,))
    x = jax.random.normal(jax.random.key(1), (4, 5))
    return plain, local, params, x


def test_local_reparameterization_matches_sampled_weights(nets):
    plain, local, params, x = nets

    def sampled(k):  # independent reference: draw W̃ = W + N(0, σ²), b̃ likewise, shared by the 4 inputs
        leaves, tree = jax.tree_util.tree_flatten(params)
        noisy = [leaf + jnp.sqrt(VAR) * jax.random.normal(jax.random.fold_in(k, i), leaf.shape) for i, leaf in enumerate(leaves)]
        return layers.apply_batch(plain, jax.tree_util.tree_unflatten(tree, noisy), x)

    def reparam(k):
        return layers.apply_batch(local, params, x, key=k, noise=noise.LocalWeightNoise(VAR))

    a = simulate.monte_carlo(sampled, rng.key(2), N)
    b = simulate.monte_carlo(reparam, rng.key(3), N)
    va, vb = np.asarray(a.var, np.float64), np.asarray(b.var, np.float64)
    assert np.all(np.abs(np.asarray(a.mean) - np.asarray(b.mean)) < 5 * np.sqrt((va + vb) / N))
    # variance of a variance estimate for non-Gaussian outputs: bounded generously by 3x the Gaussian value
    assert np.all(np.abs(va - vb) < 5 * np.sqrt(2 / N) * np.sqrt(va**2 + vb**2) * 1.7)
    # and the check has power: dropping the bias noise (a ≈ 10 % change) is detected
    c = simulate.monte_carlo(
        lambda k: layers.apply_batch(local, params, x, key=k, noise=noise.LocalWeightNoise(VAR, bias_variance=0.0)),
        rng.key(4), N)
    assert np.any(np.abs(va - np.asarray(c.var)) > 5 * np.sqrt(2 / N) * np.sqrt(va**2 + np.asarray(c.var) ** 2) * 1.7)


def test_moment_rule_of_weight_noise_dense_matches_monte_carlo(nets):
    from noisejax import moments

    _, local, params, x = nets
    lin = layers.serial(layers.WeightNoiseDense(3), layers.Linear(1.0))
    _, p = lin.init(jax.random.key(5), (5,))
    res = simulate.monte_carlo(lambda k: lin.apply(p, x[0], key=k, noise=noise.LocalWeightNoise(VAR)), rng.key(6), N)
    pred = moments.predict(lin, p, x[0], noise=noise.LocalWeightNoise(VAR))
    v_pred = np.asarray(pred[-1].var)
    assert np.all(np.abs(np.asarray(res.var) / v_pred - 1) < 5 * np.sqrt(2 / N))


@pytest.mark.parametrize("bias_variance", [0.0, 0.1, None])
def test_moment_rule_uses_the_bias_variance(bias_variance):
    """predict's variance is (y∘y)·σ_W² + σ_b² with σ_b² = bias_variance (default: variance), as sampled.

    One WeightNoiseDense and a linear readout on a fixed input: the output is exactly Gaussian, so the
    Monte Carlo variance has relative sd √(2/N) — 5σ is 5 %; bias_variance 0 vs 0.1 changes it by 3×.
    """
    from noisejax import moments

    lin = layers.serial(layers.WeightNoiseDense(3), layers.Linear(1.0))
    _, p = lin.init(jax.random.key(5), (5,))
    x = jax.random.normal(jax.random.key(1), (5,))
    nz = noise.LocalWeightNoise(VAR, bias_variance=bias_variance)
    res = simulate.monte_carlo(lambda k: lin.apply(p, x, key=k, noise=nz), rng.key(6), N)
    pred = np.asarray(moments.predict(lin, p, x, noise=nz)[-1].var)
    sb2 = VAR if bias_variance is None else bias_variance
    want = np.square(np.asarray(x, np.float64)).sum() * VAR + sb2  # the closed form, independently
    np.testing.assert_allclose(pred, want, rtol=1e-5)
    assert np.all(np.abs(np.asarray(res.var) / pred - 1) < 5 * np.sqrt(2 / N))
    # weight noise given both ways adds up (independent sources): NoisyParam + LocalWeightNoise
    both = moments.predict(lin, moments.with_weight_noise(p, (({"W": 0.01, "b": 0.02}), ())), x, noise=nz)[-1].var
    np.testing.assert_allclose(np.asarray(both), want + np.square(np.asarray(x, np.float64)).sum() * 0.01 + 0.02, rtol=1e-5)
