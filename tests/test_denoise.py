"""Tests of noisejax.denoise, noisejax.sweeps (gains, sweeps, grid search) and noisejax.study.files.

Statistical tolerances follow from the sample sizes (≈5 sampling standard deviations);
closed forms are re-derived here with NumPy.
"""

from __future__ import annotations

import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from noisejax import denoise, noise, sweeps
from noisejax.study import files, models
from noisejax.study.plots import plot_accuracy_curves
from noisejax.errors import DataFormatError, InvalidArgumentError, ShapeMismatchError


# ----------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------


def _synthetic_tree(seed: int = 0, n: int = 40_000) -> dict:
    """Gaussian 'weights' with distinct means/variances per leaf, plus BatchNorm leaves and batch_stats."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "Dense_0": {"kernel": (0.3 + 0.5 * rng.standard_normal((n // 100, 100))).astype(np.float32),
                        "bias": (-0.2 + 0.1 * rng.standard_normal(n)).astype(np.float32)},
            "BatchNorm_0": {"scale": (1 + 0.1 * rng.standard_normal(8)).astype(np.float32),
                            "bias": (0.1 * rng.standard_normal(8)).astype(np.float32)},
        },
        "batch_stats": {"BatchNorm_0": {"mean": rng.standard_normal(8).astype(np.float32),
                                        "var": np.ones(8, np.float32)}},
    }


@pytest.fixture(scope="module")
def tree():
    return jax.tree_util.tree_map(jnp.asarray, _synthetic_tree())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small sigmoid MLP on digits (trained in ~1 s, cached in a temp folder)."""
    cfg = models.ModelConfig(kind="mlp", dataset="digits", widths=(16,), activation="sigmoid", epochs=15)
    cache = tmp_path_factory.mktemp("cache")
    variables, info, ds = models.load_or_train(cfg, cache_dir=cache)
    return cfg, jax.tree_util.tree_map(jnp.asarray, variables), ds, dict(info, cache_dir=str(cache))


def _unselected_equal(a, b):
    for part in ("batch_stats",):
        for x, y in zip(jax.tree_util.tree_leaves(a[part]), jax.tree_util.tree_leaves(b[part])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree_util.tree_leaves(a["params"]["BatchNorm_0"]),
                    jax.tree_util.tree_leaves(b["params"]["BatchNorm_0"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------
# weight noise: the requested WNR is realized
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["variance", "power"])
@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_noise_has_requested_wnr(tree, reference, scope):
    wnr = 3.0
    noisy = noise.add_weight_noise(tree, wnr, key=jax.random.key(1), reference=reference, scope=scope)
    _unselected_equal(noisy, tree)  # normalization parameters and statistics stay noise-free
    leaves = [np.asarray(tree["params"]["Dense_0"][k], np.float64).ravel() for k in ("bias", "kernel")]
    noisy_leaves = [np.asarray(noisy["params"]["Dense_0"][k], np.float64).ravel() for k in ("bias", "kernel")]
    ref_pow = (lambda x: np.mean(x**2)) if reference == "power" else (lambda x: np.var(x))
    if scope == "global":
        expected = [ref_pow(np.concatenate(leaves)) / 10 ** (wnr / 10)] * 2
    else:
        expected = [ref_pow(x) / 10 ** (wnr / 10) for x in leaves]
    for clean, nz, p in zip(leaves, noisy_leaves, expected):
        diff = nz - clean
        n = diff.size
        # E[mean(d²)] = p, sampling std p·sqrt(2/n)
        assert abs(np.mean(diff**2) - p) < 5 * p * math.sqrt(2 / n), (reference, scope)
        assert abs(np.mean(diff)) < 5 * math.sqrt(p / n)
    if scope == "global":
        measured = float(noise.measured_wnr_db(tree, noisy, reference=reference))
        n_all = sum(x.size for x in leaves)
        # dB error of a variance estimate: 10/ln10 · sqrt(2/n)
        assert abs(measured - wnr) < 5 * (10 / math.log(10)) * math.sqrt(2 / n_all)


# ----------------------------------------------------------------------------------
# MMSE
# ----------------------------------------------------------------------------------


def test_mmse_side_info_equals_closed_form_posterior_mean(tree):
    p = 0.2
    noisy = noise.add_weight_noise(tree, 0.0, key=jax.random.key(2))  # any noisy tree; the formula is exact
    prior = denoise.clean_prior(tree)
    hat = denoise.MMSE(prior=prior)(noisy, p)
    for k in ("kernel", "bias"):
        clean = np.asarray(tree["params"]["Dense_0"][k], np.float64)
        w = np.asarray(noisy["params"]["Dense_0"][k], np.float64)
        m, v = clean.mean(), clean.var()
        expected = m + v / (v + p) * (w - m)
        np.testing.assert_allclose(np.asarray(hat["params"]["Dense_0"][k]), expected, rtol=1e-5, atol=1e-6)
    _unselected_equal(hat, tree)


def test_mmse_without_side_info_matches_true_posterior_mean():
    """w ~ N(μ, s²) i.i.d., w̃ = w + n: the noisy-statistics MMSE is the posterior mean up to sampling error."""
    rng = np.random.default_rng(3)
    n, mu, s2, p = 200_000, 0.4, 0.25, 0.5
    w = mu + math.sqrt(s2) * rng.standard_normal(n)
    wt = w + math.sqrt(p) * rng.standard_normal(n)
    hat = np.asarray(denoise.MMSE()({"kernel": jnp.asarray(wt, jnp.float32)}, p)["kernel"], np.float64)
    # ŵ is affine in w̃: recover (θ̂, intercept) and compare with θ = s²/(s²+p), μ(1-θ)
    slope, intercept = np.polyfit(wt, hat, 1)
    theta = s2 / (s2 + p)
    V = s2 + p
    tol_theta = 5 * (p / V) * math.sqrt(2 / (n - 1))  # θ̂ = 1 - p/V̂, δV̂ ≈ V·sqrt(2/(n-1))
    assert abs(slope - theta) < tol_theta
    tol_int = 5 * (math.sqrt(V / n) * (1 - theta) + abs(mu) * tol_theta / 5)
    assert abs(intercept - mu * (1 - theta)) < tol_int
    # and the posterior mean has the Bayes MSE s²p/(s²+p) (vs p for ML)
    bayes = s2 * p / (s2 + p)
    assert abs(np.mean((hat - w) ** 2) - bayes) < 5 * bayes * math.sqrt(2 / n) + 2 * tol_theta * V


def test_mmse_per_channel_statistics():
    rng = np.random.default_rng(4)
    scales = np.array([0.1, 1.0, 3.0])
    w = (rng.standard_normal((500, 3)) * scales).astype(np.float32)
    p = 0.5
    hat = np.asarray(denoise.MMSE(per_channel=True)({"kernel": jnp.asarray(w)}, p)["kernel"])
    m, v = w.mean(0), np.maximum(w.var(0) - p, 0)
    np.testing.assert_allclose(hat, m + v / (v + p) * (w - m), rtol=1e-4, atol=1e-5)
    assert np.allclose(hat[:, 0], m[0], atol=1e-6)  # channel below the noise floor: shrunk to its mean


# ----------------------------------------------------------------------------------
# compensated MMSE
# ----------------------------------------------------------------------------------


def test_compensated_lambda1_beta0_is_ml_exactly(tree):
    noisy = noise.add_weight_noise(tree, -3.0, key=jax.random.key(5))
    pw = noise.noise_power(tree, -3.0)
    for kw in ({}, {"per_channel": True}, {"prior": denoise.clean_prior(tree)}):
        hat = denoise.CompensatedMMSE(lam=1.0, beta=0.0, **kw)(noisy, pw)
        for a, b in zip(jax.tree_util.tree_leaves(hat), jax.tree_util.tree_leaves(noisy)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # also inside the vmapped grid
    grid = denoise.compensated_grid([0.0, 0.5, 1.0], [-0.5, 0.0])
    out = jax.jit(jax.vmap(lambda e: e(noisy, pw)))(grid)
    i = int(np.nonzero((np.asarray(grid.lam) == 1.0) & (np.asarray(grid.beta) == 0.0))[0][0])
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(noisy)):
        np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))


