"""noisejax.hardware: PCM devices, crossbar periphery, drift compensation, whole networks.

Every formula is checked against an independent NumPy transcription of the model written
here (issue 16 / aihwkit 1.1.0), with tolerances from the sample count: a sample mean of n
draws is compared within 5 standard errors, a sample standard deviation within
``5/sqrt(2n)`` relative (Gaussian) — the statistics tested are close to Gaussian.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import noisejax
from noisejax import data, hardware as hw, layers, moments, rng, simulate, train
from noisejax.study import models
from noisejax.errors import InvalidArgumentError, NoisejaxError, ShapeMismatchError

G_MAX = 25.0
HOUR, DAY, YEAR = 3600.0, 86400.0, 365 * 86400.0


# ----------------------------------------------------------------------------------
# NumPy transcription of the model (issue 16)
# ----------------------------------------------------------------------------------


def np_sigma_prog(g):
    gr = g / G_MAX
    return (0.26348 + 1.9650 * gr - 1.1731 * gr**2) * G_MAX / 25.0


def np_nu_stats(g):
    gr = np.clip(np.abs(g / G_MAX), 1e-7, None)
    mu = np.clip(-0.0155 * np.log(gr) + 0.0244, 0.049, 0.1)
    sd = np.clip(-0.0125 * np.log(gr) - 0.0059, 0.008, 0.045)
    return mu, sd


def np_read_sigma(g, t):
    q = np.minimum(0.2, 0.0088 / np.maximum(1e-3, (np.abs(g) / G_MAX) ** 0.65))
    tp = t + 20.0
    return q * np.sqrt(np.log((tp + 250e-9) / (2 * 250e-9)))


def np_quantize(v, res, bound):
    """In float32 with the library's operation order (``2 · bound · res``), so ties round alike."""
    v = np.asarray(v, np.float32)
    step = np.float32(2.0) * np.float32(bound) * np.float32(res)
    return np.round(v / step) * step


def np_mvm_row(x, W, noise_rows, *, inp_res=1 / 126, out_res=1 / 510, inp_bound=1.0, out_bound=12.0,
               max_bm_factor=1000, max_bm_res=0.25):
    """aihwkit's forward for one input row (float32); ``noise_rows[k]`` is the output noise of pass ``k``."""
    x, W = np.asarray(x, np.float32), np.asarray(W, np.float32)
    m = np.max(np.abs(x))
    m = m if m > 0 else np.float32(1.0)
    limit = min(max_bm_factor, max_bm_res / (2 * inp_bound * inp_res))
    r = np.float32(1.0)
    k = 0
    while True:
        xq = np.clip(np_quantize(x / (m * r), inp_res, inp_bound), -inp_bound, inp_bound)
        z = (xq.astype(np.float64) @ W.astype(np.float64) + noise_rows[k]).astype(np.float32)
        zq = np_quantize(z, out_res, out_bound)
        if np.all(np.abs(zq) <= out_bound) or r > limit:
            return np.clip(zq, -out_bound, out_bound) * m * r, r
        r *= 2
        k += 1


# ----------------------------------------------------------------------------------
# Device formulas
# ----------------------------------------------------------------------------------


def _ladder(levels, n):
    """W whose row i holds n copies of levels[i] (one entry at 1 sets max|W| = 1)."""
    W = np.repeat(np.asarray(levels, np.float64)[:, None], n, axis=1).astype(np.float32)
    W[0, 0] = 1.0
    return jnp.asarray(W)


def test_programming_sigma_against_numpy():
    levels = [1.0, 0.7, 0.4, 0.2, 0.1]
    n = 20_000
    pcm = hw.PCMNoise(resplit=False)
    st = pcm.program(_ladder(levels, n), key=jax.random.key(0))
    g = np.asarray(st.g_pos)
    for i, gr in enumerate(levels):
        target = gr * G_MAX
        sd = np_sigma_prog(target)
        vals = g[i, 1:]  # g + σξ is far from 0 here (rectification at <1e-7 probability)
        assert abs(vals.mean() - target) < 5 * sd / math.sqrt(vals.size)
        assert abs(vals.std() / sd - 1) < 5 / math.sqrt(2 * vals.size)
        np.testing.assert_allclose(np.asarray(pcm.programming_sigma(jnp.float32(target))), sd, rtol=1e-6)
    # the "off" device of a positive weight is programmed too: max(σ(0) ξ, 0), a half-normal
    off = np.asarray(st.g_neg)[1:].ravel()
    s0 = np_sigma_prog(0.0)
    assert abs(np.mean(off == 0) - 0.5) < 5 * 0.5 / math.sqrt(off.size)
    assert abs(off.mean() - s0 / math.sqrt(2 * math.pi)) < 5 * s0 / math.sqrt(off.size)


