"""One SNR definition (noisejax.snr), and MCResult, moments and the CLI agreeing on it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import cli, layers, moments, noise, rng, simulate, snr


def test_definitions_against_numpy():
    r = np.random.default_rng(0)
    m, v = r.normal(size=(3, 7)), r.uniform(0.1, 1.0, size=(3, 7))
    np.testing.assert_allclose(snr.snr(m, v), m**2 / v)
    np.testing.assert_allclose(snr.snr_db(m, v), 10 * np.log10(m**2 / v))
    np.testing.assert_allclose(snr.layer_snr_db(m, v), 10 * np.log10((m**2).sum() / v.sum()))
    np.testing.assert_allclose(snr.layer_snr_db(m, v, axis=1), 10 * np.log10((m**2).sum(1) / v.sum(1)))
    np.testing.assert_allclose(snr.layer_snr(m, v, count=5), ((m**2).sum() - v.sum() / 5) / v.sum())
    # JAX arrays give the same numbers, also under jit
    got = jax.jit(lambda a, b: snr.layer_snr_db(a, b, axis=1))(jnp.asarray(m, jnp.float32), jnp.asarray(v, jnp.float32))
    np.testing.assert_allclose(got, 10 * np.log10((m**2).sum(1) / v.sum(1)), rtol=1e-5)
    # the layer summary is not the mean of per-output dB: an output with mean ~0 sinks the latter
    m2, v2 = np.array([1.0, 1e-4]), np.array([0.01, 0.01])
    assert snr.layer_snr_db(m2, v2) == pytest.approx(10 * np.log10(1.00000001 / 0.02))
    assert np.mean(snr.snr_db(m2, v2)) < -10 < 16 < snr.layer_snr_db(m2, v2)
    # no noise: +inf, not clipped
    assert snr.layer_snr_db(m2, np.zeros(2)) == np.inf


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """A tanh network whose outputs have means near zero (where the two old definitions disagreed)."""
    d = tmp_path_factory.mktemp("snr")
    r = np.random.default_rng(3)
    W0, b0, W1 = r.normal(size=(6, 8)) / 2, r.normal(size=8) / 4, r.normal(size=(8, 5)) / 3
    x = r.normal(size=(3, 6)).astype(np.float32)
    np.savez(d / "w.npz", W0=W0, b0=b0, W1=W1)
    np.save(d / "x.npy", x)
    net, params = layers.from_weights([W0.astype(np.float32), W1.astype(np.float32)],
                                      [b0.astype(np.float32), None], "tanh")
    return d, net, params, jnp.asarray(x)


def test_mcresult_moments_and_cli_agree(network, capsys):
    d, net, params, x = network
    nz = noise.NeuronNoise(add_uncorrelated=1e-2, mul_correlated=1e-3)
    n, seed = 2048, 5
    fn = lambda k: layers.apply_batch(net, params, x, key=k, noise=nz, return_layers=True)[1]
    res = simulate.monte_carlo(fn, rng.make_key(seed, "fast"), n)
    preds = moments.predict(net, params, x, noise=nz)
    assert cli.main([str(a) for a in ("propagate", d / "w.npz", "--input", d / "x.npy", "--activation", "tanh",
                                       "--add-uncorrelated", "1e-2", "--mul-correlated", "1e-3", "--realizations", n,
                                       "--seed", seed, "--method", "both", "--json")]) == 0
    doc = json.loads(capsys.readouterr().out)
    for l in range(2):
        mc_db = float(res.layer_snr_db[l])
        an_db = float(preds[l].layer_snr_db)
        cli_l = doc["layers"][l]
        # the same numbers through three doors (float32 vs float64 sums: 1e-4 dB)
        assert cli_l["mc"]["snr_db"] == pytest.approx(mc_db, abs=1e-4)
        assert cli_l["analytic"]["snr_db"] == pytest.approx(an_db, abs=1e-4)
        # and a check against NumPy on the raw statistics
        m, v = np.asarray(res.mean[l], np.float64), np.asarray(res.var[l], np.float64)
        assert mc_db == pytest.approx(10 * np.log10((m**2).sum() / v.sum()), abs=1e-4)
        # Monte Carlo and analytic agree within the Monte Carlo error bound
        bound = cli_l["mc"]["snr_db_stderr_bound"]
        assert bound == pytest.approx(float(snr.layer_snr_db_stderr_bound(m, v, n)), rel=1e-6)
        assert abs(mc_db - an_db) < 3 * bound, (l, mc_db, an_db, bound)
    # the layer summary, not the mean of per-output dB (they differ by many dB here)
    assert abs(float(jnp.mean(res.snr_db[1])) - float(res.layer_snr_db[1])) > 3


def test_stderr_bound_covers_the_seed_to_seed_spread(network):
    _, net, params, x = network
    n = 256
    for nz in (noise.NeuronNoise(add_uncorrelated=1e-2), noise.NeuronNoise(add_correlated=1e-2)):
        fn = lambda k, nz=nz: layers.apply_batch(net, params, x, key=k, noise=nz, return_layers=True)[1][-1]
        runs = [simulate.monte_carlo(fn, jax.random.key(s), n) for s in range(24)]
        dbs = np.array([float(r.layer_snr_db) for r in runs])
        bounds = np.array([float(snr.layer_snr_db_stderr_bound(np.asarray(r.mean), np.asarray(r.var), n)) for r in runs])
        spread = dbs.std(ddof=1)
        # an upper bound (24 seeds estimate the spread to ~15 %), and not a vacuous one
        assert spread < 1.35 * bounds.mean(), (spread, bounds.mean())
        assert bounds.mean() < 8 * spread, (spread, bounds.mean())