def test_compensated_formula(tree):
    noisy = noise.add_weight_noise(tree, 2.0, key=jax.random.key(6))
    p = float(noise.noise_power(tree, 2.0)["params"]["Dense_0"]["kernel"])
    lam, beta = 0.3, -0.7
    hat = denoise.CompensatedMMSE(lam=lam, beta=beta)(noisy, p)
    w = np.asarray(noisy["params"]["Dense_0"]["kernel"], np.float64)
    v = max(w.var() - p, 0.0)
    eta = v / p
    theta, rho = eta / (eta + 1 - lam), v * beta / (eta + 1 - lam)
    np.testing.assert_allclose(np.asarray(hat["params"]["Dense_0"]["kernel"]), theta * w + rho, rtol=1e-4, atol=1e-6)
    _unselected_equal(hat, tree)
    # λ' = 0, β = 0 is the zero-mean-prior MMSE θ·w̃ with θ = η/(η+1)
    hat0 = denoise.CompensatedMMSE(lam=0.0, beta=0.0)(noisy, p)
    np.testing.assert_allclose(np.asarray(hat0["params"]["Dense_0"]["kernel"]), eta / (eta + 1) * w, rtol=1e-4)


def test_compensated_fallback_branch_where_eta_plus_one_minus_lambda_is_not_positive(tree):
    """η + 1 − λ' <= 0 (λ' > 1 at low WNR): noisejax's compensated uses θ = 1, ρ = β·σ² there."""
    wnr, lam, beta = -15.0, 1.5, -0.7
    noisy = noise.add_weight_noise(tree, wnr, key=jax.random.key(16))
    pw = noise.noise_power(tree, wnr)
    p = float(pw["params"]["Dense_0"]["kernel"])
    hat = denoise.CompensatedMMSE(lam=lam, beta=beta)(noisy, pw)
    for name in ("kernel", "bias"):
        w = np.asarray(noisy["params"]["Dense_0"][name], np.float64)
        eta = max(w.var() - p, 0.0) / p
        assert eta + 1 - lam <= 0, "the test must reach the fallback branch"
        np.testing.assert_allclose(np.asarray(hat["params"]["Dense_0"][name]), w + beta * p, rtol=1e-6, atol=1e-6 * p)
    # and the regular branch right beside it (λ' = 0.5) follows the formula, not the fallback
    hat = denoise.CompensatedMMSE(lam=0.5, beta=beta)(noisy, pw)
    w = np.asarray(noisy["params"]["Dense_0"]["kernel"], np.float64)
    v = max(w.var() - p, 0.0)
    eta = v / p
    np.testing.assert_allclose(np.asarray(hat["params"]["Dense_0"]["kernel"]),
                               eta / (eta + 0.5) * w + v * beta / (eta + 0.5), rtol=2e-5, atol=1e-6 * p)


# ----------------------------------------------------------------------------------
# the authors' MMSE_pb, against an independent NumPy transcription of the published formula
# ----------------------------------------------------------------------------------

PB_PAIRS = [(0.5, -0.5), (1.0, -1.0), (1.1, 0.3), (1.5, -0.25)]
PB_WNR_DB = [10.0, 0.0, -15.0, -20.0]


def _mmse_pb_numpy(w, noise_power, lam, beta, signal_var):
    """The published closed form in float64: η = var_W/σ², c = η/(η+1−λ'), d = var_W·β/(η+1−λ'), ŵ = c·w̃ + d."""
    eta = signal_var / noise_power
    c = eta / (eta + 1.0 - lam)
    d = signal_var * beta / (eta + 1.0 - lam)
    return c * np.asarray(w, np.float64) + d