def test_drift_exponent_statistics_against_numpy():
    levels = [1.0, 0.3, 0.05, 0.003]
    n = 20_000
    st = hw.PCMNoise(resplit=False).program(_ladder(levels, n), key=jax.random.key(1))
    nu = np.asarray(st.nu_pos)
    for i, gr in enumerate(levels):
        mu, sd = np_nu_stats(gr * G_MAX)
        vals = nu[i, 1:]
        # ν = |μ + σξ| with μ/σ >= 1.1 here: compare with the folded normal's moments
        z = mu / sd
        from scipy.stats import norm
        fmean = sd * math.sqrt(2 / math.pi) * math.exp(-z * z / 2) + mu * (1 - 2 * norm.cdf(-z))
        fvar = mu**2 + sd**2 - fmean**2
        assert abs(vals.mean() - fmean) < 5 * math.sqrt(fvar / vals.size)
        assert abs(vals.std() / math.sqrt(fvar) - 1) < 6 / math.sqrt(2 * vals.size)
    # a zero target (the off device) uses gr clipped at 1e-7: μ_ν = 0.1, σ_ν = 0.045 (clip values)
    mu0, sd0 = np_nu_stats(0.0)
    assert (mu0, sd0) == (0.1, 0.045)
    off = np.asarray(st.nu_neg)[1:].ravel()
    assert abs(off.mean() - mu0) < 5 * sd0 / math.sqrt(off.size) + 1e-4  # |0.1 + 0.045ξ| is never folded in practice


@pytest.mark.parametrize("t", [HOUR, DAY, YEAR])
def test_drift_of_the_mean_against_numpy(t):
    """Programming and read noise off: E[g_t] = g E[((t + t0)/t0)^(−ν)] (NumPy quadrature over ν)."""
    levels = [1.0, 0.5, 0.1]
    n = 20_000
    pcm = hw.PCMNoise(resplit=False, prog_noise_scale=0.0, read_noise_scale=0.0)
    st = pcm.program(_ladder(levels, n), key=jax.random.key(2))
    W_t = np.asarray(pcm.read(st, t, key=jax.random.key(3)))
    xi = np.linspace(-10, 10, 20001)
    w = np.exp(-xi**2 / 2)
    w /= w.sum()
    tau = (t + 20.0) / 20.0
    for i, gr in enumerate(levels):
        mu, sd = np_nu_stats(gr * G_MAX)
        fac = tau ** (-np.abs(mu + sd * xi))
        e1, e2 = (w * fac).sum(), (w * fac**2).sum()
        vals = W_t[i, 1:] / gr
        assert abs(vals.mean() - e1) < 5 * math.sqrt((e2 - e1**2) / vals.size)
        # and the closed form used by the analytic path
        mo = pcm.weight_moments(_ladder(levels, 4), t)
        np.testing.assert_allclose(float(mo.mean[i, 1]) / gr, e1, rtol=2e-5)
        np.testing.assert_allclose(float(mo.var[i, 1]) / gr**2, e2 - e1**2, rtol=2e-3, atol=1e-9)
    # the drift is real: a large weight (ν ≈ 0.049 ± 0.008) keeps about τ^(−0.049) of its conductance
    assert W_t[0, 1:].mean() < tau ** (-0.04)


def test_read_noise_growth_against_numpy():
    """Programming noise and drift off: the relative spread of g_t grows as q sqrt(ln((t'+t_r)/(2t_r)))."""
    pcm = hw.PCMNoise(resplit=False, prog_noise_scale=0.0, drift_scale=0.0)
    n = 40_000
    W = _ladder([1.0, 0.5], n)
    st = pcm.program(W, key=jax.random.key(4))
    sds = []
    for j, t in enumerate([0.0, 1.0, HOUR, YEAR, 10 * YEAR]):
        W_t = np.asarray(pcm.read(st, t, key=jax.random.fold_in(jax.random.key(5), j)))
        for i, gr in enumerate([1.0, 0.5]):
            rel = W_t[i, 1:] / gr - 1.0
            expected = np_read_sigma(gr * G_MAX, t)
            assert abs(rel.std() / expected - 1) < 5 / math.sqrt(2 * rel.size), (t, gr)
            assert abs(rel.mean()) < 5 * expected / math.sqrt(rel.size)
        sds.append(expected)
    assert all(b > a for a, b in zip(sds, sds[1:]))  # it grows with time


def test_read_factor_caps_and_floors():
    pcm = hw.PCMNoise()
    g = jnp.array([0.0, 1e-6, 0.01, 1.0, 25.0])
    q = np.asarray(pcm.read_q_factor(g))
    expected = np.minimum(0.2, 0.0088 / np.maximum(1e-3, (np.asarray(g) / 25.0) ** 0.65))
    np.testing.assert_allclose(q, expected, rtol=1e-5)


def test_resplit_matches_aihwkit_and_pair_model_differs():
    """Re-split: one device per pair, scale from the programmed weights; both models give the same programmed weights."""
    W = jax.random.normal(jax.random.key(6), (32, 16)) * 0.1
    k = jax.random.key(7)
    a = hw.PCMNoise(resplit=True).program(W, key=k)
    b = hw.PCMNoise(resplit=False).program(W, key=k)
    np.testing.assert_allclose(np.asarray(a.weights), np.asarray(b.weights), rtol=1e-5, atol=1e-7)
    ga, gb = np.asarray(a.g_pos), np.asarray(a.g_neg)
    assert np.all((ga == 0) | (gb == 0))  # one device per pair
    wp = np.asarray(a.weights)
    np.testing.assert_allclose(float(a.scale[0, 0]), G_MAX / np.abs(wp).max(), rtol=1e-6)
    assert np.any((np.asarray(b.g_pos) > 0) & (np.asarray(b.g_neg) > 0))  # the pair model keeps both


