"""Property-based tests (hypothesis) for the statistics merge and the noise models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noisejax import noise, simulate
from noisejax.errors import InvalidArgumentError, NonFiniteError



def _acc(x):
    x = np.asarray(x, np.float64)
    return simulate.Welford(jnp.asarray(len(x), jnp.int32), jnp.asarray(x.mean(0)), jnp.asarray(((x - x.mean(0)) ** 2).sum(0)))


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=4, max_size=60),
    cuts=st.lists(st.integers(1, 59), max_size=5),
    order=st.randoms(use_true_random=False),
)
def test_merge_in_any_order_and_split_gives_the_same_statistics(data, cuts, order):
    x = np.asarray(data, np.float32)
    bounds = sorted({c for c in cuts if 0 < c < len(x)})
    parts = np.split(x, bounds)
    order.shuffle(parts)
    acc = _acc(parts[0])
    for p in parts[1:]:
        acc = simulate.merge(acc, _acc(p))
    res = simulate.finalize(acc)
    scale = max(1.0, float(np.max(np.abs(x))))
    assert int(res.count) == len(x)
    np.testing.assert_allclose(float(res.mean), x.astype(np.float64).mean(), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(float(res.var), x.astype(np.float64).var(ddof=1), rtol=1e-4, atol=1e-6 * scale**2)


@settings(max_examples=30, deadline=None)
@given(
    variances=st.lists(st.one_of(st.none(), st.floats(0, 10)), min_size=4, max_size=4),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_neuron_noise_shape_dtype_and_zero_variance(variances, shape, seed):
    nz = noise.NeuronNoise(*variances)
    y = jnp.ones(tuple(shape), jnp.float32)
    out = noise.apply_neuron_noise(y, nz, key=jax.random.key(seed))
    assert out.shape == y.shape and out.dtype == y.dtype and bool(jnp.all(jnp.isfinite(out)))
    if all(v in (None, 0.0) for v in variances):
        assert np.array_equal(np.asarray(out), np.asarray(y))


@settings(max_examples=30, deadline=None)
@given(bad=st.one_of(st.floats(max_value=-1e-12), st.just(float("nan")), st.just(float("inf"))), field=st.integers(0, 3))
def test_invalid_variances_are_rejected(bad, field):
    args = [None] * 4
    args[field] = bad
    with pytest.raises(InvalidArgumentError):
        noise.NeuronNoise(*args)


def test_check_finite_names_the_first_bad_layer():
    fn = lambda k: (jax.random.normal(k, (2,)), jnp.log(-jnp.abs(jax.random.normal(k, (3,)))))
    with pytest.raises(NonFiniteError, match=r"\[1\]"):
        simulate.monte_carlo(fn, jax.random.key(0), 16, check_finite=True)
    res = simulate.monte_carlo(fn, jax.random.key(0), 16)  # off by default
    assert not np.all(np.isfinite(np.asarray(res.mean[1])))