def mmse_pb_table(tree, pairs=PB_PAIRS, wnrs=PB_WNR_DB):
    """Rows ``(wnr, lam, beta, η+1−λ', max |ŵ − ŵ_numpy| / max |ŵ_numpy|)`` in the authors' setting."""
    sv = float(denoise.global_signal_var(tree))
    rows = []
    for wnr in wnrs:
        pw = noise.noise_power(tree, wnr, reference="power", scope="global")
        p = float(pw["params"]["Dense_0"]["kernel"])
        noisy = noise.add_weight_noise(tree, wnr, key=jax.random.key(17), reference="power", scope="global")
        for lam, beta in pairs:
            hat = denoise.MMSEpb(lam=lam, beta=beta, signal_var=sv)(noisy, pw)
            errs = []
            for name in ("kernel", "bias"):
                ref = _mmse_pb_numpy(noisy["params"]["Dense_0"][name], p, lam, beta, sv)
                got = np.asarray(hat["params"]["Dense_0"][name], np.float64)
                errs.append(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
            _unselected_equal(hat, noisy)  # BatchNorm parameters and statistics untouched
            rows.append((wnr, lam, beta, sv / p + 1 - lam, max(errs)))
    return rows


def test_mmse_pb_matches_numpy_transcription_of_the_published_formula(tree):
    rows = mmse_pb_table(tree)
    assert len(rows) == len(PB_PAIRS) * len(PB_WNR_DB)
    for wnr, lam, beta, denom, err in rows:
        assert err <= 1e-6, f"WNR {wnr} dB, λ'={lam}, β={beta}: relative difference {err:.2e}"
    flipped = [r for r in rows if r[3] < 0]
    assert flipped and all(r[0] < -12 for r in flipped), "the sign-flip region (η+1−λ' < 0) must be covered, below −12 dB"


def test_global_signal_var_and_authors_noise_power(tree):
    leaves = [np.asarray(tree["params"]["Dense_0"][k], np.float64).ravel() for k in ("bias", "kernel")]
    allw = np.concatenate(leaves)
    np.testing.assert_allclose(float(denoise.global_signal_var(tree)), allw.var(), rtol=1e-5)
    pw = noise.noise_power(tree, -15.0, reference="power", scope="global")
    np.testing.assert_allclose(float(pw["params"]["Dense_0"]["bias"]), np.mean(allw**2) / 10 ** (-1.5), rtol=1e-5)
    with pytest.raises(InvalidArgumentError, match="signal_var"):
        denoise.MMSEpb(lam=1.0, beta=0.0, signal_var=-1.0)(tree, 0.1)
    with pytest.raises(InvalidArgumentError, match="signal_var"):
        denoise.MMSEpb(lam=1.0, beta=0.0, signal_var=jnp.ones(3))(tree, 0.1)
    with pytest.raises(InvalidArgumentError, match="no leaf"):
        denoise.global_signal_var(tree, leaf_filter=lambda path, leaf: False)


def test_mmse_pb_vs_compensated_with_global_prior(tree):
    """Documented relation: compensated with the global clean variance as its prior equals mmse_pb
    where η+1−λ' > 0, and falls back (θ = 1, ρ = β·σ²) where mmse_pb flips sign."""
    sv = denoise.global_signal_var(tree)
    prior = denoise.clean_prior(tree)
    prior = prior.replace(var=jax.tree_util.tree_map(lambda v: sv, prior.var))
    for wnr, lam, beta in ((0.0, 0.5, -0.5), (-15.0, 1.5, -0.25)):
        pw = noise.noise_power(tree, wnr, reference="power", scope="global")
        p = float(pw["params"]["Dense_0"]["kernel"])
        noisy = noise.add_weight_noise(tree, wnr, key=jax.random.key(18), reference="power", scope="global")
        a = np.asarray(denoise.MMSEpb(lam=lam, beta=beta, signal_var=sv)(noisy, pw)["params"]["Dense_0"]["kernel"])
        b = np.asarray(denoise.CompensatedMMSE(lam=lam, beta=beta, prior=prior)(noisy, pw)["params"]["Dense_0"]["kernel"])
        w = np.asarray(noisy["params"]["Dense_0"]["kernel"])
        if float(sv) / p + 1 - lam > 0:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(b, w + beta * p, rtol=1e-5, atol=1e-6)
            assert np.corrcoef(a.ravel(), w.ravel())[0, 1] < -0.99  # mmse_pb: c < 0, the sign flips


def test_mmse_pb_estimator_grid_and_ml_point(tree):
    sv = denoise.global_signal_var(tree)
    pw = noise.noise_power(tree, 0.0, reference="power", scope="global")
    noisy = noise.add_weight_noise(tree, 0.0, key=jax.random.key(19), reference="power", scope="global")
    grid = denoise.mmse_pb_grid([0.5, 1.0], [-0.5, 0.0], sv)
    out = jax.jit(jax.vmap(lambda e: e(noisy, pw)))(grid)
    for i in range(4):
        est = denoise.estimator("mmse_pb", lam=float(grid.lam[i]), beta=float(grid.beta[i]), signal_var=sv)
        one = est(noisy, pw)
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(one)):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-6, atol=1e-7)
    ml = denoise.MMSEpb(lam=1.0, beta=0.0, signal_var=sv)(noisy, pw)  # c = η/η = 1, d = 0
    for a, b in zip(jax.tree_util.tree_leaves(ml), jax.tree_util.tree_leaves(noisy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(InvalidArgumentError, match="signal_var"):
        denoise.MMSEpb(signal_var=float("inf"))


def test_grid_layout_and_validation():
    grid = denoise.compensated_grid([0.0, 1.0], [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(grid.lam), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(grid.beta), [-1, 0, 1, -1, 0, 1])
    with pytest.raises(InvalidArgumentError, match="lam"):
        denoise.CompensatedMMSE(lam=float("nan"))
    with pytest.raises(InvalidArgumentError):
        denoise.compensated_grid([], [0.0])


def test_estimator_lookup(tree):
    assert isinstance(denoise.estimator("ml"), denoise.ML)
    assert isinstance(denoise.estimator("compensated", lam=0.5, beta=0.1), denoise.CompensatedMMSE)
    side = denoise.estimator("mmse_side", prior=denoise.clean_prior(tree))
    assert side.name == "mmse_side" and side.prior is not None
    with pytest.raises(InvalidArgumentError, match="unknown estimator 'wiener'"):
        denoise.estimator("wiener")
    with pytest.raises(InvalidArgumentError, match="prior"):
        denoise.estimator("mmse_side")
    with pytest.raises(InvalidArgumentError, match="coef"):
        denoise.estimator("learned")


# ----------------------------------------------------------------------------------
# learned denoiser
# ----------------------------------------------------------------------------------


def test_learned_starts_at_ml_and_leaves_norm_params(tree):
    den = denoise.init_learned(tree)
    noisy = noise.add_weight_noise(tree, 0.0, key=jax.random.key(7))
    hat = den(noisy, noise.noise_power(tree, 0.0), wnr_db=0.0)
    for a, b in zip(jax.tree_util.tree_leaves(hat), jax.tree_util.tree_leaves(noisy)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    with pytest.raises(InvalidArgumentError, match="wnr_db"):
        den(noisy, 0.1)
    # MMSE exponent 1 and nothing else is the zero-mean-prior MMSE gain (1 − ν)
    den1 = denoise.init_learned(tree, mmse_exponent=1.0)
    w = np.asarray(noisy["params"]["Dense_0"]["kernel"], np.float64)
    p = float(noise.noise_power(tree, 0.0)["params"]["Dense_0"]["kernel"])
    hat1 = den1(noisy, noise.noise_power(tree, 0.0), wnr_db=0.0)
    np.testing.assert_allclose(np.asarray(hat1["params"]["Dense_0"]["kernel"]), (1 - p / w.var()) * w, rtol=1e-4)
    _unselected_equal(hat1, tree)


def test_projection_restores_the_common_mode_exactly(tree):
    den = denoise.retarget(denoise.init_learned(tree, projection=True), tree)
    names = [noise.path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    coef = den.coef[names.index(("params", "Dense_0", "kernel"))]
    assert coef["direction"].shape == (400,) and coef["target"].shape == (100,)
    assert all(c is None or "direction" not in c or c["direction"].ndim == 1 for c in den.coef)
    noisy = noise.add_weight_noise(tree, -5.0, key=jax.random.key(8))
    hat = den(noisy, noise.noise_power(tree, -5.0), wnr_db=-5.0)
    u = np.asarray(coef["direction"], np.float64)
    w = np.asarray(tree["params"]["Dense_0"]["kernel"], np.float64)
    wt = np.asarray(noisy["params"]["Dense_0"]["kernel"], np.float64)
    wh = np.asarray(hat["params"]["Dense_0"]["kernel"], np.float64)
    np.testing.assert_allclose(u @ wh, u @ w, rtol=1e-4, atol=1e-4)  # clean component along u
    corr = wh - wt  # the correction is parallel to u (rank one)
    np.testing.assert_allclose(corr, np.outer(u, u @ corr) / (u @ u), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(hat["params"]["Dense_0"]["bias"]),
                                  np.asarray(noisy["params"]["Dense_0"]["bias"]))  # 1-D leaves: no projection


def _common_mode_case(seed=13, f_in=50, c=20_000, mu=1.5, tau2=0.3, p=0.4):
    """Weights whose components along u = 1/√F are N(μ, τ²) across channels, plus i.i.d. noise of power p."""
    rng = np.random.default_rng(seed)
    u = np.ones(f_in) / math.sqrt(f_in)
    rest = rng.standard_normal((f_in, c))
    rest -= np.outer(u, u @ rest)  # orthogonal to u
    comp = mu + math.sqrt(tau2) * rng.standard_normal(c)
    w = rest + np.outer(u, comp)
    wt = w + math.sqrt(p) * rng.standard_normal((f_in, c))
    return u, w, wt, comp, p, tau2


def test_common_mode_is_the_posterior_mean_of_the_common_mode():
    u, w, wt, comp, p, tau2 = _common_mode_case()
    c = wt.shape[1]
    bias = np.arange(c, dtype=np.float32)
    hat = denoise.CommonModeMMSE()({"kernel": jnp.asarray(wt, jnp.float32), "bias": jnp.asarray(bias)}, p)
    wh = np.asarray(hat["kernel"], np.float64)
    np.testing.assert_array_equal(np.asarray(hat["bias"]), bias)  # 1-D leaves: untouched
    corr = wh - wt
    np.testing.assert_allclose(corr, np.outer(u, u @ corr), atol=2e-5)  # only the component along u moves
    ct, ch = u @ wt, u @ wh
    slope, intercept = np.polyfit(ct, ch, 1)
    theta = tau2 / (tau2 + p)  # posterior-mean gain of N(μ, τ²) observed through N(0, p)
    V = tau2 + p
    tol = 5 * (p / V) * math.sqrt(2 / (c - 1))
    assert abs(slope - theta) < tol, (slope, theta, tol)
    assert abs(intercept - ct.mean() * (1 - theta)) < 5 * math.sqrt(V / c) + abs(ct.mean()) * tol
    bayes = tau2 * p / (tau2 + p)  # posterior MSE of the common mode, vs p for ML
    mse = np.mean((ch - comp) ** 2)
    assert abs(mse - bayes) < 5 * bayes * math.sqrt(2 / c) + 2 * tol * V, (mse, bayes)
    assert np.mean((ct - comp) ** 2) > 1.5 * mse


def test_common_mode_directions_estimator_and_learned_start():
    u, w, wt, comp, p, tau2 = _common_mode_case(c=400)
    tree = {"kernel": jnp.asarray(wt, jnp.float32)}
    base = np.asarray(denoise.CommonModeMMSE()(tree, p)["kernel"])
    # a given direction (scaled) is normalized; the estimator object and the lookup agree
    np.testing.assert_allclose(np.asarray(denoise.CommonModeMMSE(directions=[jnp.asarray(3 * u)])(tree, p)["kernel"]),
                               base, rtol=1e-5, atol=1e-5)
    est = denoise.estimator("common_mode")
    np.testing.assert_array_equal(np.asarray(est(tree, p)["kernel"]), base)
    # the learned denoiser with common_mode=True starts exactly at it (exponent 1, affine part zero)
    den = denoise.init_learned(tree, common_mode=True)
    np.testing.assert_allclose(np.asarray(den(tree, p, wnr_db=0.0)["kernel"]), base, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="not both"):
        denoise.init_learned(tree, common_mode=True, projection=True)
    with pytest.raises(ShapeMismatchError, match="direction"):
        denoise.CommonModeMMSE(directions=[jnp.ones(7)])(tree, p)
    # no channel spread above the noise: every channel gets the layer's mean common mode
    flat = {"kernel": jnp.asarray(np.outer(u, np.full(400, 2.0)) + 0.01 * np.asarray(wt - w), jnp.float32)}
    out = np.asarray(denoise.CommonModeMMSE()(flat, 1.0)["kernel"], np.float64)
    cm = u @ out
    assert np.ptp(cm) < 1e-3 * abs(cm.mean()), np.ptp(cm)


def test_learned_gradient_finite_and_training_lowers_objective(tiny_model):
    cfg, variables, ds, _ = tiny_model
    f = models.logits_fn(cfg)
    loss = lambda p, b: models.loss_fn(f(p, b[0]), b[1])  # noqa: E731
    den0 = denoise.init_learned(variables, wnr_range=(-6.0, 10.0), projection=True)
    batch = (jnp.asarray(ds.x_val), jnp.asarray(ds.y_val))
    objective = jax.jit(jax.value_and_grad(lambda d: denoise.learned_objective(
        d, variables, loss, batch, key=jax.random.key(11), n_draws=16, wnr_range=(-6.0, 10.0))))
    before, grads = objective(den0)
    flat = jax.tree_util.tree_leaves(grads)
    assert flat and all(bool(jnp.all(jnp.isfinite(g))) for g in flat)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in flat) > 0
    den, hist = denoise.train_learned(den0, variables, loss, (ds.x_val, ds.y_val), key=jax.random.key(12),
                                      steps=30, n_draws=4, batch_size=64, learning_rate=0.05)
    assert len(hist["loss"]) == 30 and all(math.isfinite(v) for v in hist["loss"])
    before, after = float(before), float(objective(den)[0])
    assert after < before - 0.01 * before, (before, after)
    for c0, c1 in zip(den.coef, den0.coef):  # the stored targets are the clean projections
        if c1 is not None and "direction" in c1:
            assert not np.allclose(np.asarray(c0["direction"]), np.asarray(c1["direction"]))
    np.testing.assert_allclose(  # retarget is idempotent on the trained denoiser
        np.asarray(denoise.retarget(den, variables).coef[1]["target"]), np.asarray(den.coef[1]["target"]), rtol=1e-6)


def _variants(params, **kw):
    return [denoise.init_learned(params, projection=v == "projection", common_mode=v == "common", **kw)
            for v in ("affine", "common", "projection")]


def test_gated_variants_share_one_structure_and_ungate_back_exactly(tiny_model):
    """gate_learned: one tree structure for all variants; the gated forward is the plain one bit for bit
    (eager and jit); ungate_learned restores each variant's own structure and values."""
    _, variables, _, _ = tiny_model
    rs = np.random.default_rng(3)
    plain = []
    for d in _variants(variables, wnr_range=(-6.0, 10.0)):  # non-zero coefficients: every term counts
        leaves, tdef = jax.tree_util.tree_flatten(d)
        plain.append(jax.tree_util.tree_unflatten(tdef, [a + jnp.asarray(0.2 * rs.standard_normal(a.shape), a.dtype)
                                                        for a in leaves]))
    gated = denoise.gate_learned(plain)
    assert len({jax.tree_util.tree_structure(g) for g in gated}) == 1
    assert len({jax.tree_util.tree_structure(d) for d in plain}) == 3
    pw = noise.noise_power(variables, 2.0)
    noisy = noise.add_weight_noise(variables, 2.0, key=jax.random.key(4))
    call = lambda d, x: d(x, pw, wnr_db=jnp.float32(2.0))  # noqa: E731
    for d, g in zip(plain, gated):
        back = denoise.ungate_learned(g)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(d)
        for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(d)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for fn in (call, jax.jit(call)):
            for a, b in zip(jax.tree_util.tree_leaves(fn(g, noisy)), jax.tree_util.tree_leaves(fn(d, noisy))):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gated_training_compiles_once_and_matches_plain_training(tiny_model):
    """The three variants trained in their gated form: one compiled program; gates and switched-off parts
    exactly unchanged (no gradient reaches them); the coefficients equal to the plain trainings' up to the
    rounding of a differently fused program (the affine variant: both parts off; the projection: one on)."""
    from noisejax import train

    cfg, variables, ds, _ = tiny_model
    f = models.logits_fn(cfg)
    loss = lambda p, b: models.loss_fn(f(p, b[0]), b[1])  # noqa: E731
    plain = _variants(variables, wnr_range=(-6.0, 10.0))
    gated = denoise.gate_learned(plain)
    # plain SGD: Adam divides each coordinate's step by its gradient's size, so a coefficient whose gradient
    # is rounding noise (a feature that vanishes at these WNRs) moves by ±learning rate either way
    kw = dict(key=jax.random.key(12), steps=6, n_draws=2, batch_size=32, optimizer=optax.sgd(0.5))
    n_compiled = len(train._COMPILED)
    trained = []
    for g in gated:
        den, _ = denoise.train_learned(g, variables, loss, (ds.x_val, ds.y_val), **kw)
        for c0, c1 in zip(g.coef, den.coef):  # switched-off parts and gates keep their values bit for bit
            if c0 is not None:
                for gate, part in (("projection_gate", ("direction",)), ("common_mode_gate", ("cm_direction", "cm_exponent"))):
                    if gate not in c0:  # a bias: no optional part
                        continue
                    np.testing.assert_array_equal(np.asarray(c1[gate]), np.asarray(c0[gate]))
                    if float(c0[gate]) == 0.0:
                        for name in part:
                            np.testing.assert_array_equal(np.asarray(c1[name]), np.asarray(c0[name]))
        trained.append(denoise.ungate_learned(den))
    assert len(train._COMPILED) - n_compiled == 1  # one program for the three variants
    for d, t in zip(plain[::2], trained[::2]):
        ref, _ = denoise.train_learned(d, variables, loss, (ds.x_val, ds.y_val), **kw)
        assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(t)
        moved = 0.0
        for a, b, a0 in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(t), jax.tree_util.tree_leaves(d)):
            moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(a0)).max()))
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)
        assert moved > 1e-3  # the trainings did move the coefficients