def test_weight_moments_match_sampling():
    """The exact per-weight statistics (both device models) against 4 000 programmings."""
    W = jax.random.normal(jax.random.key(8), (24, 8)) * 0.1
    R = 4000
    for resplit in (True, False):
        pcm = hw.PCMNoise(resplit=resplit)
        for t in (1.0, YEAR):
            mo = pcm.weight_moments(W, t)
            draw = jax.jit(jax.vmap(lambda kk: pcm.read(pcm.program(W, key=jax.random.fold_in(kk, 0)), t,
                                                        key=jax.random.fold_in(kk, 1))))
            s = np.asarray(draw(jax.random.split(jax.random.key(9), R)))
            z = (s.mean(0) - np.asarray(mo.mean)) / np.sqrt(np.asarray(mo.var) / R)
            assert np.median(np.abs(z)) < 0.6745 * 1.25 and np.abs(z).max() < 5
            ratio = s.var(0, ddof=1) / np.asarray(mo.var)
            assert abs(np.mean(ratio) - 1) < 5 * math.sqrt(2 / R) * 2  # heavy-ish tails: 2× the Gaussian sd
            assert abs(np.abs(s).mean() / float(mo.abs_mean.mean()) - 1) < 0.01


# ----------------------------------------------------------------------------------
# Periphery
# ----------------------------------------------------------------------------------


def test_dac_error_is_step2_over_12_inside_and_clips_outside():
    n = 64
    mvm = hw.AnalogMVM(out_res=0.0, out_noise=0.0, noise_management="none", bound_management="none")
    x = jax.random.uniform(jax.random.key(10), (2000, n), minval=-1.0, maxval=1.0)
    y = np.asarray(mvm(x, jnp.eye(n), key=jax.random.key(11)))
    err = y - np.asarray(x)
    step = 2 / 126
    N = err.size
    assert abs(err.mean()) < 5 * step / math.sqrt(12 * N)
    # Var of a uniform error: step²/12, its sample sd relative error sqrt(0.8/N) (kurtosis 1.8)
    assert abs(err.var() / (step**2 / 12) - 1) < 5 * math.sqrt(0.8 / N)
    np.testing.assert_array_equal(y, np.clip(np_quantize(np.asarray(x), 1 / 126, 1.0), -1, 1))
    big = np.asarray(mvm(jnp.array([[1.7, -3.0] + [0.0] * (n - 2)]), jnp.eye(n), key=jax.random.key(0)))
    assert big[0, 0] == 1.0 and big[0, 1] == -1.0


def test_adc_error_is_step2_over_12_inside_and_clips_outside():
    n = 16
    mvm = hw.AnalogMVM(inp_res=0.0, out_noise=0.0, noise_management="none", bound_management="none", inp_bound=100.0)
    z = jax.random.uniform(jax.random.key(12), (4000, n), minval=-11.0, maxval=11.0)
    y = np.asarray(mvm(z, jnp.eye(n), key=jax.random.key(13)))
    err = y - np.asarray(z)
    step = 2 * 12 / 510
    N = err.size
    assert abs(err.var() / (step**2 / 12) - 1) < 5 * math.sqrt(0.8 / N)
    assert np.max(np.abs(err)) <= step / 2 + 1e-5
    out = np.asarray(mvm(jnp.array([[30.0, -13.0] + [1.0] * (n - 2)]), jnp.eye(n), key=jax.random.key(0)))
    assert out[0, 0] == 12.0 and out[0, 1] == -12.0


def test_forward_and_bound_management_against_numpy():
    """The whole forward, noise-free and with noise, row by row against the NumPy transcription."""
    rng = np.random.default_rng(0)
    n_in, n_out = 40, 6
    W = rng.normal(size=(n_in, n_out)).astype(np.float32) * 0.6
    x = rng.uniform(-1, 1, size=(7, n_in)).astype(np.float32)
    # rows whose outputs need reductions 1, 2, 4, 8 and beyond the limit (r = 16)
    x[1] *= 3.0
    x[2, :] = np.sign(W[:, 0]) * 0.97
    x[3, :] = 0.0
    x[4, :] = np.sign(W[:, 1]) * 0.43
    W[:, 2] = 3.0  # column 2 sums to 117 for a row of 0.97: beyond the bound-management limit
    x[5, :] = 0.97
    x[6, :] = 1e-3
    for noise in (0.0, 0.06):
        mvm = hw.AnalogMVM(out_noise=noise)
        key = jax.random.key(14)
        y = np.asarray(mvm(jnp.asarray(x), jnp.asarray(W), key=key))
        passes = [np.asarray(jax.random.normal(jax.random.fold_in(key, k), (7, n_out))) * np.float32(noise) for k in range(6)]
        rs = []
        for b in range(7):
            ref, r = np_mvm_row(x[b], W, [p[b] for p in passes])
            rs.append(r)
            np.testing.assert_allclose(y[b], ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))
        if noise == 0.0:
            assert rs[5] == 16.0 and rs[3] == 1.0 and len(set(rs)) >= 3, rs  # the limit r = 16 (5 passes) is reached


