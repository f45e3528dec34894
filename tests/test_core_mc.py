"""Core: noisy forward passes and Monte Carlo statistics against an independent NumPy reference.

The reference below re-implements the paper's noisy MLP in NumPy with NumPy's own
random generator; the two Monte Carlo estimates must agree within tolerances that
follow from the number of realizations (5 standard errors of the difference).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import _precision, layers, noise, rng, simulate
from noisejax.errors import InvalidArgumentError, PrecisionWarning

N_REAL = 4096
WIDTHS = [6, 8, 5]
N_INPUTS = 3

CASES = {
    "add_uncorrelated": dict(add_uncorrelated=2e-2),
    "add_correlated": dict(add_correlated=2e-2),
    "mul_uncorrelated": dict(mul_uncorrelated=5e-2),
    "mul_correlated": dict(mul_correlated=5e-2),
    "mixed": dict(add_uncorrelated=1e-2, add_correlated=5e-3, mul_uncorrelated=2e-2, mul_correlated=1e-2),
}


@pytest.fixture(scope="module")
def network():
    net = layers.mlp(WIDTHS, "sigmoid", "linear:0.8")
    _, params = net.init(jax.random.key(0), (WIDTHS[0],))
    x = np.asarray(jax.random.normal(jax.random.key(1), (N_INPUTS, WIDTHS[0])))
    return net, params, x


def numpy_reference(params, x, variances, n, seed):
    """Independent NumPy simulation of y_l = f(y_{l-1} W + b)(1+ξMU+ξMC) + ξAU + ξAC."""
    rng = np.random.default_rng(seed)
    acts = [lambda z: 1.0 / (1.0 + np.exp(-z)), lambda z: 0.8 * z]
    d = {k: variances.get(k, 0.0) for k in ("add_uncorrelated", "add_correlated", "mul_uncorrelated", "mul_correlated")}
    y = np.broadcast_to(x.astype(np.float64), (n,) + x.shape)
    outs = []
    for (block, f) in zip(params, acts):
        W = np.asarray(block[0]["W"], np.float64)
        b = np.asarray(block[0]["b"], np.float64)
        clean = f(y @ W + b)
        shape, cshape = clean.shape, clean.shape[:-1] + (1,)
        mult = 1 + np.sqrt(d["mul_uncorrelated"]) * rng.standard_normal(shape) + np.sqrt(d["mul_correlated"]) * rng.standard_normal(cshape)
        y = clean * mult + np.sqrt(d["add_uncorrelated"]) * rng.standard_normal(shape) + np.sqrt(d["add_correlated"]) * rng.standard_normal(cshape)
        outs.append(y)
    return [(o.mean(0), o.var(0, ddof=1)) for o in outs]


@pytest.mark.parametrize("case", sorted(CASES))
def test_monte_carlo_matches_numpy_reference(network, case):
    net, params, x = network
    nz = noise.NeuronNoise(**CASES[case])
    fn = lambda k: layers.apply_batch(net, params, jnp.asarray(x), key=k, noise=nz, return_layers=True)[1]
    # JAX's threefry for one case, noisejax's fast generator for the others
    key = jax.random.key(7) if case == "mixed" else rng.key(7)
    res = simulate.monte_carlo(fn, key, N_REAL)
    ref = numpy_reference(params, x, CASES[case], N_REAL, seed=11)
    for l, ((m_ref, v_ref), m, v) in enumerate(zip(ref, res.mean, res.var)):
        m, v = np.asarray(m, np.float64), np.asarray(v, np.float64)
        # difference of two independent means: std = sqrt((v1 + v2) / n)
        tol_mean = 5 * np.sqrt((v + v_ref) / N_REAL) + 1e-6
        assert np.all(np.abs(m - m_ref) <= tol_mean), (case, l, np.max(np.abs(m - m_ref) / tol_mean))
        # difference of two variance estimates: std ≈ v sqrt(2/(n-1)) each (Gaussian-like outputs)
        tol_var = 5 * np.sqrt(2.0 / (N_REAL - 1)) * np.sqrt(v**2 + v_ref**2)
        assert np.all(np.abs(v - v_ref) <= tol_var), (case, l, np.max(np.abs(v - v_ref) / tol_var))
        assert int(res.count) == N_REAL


def test_reference_comparison_detects_a_wrong_variance(network):
    """The tolerance above is tight enough to reject a 20 % error in the noise variance."""
    net, params, x = network
    nz = noise.NeuronNoise(add_uncorrelated=2e-2)
    fn = lambda k: layers.apply_batch(net, params, jnp.asarray(x), key=k, noise=nz, return_layers=True)[1]
    res = simulate.monte_carlo(fn, rng.key(7), N_REAL)
    wrong = numpy_reference(params, x, {"add_uncorrelated": 2.4e-2}, N_REAL, seed=11)
    v, v_ref = np.asarray(res.var[0], np.float64), wrong[0][1]
    tol_var = 5 * np.sqrt(2.0 / (N_REAL - 1)) * np.sqrt(v**2 + v_ref**2)
    assert np.any(np.abs(v - v_ref) > tol_var)


def test_correlated_noise_is_shared_and_uncorrelated_is_not():
    y = jnp.linspace(0.1, 1.0, 7)
    key = jax.random.key(3)
    d_ac = noise.apply_neuron_noise(y, noise.NeuronNoise(add_correlated=0.1), key=key) - y
    assert np.allclose(d_ac, d_ac[0]) and abs(float(d_ac[0])) > 0
    d_au = noise.apply_neuron_noise(y, noise.NeuronNoise(add_uncorrelated=0.1), key=key) - y
    assert np.unique(np.asarray(d_au)).size == y.size
    r_mc = noise.apply_neuron_noise(y, noise.NeuronNoise(mul_correlated=0.1), key=key) / y
    assert np.allclose(r_mc, r_mc[0], rtol=1e-5) and abs(float(r_mc[0]) - 1) > 0
    # correlated over axis 0 only: one draw per column of a (4, 3) feature map
    fm = jnp.zeros((4, 3))
    d = noise.apply_neuron_noise(fm, noise.NeuronNoise(add_correlated=1.0, correlated_axes=(0,)), key=key)
    assert np.allclose(d, d[0:1]) and np.unique(np.asarray(d[0])).size == 3


def _count_normal_draws(fn, *args):
    """Number of random-number generation calls (``jit:_normal`` or ``random_bits``) at the top level."""
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return sum(e.params.get("name") == "_normal" or e.primitive.name == "random_bits" for e in eqns)


def test_statically_zero_noise_types_draw_nothing():
    y = jnp.ones(5)
    key = jax.random.key(0)
    one = lambda y: noise.apply_neuron_noise(y, noise.NeuronNoise(add_uncorrelated=1.0), key=key)
    four = lambda y: noise.apply_neuron_noise(
        y, noise.NeuronNoise(add_uncorrelated=1.0, add_correlated=1.0, mul_uncorrelated=1.0, mul_correlated=1.0), key=key
    )
    none = lambda y: noise.apply_neuron_noise(y, noise.NeuronNoise(), key=key)
    assert _count_normal_draws(one, y) == 1
    assert _count_normal_draws(four, y) == 4
    assert _count_normal_draws(none, y) == 0


def test_noise_intensity_sweep_is_a_vmap(network):
    net, params, x = network
    sweep = noise.NeuronNoise(add_uncorrelated=jnp.array([1e-4, 1e-2, 1.0]))

    def fn(k):
        return jax.vmap(lambda nz: layers.apply_batch(net, params, jnp.asarray(x), key=k, noise=nz))(sweep)

    res = simulate.monte_carlo(fn, rng.key(2), 1024)
    var = np.asarray(res.var).mean(axis=(1, 2))
    assert res.var.shape == (3, N_INPUTS, WIDTHS[-1])
    assert var[0] < var[1] < var[2]


def test_adding_a_noise_type_keeps_the_other_draws():
    y = jnp.linspace(-1, 1, 9)
    key = jax.random.key(5)
    a = noise.apply_neuron_noise(y, noise.NeuronNoise(add_uncorrelated=0.5), key=key)
    b = noise.apply_neuron_noise(y, noise.NeuronNoise(add_uncorrelated=0.5, add_correlated=0.0), key=key)
    assert np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- invariance


def _mixed_fn(network):
    net, params, x = network
    nz = noise.NeuronNoise(**CASES["mixed"])
    return lambda k: layers.apply_batch(net, params, jnp.asarray(x), key=k, noise=nz, return_layers=True)[1]


def test_chunk_size_invariance_is_bitwise(network):
    fn = _mixed_fn(network)
    results = [simulate.monte_carlo(fn, rng.key(9), 130, chunk_size=c) for c in (1, 7, 64, None)]
    ref = jax.tree_util.tree_leaves(results[0])
    for r in results[1:]:
        for a, b in zip(ref, jax.tree_util.tree_leaves(r)):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_jit_and_eager_and_repeated_runs_agree(network):
    """The same key: the same noisy forward pass eagerly, under jit, and run twice."""
    fn = _mixed_fn(network)
    for key in (rng.key(3), jax.random.key(3)):  # noisejax's generator and JAX's threefry
        eager = jax.tree_util.tree_leaves(fn(key))
        jitted = jax.tree_util.tree_leaves(jax.jit(fn)(key))
        again = jax.tree_util.tree_leaves(jax.jit(fn)(key))
        for a, b, c in zip(eager, jitted, again):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
            # eager dispatch compiles op by op, jit fuses (FMA): the same draws, the sums may round
            # differently in the last bits of their largest terms
            b = np.asarray(b)
            ulp = np.finfo(b.dtype).eps * np.max(np.abs(b))
            np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=8 * ulp)
    res = [simulate.monte_carlo(fn, rng.key(9), 100) for _ in range(2)]
    for a, b in zip(jax.tree_util.tree_leaves(res[0]), jax.tree_util.tree_leaves(res[1])):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _assert_statistics_of_the_samples(fn, key, res):
    """``res`` (count, mean, unbiased var) equals float64 statistics of fn(fold_in(key, i)), i < count."""
    n = int(res.count)
    samples = jax.vmap(fn)(simulate.realization_keys(key, jnp.arange(n, dtype=jnp.uint32)))
    for s, m, v in zip(samples, res.mean, res.var):
        s = np.asarray(s, np.float64)
        np.testing.assert_allclose(m, s.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v, s.var(0, ddof=1), rtol=1e-4, atol=1e-9)


def test_engine_equals_direct_vmap_statistics(network):
    fn = _mixed_fn(network)
    res = simulate.monte_carlo(fn, rng.key(9), 300, chunk_size=7)
    assert int(res.count) == 300
    _assert_statistics_of_the_samples(fn, rng.key(9), res)


@pytest.mark.parametrize("streams", [3, 6, 8])
def test_any_stream_count_keeps_every_realization(network, streams):
    """Non-power-of-two stream counts: the pairwise merge keeps the leftover accumulator (count and
    statistics of all 3000 realizations, against the samples themselves), bitwise for two chunk sizes."""
    fn = _mixed_fn(network)
    n = 3000  # 46.9 tiles of 64: a partial last tile, tiles not a multiple of the stream count
    res = simulate.monte_carlo(fn, rng.key(9), n, streams=streams, chunk_size=448)
    assert int(res.count) == n
    _assert_statistics_of_the_samples(fn, rng.key(9), res)
    other = simulate.monte_carlo(fn, rng.key(9), n, streams=streams, chunk_size=64 * streams * 3)
    for a, b in zip(jax.tree_util.tree_leaves(res), jax.tree_util.tree_leaves(other)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


_DEVICE_SCRIPT = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from noisejax import layers, noise, rng, simulate
net = layers.mlp([6, 8, 5], "sigmoid", "linear:0.8")
_, params = net.init(jax.random.key(0), (6,))
x = jax.random.normal(jax.random.key(1), (3, 6))
nz = noise.NeuronNoise(add_uncorrelated=1e-2, add_correlated=5e-3, mul_uncorrelated=2e-2, mul_correlated=1e-2)
fn = lambda k: layers.apply_batch(net, params, x, key=k, noise=nz, return_layers=True)[1]
assert len(jax.devices()) == int(sys.argv[2]), jax.devices()
res = simulate.monte_carlo(fn, rng.key(9), 1000, chunk_size=int(sys.argv[3]))
np.savez(sys.argv[1], *[np.asarray(a) for a in jax.tree_util.tree_leaves(res)])
"""