def test_gate_learned_rejects_bad_input(tiny_model):
    _, variables, _, _ = tiny_model
    other = denoise.init_learned(variables, wnr_range=(0.0, 4.0))
    with pytest.raises(InvalidArgumentError, match=r"denoisers\[1\] differs"):
        denoise.gate_learned([denoise.init_learned(variables), other])
    with pytest.raises(InvalidArgumentError, match="non-empty sequence"):
        denoise.gate_learned([])
    g = denoise.gate_learned(_variants(variables))[0]
    with pytest.raises(InvalidArgumentError, match="already gated"):
        denoise.gate_learned([g])
    bad = g.replace(coef=tuple(None if c is None else dict(c, projection_gate=jnp.float32(0.5)) for c in g.coef))
    with pytest.raises(InvalidArgumentError, match="must be 0 or 1"):
        denoise.ungate_learned(bad)


# ----------------------------------------------------------------------------------
# sweeps: gains, sweeps, grids
# ----------------------------------------------------------------------------------


def test_gain_db_hand_computed():
    # ML: 0.2 -> 0.8 over 0..10 dB reaches 0.6 at 6.667 dB; estimator 0.4 -> 0.9 reaches it at 4 dB
    assert sweeps.gain_db([0, 10], [0.2, 0.8], [0.4, 0.9], 0.6) == pytest.approx(20 / 3 - 4.0, abs=1e-12)
    # unsorted input, three points, crossing in the second interval; (W, R) arrays are averaged
    w = [10.0, 0.0, 5.0]
    ml = [0.9, 0.1, 0.5]  # reaches 0.8 at 5 + 5·(0.3/0.4) = 8.75
    est = np.array([[0.95, 0.95], [0.3, 0.3], [0.7, 0.9]])  # means 0.95, 0.3, 0.8 -> reaches 0.8 at 5
    assert sweeps.gain_db(w, ml, est, 0.8) == pytest.approx(3.75, abs=1e-12)
    assert sweeps.wnr_at_accuracy(w, ml, 0.05) == -math.inf  # already above at the first point
    # non-monotone curve: the conservative (last upward) crossing, 2 + 0.1/0.4
    assert sweeps.wnr_at_accuracy([0, 1, 2, 3], [0.1, 0.7, 0.5, 0.9], 0.6) == pytest.approx(2.25, abs=1e-12)
    assert math.isnan(sweeps.wnr_at_accuracy(w, ml, 0.99))
    assert math.isnan(sweeps.gain_db(w, ml, est, 0.99))
    table = sweeps.gains_table(w, {"ML": ml, "est": est}, [0.8], baseline="ML")
    assert table["est"]["80%"]["gain_db"] == pytest.approx(3.75) and table["ML"]["80%"]["gain_db"] == 0.0