def test_one_hot_readout_equals_eye_and_tiles():
    W = jax.random.normal(jax.random.key(15), (30, 5)) * 4.0  # large enough for bound management
    mvm = hw.AnalogMVM()
    k = jax.random.key(16)
    x = jax.random.uniform(jax.random.key(17), (3, 30))
    grid = hw.TileGrid.of((30, 5), (16, 4))
    assert grid.in_sizes == (15, 15) and grid.out_sizes == (3, 2)

    @jax.jit
    def run(W, x):
        ref = []
        for o, so in enumerate(grid.out_slices()):
            acc = 0
            for kk, si in enumerate(grid.in_slices()):
                acc = acc + (1 + 2 * kk + o) * mvm(x[:, si], W[si, so], key=jax.random.fold_in(k, 2 * kk + o))
            ref.append(acc)
        return (mvm.one_hot(W, key=k), mvm(jnp.eye(30), W, key=k), mvm.tiled(x, W, key=k, tile=None),
                mvm(x, W, key=jax.random.fold_in(k, 0)),
                mvm.tiled(x, W, key=k, tile=(16, 4), gain=jnp.array([[1.0, 2.0], [3.0, 4.0]])), jnp.concatenate(ref, -1))

    hot, eye, one, one_ref, two, two_ref = (np.asarray(a) for a in run(W, x))
    np.testing.assert_array_equal(hot, eye)
    np.testing.assert_array_equal(one, one_ref)
    np.testing.assert_allclose(two, two_ref, rtol=1e-6)


def test_tiles_have_their_own_scale():
    W = jnp.concatenate([jnp.full((300, 20), 0.1), jnp.full((300, 20), 2.0)])
    st = hw.PCMNoise(prog_noise_scale=0.0).program(W, key=jax.random.key(0), tile=(512, 512))
    assert st.scale.shape == (2, 1)
    np.testing.assert_allclose(np.asarray(st.scale)[:, 0], [G_MAX / 0.1, G_MAX / 2.0], rtol=1e-6)
    assert hw.split_sizes(784, 512) == (392, 392) and hw.split_sizes(1100, 512) == (367, 367, 366)


def test_straight_through_gradient():
    mvm = hw.AnalogMVM()
    x = jax.random.uniform(jax.random.key(18), (5, 20))
    W = jax.random.normal(jax.random.key(19), (20, 3)) * 0.2
    gW = jax.grad(lambda w: mvm(x, w, key=jax.random.key(1)).sum())(W)
    np.testing.assert_allclose(np.asarray(gW), np.asarray(jnp.broadcast_to(x.sum(0)[:, None], W.shape)), rtol=1e-5)
    gx = jax.grad(lambda v: mvm(v, W, key=jax.random.key(1)).sum())(x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(jnp.broadcast_to(W.sum(1), x.shape)), rtol=1e-5)


# ----------------------------------------------------------------------------------
# The three aihwkit pitfalls cannot happen
# ----------------------------------------------------------------------------------


def _trained_mlp(steps=1500):
    ds = data.load_digits()
    net = layers.mlp([64, 64, 64, 10], "sigmoid", "linear", noisy=False, dense=hw.AnalogDense)
    _, p0 = net.init(jax.random.key(0), (64,))
    res = train.train_plain(net, p0, ds.x_train, ds.y_train, key=jax.random.key(1), steps=steps, batch_size=128,
                            optimizer=optax.adam(3e-3))
    return net, res.params, ds


@pytest.fixture(scope="module")
def mlp():
    return _trained_mlp()


