"""Numerical robustness of the moments: saturated activations (|x| > 30), noise from 1e-12 to 1e2.

References are written here in float64 NumPy (a fine trapezoid rule, centred
two-pass variance); the library runs in the default float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import layers, moments, noise, simulate

MEANS = np.array([-100.0, -45.0, -30.0, -5.0, 0.0, 0.7, 5.0, 30.0, 45.0, 100.0])
VARS = np.logspace(-12, 2, 15)

_sigmoid64 = lambda x: 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow at |x| = 1e3
_erf64 = np.vectorize(math.erf)
ACTS = {
    "sigmoid": (jax.nn.sigmoid, None, _sigmoid64),
    "tanh": (jnp.tanh, None, np.tanh),
    "erf": (jax.scipy.special.erf, "erf", _erf64),
    "relu": (jax.nn.relu, "relu", lambda x: np.maximum(x, 0.0)),
}


def _reference(f64, mu, v, h=0.005):
    """E f and Var f for x ~ N(mu, v) in float64: trapezoid rule on z ∈ [-12, 12] (spacing h), centred.

    For an integrand analytic in a strip of half-width d the error is ~exp(-2πd/h);
    sigmoid/tanh poles at distance π/σ give d ≥ 0.31 for σ ≤ 10: error < 1e-100.
    """
    z = np.arange(-12.0, 12.0 + h / 2, h)
    w = np.exp(-0.5 * z * z)
    w /= w.sum()
    fx = f64(mu[..., None] + np.sqrt(v)[..., None] * z)
    ef = fx @ w
    return ef, np.square(fx - ef[..., None]) @ w


# error bounds of E f and Var f (relative) where σ > 2: the trapezoid rule's exp(-2πd/h),
# d = π/σ (sigmoid) or π/(2σ) (tanh) from the poles; float32 resolution elsewhere
_WIDE_TOL = {("sigmoid", 64): 5e-5, ("tanh", 64): 5e-3, ("sigmoid", 128): 2e-6, ("tanh", 128): 5e-5}


@pytest.mark.parametrize("nodes", [64, 128])
@pytest.mark.parametrize("name", list(ACTS))
def test_activation_moments_saturated_and_extreme_noise(name, nodes):
    fn, kind, f64 = ACTS[name]
    mu, v = np.meshgrid(MEANS, VARS, indexing="ij")
    ef, vf, g = moments.activation_moments(
        fn, jnp.asarray(mu, jnp.float32), jnp.asarray(v, jnp.float32), method="gaussian", kind=kind, quad_nodes=nodes
    )
    ef, vf, g = map(np.asarray, (ef, vf, g))
    assert np.all(np.isfinite(ef)) and np.all(np.isfinite(vf)) and np.all(np.isfinite(g))
    ref_mean, ref_var = _reference(f64, mu, v)
    # a variance clamped to zero where float32 values of f resolve the true one (sd above a few ulps
    # of |E f|) is wrong; the comparison below allows that much absolute slack, so check it on its own
    resolvable = ref_var > np.square(4.0 * np.finfo(np.float32).eps * np.maximum(np.abs(ref_mean), 1.0))
    assert np.all(vf[resolvable] > 0), f"{name}: zero variance where the reference is positive"
    scale = np.maximum(np.abs(ref_mean), 1.0)
    wide_tol = np.where(np.sqrt(v) > 2.0, _WIDE_TOL.get((name, nodes), 0.0), 0.0)
    mean_err = np.abs(ef - ref_mean)
    assert np.all(mean_err <= 4e-6 * scale + wide_tol), f"{name}: max error of E f {mean_err.max():.3g}"
    # variance: relative accuracy 1e-3, down to what the values of f resolve: with f known to δ
    # (a few float32 ulps, plus the quadrature's error where σ > 2), Var f is known to
    # 2·sd(f)·δ + δ² — this matters on saturated tails, e.g. tanh(±5) or P(x < 0) ~ 1e-6
    delta = 4.0 * np.finfo(np.float32).eps * scale + wide_tol
    allowed = 1e-3 * ref_var + 2.0 * np.sqrt(ref_var) * delta + np.square(delta)
    bad = np.abs(vf - ref_var) > allowed
    assert not bad.any(), f"{name}: mu={mu[bad]}, v={v[bad]}, got {vf[bad]}, want {ref_var[bad]}"
    # linear response at tiny noise: Var f / v is the same for v = 1e-12 ... 1e-6 (no cancellation)
    small = VARS <= 1e-6
    response = vf[:, small] / VARS[small]
    normal = vf[:, small] > 1e-30  # away from float32 denormals (f'² v underflows for |μ| ≥ 30)
    expected = np.broadcast_to(response[:, -1:], response.shape)
    np.testing.assert_allclose(response[normal], expected[normal], rtol=1e-3)


def _net_and_params(scale):
    """64-32-16-4 sigmoid MLP whose pre-activations reach |x| ≈ scale."""
    net = layers.mlp([64, 32, 16, 4], "sigmoid", "linear", noisy=True)
    _, params = net.init(jax.random.key(0), (64,))
    params = jax.tree_util.tree_map(lambda p: p * scale if p.ndim == 2 else p, params)
    return net, params


@pytest.mark.parametrize("kind", ["add_uncorrelated", "add_correlated", "mul_uncorrelated", "mul_correlated"])
@pytest.mark.parametrize("method", ["gaussian", "linearized"])
def test_network_moments_stable_from_1e_minus_12_to_1e2(kind, method):
    net, params = _net_and_params(scale=8.0)
    x = jax.random.normal(jax.random.key(1), (8, 64))
    pre = np.asarray(jnp.abs(x @ params[0][0]["W"]))
    assert pre.max() > 30, "the test needs saturated first-layer pre-activations"
    out = []
    for v in VARS:
        res = moments.predict(net, params, x, noise=noise.NeuronNoise(**{kind: float(v)}), method=method)
        for layer in res:
            assert np.all(np.isfinite(np.asarray(layer.mean))) and np.all(np.isfinite(np.asarray(layer.var)))
            assert np.asarray(layer.var).sum() > 0  # every layer has a noise site: its noise cannot vanish
        out.append(np.asarray(res[-1].var).sum())
    out = np.array(out)
    # more noise never means less output noise; in the small-noise regime the output
    # variance is proportional to the noise variance (no cancellation at 1e-12)
    assert np.all(np.diff(out) >= -1e-6 * out[1:])
    small = VARS <= 1e-6
    ratio = out[small] / VARS[small]
    np.testing.assert_allclose(ratio, ratio[-1], rtol=2e-2)


@pytest.mark.parametrize("v", [1e-12, 1e-4, 1e2])
def test_saturated_one_hidden_layer_against_monte_carlo(v):
    """One noisy hidden layer on deterministic input: the gaussian moments are exact; MC agrees."""
    net = layers.mlp([16, 32, 3], "sigmoid", "linear", noisy=True)
    _, params = net.init(jax.random.key(2), (16,))
    params = jax.tree_util.tree_map(lambda p: p * 20.0 if p.shape == (16, 32) else p, params)
    x = jax.random.normal(jax.random.key(3), (16,))
    assert float(jnp.max(jnp.abs(x @ params[0][0]["W"]))) > 30
    nz = noise.NeuronNoise(add_uncorrelated=v, add_correlated=v, mul_uncorrelated=v, mul_correlated=v)
    sites = [nz, None]  # noise on the hidden layer only
    n = 4096
    # at v = 1e-12 the noise is ~8 float32 ulps of the saturated outputs: their means are not resolved
    # (docs/precision.md; monte_carlo would warn) but the variance compared here is, to < 1 sd
    mc = simulate.monte_carlo(lambda k: net.apply(params, x, key=k, noise=sites), jax.random.key(4), n,
                              precision_check=v > 1e-6)
    an = moments.predict(net, params, x, noise=sites)[-1]
    # the input is deterministic, so the hidden layer's noisy output y·(1 + ξ_MU + ξ_MC) + ξ_AU + ξ_AC is
    # exactly Gaussian, and so is the linear readout: a sample variance has relative sd √(2/(n−1))
    tol = 5 * math.sqrt(2.0 / (n - 1))  # 5 sigma = 11 % at n = 4096
    np.testing.assert_allclose(np.asarray(mc.var), np.asarray(an.var), rtol=tol)
    assert np.all(np.isfinite(np.asarray(mc.var))) and np.all(np.asarray(mc.var) > 0)


# ----------------------------------------------------------------------------------
# Clark's max of two strongly correlated, high-SNR Gaussians (a max pool's neighbours)
# ----------------------------------------------------------------------------------


def test_gaussian_max_is_accurate_in_float32_for_correlated_high_snr_inputs():
    """``rules.gaussian_max`` on neighbours that share most of their noise and have means ≫ their
    noise (as in a max pool after a convolution with kernel noise): the float32 moments, jit and
    eager, against Clark's formulas evaluated in float64 in this test.  The textbook form
    (``Var a + Var b − 2 Cov`` and ``E[max²] − E²``) lost every digit here and made jit and eager
    disagree by up to 80 % on a ResNet's output variance (AVX2 CPU, jaxlib 0.10.2)."""
    from types import SimpleNamespace

    from noisejax import gaussian as G
    from noisejax import rules

    rng_np = np.random.default_rng(0)
    n, k = 64, 24
    shared = rng_np.normal(size=(n, k)) * 1e-2  # common loadings
    da = rng_np.normal(size=(n, k)) * 1e-5  # the neighbours differ slightly
    ind_a, ind_b = np.abs(rng_np.normal(size=n)) * 3e-6, np.abs(rng_np.normal(size=n)) * 3e-6
    ma = rng_np.normal(size=n) * 0.5 + 20.0
    mb = ma + rng_np.normal(size=n) * 3e-5
    la, lb = shared + da, shared.copy()

    shared_sid = G.fresh()  # one source set loaded by both values

    def state(m, cols, ind):
        return G.Gaussian(jnp.asarray(m, jnp.float32), (G.Dense(shared_sid, jnp.asarray(cols, jnp.float32)),
                                                        G.Diag(G.fresh(), jnp.asarray(ind, jnp.float32))))

    def moments_of_max(ma, mb, la, lb, ia, ib):
        ctx = SimpleNamespace(method="gaussian", mode="factored", live=set())
        out = rules.gaussian_max(ctx, state(ma, la, ia), state(mb, lb, ib))
        return out.mean, G.variance(out)

    # the float64 reference (Clark 1961), written out here
    from scipy.special import ndtr

    a32 = [np.asarray(np.float32(v), np.float64) for v in (ma, mb, la, lb, ind_a, ind_b)]
    ma64, mb64, la64, lb64, ia64, ib64 = a32
    va, vb = (la64**2).sum(1) + ia64**2, (lb64**2).sum(1) + ib64**2
    th = np.sqrt(((la64 - lb64) ** 2).sum(1) + ia64**2 + ib64**2)
    al = (ma64 - mb64) / th
    cdf, pdf = ndtr(al), np.exp(-0.5 * al**2) / np.sqrt(2 * np.pi)
    e = ma64 * cdf + mb64 * (1 - cdf) + th * pdf
    e2 = (ma64**2 + va) * cdf + (mb64**2 + vb) * (1 - cdf) + (ma64 + mb64) * th * pdf
    var_ref = e2 - e**2

    args = (ma, mb, la, lb, ind_a, ind_b)
    m_jit, v_jit = jax.jit(moments_of_max)(*args)
    with jax.disable_jit():
        m_eager, v_eager = moments_of_max(*args)
    for m, v, how in ((m_jit, v_jit, "jit"), (m_eager, v_eager, "eager")):
        np.testing.assert_allclose(np.asarray(v, np.float64), var_ref, rtol=2e-3, err_msg=how)
        np.testing.assert_allclose(np.asarray(m, np.float64), e, rtol=1e-6, atol=0, err_msg=how)