def test_sweep_and_grid_share_realizations(tiny_model, tmp_path):
    cfg, variables, ds, info = tiny_model
    f = models.logits_fn(cfg)
    wnr = [-2.0, 60.0]
    key = jax.random.key(3)
    ests = {"ML": denoise.ML(), "comp(1,0)": denoise.CompensatedMMSE(lam=1.0, beta=0.0), "MMSE": denoise.MMSE()}
    res = sweeps.accuracy_sweep(f, variables, ds.x_test, ds.y_test, wnr, key=key, n_realizations=4, estimators=ests)
    assert res["ML"].shape == (2, 4) and res["_seconds"] > 0
    np.testing.assert_array_equal(res["ML"], res["comp(1,0)"])  # ML exactly
    # 60 dB: the clean accuracy, up to one borderline test example
    np.testing.assert_allclose(res["ML"][1], info["test_accuracy"], atol=1.5 / len(ds.y_test))
    grid = denoise.compensated_grid([0.5, 1.0], [0.0])
    acc = sweeps.grid_accuracies(f, variables, {"test": (ds.x_test, ds.y_test)}, wnr, grid, key=key, n_realizations=4)
    assert acc["test"].shape == (2, 2, 4)
    np.testing.assert_array_equal(acc["test"][:, 1, :], res["ML"])  # same keys -> same noisy weights
    sel, means = sweeps.select_grid(acc["test"]), acc["test"].mean(axis=2)
    assert all(means[w, sel[w]] == means[w].max() for w in range(len(wnr)))  # a best point, per WNR
    # hand-made (W=2, G=3, R=2): a three-way tie goes to the lowest index; then the clear best
    hand = np.array([[[0.5, 0.7], [0.6, 0.6], [0.6, 0.6]], [[0.8, 0.8], [0.1, 0.2], [0.95, 0.85]]])
    np.testing.assert_array_equal(sweeps.select_grid(hand), [0, 2])
    # per-WNR estimator lists are accepted without recompiling; wrong length is refused
    per_wnr = {"ML": ests["ML"], "sel": [grid_point(grid, 1), grid_point(grid, 0)], "MMSE": ests["MMSE"]}
    res2 = sweeps.accuracy_sweep(f, variables, ds.x_test, ds.y_test, wnr, key=key, n_realizations=4,
                                 estimators=per_wnr)
    np.testing.assert_array_equal(res2["sel"][0], res["ML"][0])  # (1, 0) at the first WNR: ML
    np.testing.assert_array_equal(res2["ML"], res["ML"])
    with pytest.raises(ShapeMismatchError, match="WNR points"):
        sweeps.accuracy_sweep(f, variables, ds.x_test, ds.y_test, wnr, key=key, n_realizations=2,
                              estimators={"sel": [grid_point(grid, 1)]})
    png = plot_accuracy_curves(wnr, {k: res[k] for k in ests}, str(tmp_path / "c.png"), targets=[0.6])
    assert os.path.getsize(png) > 1000