def _corr(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(np.corrcoef(a, b)[0, 1])


def test_fresh_device_variability_per_realization(mlp):
    """Two realizations draw independent programming and drift exponents; times of one realization share them."""
    net, params, _ = mlp
    chip = hw.AnalogHardware(compensation="none")
    W = params[1][0]["W"]
    n = W.size
    program = jax.jit(lambda k: hw.program_params(chip, params, key=k))
    read = jax.jit(lambda p, t, k: hw.read_params(chip, p, t, key=k))
    pa, pb = program(jax.random.key(1)), program(jax.random.key(2))
    ta = [read(pa, t, jax.random.key(10 + i))[1][0]["W"] for i, t in enumerate((HOUR, YEAR))]
    tb = read(pb, HOUR, jax.random.key(20))[1][0]["W"]
    mean_h = hw.PCMNoise().weight_moments(W, HOUR).mean
    mean_y = hw.PCMNoise().weight_moments(W, YEAR).mean
    across = _corr(ta[0] - mean_h, tb - mean_h)
    within = _corr(ta[0] - mean_h, ta[1] - mean_y)
    assert abs(across) < 5 / math.sqrt(n), across  # fresh devices: no correlation beyond sampling error
    assert within > 0.3, within  # same devices at two times: the programming is shared
    # drift exponents: residuals from their state-dependent mean E[ν | target] are uncorrelated
    gp = jnp.clip(W * (G_MAX / jnp.abs(W).max()), 0.0, G_MAX)
    mu, sd = hw.PCMNoise().drift_stats(gp)
    nu_a, nu_b = pa[1][0]["W"].nu_pos, pb[1][0]["W"].nu_pos
    assert abs(_corr((nu_a - mu) / sd, (nu_b - mu) / sd)) < 5 / math.sqrt(n)
    # drift_forward: realization keys differ -> programmings differ
    x = jnp.ones((1, 64)) * 0.5
    out = jax.jit(jax.vmap(lambda k: hw.drift_forward(net, params, x, jnp.array([1.0]), key=k, hardware=chip)))(
        jax.random.split(jax.random.key(3), 2))
    assert not np.allclose(np.asarray(out[0]), np.asarray(out[1]))


@pytest.mark.parametrize("compensation", ["readout", "exact"])
def test_no_stale_compensation_gain(mlp, compensation):
    """After re-programming, the gain comes from the new programming's baseline (≈ 1 right after it)."""
    net, params, _ = mlp
    chip = hw.AnalogHardware(compensation=compensation)
    program = jax.jit(lambda k: hw.program_params(chip, params, key=k))
    read = jax.jit(lambda p, t, k: hw.read_params(chip, p, t, key=k))
    old = program(jax.random.key(4))
    late = read(old, 10 * YEAR, jax.random.key(5))
    g_late = np.asarray(late[1][0]["gain"])
    assert float(g_late.max()) > 1.2  # a decade of drift needs a large gain
    new = program(jax.random.key(6))  # re-programming
    early = read(new, 0.0, jax.random.key(7))
    g_new = np.asarray(early[1][0]["gain"])
    assert np.all(np.abs(g_new - 1.0) < 0.05), g_new
    # and it is exactly baseline(new) / readout(now), recomputed
    mvm = chip.mvm if compensation == "readout" else None
    kj = jax.random.fold_in(jax.random.key(7), 1)
    now = hw.compensation_readout(early[1][0]["W"], mvm=mvm, key=jax.random.fold_in(kj, 1), tile=chip.tile)
    np.testing.assert_allclose(g_new, np.asarray(new[1][0]["baseline"] / now), rtol=1e-6)


def test_reading_always_from_the_current_programming(mlp):
    """read(state_B, t) deviates like programming B, not like an earlier programming A."""
    _, params, _ = mlp
    W = params[0][0]["W"]
    pcm = hw.PCMNoise()
    a = pcm.program(W, key=jax.random.key(8))
    b = pcm.program(W, key=jax.random.key(9))  # "set_weights" then program again
    W_t = pcm.read(b, DAY, key=jax.random.key(10))
    mean_t = pcm.weight_moments(W, DAY).mean
    prog_mean = pcm.weight_moments(W, DAY).prog_mean
    n = W.size
    with_b = _corr(W_t - mean_t, b.weights - prog_mean)
    with_a = _corr(W_t - mean_t, a.weights - prog_mean)
    assert with_b > 0.3 and abs(with_a) < 5 / math.sqrt(n), (with_b, with_a)
    # changed target weights: programming the new W reads the new W (no trace of the old one)
    W2 = -W
    c = pcm.program(W2, key=jax.random.key(8))
    assert _corr(pcm.read(c, DAY, key=jax.random.key(10)), W2) > 0.9


def test_readout_compensation_under_compensates(mlp):
    """Through the noisy periphery the readout gain is smaller than the exact one (the issue's 1.50 vs 2.02)."""
    _, params, _ = mlp
    W = params[1][0]["W"]
    pcm, mvm = hw.PCMNoise(), hw.AnalogMVM()
    ks = jax.random.split(jax.random.key(11), 20)

    def gains(k):
        st = pcm.program(W, key=jax.random.fold_in(k, 0))
        W_t = pcm.read(st, YEAR, key=jax.random.fold_in(k, 1))
        return (hw.drift_compensation(st.weights, W_t),
                hw.drift_compensation(st.weights, W_t, mvm=mvm, key=jax.random.fold_in(k, 2)))

    exact, noisy = (np.asarray(g) for g in jax.jit(jax.vmap(gains))(ks))
    assert exact.mean() > noisy.mean() + 10 * noisy.std() / math.sqrt(len(ks))
    assert 1.0 < noisy.mean() < exact.mean()


# ----------------------------------------------------------------------------------
# Whole networks
# ----------------------------------------------------------------------------------


def test_analytic_per_layer_variance_within_5_percent_of_monte_carlo(mlp):
    """Digits MLP 64-64-64-10 on PCM + aihwkit periphery (exact compensation), every time of the study.

    Per layer and time: the median over inputs × neurons of |var_analytic / var_MC − 1| is
    within 5 %.  With R realizations a sample variance has relative sd ≈ sqrt(2/R)
    (2.2 % at R = 4000), whose median absolute deviation alone is ≈ 0.67 × that = 1.5 %.
    """
    net, params, ds = mlp
    chip = hw.AnalogHardware(compensation="exact")
    times = jnp.asarray(list(hw.SECONDS.values()))
    x = jnp.asarray(ds.x_test[:8])
    R = 4000
    f = jax.jit(jax.vmap(lambda k: hw.drift_forward(net, params, x, times, key=k, hardware=chip, return_layers=True)[1]))
    outs = [np.asarray(o) for o in f(simulate.realization_keys(rng.key(12), jnp.arange(R)))]
    an = jax.jit(jax.vmap(lambda t: hw.drift_moments(net, params, x, t, hardware=chip)))(times)
    sampling = 0.6745 * math.sqrt(2 / (R - 1))
    assert sampling < 0.02
    for l, o in enumerate(outs):
        v_mc = o.var(0, ddof=1)
        v_an = np.asarray(an[l].var)
        for ti in range(len(times)):
            med = np.median(np.abs(v_an[ti] / v_mc[ti] - 1))
            assert med < 0.05, (l, float(times[ti]), med)
            m_err = np.median(np.abs(np.asarray(an[l].mean)[ti] - o.mean(0)[ti]) / np.sqrt(v_mc[ti]))
            assert m_err < 0.1, (l, ti, m_err)


def test_jit_equals_eager_and_time_keys_fold_the_index():
    """The quantizers round identically compiled and op by op (no x·(1/δ) rewrite at ties)."""
    mvm = hw.AnalogMVM()
    W = jax.random.normal(jax.random.key(0), (20, 6)) * 2.0
    x = jnp.round(jax.random.uniform(jax.random.key(1), (9, 20), minval=-1, maxval=1) * 63) / 63  # on DAC ties
    k = rng.key(13)
    np.testing.assert_array_equal(np.asarray(mvm(x, W, key=k)), np.asarray(jax.jit(lambda a, b: mvm(a, b, key=k))(x, W)))
    pcm = hw.PCMNoise()
    st = pcm.program(W, key=k)
    np.testing.assert_allclose(np.asarray(pcm.read(st, DAY, key=k)),
                               np.asarray(jax.jit(lambda s_: pcm.read(s_, DAY, key=k))(st)), rtol=1e-6, atol=1e-7)
    # time i draws with fold_in(·, i): row 0 does not depend on the other times of the run
    net = layers.mlp([6, 5, 3], "sigmoid", "linear", noisy=False, dense=hw.AnalogDense)
    _, params = net.init(jax.random.key(0), (6,))
    chip = hw.AnalogHardware()
    xs = jax.random.uniform(jax.random.key(1), (2, 6))
    run = jax.jit(lambda ts: hw.drift_forward(net, params, xs, ts, key=k, hardware=chip))
    a, b = run(jnp.array([1.0, DAY])), run(jnp.array([1.0, YEAR]))
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(a[1]), np.asarray(b[1]))


