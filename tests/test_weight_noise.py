"""Weight perturbations of parameter pytrees: per-leaf keys, quantization against its NumPy formula,
unbiased stochastic rounding, multiplicative noise of variance D·w².

Statistical bounds are 5 standard deviations of the statistic for the sample count used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import noise
from noisejax.errors import InvalidArgumentError


def _twins(shape=(64, 64)):
    """Two leaves of the same shape and values: one shared key would give them identical noise."""
    w = jax.random.normal(jax.random.key(0), shape)
    return {"a": {"W": w}, "b": {"W": w}}


@pytest.mark.parametrize("model", ["additive", "multiplicative", "stochastic_quantization"])
def test_each_leaf_draws_its_own_noise(model):
    p = _twins()
    key = jax.random.key(1)
    if model == "additive":
        out = noise.AdditiveWeightNoise(0.0).apply(p, key=key)
    elif model == "multiplicative":
        out = noise.MultiplicativeWeightNoise(0.1).apply(p, key=key)
    else:
        out = noise.Quantization(bits=3, stochastic=True).apply(p, key=key)
    da = np.asarray(out["a"]["W"] - p["a"]["W"], np.float64).ravel()
    db = np.asarray(out["b"]["W"] - p["b"]["W"], np.float64).ravel()
    assert np.any(da != db)
    assert abs(np.corrcoef(da, db)[0, 1]) < 5 / np.sqrt(da.size)


def test_leaf_draws_do_not_depend_on_which_other_leaves_are_selected():
    """Leaf k draws with fold_in(key, k) (its flattening index), whatever the filter selects."""
    p = _twins((8, 8))
    only_b = lambda path, leaf: noise.path_names(path)[0] == "b"  # noqa: E731
    both = noise.add_weight_noise(p, 0.0, key=jax.random.key(2), scope="per_layer")
    one = noise.add_weight_noise(p, 0.0, key=jax.random.key(2), scope="per_layer", leaf_filter=only_b)
    np.testing.assert_array_equal(np.asarray(one["b"]["W"]), np.asarray(both["b"]["W"]))
    np.testing.assert_array_equal(np.asarray(one["a"]["W"]), np.asarray(p["a"]["W"]))
    # and the draw is the documented one: w + sqrt(σ²)·normal(fold_in(key, k))
    sigma2 = float(noise.noise_power(p, 0.0, scope="per_layer")["b"]["W"])
    expected = p["b"]["W"] + np.sqrt(sigma2) * jax.random.normal(jax.random.fold_in(jax.random.key(2), 1), (8, 8))
    np.testing.assert_allclose(np.asarray(both["b"]["W"]), np.asarray(expected), rtol=1e-6, atol=1e-7)


def _quantize_numpy(w, bits):
    """Uniform symmetric quantization: Δ = max|w| / L, L = 2^(bits-1) − 1; q = clip(round(w/Δ), −L, L)·Δ."""
    w = np.asarray(w, np.float32)
    levels = 2 ** (bits - 1) - 1
    step = np.float32(np.max(np.abs(w)) / np.float32(levels))
    return (np.clip(np.round(w / step), -levels, levels) * step).astype(np.float32), step, levels


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantization_equals_the_numpy_formula(bits):
    w = jax.random.normal(jax.random.key(3), (40, 30)) * 0.2 + 0.05
    p = {"Dense_0": {"kernel": w, "bias": jnp.linspace(-1.0, 3.0, 30)}, "BatchNorm_0": {"scale": jnp.full(30, 0.3)}}
    out = noise.Quantization(bits=bits).apply(p)
    for name in ("kernel", "bias"):
        want, step, levels = _quantize_numpy(p["Dense_0"][name], bits)
        got = np.asarray(out["Dense_0"][name])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * step)
        assert len(np.unique(np.round(got / step))) <= 2 * levels + 1
    np.testing.assert_array_equal(np.asarray(out["BatchNorm_0"]["scale"]), np.asarray(p["BatchNorm_0"]["scale"]))
    zero = noise.Quantization(bits=bits).apply({"w": jnp.zeros((3, 3))})
    np.testing.assert_array_equal(np.asarray(zero["w"]), 0.0)


def test_stochastic_rounding_is_unbiased():
    bits, K = 4, 4000
    w = jax.random.uniform(jax.random.key(4), (200,), minval=-1.0, maxval=1.0)
    q = noise.Quantization(bits=bits, stochastic=True)
    draws = np.asarray(jax.vmap(lambda i: q.apply({"w": w}, key=jax.random.fold_in(jax.random.key(5), i))["w"])(jnp.arange(K)),
                       np.float64)
    _, step, _ = _quantize_numpy(w, bits)
    x = np.asarray(w, np.float64) / step
    lo = np.floor(x)
    # every draw is one of the two neighbouring levels
    k = np.round(draws / step)
    assert np.all((k == lo) | (k == lo + 1))
    # E[q] = w: the up-probability is the remainder; sd of the mean of K Bernoulli·Δ draws
    frac = x - lo
    sd = step * np.sqrt(frac * (1 - frac) / K)
    assert np.all(np.abs(draws.mean(0) - np.asarray(w, np.float64)) <= 5 * sd + 1e-6 * step)
    # the rounding is random where it should be (a deterministic round would fail the mean test)
    assert np.all(draws.std(0)[(frac > 0.05) & (frac < 0.95)] > 0)
    with pytest.raises(InvalidArgumentError, match="key"):
        q.apply({"w": w})


def test_multiplicative_weight_noise_has_variance_d_times_w_squared():
    D, K = 0.04, 2000
    w = jax.random.normal(jax.random.key(6), (16, 16)) + 0.5
    m = noise.MultiplicativeWeightNoise(D)
    draws = np.asarray(jax.vmap(lambda i: m.apply({"w": w}, key=jax.random.fold_in(jax.random.key(7), i))["w"])(jnp.arange(K)),
                       np.float64)
    w64 = np.asarray(w, np.float64)
    eps = (draws - w64) / w64  # ε ~ N(0, D) i.i.d.
    M = eps.size
    assert abs(eps.mean()) < 5 * np.sqrt(D / M)
    ratio = np.mean(np.square(eps)) / D  # mean of M independent χ²₁: sd √(2/M)
    assert abs(ratio - 1) < 5 * np.sqrt(2 / M), ratio
    # per weight: Var(w̃) = D·w² within the sampling error of K draws
    per = draws.var(0, ddof=1) / (D * np.square(w64))
    assert np.all(np.abs(per - 1) < 5 * np.sqrt(2 / K) + 1e-3), np.abs(per - 1).max()
