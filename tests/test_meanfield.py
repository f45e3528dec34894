"""Mean-field theory (noisejax.meanfield) against full moment propagation (noisejax.moments).

On symmetric networks (every ``W_ij = c/N``) all neurons of a layer see the same
pre-activation, so the scalar recursion is exact in the linear regime: it must
equal the propagation of the full covariance through 50 layers to float32
rounding.  The depth -> infinity limit must equal layer 50 where the recursion
converges, and the slope criterion must separate bounded from growing noise as
the paper states (slope < 1: bounded; > 1: growth).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from noisejax import data, errors, layers, meanfield, moments, noise

DEPTH = 50
WIDTH = 8
IN_DIM = 6
X_MEAN = 0.7
NZ = noise.NeuronNoise(add_uncorrelated=1e-3, add_correlated=2e-4, mul_uncorrelated=2e-3, mul_correlated=5e-4)


def _propagate_symmetric(activation, coupling, method):
    """Per-layer (mean, var) of the full-covariance propagation through a symmetric network (eager: the
    50 identical layers reuse the same compiled operations)."""
    net, params = meanfield.symmetric_network(IN_DIM, WIDTH, DEPTH, coupling=coupling, activation=activation)
    x = jnp.full(IN_DIM, X_MEAN, jnp.float32)
    out = moments.propagate(net, params, x, noise=NZ, method=method, covariance="full")
    return np.array([np.asarray(m.mean) for m in out]), np.array([np.asarray(m.var) for m in out])


@pytest.fixture(scope="module")
def propagated():
    cases = {
        ("linear:0.8", 1.0, "linearized"),
        ("linear:1.2", 1.0, "linearized"),
        ("sigmoid", 1.0, "linearized"),
        ("sigmoid", 4.0, "linearized"),
        ("sigmoid", 4.0, "gaussian"),
    }
    return {c: _propagate_symmetric(*c) for c in sorted(cases)}


@pytest.mark.parametrize(
    "activation,coupling,method",
    [("linear:0.8", 1.0, "linearized"), ("linear:1.2", 1.0, "linearized"), ("sigmoid", 1.0, "linearized"), ("sigmoid", 4.0, "linearized")],
)
def test_symmetric_recursion_equals_full_propagation(propagated, activation, coupling, method):
    means, var = propagated[activation, coupling, method]
    # all neurons of a layer are identical
    np.testing.assert_allclose(var, var[:, :1] * np.ones_like(var), rtol=1e-5)
    mf = meanfield.symmetric(DEPTH, width=WIDTH, coupling=coupling, activation=activation, noise=NZ, x_mean=X_MEAN, method=method)
    np.testing.assert_allclose(np.asarray(mf.var), var[:, 0], rtol=2e-5)
    np.testing.assert_allclose(np.asarray(mf.mean), means[:, 0], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mf.correlated + mf.uncorrelated), np.asarray(mf.var), rtol=1e-6)


def test_symmetric_recursion_gaussian_method_close_to_propagation(propagated):
    """Gaussian moment matching: the propagation treats the nonlinear residual ``Var f − g² v`` as
    independent across neurons, the symmetric recursion (exactly) as shared — a second-order difference."""
    means, var = propagated["sigmoid", 4.0, "gaussian"]
    mf = meanfield.symmetric(DEPTH, width=WIDTH, coupling=4.0, activation="sigmoid", noise=NZ, x_mean=X_MEAN, method="gaussian")
    np.testing.assert_allclose(np.asarray(mf.var), var[:, 0], rtol=2e-3)
    np.testing.assert_allclose(np.asarray(mf.mean), means[:, 0], rtol=1e-5)


@pytest.mark.parametrize("activation,coupling", [("linear:0.8", 1.0), ("sigmoid", 1.0), ("sigmoid", 4.0)])
def test_depth_limit_matches_fifty_layers(propagated, activation, coupling):
    _, var = propagated[activation, coupling, "linearized"]
    lim = meanfield.symmetric_limit(width=WIDTH, coupling=coupling, activation=activation, noise=NZ, x_mean=X_MEAN)
    assert bool(lim.bounded) and float(lim.slope) < 1
    np.testing.assert_allclose(float(lim.var), var[-1, 0], rtol=1e-4)
    np.testing.assert_allclose(float(lim.correlated + lim.uncorrelated), float(lim.var), rtol=1e-6)
    # the noise converges: the last ten layers agree with the limit
    np.testing.assert_allclose(var[-10:, 0], float(lim.var), rtol=1e-3)


def test_slope_above_one_grows(propagated):
    _, var = propagated["linear:1.2", 1.0, "linearized"]
    lim = meanfield.symmetric_limit(width=WIDTH, activation="linear:1.2", noise=NZ, x_mean=X_MEAN)
    assert not bool(lim.bounded) and np.isinf(float(lim.var))
    assert float(lim.slope) > 1.4  # 1.2² (1 + D_MC + D_MU/N)
    assert var[-1, 0] / var[DEPTH // 2 - 1, 0] > 1e3  # (1.44)^25 ≈ 9e3: exponential growth
    assert np.all(np.diff(var[:, 0]) > 0)


@pytest.mark.parametrize("slope", [0.3, 0.7, 0.95, 0.99])
def test_slope_below_one_bounded(slope):
    """Paper: with slope < 1 (rows of W summing to 1) accumulation is bounded at every depth and converges."""
    act = f"linear:{slope}"
    mf = meanfield.symmetric(400, width=WIDTH, activation=act, noise=NZ, x_mean=X_MEAN)
    lim = meanfield.symmetric_limit(width=WIDTH, activation=act, noise=NZ, x_mean=X_MEAN)
    assert bool(lim.bounded)
    v = np.asarray(mf.var)
    # bounded at every depth: the limit plus what the (decaying) signal adds through multiplicative noise
    extra = float(NZ.mul_uncorrelated + NZ.mul_correlated) * X_MEAN**2 / (1 - slope**2)
    assert np.all(v <= float(lim.var) + extra)
    # and converging to the limit (the slower, the closer the slope is to 1)
    np.testing.assert_allclose(v[-1], float(lim.var), rtol=1e-2)


def test_critical_slope_separates_bounded_from_growing():
    ac = float(meanfield.critical_slope(width=WIDTH, noise=NZ))
    d_mu, d_mc = 2e-3, 5e-4
    np.testing.assert_allclose(ac, 1 / np.sqrt(1 + d_mc + d_mu / WIDTH), rtol=1e-6)
    assert 0.99 < ac < 1.0  # "slope below 1" up to the multiplicative noise
    below = meanfield.symmetric_limit(width=WIDTH, activation=layers.Linear(ac * 0.999), noise=NZ, x_mean=0.0)
    above = meanfield.symmetric_limit(width=WIDTH, activation=layers.Linear(ac * 1.001), noise=NZ, x_mean=0.0)
    assert bool(below.bounded) and not bool(above.bounded)
    np.testing.assert_allclose(float(below.slope), (0.999) ** 2, rtol=1e-5)
    # coupling enters as c·α: halving the weights doubles the critical slope
    np.testing.assert_allclose(float(meanfield.critical_slope(width=WIDTH, coupling=0.5, noise=NZ)), 2 * ac, rtol=1e-6)


def test_linear_closed_form_of_the_limit():
    """Additive noise only, slope α, c = 1: s* = (D_AC + D_AU/N) / (1 − α²), v* = α² s* + D_AC + D_AU."""
    nz = noise.NeuronNoise(add_uncorrelated=1e-2, add_correlated=1e-3)
    a = 0.6
    lim = meanfield.symmetric_limit(width=WIDTH, activation=f"linear:{a}", noise=nz)
    s = (1e-3 + 1e-2 / WIDTH) / (1 - a * a)
    np.testing.assert_allclose(float(lim.pre_activation_var), s, rtol=1e-5)
    np.testing.assert_allclose(float(lim.var), a * a * s + 1e-3 + 1e-2, rtol=1e-5)
    np.testing.assert_allclose(float(lim.slope), a * a, rtol=1e-6)


def test_layer_statistics_recursion_reproduces_symmetric():
    net, params = meanfield.symmetric_network(IN_DIM, WIDTH, 12, coupling=4.0, activation="sigmoid")
    stats = meanfield.layer_statistics(net, params, jnp.full(IN_DIM, X_MEAN))
    assert stats[0].fan_in == IN_DIM and stats[1].fan_in == WIDTH
    np.testing.assert_allclose(float(stats[1].w_mean), 4.0 / WIDTH, rtol=1e-6)
    np.testing.assert_allclose(float(stats[1].w_mean_square), 16.0 / WIDTH**2, rtol=1e-6)
    rec = meanfield.recursion(stats, NZ)
    sym = meanfield.symmetric(12, width=WIDTH, coupling=4.0, activation="sigmoid", noise=NZ, x_mean=X_MEAN)
    np.testing.assert_allclose(np.asarray(rec.var), np.asarray(sym.var), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rec.correlated), np.asarray(sym.correlated), rtol=1e-5)


@pytest.fixture(scope="module")
def trained():
    """A 64-32-32-10 sigmoid MLP trained on digits (100 full-batch Adam steps)."""
    ds = data.load_digits(seed=0)
    rng = np.random.default_rng(0)
    widths = (64, 32, 32, 10)
    net = layers.mlp(list(widths), "sigmoid", "linear")
    params = tuple(
        ({"W": jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i), jnp.float32), "b": jnp.zeros(o, jnp.float32)}, (), ())
        for i, o in zip(widths[:-1], widths[1:])
    )
    opt = optax.adam(1e-2)
    xs, ys = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(layers.apply_batch(net, p, xs), ys).mean())(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    for _ in range(100):
        params, state = step(params, state)
    return net, params, jnp.asarray(ds.x_test[:8])


def test_trained_network_meanfield_tracks_propagation(trained):
    """Mean-field from per-layer statistics vs the exact linearized propagation of a trained network
    (layer noise averaged over neurons and 8 test digits).

    Hidden layers agree within a few %; the trained output layer within a factor 1.7
    (its weights correlate with the gains).  The pure M1/M2 theory misses correlated
    noise there by a factor > 3 (row sums spread around a mean near 0); ``⟨r²⟩`` repairs it.
    """
    net, params, xs = trained
    stats = jax.vmap(lambda x: meanfield.layer_statistics(net, params, x))(xs)
    # every case with the same four fields (zeros where absent): one compiled propagation for all
    one = lambda **kw: noise.NeuronNoise(**{k: kw.get(k, 0.0) for k in ("add_uncorrelated", "add_correlated", "mul_uncorrelated", "mul_correlated")})  # noqa: E731
    for nz in (NZ, one(add_uncorrelated=1e-3), one(add_correlated=1e-3), one(mul_correlated=1e-3)):
        exact = moments.predict(net, params, xs, noise=nz, method="linearized")
        ex = np.array([np.asarray(m.var).mean() for m in exact])
        ratio = np.asarray(jax.vmap(lambda st: meanfield.recursion(st, nz).var)(stats)).mean(0) / ex
        np.testing.assert_allclose(ratio[:2], 1.0, rtol=0.05)
        assert 1 / 1.7 < ratio[2] < 1.7, ratio
    nz = one(add_correlated=1e-3)
    exact = moments.predict(net, params, xs, noise=nz, method="linearized")[-1].var.mean()
    pure = np.asarray(jax.vmap(lambda st: meanfield.recursion(st, nz, row_sums=False).var)(stats)).mean(0)[-1]
    assert pure / exact < 1 / 3


def test_validation():
    with pytest.raises(errors.InvalidArgumentError, match="noise"):
        meanfield.symmetric(3, width=4, noise=[NZ, NZ])
    with pytest.raises(errors.InvalidArgumentError, match="activation"):
        meanfield.symmetric(3, width=4, activation="swish")
    with pytest.raises(errors.InvalidArgumentError, match="method"):
        meanfield.symmetric(3, width=4, method="exact")
    with pytest.raises(errors.InvalidArgumentError, match="width"):
        meanfield.symmetric_limit(width=0)
    with pytest.raises(errors.InvalidArgumentError, match="NeuronNoise"):
        meanfield.symmetric_limit(width=4, noise=[NZ])
    with pytest.raises(errors.InvalidArgumentError, match="stats"):
        meanfield.recursion([])
    with pytest.raises(errors.InvalidArgumentError, match="serial"):
        meanfield.layer_statistics(layers.Dense(3), {"W": jnp.ones((2, 3))}, jnp.ones(2))