def test_analog_dense_digital_path_and_moments(mlp):
    net, params, ds = mlp
    x = jnp.asarray(ds.x_test[:4])
    plain = layers.apply_batch(net, params, x)
    dense_net, _ = layers.from_weights([p[0]["W"] for p in params], [p[0]["b"] for p in params], "sigmoid", "linear",
                                       noisy=False)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(layers.apply_batch(dense_net, params, x)), rtol=1e-6)
    # gains apply per tile in the digital path
    p = jax.tree_util.tree_map(lambda a: a, params)
    p = tuple((dict(blk[0], gain=jnp.float32(2.0)),) + tuple(blk[1:]) for blk in p)
    y1 = net.apply(p, x[0])
    y_ref = net.apply(tuple((dict(blk[0], W=2.0 * blk[0]["W"]),) + tuple(blk[1:]) for blk in params), x[0])
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y_ref), rtol=1e-5)
    # moment rule without periphery = the dense rule
    mo = moments.predict(net, params, x)
    mo_ref = moments.predict(dense_net, params, x)
    np.testing.assert_allclose(np.asarray(mo[-1].mean), np.asarray(mo_ref[-1].mean), rtol=1e-6)


def test_hardware_aware_training_with_the_existing_trainer(mlp):
    _, _, ds = mlp
    net = layers.mlp([64, 16, 10], "sigmoid", "linear", noisy=False, dense=hw.AnalogDense)
    _, params = net.init(jax.random.key(0), (64,))
    chip = hw.AnalogHardware(compensation="exact")
    obj = train.noise_aware_loss(net, noise=chip, weight_noise=hw.DriftedWeights(chip), n_realizations=1)
    res = train.fit(obj, params, ds.x_train, ds.y_train, key=rng.key(14), steps=20, chunk=20, batch_size=32,
                    optimizer=optax.adam(1e-2))
    assert np.all(np.isfinite(res.losses)) and res.losses[-5:].mean() < res.losses[:5].mean()
    changed = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(res.params),
                                                         jax.tree_util.tree_leaves(params))]
    assert max(changed) > 0
    # a sweep over a device coefficient is a vmap over the hardware pytree
    W = params[0][0]["W"]
    v = jax.vmap(lambda s: hw.PCMNoise(prog_noise_scale=s).weight_moments(W, 1.0).prog_var.mean())(jnp.array([0.5, 1.0, 2.0]))
    assert np.all(np.diff(np.asarray(v)) > 0)


def test_bad_arguments_raise_clear_errors(mlp):
    net, params, _ = mlp
    pcm = hw.PCMNoise()
    with pytest.raises(ShapeMismatchError, match="2-D"):
        pcm.program(jnp.ones(5), key=jax.random.key(0))
    st = pcm.program(jnp.ones((3, 2)), key=jax.random.key(0))
    with pytest.raises(InvalidArgumentError, match="t must be >= 0"):
        pcm.read(st, -1.0, key=jax.random.key(0))
    with pytest.raises(InvalidArgumentError, match="PCMState"):
        pcm.read(jnp.ones((3, 2)), 1.0, key=jax.random.key(0))
    with pytest.raises(InvalidArgumentError, match="g_max must be > 0"):
        hw.PCMNoise(g_max=0.0).program(jnp.ones((3, 2)), key=jax.random.key(0))
    with pytest.raises(InvalidArgumentError, match="finite"):
        hw.PCMNoise(t0=float("nan"))
    with pytest.raises(InvalidArgumentError, match="compensation"):
        hw.AnalogHardware(compensation="global")
    with pytest.raises(InvalidArgumentError, match="tile"):
        hw.AnalogHardware(tile=(0, 4))
    with pytest.raises(ShapeMismatchError, match="features"):
        hw.AnalogMVM()(jnp.ones((2, 5)), jnp.ones((4, 3)), key=jax.random.key(0))
    with pytest.raises(InvalidArgumentError, match="needs key"):
        hw.compensation_readout(jnp.ones((3, 2)), mvm=hw.AnalogMVM())
    with pytest.raises(InvalidArgumentError, match="affine"):
        hw.program_params(hw.AnalogHardware(), {"kernel": jnp.ones((3, 3))}, key=jax.random.key(0))
    with pytest.raises(InvalidArgumentError, match="needs key"):
        net.apply(params, jnp.ones(64), noise=hw.AnalogHardware())
    with pytest.raises(InvalidArgumentError, match="times must be >= 0"):
        hw.drift_forward(net, params, jnp.ones((1, 64)), jnp.array([1.0, -5.0]), key=jax.random.key(0),
                         hardware=hw.AnalogHardware())
    with pytest.raises(InvalidArgumentError, match="pcm must be a PCMNoise"):
        hw.AnalogHardware(pcm=hw.AnalogMVM())
    assert issubclass(InvalidArgumentError, NoisejaxError)