def _run_devices(run, tmp_path, n_dev, chunk):
    out = tmp_path / f"res_{n_dev}_{chunk}.npz"
    run(_DEVICE_SCRIPT, n_dev, out, n_dev, chunk)
    with np.load(out) as z:
        return [z[k] for k in sorted(z.files, key=lambda s: int(s.split("_")[1]))]


def test_device_count_invariance_is_bitwise(tmp_path, on_host_devices):
    one = _run_devices(on_host_devices, tmp_path, 1, 512)
    four = _run_devices(on_host_devices, tmp_path, 4, 100)
    assert len(one) == len(four) > 0
    for a, b in zip(one, four):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- numerics


def test_streaming_variance_float32_large_mean():
    """Mean 10³× the std over 10⁷ samples: float32 streaming statistics match a float64 reference."""
    n, chunk = 10_000_000, 1_000_000
    fn = lambda k: 1000.0 + jax.random.normal(k, (4,), jnp.float32)
    with pytest.warns(PrecisionWarning, match="accumulation may shift"):  # |mean|/std = 1000 over 10⁷
        res = simulate.monte_carlo(fn, jax.random.key(0), n, tile_size=4096, streams=8)
    # reference: the same samples, shifted by the known 1000 and summed in float64 (no cancellation)
    sample = jax.jit(jax.vmap(fn))
    s1 = s2 = 0.0
    n1 = n2 = np.zeros(4, np.float32)  # the naive one-pass float32 formula, for contrast
    for start in range(0, n, chunk):
        keys = simulate.realization_keys(jax.random.key(0), jnp.arange(start, start + chunk, dtype=jnp.uint32))
        x32 = np.asarray(sample(keys))
        d = x32.astype(np.float64) - 1000.0
        s1, s2 = s1 + d.sum(0), s2 + np.square(d).sum(0)
        n1, n2 = n1 + x32.sum(0, dtype=np.float32), n2 + np.square(x32).sum(0, dtype=np.float32)
    ref_mean, ref_var = 1000.0 + s1 / n, (s2 - s1 * s1 / n) / (n - 1)
    assert int(res.count) == n
    np.testing.assert_allclose(np.asarray(res.var, np.float64), ref_var, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(res.mean, np.float64), ref_mean, rtol=1e-6)
    # the naive formula in float32 is far off: the test can tell them apart
    naive = (n2 / np.float32(n) - np.square(n1 / np.float32(n))) * n / (n - 1)
    assert np.max(np.abs(naive / ref_var - 1)) > 1e-2
    # the documented bounds (docs/precision.md) hold here, beyond the sizes they were fitted on
    eps = float(np.finfo(np.float32).eps)
    err_mean = np.max(np.abs(np.asarray(res.mean, np.float64) - ref_mean) / np.sqrt(ref_var / n))
    err_var = np.max(np.abs(np.asarray(res.var, np.float64) - ref_var) / (ref_var * np.sqrt(2 / n)))
    assert err_mean <= _precision.mean_error_bound(1000.0, n, 4096, 8, eps), err_mean
    assert err_var <= _precision.var_error_bound(1000.0, n, 4096, 8, eps), err_var


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_precision_bounds_hold_and_warn_only_beyond_one_standard_error(offset):
    """float32 statistics of offset + N(0, 1) against float64 statistics of the same samples."""
    n, tile, streams = 200_000, 64, 8
    fn = lambda k: offset + jax.random.normal(k, (16,), jnp.float32)  # noqa: E731
    eps = float(np.finfo(np.float32).eps)
    bm, bv = (f(offset, n, tile, streams, eps) for f in (_precision.mean_error_bound, _precision.var_error_bound))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = simulate.monte_carlo(fn, jax.random.key(1), n, tile_size=tile, streams=streams)
    warned = [w for w in caught if issubclass(w.category, PrecisionWarning)]
    assert bool(warned) == (max(bm, bv) > 1.0), (bm, bv, [str(w.message) for w in warned])
    keys = simulate.realization_keys(jax.random.key(1), jnp.arange(n, dtype=jnp.uint32))
    x = np.asarray(jax.jit(jax.vmap(fn))(keys), np.float64) - offset
    mean, var = offset + x.mean(0), x.var(0, ddof=1)
    assert np.max(np.abs(np.asarray(res.mean, np.float64) - mean) / np.sqrt(var / n)) <= bm
    assert np.max(np.abs(np.asarray(res.var, np.float64) - var) / (var * np.sqrt(2 / n))) <= bv


def test_realization_count_limit():
    with pytest.raises(InvalidArgumentError, match="2\\*\\*31"):
        simulate.monte_carlo(lambda k: jax.random.normal(k, (2,)), jax.random.key(0), 2**31)


def test_result_derived_quantities():
    res = simulate.monte_carlo(lambda k: 2.0 + 0.5 * jax.random.normal(k, (3,)), jax.random.key(1), 4096)
    np.testing.assert_allclose(res.snr, np.square(res.mean) / res.var, rtol=1e-6)
    np.testing.assert_allclose(res.stderr, np.sqrt(res.var / 4096), rtol=1e-6)
    # SNR of 2/0.5 → 16 (12.04 dB) within sampling error
    assert np.all(np.abs(np.asarray(res.snr_db) - 12.04) < 5 * 10 / np.log(10) * np.sqrt(2 / 4096))
