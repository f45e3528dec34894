"""Tests of noisejax.train: objectives, the optax loop, evaluation under noise.

Tiny networks and few steps; full-batch training where the minibatch sampler is
not under test (no random numbers means a much faster compile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from noisejax import data, layers, moments, noise, rng, train
from noisejax.errors import InvalidArgumentError, ShapeMismatchError


@pytest.fixture(scope="module")
def setup():
    ds = data.load_digits()
    x, y = ds.x_train[:200], ds.y_train[:200]
    gen = np.random.default_rng(0)  # NumPy init: no PRNG compile
    Ws = [gen.normal(0, 1 / 8, (64, 8)).astype(np.float32), gen.normal(0, 1 / np.sqrt(8), (8, 10)).astype(np.float32)]
    net, p0 = layers.from_weights(Ws, [np.zeros(8, np.float32), np.zeros(10, np.float32)], "sigmoid", "linear")
    opt = optax.adam(3e-2)  # one object: fits share compiled steps
    return dict(ds=ds, x=x, y=y, net=net, p0=p0, opt=opt)


def _head_tail(losses, k=5):
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def test_plain_training_decreases_loss_and_is_chunk_invariant(setup):
    s = setup
    obj = train.plain_loss(s["net"])
    r1 = train.fit(obj, s["p0"], s["x"], s["y"], key=rng.key(1), optimizer=s["opt"], steps=60, chunk=30)
    head, tail = _head_tail(r1.losses)
    assert r1.losses.shape == (60,) and tail < 0.5 * head
    # 60 steps in chunks of 7 (last chunk partly masked) give the same parameters
    r2 = train.fit(obj, s["p0"], s["x"], s["y"], key=rng.key(1), optimizer=s["opt"], steps=60, chunk=7)
    np.testing.assert_allclose(r2.losses, r1.losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(r1.params), jax.tree_util.tree_leaves(r2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the plain-loss value is the cross-entropy of the noise-free outputs (NumPy reference)
    out = np.asarray(jax.jit(lambda p, xx: layers.apply_batch(s["net"], p, xx))(s["p0"], jnp.asarray(s["x"])))
    logp = out - out.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    ce = -logp[np.arange(len(s["y"])), s["y"]].mean()
    assert float(jax.jit(obj)(s["p0"], s["x"], s["y"], None)) == pytest.approx(ce, rel=1e-5)


class _Shift:
    """A deterministic 'weight noise' (w + 0.1): isolates the straight-through rule from sampling."""

    def apply(self, params, *, key):
        return jax.tree_util.tree_map(lambda w: w + 0.1, params)


def test_noise_aware_objective_matches_manual_average(setup):
    s = setup
    # neuron noise here; weight noise by the deterministic _Shift below (sampling it
    # triples the compile time of this test without testing more of train.py)
    nz = noise.NeuronNoise(add_uncorrelated=0.05, mul_correlated=0.02)
    obj = train.noise_aware_loss(s["net"], noise=nz, n_realizations=2)
    net, p0 = s["net"], s["p0"]
    x, y = jnp.asarray(s["x"][:20]), jnp.asarray(s["y"][:20])

    def ce(p, nzk=None, nz_=None):
        return train.softmax_cross_entropy(layers.apply_batch(net, p, x, key=nzk, noise=nz_), y)

    @jax.jit  # one compile for the objective and its reference
    def both(key):
        def manual_one(r):
            kr = jax.random.fold_in(key, r)
            return ce(p0, jax.random.fold_in(kr, 0), nz)

        return obj(p0, x, y, key), jnp.mean(lax.map(manual_one, jnp.arange(2)))

    value, manual = both(rng.key(7))
    assert float(value) == pytest.approx(float(manual), rel=1e-5)
    # straight-through: the gradient is the plain gradient at the perturbed weights
    st = train.noise_aware_loss(net, weight_noise=_Shift(), n_realizations=1)
    g, g_ref = jax.jit(lambda k: (jax.grad(st)(p0, x, y, k), jax.grad(ce)(jax.tree_util.tree_map(lambda w: w + 0.1, p0))))(
        rng.key(0)
    )
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_noise_aware_training_decreases_loss_and_reuses_compile(setup):
    s = setup
    kw = dict(key=rng.key(2), optimizer=s["opt"], steps=40, batch_size=64, chunk=20)
    obj = train.noise_aware_loss(s["net"], noise=noise.NeuronNoise(add_uncorrelated=0.1), n_realizations=4)
    r1 = train.fit(obj, s["p0"], s["x"], s["y"], **kw)
    head, tail = _head_tail(r1.losses)
    assert tail < 0.7 * head, (head, tail)
    assert r1.compile_seconds > 0
    # same structure, another intensity: the compiled step is reused, the result differs
    obj2 = train.noise_aware_loss(s["net"], noise=noise.NeuronNoise(add_uncorrelated=0.3), n_realizations=4)
    r2 = train.fit(obj2, s["p0"], s["x"], s["y"], **kw)
    assert r2.compile_seconds == 0.0
    assert not np.allclose(r2.losses, r1.losses)


def test_moment_regularized_training(setup):
    s = setup
    nz = noise.NeuronNoise(add_uncorrelated=0.05, add_correlated=0.02)
    x, y = jnp.asarray(s["x"][:16]), jnp.asarray(s["y"][:16])
    obj = train.moment_loss(s["net"], noise=nz, penalty=0.5)
    # value: CE of the predicted mean + penalty * mean total variance, from moments.predict
    pred = moments.predict(s["net"], s["p0"], x, noise=nz)[-1]
    ref = train.softmax_cross_entropy(pred.mean, y) + 0.5 * jnp.mean(jnp.sum(pred.var, -1))
    assert float(obj(s["p0"], x, y, None)) == pytest.approx(float(ref), rel=1e-4)
    # training: the loss decreases, and a larger penalty gives a smaller predicted output variance
    res = {}
    for lam in (0.0, 0.5, 2.0):
        o = train.moment_loss(s["net"], noise=nz, penalty=lam)
        res[lam] = train.fit(o, s["p0"], s["x"], s["y"], key=rng.key(3), optimizer=s["opt"], steps=40, chunk=40)
    head, tail = _head_tail(res[0.5].losses)
    assert tail < 0.85 * head, (head, tail)
    assert res[2.0].compile_seconds == 0.0  # the penalty is a leaf: one compile for all
    var = {lam: float(moments.output_variance(s["net"], r.params, x, noise=nz).sum()) for lam, r in res.items()}
    assert var[2.0] < var[0.5] < var[0.0], var


def test_evaluator_against_numpy_and_exact_variance(setup):
    s = setup
    ds = s["ds"]
    x, y = ds.x_test[:50], ds.y_test[:50]
    R = 512
    ev = train.make_evaluator(s["net"], n_realizations=R)
    out = np.asarray(jax.jit(lambda p, xx: layers.apply_batch(s["net"], p, xx))(s["p0"], jnp.asarray(x)))
    # additive uncorrelated noise at both sites of 64 → 8 (sigmoid) → 10 (linear): the output
    # variance is exactly D (Σ_i W2_ij² + 1) — noise enters after the sigmoid and the rest is linear
    d = 0.2
    res = ev(s["p0"], x, y, noise=noise.NeuronNoise(add_uncorrelated=d), key=rng.key(5))
    W2 = np.asarray(s["p0"][1][0]["W"])
    exact = d * ((W2**2).sum(0) + 1.0)
    got = np.asarray(res.output_var).mean(0)  # 50 inputs with independent noise
    np.testing.assert_allclose(got, exact, rtol=5 * np.sqrt(2 / (R - 1)) / np.sqrt(len(y)))
    np.testing.assert_allclose(np.asarray(res.output_mean), out, atol=5 * np.sqrt(exact.max() / R))
    assert res.accuracy.shape == (R,) and float(res.accuracy.std()) > 0
    assert float(res.mean_accuracy) == pytest.approx(float(np.mean(res.accuracy)))
    m, v = np.asarray(res.output_mean, np.float64), np.asarray(res.output_var, np.float64)
    assert float(res.snr) == pytest.approx(((m**2).sum() - v.sum() / R) / v.sum(), rel=1e-4)
    # noise-free: every realization is the NumPy accuracy (same compiled function, zero intensity)
    clean = ev(s["p0"], x, y, noise=noise.NeuronNoise(add_uncorrelated=0.0), key=rng.key(5))
    np.testing.assert_allclose(np.asarray(clean.accuracy), np.mean(out.argmax(1) == y), rtol=1e-6)
    with pytest.raises(InvalidArgumentError, match="key"):
        ev(s["p0"], x, y, noise=noise.NeuronNoise(add_uncorrelated=d))


def test_validation(setup):
    s = setup
    obj = train.plain_loss(s["net"])
    with pytest.raises(InvalidArgumentError, match="steps"):
        train.fit(obj, s["p0"], s["x"], s["y"], key=rng.key(0), steps=0)
    with pytest.raises(ShapeMismatchError, match="same n"):
        train.fit(obj, s["p0"], s["x"], s["y"][:5], key=rng.key(0))
    with pytest.raises(InvalidArgumentError, match="integer"):
        train.fit(obj, s["p0"], s["x"], s["y"].astype(np.float32), key=rng.key(0))
    with pytest.raises(InvalidArgumentError, match="weight_noise"):
        train.noise_aware_loss(s["net"], weight_noise=0.1)
    with pytest.raises(InvalidArgumentError, match="n_realizations"):
        train.noise_aware_loss(s["net"], n_realizations=0)
    with pytest.raises(InvalidArgumentError, match="penalty"):
        train.moment_loss(s["net"], noise=noise.NeuronNoise(add_uncorrelated=0.1), penalty=-1.0)
    with pytest.raises(InvalidArgumentError, match="loss"):
        train.plain_loss(s["net"], loss="hinge")
    with pytest.raises(InvalidArgumentError, match="noise"):
        train.noise_aware_loss(s["net"], noise=0.1)


def test_conv_objective_runs_outside_scan_on_cpu_and_matches_the_scanned_steps():
    """XLA:CPU runs a conv's kernel gradient 30-100x slower inside lax.scan: fit dispatches single steps there.

    The single-step path must train exactly like the scanned one (same minibatches, same keys, same
    updates up to float rounding), and must be the path taken for a conv objective on the CPU.
    """
    from noisejax import _backend

    gen = np.random.default_rng(0)
    x = jnp.asarray(gen.normal(size=(64, 6, 6, 2)), jnp.float32)
    y = jnp.asarray(gen.integers(0, 3, 64), jnp.int32)
    p0 = {"k": jnp.asarray(gen.normal(0, 0.3, (3, 3, 2, 4)), jnp.float32),
          "w": jnp.asarray(gen.normal(0, 0.3, (4, 3)), jnp.float32)}

    def objective(p, xb, yb, key):
        h = lax.conv_general_dilated(xb, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        logits = jnp.tanh(h).mean((1, 2)) @ p["w"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    opt = optax.adam(1e-2)
    kw = dict(key=rng.key(4), optimizer=opt, steps=12, batch_size=16)
    direct = train.fit(objective, p0, x, y, chunk=5, **kw)
    jaxpr = jax.make_jaxpr(jax.grad(objective))(p0, x[:16], y[:16], None)
    assert _backend.uses_primitive(jaxpr, {"conv_general_dilated"})
    assert _backend.loops_slow_down(jaxpr, "cpu") and not _backend.loops_slow_down(jaxpr, "gpu")
    conv1d = jax.make_jaxpr(lambda k, h: lax.conv_general_dilated(h, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")))
    assert not _backend.loops_slow_down(conv1d(jnp.ones((3, 2, 4)), jnp.ones((5, 7, 2))), "cpu")  # 1-D: kept in the scan
    if jax.default_backend() == "cpu":  # the conv objective (asked in chunks of 5) compiled as one direct step
        assert list(train._COMPILED.values())[-1][1] == 1 and direct.losses.shape == (12,)
    # the same steps through lax.scan (an independent path: scan_steps with the same minibatches and keys)
    idx = train.Minibatches(16).indices(kw["key"], jnp.int32(0), 12, 64)

    def loss(p, st, inp):
        t, i = inp
        k = jax.random.fold_in(jax.random.fold_in(kw["key"], t), 1)
        return objective(p, x[i], y[i], k), st

    (p_scan, _, _), l_scan = jax.jit(lambda p: train.scan_steps(loss, opt, p, opt.init(p), None,
                                                                 (jnp.arange(12, dtype=jnp.int32), idx)))(p0)
    np.testing.assert_allclose(direct.losses, np.asarray(l_scan), rtol=2e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(direct.params), jax.tree_util.tree_leaves(p_scan)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