# ----------------------------------------------------------------------------------
# Any JAX model: noisejax.noisy / noisejax.analytic with the chip
# ----------------------------------------------------------------------------------


class ConvDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=4, kernel_size=(3, 3))(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(features=5)(x)


def test_any_model_products_run_through_the_crossbar():
    """A Flax Conv and Dense under noisejax.noisy(neuron=chip, sites="matmuls"): every patch / row is
    aihwkit's forward (the NumPy transcription np_mvm_row; noise-free periphery: DAC, ADC, managements)."""
    model = ConvDense()
    x = jax.random.uniform(jax.random.key(20), (2, 6, 6, 3), minval=-1.0, maxval=1.0)
    variables = model.init(jax.random.key(21), x)
    variables = jax.tree_util.tree_map(lambda a: a * 12.0, variables)  # large enough for bound management
    chip = hw.AnalogHardware(mvm=hw.AnalogMVM(out_noise=0.0), compensation="none")
    y = np.asarray(noisejax.noisy(model.apply, neuron=chip, sites="matmuls")(jax.random.key(0), variables, x))
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    K, bc = p["Conv_0"]["kernel"], p["Conv_0"]["bias"]
    Wc = K.reshape(-1, K.shape[-1])  # rows (kh, kw, c), as a patch read row-major
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    zero = [np.zeros(Wc.shape[1])] * 6
    h = np.zeros((2, 6, 6, 4), np.float32)
    rs = set()
    for b in range(2):
        for i in range(6):
            for j in range(6):
                h[b, i, j], r = np_mvm_row(xp[b, i:i + 3, j:j + 3, :].reshape(-1), Wc, zero)
                rs.add(float(r))
    h = (h + bc).reshape(2, -1)
    ref = np.stack([np_mvm_row(h[b], p["Dense_0"]["kernel"], [np.zeros(5)] * 6)[0] for b in range(2)]) + p["Dense_0"]["bias"]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert len(rs) > 1  # some patches needed bound management
    assert not np.allclose(y, np.asarray(model.apply(variables, x)), rtol=1e-3)  # the periphery is not the identity


def test_pcm_weights_sample_the_documented_programming_and_share_it_across_times():
    """PCMWeights: leaf j programmed with fold_in(fold_in(key, j), 0), read at t, compensated per tile; the
    programming is shared by the times of one key, the reads are fresh."""
    W = jax.random.normal(jax.random.key(22), (40, 12)) * 0.2
    params = {"b": jnp.ones(12), "W": W}  # leaf 0 ("W", flattening order) on crossbars, "b" (1-D) digital
    chip = hw.AnalogHardware(compensation="exact", tile=(16, 8))
    key = jax.random.key(23)
    out, gains = jax.jit(lambda t: chip.weights(t).apply_with_gains(params, key=key))(jnp.float32(DAY))
    np.testing.assert_array_equal(np.asarray(out["b"]), np.ones(12))
    assert gains["b"] is None and gains["W"].shape == (3, 2)
    kj = jax.random.fold_in(key, 0)
    state = chip.pcm.program(W, key=jax.random.fold_in(kj, 0), tile=chip.tile)
    tbits = jax.lax.bitcast_convert_type(jnp.float32(DAY), jnp.uint32)
    W_t = chip.pcm.read(state, DAY, key=jax.random.fold_in(jax.random.fold_in(kj, 2), tbits))
    alpha = hw.drift_compensation(state.weights, W_t, tile=chip.tile)
    np.testing.assert_allclose(np.asarray(gains["W"]), np.asarray(alpha), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["W"]), np.asarray(W_t * hw.TileGrid.of(W.shape, chip.tile).expand(alpha)),
                               rtol=1e-5, atol=1e-7)
    # one key, two times: the same devices (deviations correlate), fresh read noise
    w_h, w_y = (chip.weights(t).apply(params, key=key)["W"] for t in (HOUR, YEAR))
    m_h, m_y = (chip.weights(t).weight_moments(params)[0]["W"] for t in (HOUR, YEAR))
    assert _corr(w_h - m_h, w_y - m_y) > 0.3
    w_h2 = chip.weights(HOUR).apply(params, key=jax.random.key(24))["W"]
    assert abs(_corr(w_h - m_h, w_h2 - m_h)) < 5 / math.sqrt(W.size)


def test_layers_path_and_any_model_path_are_one_mechanism(mlp):
    """drift_moments (layers: AnalogDense, moments.predict) = noisejax.analytic(net.apply, weight=chip.weights(t),
    neuron=chip, sites="matmuls") on the same network."""
    net, params, ds = mlp
    chip = hw.AnalogHardware()
    x = jnp.asarray(ds.x_test[:3])
    a = hw.drift_moments(net, params, x, YEAR, hardware=chip)
    fn = lambda p, xb: layers.apply_batch(net, p, xb, return_layers=True)[1]  # noqa: E731
    b = noisejax.analytic(fn, weight=chip.weights(YEAR), neuron=chip, sites="matmuls")(params, x)
    for lm, m, v in zip(a, b.mean, b.var):
        np.testing.assert_allclose(np.asarray(lm.mean), np.asarray(m), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(lm.var), np.asarray(v), rtol=1e-4, atol=1e-9)