def grid_point(grid, i):
    return jax.tree_util.tree_map(lambda a: a[i], grid)


def test_grid_accuracies_conv_model_loops_on_cpu_with_the_same_numbers():
    """A model with a convolution: on the CPU the realizations run in lax.map (vmapped kernels become a slow
    grouped convolution); the numbers equal the vmapped program's and a Python loop over realizations."""
    from noisejax import _backend, noise as nz_noise
    from noisejax.simulate import _key_data, realization_keys

    k0 = jax.random.key(3)
    variables = {"conv": jax.random.normal(k0, (3, 2, 4)), "dense": jax.random.normal(jax.random.fold_in(k0, 1), (4 * 12, 3))}

    def f(v, x):
        h = jax.lax.conv_general_dilated(x, v["conv"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
        return jnp.tanh(h).reshape(x.shape[0], -1) @ v["dense"]

    x = jax.random.normal(jax.random.fold_in(k0, 2), (40, 12, 2))
    y = jnp.argmax(f(variables, x), -1)
    mlp = jax.make_jaxpr(lambda v, x: jnp.tanh(x.reshape(x.shape[0], -1)) @ v["dense"][:24])(variables, x)
    conv = jax.make_jaxpr(f)(variables, x)
    assert _backend.batched_kernels_slow(conv, "cpu") and not _backend.batched_kernels_slow(conv, "gpu")
    assert not _backend.batched_kernels_slow(mlp, "cpu")
    grid = denoise.compensated_grid([0.5, 1.0], [0.0, 0.2])
    key, wnr = jax.random.key(9), [0.0, 6.0]
    acc = sweeps.grid_accuracies(f, variables, {"test": (x, y)}, wnr, grid, key=key, n_realizations=3)["test"]
    keys, impl = _key_data(realization_keys(key, jnp.arange(3)))
    for i, w in enumerate(wnr):
        w = jnp.asarray(w, jnp.float32)
        for loop in (False, True):  # both programs, whichever the backend picks
            out = sweeps._grid_point_fn(f, "variance", "global", nz_noise.default_leaf_filter, None, None, impl, loop)(
                variables, w, keys, grid, {"test": (x, y)})
            np.testing.assert_array_equal(np.asarray(out["test"]), acc[i])
        pw = nz_noise.noise_power(variables, w)
        for r in range(3):  # an independent reference: one realization and one grid point at a time, eagerly
            noisy = nz_noise.add_weight_noise(variables, w, key=realization_keys(key, jnp.arange(3))[r])
            for g in range(4):
                den = grid_point(grid, g)(noisy, pw, wnr_db=w)
                ref = float(jnp.mean(jnp.argmax(f(den, x), -1) == y))
                assert abs(ref - acc[i, g, r]) <= 1.0 / len(y) + 1e-6  # eager vs compiled: one borderline input at most


# ----------------------------------------------------------------------------------
# checkpoint: safe, atomic, corruption detected
# ----------------------------------------------------------------------------------


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    tree = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "stats": {"n": np.int32(3)}}
    path = files.save(tmp_path / "a.msgpack", tree, metadata={"x": 1})
    back, meta = files.load(path)
    np.testing.assert_array_equal(back["params"]["w"], tree["params"]["w"])
    assert meta == {"x": 1} and int(back["stats"]["n"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["a.msgpack"]  # no temp file left behind
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    (tmp_path / "bad.msgpack").write_bytes(bytes(blob))
    with pytest.raises(DataFormatError, match="checksum"):
        files.load(tmp_path / "bad.msgpack")
    (tmp_path / "short.msgpack").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="truncated"):
        files.load(tmp_path / "short.msgpack")
    (tmp_path / "junk.msgpack").write_bytes(b"\x80\x04pickle?")
    with pytest.raises(DataFormatError, match="magic"):
        files.load(tmp_path / "junk.msgpack")


def test_cached_rebuilds_corrupted_entry(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"w": np.full(3, float(len(calls)), np.float32)}, {"n": len(calls)}

    cfg = {"kind": "demo", "width": 3}
    t1, info1, s1 = files.cached(cfg, build, cache_dir=tmp_path, name="demo")
    t2, info2, s2 = files.cached(cfg, build, cache_dir=tmp_path, name="demo")
    assert (s1, s2) == ("built", "loaded") and len(calls) == 1 and info2 == {"n": 1}
    np.testing.assert_array_equal(t2["w"], t1["w"])
    path = tmp_path / f"demo-{files.fingerprint(cfg)}.msgpack"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t3, info3, s3 = files.cached(cfg, build, cache_dir=tmp_path, name="demo")
    assert s3 == "rebuilt" and len(calls) == 2 and info3 == {"n": 2}
    assert any("rebuilding" in str(w.message) for w in caught)
    assert files.cached(cfg, build, cache_dir=tmp_path, name="demo")[2] == "loaded"


def test_model_cache_reloads_same_variables(tiny_model):
    cfg, variables, ds, info = tiny_model
    assert info["cache"] == "built" and info["test_accuracy"] > 0.5  # the tiny model learned something
    again, info2, _ = models.load_or_train(cfg, cache_dir=info["cache_dir"])
    assert info2["cache"] == "loaded" and info2["test_accuracy"] == info["test_accuracy"]
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(InvalidArgumentError, match="ModelConfig.kind"):
        models.ModelConfig(kind="transformer")


@pytest.mark.parametrize("kind", ["resnet1d", "mlp"])
def test_compiled_model_init_is_the_eager_init_bitwise(kind):
    """study.models.init compiles module.init in one program (at -O1 on the CPU): the eager numbers, leaf for leaf."""
    if kind == "resnet1d":
        cfg = models.ModelConfig(kind="resnet1d", dataset="mnist1d", stage_channels=(8, 16), blocks_per_stage=1,
                                 n_samples=64)
        x = jnp.ones((2, 40, 1), jnp.float32)
    else:
        cfg = models.ModelConfig(kind="mlp", dataset="digits", widths=(64, 64), activation="sigmoid")
        x = jnp.ones((2, 64), jnp.float32)
    module, key = models.build(cfg), jax.random.key(3)
    eager = module.init(key, x, train=False)
    compiled = models.init(module, key, x, train=False)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(compiled)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(compiled)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jit_init_of_a_layers_network_is_the_eager_init_bitwise():
    """study.models.jit_init (-O1 on the CPU) gives a noisejax.layers network's eager initial parameters, leaf for leaf."""
    from noisejax import _backend, layers

    net, key = layers.mlp([64, 64, 64, 10], "sigmoid"), jax.random.key(5)
    eager = net.init(key, (64,))
    compiled = models.jit_init(net.init, static_argnums=1)(key, (64,))
    assert eager[0] == compiled[0]
    for a, b in zip(jax.tree_util.tree_leaves(eager[1]), jax.tree_util.tree_leaves(compiled[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _backend.once_compiler_options("cpu") == {"xla_backend_optimization_level": 1}
    assert _backend.once_compiler_options("gpu") is None


def _learned_reference(den, noisy, noise_power, wnr_db):
    """LearnedDenoiser written leaf by leaf (the module docstring's formulas), an independent reference."""
    tau = (wnr_db - den.wnr_center) / den.wnr_half_width
    flat, treedef = jax.tree_util.tree_flatten_with_path(noisy)
    out = []
    for (path, w), c in zip(flat, den.coef):
        if c is None or not den.leaf_filter(path, w):
            out.append(w)
            continue
        p = jnp.asarray(noise_power, w.dtype)
        w2 = w.reshape(-1, w.shape[-1])
        if "direction" in c:
            u = c["direction"]
            w2 = w2 - (u / jnp.sum(u * u))[:, None] * (u @ w2 - c["target"])[None, :]
        if "cm_direction" in c:
            u = c["cm_direction"] / jnp.sqrt(jnp.sum(c["cm_direction"] ** 2))
            comp = u @ w2
            m, v = jnp.mean(comp), jnp.var(comp)
            g = jnp.clip((v - p) / v, 1e-4, 1.0) ** (c["cm_exponent"][0] + c["cm_exponent"][1] * tau)
            w2 = w2 + u[:, None] * (m + g * (comp - m) - comp)[None, :]
        w = w2.reshape(w.shape)
        axes = tuple(range(w.ndim - 1)) if (den.per_channel and w.ndim >= 2) else None
        v = jnp.var(w, axis=axes, keepdims=True).reshape(-1)
        nu = jnp.clip(p / v, 0.0, 1.0)
        phi = jnp.stack([nu, nu * tau, nu**2, nu**2 * tau], -1)
        log_a = (c["mmse_exponent"][:, 0] + c["mmse_exponent"][:, 1] * tau) * jnp.log(jnp.maximum(1 - nu, 1e-4))
        log_a = log_a + den.bound * jnp.tanh(jnp.sum(c["log_scale"] * phi, -1) / den.bound)
        shift = den.bound * jnp.tanh(jnp.sum(c["shift"] * phi, -1) / den.bound)
        shape = (-1,) + (1,) * (w.ndim - 1) if axes is None else (1,) * (w.ndim - 1) + (-1,)
        shape = (1,) * w.ndim if axes is None else shape
        out.append(jnp.exp(log_a).reshape(shape) * (w + jnp.sqrt(p) * shift.reshape(shape)))
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("variant", ["common", "projection"])
def test_learned_denoiser_matches_a_leaf_by_leaf_reference(variant):
    """LearnedDenoiser's values and coefficient gradients are those of an independent per-leaf reference."""
    k = jax.random.split(jax.random.key(11), 8)
    clean = {"conv": {"kernel": jax.random.normal(k[0], (3, 4, 6)), "bias": jax.random.normal(k[1], (6,))},
             "dense": {"kernel": jax.random.normal(k[2], (12, 5)), "bias": 0.1 * jax.random.normal(k[3], (5,))},
             "out": {"kernel": jax.random.normal(k[4], (5, 3))}}
    den = denoise.init_learned(clean, wnr_range=(-4.0, 12.0), per_channel=variant == "projection",
                               projection=variant == "projection", common_mode=variant == "common")
    leaves, tdef = jax.tree_util.tree_flatten(den)  # non-zero coefficients, so every term counts
    rs = np.random.default_rng(5)
    leaves = [a + jnp.asarray(0.3 * rs.standard_normal(a.shape), a.dtype) for a in leaves]
    den = jax.tree_util.tree_unflatten(tdef, leaves)
    noisy = noise.add_weight_noise(clean, 3.0, key=k[6])
    power = 0.05

    def loss(d, fn):
        out = fn(d, noisy, power, jnp.float32(3.0))
        return sum(jnp.sum(jnp.sin(a)) for a in jax.tree_util.tree_leaves(out))

    ours = lambda d, x, p, w: d(x, p, wnr_db=w)  # noqa: E731
    w = jnp.float32(3.0)
    got, want = jax.jit(ours)(den, noisy, power, w), jax.jit(_learned_reference)(den, noisy, power, w)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=2e-6)
    g_got = jax.jit(jax.grad(loss), static_argnums=1)(den, ours)
    g_want = jax.jit(jax.grad(loss), static_argnums=1)(den, _learned_reference)
    for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
