"""Tests of noisejax.mitigate: pooling, ghost neurons, slope scaling.

Noise statistics are checked three ways: Monte Carlo (one compiled run for all
networks, tolerances from the sample count), an exact NumPy reference written
here, and the analytic moments of noisejax.moments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import layers, mitigate, moments, noise, rng, simulate
from noisejax.errors import InvalidArgumentError, ShapeMismatchError

N_MC = 40_960  # var estimate rel. std sqrt(2/(n-1)) ≈ 0.7 %
REL_SIGMA = np.sqrt(2.0 / (N_MC - 1))
P = 4
D = {"add_uncorrelated": 0.02, "add_correlated": 0.03, "mul_uncorrelated": 0.05, "mul_correlated": 0.04}
TYPES = tuple(D)
GROUPS = {"unc": ("add_uncorrelated", "mul_uncorrelated"), "cor": ("add_correlated", "mul_correlated")}


def _only(*kinds):
    return noise.NeuronNoise(**{k: (D[k] if k in kinds else 0.0) for k in TYPES})


def _mlp(widths, act, seed=0, shift=0.0):
    """A block network with NumPy-drawn weights (no PRNG compile in the tests)."""
    gen = np.random.default_rng(seed)
    Ws = [gen.normal(shift, 1 / np.sqrt(a), (a, b)).astype(np.float32) for a, b in zip(widths[:-1], widths[1:])]
    bs = [gen.normal(shift, 0.3, b).astype(np.float32) for b in widths[1:]]
    return layers.from_weights(Ws, bs, act)


def _out(net, params, x):
    """Noise-free outputs for a batch (one small compile instead of many eager ops)."""
    return np.asarray(jax.jit(lambda p, xx: layers.apply_batch(net, p, xx))(params, jnp.asarray(x)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _two_layer(seed=0):
    """Noisy sigmoid layer 6 → 5, then a noise-free linear read-out 5 → 3 (the 'next layer')."""
    gen = np.random.default_rng(seed)
    W0 = gen.normal(0, 0.8, (6, 5)).astype(np.float32)
    b0 = gen.normal(0, 0.3, 5).astype(np.float32)
    W1 = (gen.normal(0.4, 0.7, (5, 3))).astype(np.float32)  # nonzero mean: correlated noise gets through
    b1 = gen.normal(0, 0.3, 3).astype(np.float32)
    blocks = [
        layers.serial(layers.Dense(5), layers.Sigmoid(), layers.NoiseSite()),
        layers.serial(layers.Dense(3), layers.Linear(1.0)),
    ]
    net = layers.serial(*blocks)
    params = (({"W": jnp.asarray(W0), "b": jnp.asarray(b0)}, (), ()), ({"W": jnp.asarray(W1), "b": jnp.asarray(b1)}, ()))
    return net, params, (W0, b0, W1, b1)


def _exact_next_var(kind, W0, b0, W1, x, d):
    """Variance of the next pre-activation (B, 3) when only layer 0 is noisy (NumPy reference)."""
    h = _sigmoid(x @ W0 + b0)  # (B, 5) noise-free activations
    if kind == "add_uncorrelated":
        return np.broadcast_to((W1**2).sum(0) * d, (x.shape[0], W1.shape[1]))
    if kind == "add_correlated":
        return np.broadcast_to(W1.sum(0) ** 2 * d, (x.shape[0], W1.shape[1]))
    if kind == "mul_uncorrelated":
        return (h**2) @ (W1**2) * d
    return (h @ W1) ** 2 * d


@pytest.fixture(scope="module")
def setup():
    net, params, (W0, b0, W1, b1) = _two_layer()
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 6)).astype(np.float32))
    pnet, pparams = mitigate.pool(net, params, P)
    # ghost test network: 3 noisy sigmoid layers, correlated additive noise everywhere
    gnet0, gp0 = _mlp([6, 7, 5, 3], "sigmoid", seed=3, shift=0.3)  # nonzero-mean weights and biases
    gnet, gparams = mitigate.ghost_neurons(gnet0, gp0)
    ac = noise.NeuronNoise(add_correlated=0.05)

    # for the moments: every type present (zeros elsewhere), one compiled prediction per network
    nzs = {k: _only(k) for k in D}
    groups = {g: noise.NeuronNoise(**{k: D[k] for k in kinds}) for g, kinds in GROUPS.items()}

    def fn(key):
        out = {}
        for i, (k, nz) in enumerate(groups.items()):
            kk = jax.random.fold_in(key, i)
            out["plain_" + k] = layers.apply_batch(net, params, x, key=kk, noise=(nz,))
            out["pool_" + k] = layers.apply_batch(pnet, pparams, x, key=kk, noise=(nz,))
        out["ghost_plain"] = layers.apply_batch(gnet0, gp0, x, key=jax.random.fold_in(key, 10), noise=ac)
        out["ghost"] = layers.apply_batch(gnet, gparams, x, key=jax.random.fold_in(key, 10), noise=ac)
        return out

    mc = simulate.monte_carlo(fn, rng.key(42), N_MC, tile_size=256)
    return dict(
        net=net, params=params, pnet=pnet, pparams=pparams, W=(W0, b0, W1, b1), x=x, mc=mc, nzs=nzs,
        gnet0=gnet0, gp0=gp0, gnet=gnet, gparams=gparams, ac=ac,
    )


# ----------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------


def test_pool_structure_and_noise_free_output(setup):
    s = setup
    assert mitigate.widths(s["pnet"], s["pparams"]) == [6, 5 * P, 3]
    assert s["pnet"].n_sites == s["net"].n_sites
    y0 = _out(s["net"], s["params"], s["x"])
    y1 = _out(s["pnet"], s["pparams"], s["x"])
    assert np.max(np.abs(y1 - y0)) <= 1e-5


@pytest.mark.parametrize("group", GROUPS)
def test_pool_matches_exact_reference(setup, group):
    """MC variance of the next pre-activation vs the NumPy formula, plain and pooled (5 sigma).

    The independent sources add: the reference is the sum of the exact terms of
    the group's two noise types.
    """
    s = setup
    W0, b0, W1, _ = s["W"]
    exact = sum(_exact_next_var(k, W0, b0, W1, np.asarray(s["x"]), D[k]) for k in GROUPS[group])
    factor = 1.0 / P if group == "unc" else 1.0
    for prefix, expected in (("plain_", exact), ("pool_", exact * factor)):
        got = np.asarray(s["mc"].var[prefix + group])
        np.testing.assert_allclose(got, expected, rtol=5 * REL_SIGMA, atol=0)


@pytest.mark.parametrize("group", GROUPS)
def test_pool_divides_uncorrelated_by_P_keeps_correlated(setup, group):
    s = setup
    ratio = float(jnp.sum(s["mc"].var["pool_" + group]) / jnp.sum(s["mc"].var["plain_" + group]))
    target = 1.0 / P if group == "unc" else 1.0
    # ratio of two independent variance estimates: rel. std <= 2/sqrt(n) = 1 %; the claim is ±5 %
    assert abs(ratio / target - 1.0) <= 0.05, (group, ratio, target)


@pytest.mark.parametrize("kind", TYPES)
def test_pool_moments_agree(setup, kind):
    s = setup
    W0, b0, W1, _ = s["W"]
    exact = _exact_next_var(kind, W0, b0, W1, np.asarray(s["x"]), D[kind])
    nz = (s["nzs"][kind],)
    plain = np.asarray(moments.predict(s["net"], s["params"], s["x"], noise=nz)[-1].var)
    pooled = np.asarray(moments.predict(s["pnet"], s["pparams"], s["x"], noise=nz)[-1].var)
    factor = 1.0 / P if kind.endswith("uncorrelated") else 1.0
    np.testing.assert_allclose(plain, exact, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(pooled, exact * factor, rtol=1e-4, atol=1e-9)


def test_pool_last_layer_appends_averaging_readout():
    net, params = _mlp([4, 3, 2], "tanh")
    pnet, pparams = mitigate.pool(net, params, 3)
    assert mitigate.widths(pnet, pparams) == [4, 9, 6, 2]
    blk = mitigate.blocks(pnet, pparams)
    assert blk[-1].act is None and not blk[-1].noisy
    np.testing.assert_allclose(np.asarray(blk[-1].W), np.repeat(np.eye(2), 3, axis=0) / 3, rtol=1e-6)
    # without the read-out: n_out * P outputs whose groups average to the original output
    qnet, qparams = mitigate.pool(net, params, 3, readout=False)
    x = np.linspace(-1, 1, 4, dtype=np.float32)[None]
    y = _out(qnet, qparams, x).reshape(2, 3).mean(-1)
    np.testing.assert_allclose(y, _out(net, params, x)[0], atol=1e-6)


def test_pool_per_layer_copies():
    net, params = _mlp([4, 3, 5, 2], "relu")
    pnet, pparams = mitigate.pool(net, params, {1: 2})
    assert mitigate.widths(pnet, pparams) == [4, 3, 10, 2]
    pnet, pparams = mitigate.pool(net, params, 2, layers_to_pool=[0])
    assert mitigate.widths(pnet, pparams) == [4, 6, 5, 2]
    x = np.linspace(-1, 1, 4, dtype=np.float32)[None]
    np.testing.assert_allclose(_out(pnet, pparams, x), _out(net, params, x), atol=1e-6)


# ----------------------------------------------------------------------------------
# Ghost neurons
# ----------------------------------------------------------------------------------


def test_ghost_structure_and_noise_free_output(setup):
    s = setup
    assert mitigate.widths(s["gnet"], s["gparams"]) == [6, 8, 6, 4, 3]
    y0 = _out(s["gnet0"], s["gp0"], s["x"])
    y1 = _out(s["gnet"], s["gparams"], s["x"])
    assert np.max(np.abs(y1 - y0)) <= 1e-5


def test_ghost_removes_correlated_additive_noise_mc(setup):
    s = setup
    v_plain = float(jnp.sum(s["mc"].var["ghost_plain"]))
    v_ghost = float(jnp.sum(s["mc"].var["ghost"]))
    assert v_plain > 1e-3  # the test can fail: the plain output does carry correlated noise
    assert v_ghost <= 0.05 * v_plain, (v_ghost, v_plain)


def test_ghost_removes_correlated_additive_noise_moments(setup):
    s = setup
    v_plain = np.asarray(moments.predict(s["gnet0"], s["gp0"], s["x"], noise=s["ac"])[-1].var)
    v_ghost = np.asarray(moments.predict(s["gnet"], s["gparams"], s["x"], noise=s["ac"])[-1].var)
    # the analytic prediction agrees with Monte Carlo on the plain network ...
    np.testing.assert_allclose(v_plain, np.asarray(s["mc"].var["ghost_plain"]), rtol=5 * REL_SIGMA + 0.02)
    # ... and says the ghost network keeps < 5 % of it
    assert v_ghost.sum() <= 0.05 * v_plain.sum(), (v_ghost.sum(), v_plain.sum())


def test_ghost_exact_cancellation_linear_next_layer():
    """Hidden ghost, linear read-out: the correlated additive noise cancels exactly (NumPy check)."""
    net, params, (W0, b0, W1, b1) = _two_layer(seed=5)
    gnet, gparams = mitigate.ghost_neurons(net, params)  # last block has no noise site: no read-out ghost
    assert mitigate.widths(gnet, gparams) == [6, 6, 3]
    blk = mitigate.blocks(gnet, gparams)
    np.testing.assert_allclose(np.asarray(blk[1].W[-1]), -W1.sum(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(blk[1].b), b1 + 0.5 * W1.sum(0), rtol=1e-6)
    # a correlated shift c of every layer-0 output (ghost included) does not move the output
    x = np.random.default_rng(0).uniform(-1, 1, 6).astype(np.float32)
    h = np.append(_sigmoid(x @ W0 + b0), 0.5)
    for c in (-1.0, 0.3, 2.0):
        out = (h + c) @ np.asarray(blk[1].W) + np.asarray(blk[1].b)
        np.testing.assert_allclose(out, _sigmoid(x @ W0 + b0) @ W1 + b1, atol=1e-5)


def test_ghost_options():
    net, params = _mlp([4, 3, 2], "sigmoid")
    gnet, gparams = mitigate.ghost_neurons(net, params, readout=False)
    assert mitigate.widths(gnet, gparams) == [4, 4, 2]
    with pytest.raises(InvalidArgumentError, match="readout"):
        mitigate.ghost_neurons(net, params, layers_with_ghost=[1], readout=False)
    # pooling and ghosts compose, noise-free output unchanged
    cnet, cparams = mitigate.ghost_neurons(*mitigate.pool(net, params, 2))
    x = np.linspace(0, 1, 4, dtype=np.float32)[None]
    np.testing.assert_allclose(_out(cnet, cparams, x), _out(net, params, x), atol=1e-6)


def test_output_snr_matches_exact(setup):
    s = setup
    W0, b0, W1, b1 = s["W"]
    x = np.asarray(s["x"])
    d = D["add_uncorrelated"]
    n = 4096
    snr = float(mitigate.output_snr(s["net"], s["params"], s["x"], noise=(s["nzs"]["add_uncorrelated"],), key=rng.key(3), n_realizations=n))
    mean = _sigmoid(x @ W0 + b0) @ W1 + b1
    var = _exact_next_var("add_uncorrelated", W0, b0, W1, x, d)
    exact = (mean**2).sum() / var.sum()
    # Σ var over 4 independent inputs: rel. std <= sqrt(2/(n-1)); the signal estimate adds less
    assert snr == pytest.approx(exact, rel=5 * np.sqrt(2 / (n - 1)))


# ----------------------------------------------------------------------------------
# Slope scaling
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["linear:0.8", "relu"])
def test_scale_slope_exact_for_linear_and_relu(act):
    net, params = _mlp([5, 6, 4, 3], act, seed=1, shift=0.2)
    snet, sparams = mitigate.scale_slope(net, params, {0: 3.0, 1: 0.25})
    x = np.random.default_rng(2).normal(size=(8, 5)).astype(np.float32)
    y0 = _out(net, params, x)
    y1 = _out(snet, sparams, x)
    assert np.max(np.abs(y1 - y0)) <= 1e-5 * max(1.0, np.max(np.abs(y0)))
    blk0, blk1 = mitigate.blocks(net, params), mitigate.blocks(snet, sparams)
    if act.startswith("linear"):
        assert blk1[0].act.slope == pytest.approx(0.8 * 3.0) and blk1[1].act.slope == pytest.approx(0.8 * 0.25)
        np.testing.assert_allclose(blk1[1].W, blk0[1].W / 3.0, rtol=1e-6)
    else:
        np.testing.assert_allclose(blk1[0].W, blk0[0].W * 3.0, rtol=1e-6)
        np.testing.assert_allclose(blk1[1].W, blk0[1].W / 3.0 * 0.25, rtol=1e-6)


def test_scale_slope_reduces_additive_noise_reaching_next_layer():
    """s > 1 on a linear layer: its additive noise reaches the next layer divided by s²."""
    net, params = _mlp([3, 4, 2], "linear")
    snet, sparams = mitigate.scale_slope(net, params, {0: 2.0})
    W1 = np.asarray(params[1][0]["W"])
    Ws = np.asarray(sparams[1][0]["W"])
    np.testing.assert_allclose((Ws**2).sum(0), (W1**2).sum(0) / 4.0, rtol=1e-6)


def test_scale_slope_sigmoid_is_approximate():
    net, params = _mlp([5, 6, 3], "sigmoid", seed=1)
    x = np.random.default_rng(2).normal(size=(16, 5)).astype(np.float32)
    f = jax.jit(lambda p, xx: layers.apply_batch(net, p, xx))  # sigmoid: same network, new weights
    y0 = np.asarray(f(params, x))
    err = {}
    for s in (1.05, 3.0):
        _, sparams = mitigate.scale_slope(net, params, {0: s})
        err[s] = float(np.max(np.abs(np.asarray(f(sparams, x)) - y0)))
    assert 0 < err[1.05] < err[3.0]  # first-order compensation: small for s near 1, not exact


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------


def test_validation_errors():
    net, params = _mlp([4, 3, 2], "sigmoid")
    with pytest.raises(InvalidArgumentError, match="serial"):
        mitigate.pool(layers.Dense(3), {"W": jnp.ones((4, 3))}, 2)
    with pytest.raises(InvalidArgumentError, match="blocks"):
        mitigate.pool(layers.serial(layers.Dense(3), layers.Sigmoid()), ({"W": jnp.ones((4, 3))}, ()), 2)
    with pytest.raises(ShapeMismatchError, match="params"):
        mitigate.pool(net, params[:1], 2)
    with pytest.raises(InvalidArgumentError, match="copies"):
        mitigate.pool(net, params, 0)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        mitigate.pool(net, params, 2, layers_to_pool=[5])
    with pytest.raises(InvalidArgumentError, match="scales"):
        mitigate.scale_slope(net, params, {0: -1.0})
    with pytest.raises(InvalidArgumentError, match="entries"):
        mitigate.scale_slope(net, params, [1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------------
# The experiment, tiny configuration
# ----------------------------------------------------------------------------------


def test_experiment_tiny(tmp_path):
    import json

    from noisejax.study import reproduce

    exp = reproduce.load_experiment("mitigation")
    run = exp.run_module
    res = exp.main(exp.config("tiny"), str(tmp_path), progress=False).to_json()
    for name in ("results.json", "accuracy_vs_noise.png", "snr_gain.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["noise_types"]) == set(run.NOISE_TYPES)
    # the transformed networks compute the same noise-free function
    assert max(saved["noise_free_output_max_abs_change"].values()) <= 1e-5
    assert saved["widths"]["pooled"] == [64, 16, 20, 10] and saved["widths"]["ghost"] == [64, 9, 11, 10]
    for nt, v in saved["noise_types"].items():
        assert set(v["at_target"]) == set(run.METHODS)
        assert all(len(v["accuracy"][m]["mean"]) == len(v["grid"]) for m in run.METHODS)
    # exact cancellation: under correlated additive noise the ghost network keeps its clean accuracy
    ac = saved["noise_types"]["add_correlated"]["at_target"]
    assert ac["ghost"]["accuracy"] == pytest.approx(saved["clean_test_accuracy"]["plain"], abs=1e-6)
    # P = 2 copies: the output SNR under uncorrelated additive noise roughly doubles (4 realizations)
    assert 1.4 < saved["noise_types"]["add_uncorrelated"]["at_target"]["pooled"]["snr_gain"] < 3.0
    assert res["summary"].keys() == saved["summary"].keys()