@pytest.fixture(scope="module")
def flax_cnn():
    """The Flax MNIST example's CNN (noisejax.study.models.CNN, unmodified), trained briefly on the 8x8 digits."""
    ds = data.load_digits(seed=0)
    xtr = jnp.asarray(ds.x_train.reshape(-1, 8, 8, 1) / 16.0, jnp.float32)
    model = models.CNN()
    loss = lambda v, x, y, key: optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()  # noqa: E731
    variables = train.fit(loss, model.init(jax.random.key(0), xtr[:1]), xtr, jnp.asarray(ds.y_train), key=jax.random.key(1),
                          steps=100, batch_size=128, optimizer=optax.adam(3e-3)).params
    xte = jnp.asarray(ds.x_test.reshape(-1, 8, 8, 1) / 16.0, jnp.float32)
    return model, variables, xte[:2]


def test_flax_cnn_on_the_chip_analytic_matches_monte_carlo(flax_cnn):
    """The unmodified Flax CNN on PCM (every kernel) with the crossbar at every product (two convolutions by
    im2col, two Dense), exact compensation, 1 s and 1 year after programming: per product (taps) the analytic
    variance against R = 1 500 realizations of noisejax.noisy (one programming per realization, read at both times).

    Tolerance: the median over outputs of |var_an/var_MC − 1| within 0.06 — sampling alone gives
    0.6745·sqrt(2/R) ≈ 0.025; the model's own approximations (the DAC of a noisy convolution input per
    output, its cross-channel covariance dropped; quantization as uniform noise; managements at the mean)
    were measured at <= 0.02 with 2 000 realizations.  Means within 0.1 standard deviation (median)."""
    model, variables, x = flax_cnn
    chip = hw.AnalogHardware(compensation="exact")
    times = jnp.array([1.0, YEAR])
    kw = dict(neuron=chip, sites="matmuls", taps="matmuls")
    R = 1500
    one = lambda k: jax.vmap(lambda t: noisejax.noisy(model.apply, weight=chip.weights(t), **kw)(k, variables, x)[1])(times)  # noqa: E731
    mc = simulate.monte_carlo(one, rng.key(25), R)
    an = jax.jit(lambda t: noisejax.analytic(model.apply, weight=chip.weights(t), **kw)(variables, x))
    for ti, t in enumerate(times):
        pred = an(t)
        assert len(pred.var[1]) == 4  # conv, conv, dense, dense
        for i, (m, v, am, av) in enumerate(zip(mc.mean, mc.var, pred.mean[1], pred.var[1])):
            m, v, am, av = np.asarray(m)[ti], np.asarray(v)[ti], np.asarray(am), np.asarray(av)
            err = np.median(np.abs(av / v - 1))
            assert err < 0.06, (i, float(t), err)
            assert np.median(np.abs(am - m) / np.sqrt(v)) < 0.1, (i, float(t))


def test_product_model_errors():
    chip = hw.AnalogHardware()
    f = lambda p, x: jnp.tanh(x @ p["W"])  # noqa: E731
    p, x = {"W": jnp.ones((3, 2))}, jnp.ones((4, 3))
    with pytest.raises(InvalidArgumentError, match="matmul sites"):
        noisejax.noisy(f, neuron=chip, sites="activations")(jax.random.key(0), p, x)
    g = lambda p, x: jnp.einsum("bi,bij->bj", x, p["W"])  # noqa: E731  (a weight with a batch dimension)
    with pytest.raises(InvalidArgumentError, match="crossbar"):
        noisejax.noisy(g, neuron=chip, sites="matmuls")(jax.random.key(0), {"W": jnp.ones((4, 3, 2))}, x)
    with pytest.raises(InvalidArgumentError, match="PCMWeights.t must be >= 0"):
        chip.weights(-1.0)
    with pytest.raises(InvalidArgumentError, match="weight_noise_var or weight"):
        net = layers.mlp([3, 2], "tanh", noisy=False, dense=hw.AnalogDense)
        _, params = net.init(jax.random.key(0), (3,))
        moments.predict(net, params, jnp.ones(3), weight=chip.weights(1.0), weight_noise_var=0.1)


def test_readme_snippet():
    """The README's hardware snippet (same code, fewer realizations)."""
    import jax, jax.numpy as jnp
    from noisejax import hardware as hw, layers, rng, simulate

    net = layers.mlp([64, 32, 10], "sigmoid", "linear", noisy=False, dense=hw.AnalogDense)
    _, params = net.init(jax.random.key(0), (64,))               # (train it first, e.g. noisejax.train)
    chip = hw.AnalogHardware()                                   # PCM + aihwkit 1.1.0 periphery + compensation
    times = jnp.array(list(hw.SECONDS.values()))                 # 1 s, 1 h, 1 day, 1 month, 1 year, 10 years
    x = jnp.ones((8, 64))

    one = lambda key: hw.drift_forward(net, params, x, times, key=key, hardware=chip)   # one programming, all times
    out = jax.jit(jax.vmap(one))(simulate.realization_keys(rng.key(1), jnp.arange(16)))  # (16, 6, 8, 10)
    pred = jax.vmap(lambda t: hw.drift_moments(net, params, x, t, hardware=chip))(times)  # analytic, per layer
    assert out.shape == (16, 6, 8, 10) and pred[-1].var.shape == (6, 8, 10)
