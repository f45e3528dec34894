"""Statistical checks of noisejax's fast generator (noisejax.rng).

Every bound is a multiple of the sampling standard deviation of the statistic
under the null hypothesis of i.i.d. N(0, 1) / uniform bits, so a broken
generator (constant streams, shared draws between realizations, biased bits)
fails them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import rng

N = 200_000


@pytest.fixture(scope="module")
def normals():
    return np.asarray(jax.random.normal(rng.key(0), (N,)), np.float64)


def test_normal_moments(normals):
    z = normals
    se = 1 / np.sqrt(N)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * np.sqrt(2) * se
    assert abs(np.mean(z**3)) < 5 * np.sqrt(15) * se  # skewness, var(z^3) = 15
    assert abs(np.mean(z**4) - 3) < 5 * np.sqrt(96) * se  # kurtosis, var(z^4) = 96


def test_normal_quantiles(normals):
    # fraction beyond ±1.96 and ±3 (binomial standard errors)
    for q, p in ((1.959964, 0.05), (3.0, 0.0026998)):
        frac = np.mean(np.abs(normals) > q)
        assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / N)


def test_bits_are_balanced():
    bits = np.asarray(jax.random.bits(rng.key(1), (N,), jnp.uint32))
    ones = np.unpackbits(bits.view(np.uint8)).reshape(N, 32).mean(0)
    assert np.all(np.abs(ones - 0.5) < 5 * 0.5 / np.sqrt(N))


def _corr_bound(n_samples, n_pairs):
    # max |r| over n_pairs null correlations, each ≈ N(0, 1/n): a Bonferroni-style 5σ-ish bound
    return (np.sqrt(2 * np.log(n_pairs)) + 3) / np.sqrt(n_samples)


def test_no_correlation_between_realizations_or_neurons():
    key = rng.key(2)
    n_real, n_neur = 4000, 32
    z = np.asarray(
        jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (n_neur,)))(jnp.arange(n_real)), np.float64
    )
    between_neurons = np.corrcoef(z.T)[np.triu_indices(n_neur, 1)]
    assert np.max(np.abs(between_neurons)) < _corr_bound(n_real, between_neurons.size)
    # adjacent realizations (fold_in(key, i) vs fold_in(key, i + 1)), paired over neurons and realizations
    r = np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]
    assert abs(r) < 5 / np.sqrt(z[:-1].size)
    # the same counter in different realizations
    r0 = np.corrcoef(z[:, 0], z[:, 1])[0, 1]
    assert abs(r0) < 5 / np.sqrt(n_real)


def test_split_and_fold_in_give_distinct_streams():
    key = rng.key(3)
    children = jax.random.split(key, 1000)
    data = np.asarray(jax.random.key_data(children))
    assert len({tuple(d) for d in data}) == 1000
    folded = np.asarray(jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(1000))))
    assert len({tuple(d) for d in folded}) == 1000
    # streams of neighbouring children are uncorrelated
    z = np.asarray(jax.vmap(lambda k: jax.random.normal(k, (256,)))(children), np.float64)
    r = np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]
    assert abs(r) < 5 / np.sqrt(z[:-1].size)


def test_deterministic_and_seed_sensitive():
    a = np.asarray(jax.random.normal(rng.key(5), (8,)))
    b = np.asarray(jax.random.normal(rng.key(5), (8,)))
    c = np.asarray(jax.random.normal(rng.key(6), (8,)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_make_key_validates_name():
    from noisejax.errors import InvalidArgumentError

    assert jax.random.key_impl(rng.make_key(0, "threefry")) is not None
    with pytest.raises(InvalidArgumentError, match="rng"):
        rng.make_key(0, "mersenne")


# ---- an independent NumPy transcription of the generator: pins seeding, fold_in, split and bits ----

_M = 0xFFFFFFFF


def _np_fmix(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M
    return h ^ (h >> 16)


def _np_hash(k0, k1, c):
    c = np.asarray(c, np.uint64)
    return _np_fmix((_np_fmix(((c * 0x9E3779B9) & _M) ^ int(k0)) + int(k1)) & _M)


def _np_seed(s):
    return int(_np_hash(s & _M, 0x27D4EB2F, 0)), int(_np_hash(0, s & _M, 0x27D4EB2F))


def _np_derive(key, c, domain):
    k0, k1 = key
    return int(_np_hash(k0 ^ domain, k1, c)), int(_np_hash(k1, (k0 + domain) & _M, c ^ 0x5BD1E995))


def _data(key):
    return tuple(int(v) for v in np.asarray(jax.random.key_data(key)))


def test_seed_fold_in_split_and_bits_match_a_numpy_transcription():
    for seed in (0, 7, 2**31 - 1):
        key = rng.key(seed)
        assert _data(key) == _np_seed(seed)
        for i in (0, 1, 5, 1000, 2**31):
            assert _data(jax.random.fold_in(key, i)) == _np_derive(_np_seed(seed), i, 0x85EBCA77), (seed, i)
        children = np.asarray(jax.random.key_data(jax.random.split(key, 5)))
        assert [tuple(map(int, c)) for c in children] == [_np_derive(_np_seed(seed), c, 0xC2B2AE3D) for c in range(5)]
        k = jax.random.fold_in(key, 3)
        bits = np.asarray(jax.random.bits(k, (1000,), jnp.uint32))
        np.testing.assert_array_equal(bits, _np_hash(*_data(k), np.arange(1000)).astype(np.uint32))


def test_fold_in_and_split_are_different_streams():
    """fold_in(k, i) and split(k)[i] derive different keys (distinct domains) with uncorrelated draws:
    code that mixes the two (serial folds children in, users split) gets independent noise."""
    key = rng.key(21)
    n = 256
    folded = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
    split = jax.random.split(key, n)
    fk = {tuple(d) for d in np.asarray(jax.random.key_data(folded))}
    sk = {tuple(d) for d in np.asarray(jax.random.key_data(split))}
    assert len(fk) == len(sk) == n and not (fk & sk)
    za = np.asarray(jax.vmap(lambda k: jax.random.normal(k, (64,)))(folded), np.float64).ravel()
    zb = np.asarray(jax.vmap(lambda k: jax.random.normal(k, (64,)))(split), np.float64).ravel()
    assert abs(np.corrcoef(za, zb)[0, 1]) < 5 / np.sqrt(za.size)


# ---------------------------------------------------------------- rng.normal (Box–Muller from one word)


@pytest.fixture(scope="module")
def fast_normals():
    return np.asarray(rng.normal(rng.key(10), (N,)), np.float64)


def test_fast_normal_moments_and_quantiles(fast_normals):
    z = fast_normals
    se = 1 / np.sqrt(N)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * np.sqrt(2) * se
    assert abs(np.mean(z**3)) < 5 * np.sqrt(15) * se
    assert abs(np.mean(z**4) - 3) < 5 * np.sqrt(96) * se
    assert abs(np.mean(z**6) - 15) < 5 * np.sqrt(10395 - 225) * se  # var(z^6) = E z^12 - 15^2
    for q, p in ((0.6744898, 0.5), (1.959964, 0.05), (3.0, 0.0026998), (4.0, 6.334e-5)):
        frac = np.mean(np.abs(z) > q)
        assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / N)


def test_fast_normal_distribution_ks(fast_normals):
    """Kolmogorov–Smirnov distance to the standard normal CDF (critical value at p ≈ 1e-6: 2.6/√N)."""
    from math import erf, sqrt

    z = np.sort(fast_normals)
    cdf = 0.5 * (1 + np.vectorize(erf)(z / sqrt(2)))
    i = np.arange(1, N + 1)
    d = max(np.max(i / N - cdf), np.max(cdf - (i - 1) / N))
    assert d < 2.6 / np.sqrt(N)


def test_fast_normal_independent_across_realizations_and_neurons():
    key = rng.key(12)
    n_real, n_neur = 4000, 32
    z = np.asarray(jax.vmap(lambda i: rng.normal(jax.random.fold_in(key, i), (n_neur,)))(jnp.arange(n_real)), np.float64)
    between_neurons = np.corrcoef(z.T)[np.triu_indices(n_neur, 1)]
    assert np.max(np.abs(between_neurons)) < _corr_bound(n_real, between_neurons.size)
    r = np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]
    assert abs(r) < 5 / np.sqrt(z[:-1].size)
    # squares too: a shared radius between neighbours would correlate |z|, not z
    r2 = np.corrcoef(np.square(z[:, :-1]).ravel(), np.square(z[:, 1:]).ravel())[0, 1]
    assert abs(r2) < 5 / np.sqrt(z[:, :-1].size)


def test_fast_normal_is_jax_normal_for_other_generators_and_float64():
    for k in (jax.random.key(3), jax.random.PRNGKey(3)):
        # the same dtype on both sides: under JAX_ENABLE_X64 jax.random.normal defaults to float64
        np.testing.assert_array_equal(np.asarray(rng.normal(k, (5,))), np.asarray(jax.random.normal(k, (5,), jnp.float32)))
        np.testing.assert_array_equal(np.asarray(rng.normal(k, (5,), jnp.float64)), np.asarray(jax.random.normal(k, (5,), jnp.float64)))
    z = rng.normal(rng.key(3), (4, 2), jnp.bfloat16)
    assert z.shape == (4, 2) and z.dtype == jnp.bfloat16
    # deterministic, key-sensitive, same under jit
    a, b = rng.normal(rng.key(5), (8,)), jax.jit(lambda k: rng.normal(k, (8,)))(rng.key(5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(rng.normal(rng.key(6), (8,))))
