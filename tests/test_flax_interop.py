"""noisejax.flax: neuron noise injected into unmodified linen / NNX models, weight noise on
Flax parameters.  Nothing is trained; statistics are checked by Monte Carlo over keys
with tolerances derived from the number of realizations N:

* mean of N draws of variance v: std sqrt(v/N);
* sample variance: std v·sqrt(2/(N-1));
* sample covariance of (a, b): std sqrt((Σaa Σbb + Σab²)/N);
* sample correlation of independent draws: std 1/sqrt(N).

Every check uses 5 standard deviations.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from noisejax import flax as njf
from noisejax import noise
from noisejax.errors import InvalidArgumentError, ShapeMismatchError

N = 2000  # realizations
Z = 5.0  # sigmas
WIDTH, IN, BATCH = 6, 5, 3
# Realization keys from NumPy bits: nothing to compile.
KEYS = jax.random.wrap_key_data(np.random.default_rng(42).integers(0, 2**32, (N, 2), dtype=np.uint32))
# XLA's CPU backend optimizations triple the compile time of these small, threefry-heavy
# programs and buy nothing at this size; statistics do not depend on them.
FAST = {"xla_backend_optimization_level": 0}


def fast_jit(fn):
    return jax.jit(fn, compiler_options=FAST)


def _numpy_leaf(path, leaf, rng):
    name = "/".join(noise.path_names(path))
    if any(t in name for t in ("scale", "var")):  # norm scales and variances stay positive
        return np.float32(1.0) + 0.2 * np.abs(rng.standard_normal(leaf.shape, np.float32))
    fan_in = leaf.shape[0] if len(leaf.shape) == 2 else 1
    return rng.standard_normal(leaf.shape, np.float32) / np.float32(np.sqrt(fan_in))


def linen_variables(model, x, seed):
    """Variables of ``model`` with random NumPy values (structure from ``eval_shape``: no compile)."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(_numpy_leaf(p, l, rng)), abstract)


def nnx_model(ctor, seed):
    """``ctor(rngs)`` with random NumPy parameters (``nnx.eval_shape`` + ``nnx.merge``: no compile)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ctor(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(_numpy_leaf(p, l, rng)), state))


# One probe model per flavour, run ONCE for all keys in a single compiled program (compiles
# dominate the cost on CPU): a linear 3-layer MLP trunk t0 -> t1 -> t2 (equal widths, so
# shared keys between sites would show up in the output covariance), four heads on the
# input, one per noise type, and one module ("shared") called twice.
D_TRUNK = 0.01
D_AU = np.linspace(0.01, 0.06, WIDTH).astype(np.float32)  # per-neuron intensities
D_AC, D_MU, D_MC, D_SHARED = 0.09, 0.05, 0.02, 1.0
HEADS = ("au", "ac", "mu", "mc")
NOISE = {
    "t0": noise.NeuronNoise(add_uncorrelated=D_TRUNK),
    "t1": noise.NeuronNoise(add_uncorrelated=D_TRUNK),
    "t2": noise.NeuronNoise(add_uncorrelated=D_TRUNK),
    "au": noise.NeuronNoise(add_uncorrelated=D_AU),
    "ac": noise.NeuronNoise(add_correlated=D_AC),
    "mu": noise.NeuronNoise(mul_uncorrelated=D_MU),
    "mc": noise.NeuronNoise(mul_correlated=D_MC),
    "shared": noise.NeuronNoise(add_uncorrelated=D_SHARED),
}
# output rows of the probe: 0 trunk, 1..4 heads, 5 and 6 the two calls of "shared"
ROW = {"trunk": 0, **{h: 1 + i for i, h in enumerate(HEADS)}, "shared0": 5, "shared1": 6}


def by_path(site):
    return NOISE.get(site.path)


def only(path):
    return lambda site: NOISE[path] if site.path == path else None


class LinenProbe(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(WIDTH, name="t2")(nn.Dense(WIDTH, name="t1")(nn.Dense(WIDTH, name="t0")(x)))
        heads = [nn.Dense(WIDTH, name=n)(x) for n in HEADS]
        shared = nn.Dense(WIDTH, name="shared")
        return jnp.stack([h, *heads, shared(x), shared(x)])


class NNXProbe(nnx.Module):
    def __init__(self, rngs):
        self.t0 = nnx.Linear(IN, WIDTH, rngs=rngs)
        self.t1 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.t2 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        for n in HEADS:
            setattr(self, n, nnx.Linear(IN, WIDTH, rngs=rngs))
        self.shared = nnx.Linear(IN, WIDTH, rngs=rngs)

    def __call__(self, x):
        h = self.t2(self.t1(self.t0(x)))
        return jnp.stack([h, *(getattr(self, n)(x) for n in HEADS), self.shared(x), self.shared(x)])


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, IN)), jnp.float32)


@pytest.fixture(scope="module")
def x2():
    return jnp.asarray(np.random.default_rng(7).normal(size=(2, 3, IN)), jnp.float32)


@pytest.fixture(scope="module")
def linen_probe(x):
    model = LinenProbe()
    return model, linen_variables(model, x, 1)


@pytest.fixture(scope="module")
def nnx_probe():
    return nnx_model(NNXProbe, 2)


def _run_all(call, x, x2):
    """Everything the statistics tests need, for one key (vmapped over KEYS by the caller)."""

    def one(k):
        return {
            "noisy": call(x, by_path, k, 1),
            "clean": call(x, lambda s: None, k, 1),
            "only_au": call(x, only("au"), k, 1),
            "ac_b2": call(x2, only("ac"), jax.random.fold_in(k, 1), 2),
            "ac_b0": call(x, only("ac"), jax.random.fold_in(k, 2), 0),
        }

    return one


def _kernels(flavour, model):
    if flavour == "linen":
        _, variables = model
        return [np.asarray(variables["params"][n]["kernel"], np.float64) for n in ("t0", "t1", "t2")]
    return [np.asarray(getattr(model, n).kernel[...], np.float64) for n in ("t0", "t1", "t2")]


@pytest.fixture(scope="module", params=["linen", "nnx"])
def runs(request, linen_probe, nnx_probe, x, x2):
    """(flavour, Monte Carlo outputs as float64 NumPy, the compiled program, call, kernels)."""
    if request.param == "linen":
        model, variables = linen_probe

        def call(inp, nz, k, batch_axes):
            return njf.apply_with_neuron_noise(model, variables, inp, noise=nz, key=k, batch_axes=batch_axes)

        kernels = _kernels("linen", linen_probe)
    else:
        model = nnx_probe

        def call(inp, nz, k, batch_axes):
            return njf.call_with_neuron_noise_nnx(model, inp, noise=nz, key=k, batch_axes=batch_axes)

        kernels = _kernels("nnx", nnx_probe)
    program = fast_jit(jax.vmap(_run_all(call, x, x2)))
    out = {k: np.asarray(v, np.float64) for k, v in program(KEYS).items()}
    out["clean"] = out["clean"][0]
    return request.param, out, program, call, kernels


def assert_var(sample, expected):
    """Sample variance over axis 0 equals ``expected`` within Z sampling sigmas, elementwise."""
    var = sample.var(axis=0, ddof=1)
    tol = Z * expected * np.sqrt(2.0 / (len(sample) - 1))
    assert np.all(np.abs(var - expected) <= tol), (var, expected, tol)


def assert_zero_mean(sample, variance):
    tol = Z * np.sqrt(variance / len(sample))
    assert np.all(np.abs(sample.mean(axis=0)) <= tol), (sample.mean(axis=0), tol)


def assert_uncorrelated(a, b):
    r = np.corrcoef(a, b)[0, 1]
    assert abs(r) <= Z / np.sqrt(len(a)), r


def head_diff(out, name, key="noisy"):
    return out[key][:, ROW[name]] - out["clean"][ROW[name]]


# ----------------------------------------------------------------------------------
# Statistics of the injected neuron noise
# ----------------------------------------------------------------------------------


def test_additive_uncorrelated_variance(runs):
    _, out, _, _, _ = runs
    diff = head_diff(out, "au")
    assert diff.shape == (N, BATCH, WIDTH)
    expected = np.broadcast_to(D_AU, (BATCH, WIDTH)).astype(np.float64)
    assert_zero_mean(diff, expected)
    assert_var(diff, expected)
    assert_uncorrelated(diff[:, 0, 0], diff[:, 0, 1])  # across neurons
    assert_uncorrelated(diff[:, 0, 0], diff[:, 1, 0])  # across examples


def test_additive_correlated_shared_over_features(runs):
    _, out, _, _, _ = runs
    diff = head_diff(out, "ac")
    np.testing.assert_allclose(diff, np.broadcast_to(diff[..., :1], diff.shape), atol=1e-5)
    assert np.std(diff[:, 0, 0]) > 0.1  # not trivially zero
    assert_zero_mean(diff[..., 0], D_AC)
    assert_var(diff[..., 0], D_AC)
    assert_uncorrelated(diff[:, 0, 0], diff[:, 2, 0])  # one draw per example, not per batch


def test_multiplicative_uncorrelated_scales_with_clean_output(runs):
    _, out, _, _, _ = runs
    diff = head_diff(out, "mu")
    y = out["clean"][ROW["mu"]]
    assert_var(diff, D_MU * y**2)
    assert_zero_mean(diff, D_MU * y**2)


def test_multiplicative_correlated_shared_factor(runs):
    _, out, _, _, _ = runs
    xi = head_diff(out, "mc") / out["clean"][ROW["mc"]]  # the shared factor ξ_MC
    np.testing.assert_allclose(xi, np.broadcast_to(xi[..., :1], xi.shape), atol=1e-4)
    assert_var(xi[..., 0], D_MC)


def _assert_cov(sample, cov):
    emp = np.cov(sample, rowvar=False)
    d = np.diag(cov)
    tol = Z * np.sqrt((np.outer(d, d) + cov**2) / len(sample))
    assert np.all(np.abs(emp - cov) <= tol), np.max(np.abs(emp - cov) / tol)


def test_every_site_draws_independently(runs):
    # y = ((x W0 + b0 + n0) W1 + b1 + n1) W2 + b2 + n2 with independent n_l ~ N(0, D I):
    # Cov y = D (A^T A + W2^T W2 + I), A = W1 W2.  Had two sites shared a key, their
    # (identically shaped) draws would coincide and this covariance would not hold.
    _, out, _, _, (W0, W1, W2) = runs
    A = W1 @ W2
    cov = D_TRUNK * (A.T @ A + W2.T @ W2 + np.eye(WIDTH))
    trunk = out["noisy"][:, ROW["trunk"]]
    for b in range(BATCH):
        _assert_cov(trunk[:, b], cov)
    assert_uncorrelated(trunk[:, 0, 0], trunk[:, 1, 0])


def test_repeated_calls_of_one_module_draw_independently(runs):
    _, out, _, _, _ = runs
    d0, d1 = head_diff(out, "shared0"), head_diff(out, "shared1")
    assert not np.any(d0 == d1)
    assert_var(d0, D_SHARED)
    assert_var(d1, D_SHARED)
    assert_uncorrelated(d0[:, 0, 0], d1[:, 0, 0])


def test_draws_do_not_depend_on_other_sites(runs):
    _, out, _, _, _ = runs
    np.testing.assert_allclose(out["only_au"][:, ROW["au"]], out["noisy"][:, ROW["au"]], rtol=1e-6, atol=1e-6)
    others = [r for name, r in ROW.items() if name != "au"]
    np.testing.assert_array_equal(out["only_au"][:, others], np.broadcast_to(out["clean"][others], out["only_au"][:, others].shape))


def test_batch_axes(runs, linen_probe, nnx_probe, x2):
    flavour, out, _, _, _ = runs
    # batch_axes=2 on a (2, 3, IN) input: one correlated draw per (i, j) example
    if flavour == "linen":
        model, variables = linen_probe
        clean2 = np.asarray(fast_jit(model.apply)(variables, x2), np.float64)
    else:
        clean2 = np.asarray(fast_jit(lambda v: nnx_probe(v))(x2), np.float64)
    d = out["ac_b2"][:, ROW["ac"]] - clean2[ROW["ac"]]
    assert d.shape == (N, 2, 3, WIDTH)
    np.testing.assert_allclose(d, np.broadcast_to(d[..., :1], d.shape), atol=1e-5)
    assert len(np.unique(np.round(d[0, ..., 0], 5))) == 6
    assert_var(d[..., 0], D_AC)
    assert_uncorrelated(d[:, 0, 1, 0], d[:, 1, 2, 0])
    # batch_axes=0: the whole (BATCH, WIDTH) output is one example, one shared draw
    d0 = out["ac_b0"][:, ROW["ac"]] - out["clean"][ROW["ac"]]
    np.testing.assert_allclose(d0, np.broadcast_to(d0[:, :1, :1], d0.shape), atol=1e-5)
    assert_var(d0[:, 0, 0], D_AC)


# ----------------------------------------------------------------------------------
# Determinism, purity, restoration
# ----------------------------------------------------------------------------------


def test_determinism_and_vmap_consistency(runs, x):
    _, out, program, call, _ = runs
    rolled = program(jnp.roll(KEYS, 1))  # same compiled program, keys shifted by one
    for k in ("noisy", "only_au"):
        np.testing.assert_array_equal(np.asarray(rolled[k][4]), out[k][3].astype(np.float32))  # same key -> same draws
    assert not np.allclose(out["noisy"][3], out["noisy"][4])  # different keys differ
    single = fast_jit(lambda k: call(x, only("au"), k, 1))(KEYS[3])  # no vmap: same draws
    np.testing.assert_allclose(single, out["only_au"][3], rtol=1e-5, atol=1e-5)


ALL_SITES = [("t0", 0), ("t1", 0), ("t2", 0), ("au", 0), ("ac", 0), ("mu", 0), ("mc", 0), ("shared", 0), ("shared", 1)]


def test_nnx_context_touches_only_the_given_instances(x):
    m1, m2 = nnx_model(NNXProbe, 11), nnx_model(NNXProbe, 11)
    nz = only("shared")

    @fast_jit
    def f(k):
        with njf.noisy_nnx(m1, nz, key=k) as sites:
            noisy = m1(x)
            other = m2(x)  # another model with the same classes: clean
            with pytest.raises(InvalidArgumentError, match="nested"):
                with njf.noisy_nnx(m1, nz, key=k):
                    pass
        after = m1(x)
        f.sites = list(sites)
        return noisy, other, after

    noisy, other, after = (np.asarray(a) for a in f(jax.random.key(12)))
    assert [(s.path, s.call) for s in f.sites] == [("shared", 0), ("shared", 1)]
    np.testing.assert_array_equal(other, after)
    rows = [ROW["shared0"], ROW["shared1"]]
    assert not np.any(np.isclose(noisy[rows], after[rows]))
    np.testing.assert_array_equal(np.delete(noisy, rows, axis=0), np.delete(after, rows, axis=0))
    assert type(m1.t0) is nnx.Linear and type(m1.shared) is nnx.Linear and type(m1) is NNXProbe
    # every Linear of the model is a site, in call order (traced only)
    with njf.noisy_nnx(m1, by_path, key=jax.random.key(0)) as sites:
        jax.eval_shape(m1, x)
    assert [(s.path, s.call) for s in sites] == ALL_SITES
    assert type(m1.t0) is nnx.Linear


def test_linen_sites_and_zero_noise(linen_probe, x):
    model, variables = linen_probe

    def f(k, nz):
        with njf.noisy_linen(nz, key=k) as sites:
            y = model.apply(variables, x)
        f.sites = list(sites)
        return y

    jax.eval_shape(lambda k: f(k, noise.NeuronNoise(add_uncorrelated=1.0)), jax.random.key(0))
    assert [(s.path, s.call) for s in f.sites] == ALL_SITES
    # all-None variances: the sites are visited but nothing is drawn
    jaxpr = jax.make_jaxpr(lambda k: f(k, noise.NeuronNoise()))(jax.random.key(0))
    assert "random_bits" not in str(jaxpr) and "threefry" not in str(jaxpr)


# ----------------------------------------------------------------------------------
# Weight noise
# ----------------------------------------------------------------------------------


class LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(8)(nn.relu(x))


class NNXBN(nnx.Module):
    def __init__(self, rngs):
        self.l0 = nnx.Linear(IN, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, use_running_average=True, rngs=rngs)
        self.l1 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.l1(jax.nn.relu(self.norm(self.l0(x))))


def _selected_leaves(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(noise.path_names(p), np.asarray(v, np.float64)) for p, v in flat if noise.default_leaf_filter(p, v)]


def _check_wnr(clean_params, noisy_batched, wnr_db):
    """Pooled noise power over N realizations vs σ² = Var(selected weights) / 10^(WNR/10)."""
    clean = _selected_leaves(clean_params)
    noisy = _selected_leaves(noisy_batched)
    assert [p for p, _ in clean] == [p for p, _ in noisy] and len(clean) == 4
    all_w = np.concatenate([w.ravel() for _, w in clean])
    sigma2 = all_w.var() / 10 ** (wnr_db / 10)
    diffs = np.concatenate([(nw - w[None]).reshape(-1) for (_, w), (_, nw) in zip(clean, noisy)])
    power = np.mean(diffs**2)
    tol = Z * sigma2 * np.sqrt(2.0 / diffs.size)
    assert abs(power - sigma2) <= tol, (power, sigma2, tol)
    assert abs(diffs.mean()) <= Z * np.sqrt(sigma2 / diffs.size)
    return 10 * np.log10(all_w.var() / power), 10 / np.log(10) * Z * np.sqrt(2.0 / diffs.size)


def _check_per_layer(clean_params, noisy_batched, wnr_db):
    for (path, w), (_, nw) in zip(_selected_leaves(clean_params), _selected_leaves(noisy_batched)):
        d = nw - w[None]
        if w.var() == 0:  # zero-initialized biases: zero reference, zero noise
            np.testing.assert_array_equal(d, 0.0)
            continue
        sigma2 = w.var() / 10 ** (wnr_db / 10)
        assert abs(np.mean(d**2) - sigma2) <= Z * sigma2 * np.sqrt(2.0 / d.size), path


WNR = 10.0


@pytest.fixture(scope="module")
def linen_weight_runs(x):
    model = LinenBN()
    variables = linen_variables(model, x, 13)

    def one(k):
        noisy = njf.add_weight_noise_linen(variables, WNR, key=k)
        assert noisy["batch_stats"] is variables["batch_stats"]  # checked while tracing
        return {
            "global": noisy,
            "per_layer": njf.add_weight_noise_linen(variables, WNR, key=k, scope="per_layer"),
            "quant": njf.perturb_weights_linen(variables, noise.Quantization(bits=3)),
            "y": model.apply(noisy, x),
        }

    return model, variables, fast_jit(jax.vmap(one))(KEYS)


def test_linen_weight_noise_wnr_and_untouched_batch_stats(linen_weight_runs):
    model, variables, out = linen_weight_runs
    measured, tol_db = _check_wnr(variables["params"], out["global"]["params"], WNR)
    assert abs(measured - WNR) <= tol_db
    for a, b in zip(jax.tree_util.tree_leaves(variables["batch_stats"]), jax.tree_util.tree_leaves(out["global"]["batch_stats"])):
        np.testing.assert_array_equal(np.broadcast_to(a, b.shape), b)
    for name in ("scale", "bias"):  # BatchNorm parameters skipped by the default filter
        bn = out["global"]["params"]["BatchNorm_0"][name]
        np.testing.assert_array_equal(np.broadcast_to(variables["params"]["BatchNorm_0"][name], bn.shape), bn)
    assert out["y"].shape == (N, BATCH, 8) and np.all(np.isfinite(out["y"]))


def test_linen_weight_noise_per_layer_and_quantization(linen_weight_runs):
    _, variables, out = linen_weight_runs
    _check_per_layer(variables["params"], out["per_layer"]["params"], WNR)
    for path, w in _selected_leaves(out["quant"]["params"]):
        assert len(np.unique(w[0])) <= 7, path  # 3 bits: levels -3..3


def test_nnx_weight_noise_wnr_and_untouched_batch_stats(x):
    model = nnx_model(NNXBN, 15)
    clean_params = nnx.state(model, nnx.Param)
    clean_stats = nnx.state(model, nnx.BatchStat)

    def one(k):
        noisy = njf.add_weight_noise_nnx(model, WNR, key=k)
        return {
            "params": nnx.state(noisy, nnx.Param),
            "stats": nnx.state(noisy, nnx.BatchStat),
            "per_layer": nnx.state(njf.add_weight_noise_nnx(model, WNR, key=k, scope="per_layer"), nnx.Param),
            "quant": nnx.state(njf.perturb_weights_nnx(model, noise.Quantization(bits=2)), nnx.Param),
            "y": noisy(x),
        }

    out = fast_jit(jax.vmap(one))(KEYS)
    measured, tol_db = _check_wnr(clean_params, out["params"], WNR)
    assert abs(measured - WNR) <= tol_db
    _check_per_layer(clean_params, out["per_layer"], WNR)
    names = [p for p, _ in _selected_leaves(clean_params)]
    assert not any("norm" in p for p in names)
    for a, b in zip(jax.tree_util.tree_leaves(clean_stats), jax.tree_util.tree_leaves(out["stats"])):
        np.testing.assert_array_equal(np.broadcast_to(a, b.shape), b)
    np.testing.assert_array_equal(out["params"]["norm"]["scale"][...][0], model.norm.scale[...])
    # the original model is unchanged
    for a, b in zip(jax.tree_util.tree_leaves(clean_params), jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    assert out["y"].shape == (N, BATCH, 8) and np.all(np.isfinite(out["y"]))
    q = np.asarray(out["quant"]["l1"]["kernel"][...][0])
    assert len(np.unique(np.abs(q))) <= 2  # 2 bits: levels -1, 0, 1 times a step


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------


def _bad_cases(model, variables, x, nm):
    nz = noise.NeuronNoise(add_uncorrelated=0.1)
    k = jax.random.key(0)

    def linen(**kw):  # traced only: errors are raised before anything compiles
        args = {"noise": nz, "key": k, **kw}
        return lambda: jax.eval_shape(lambda: njf.apply_with_neuron_noise(model, variables, x, **args))

    def nnx_call(m, **kw):
        args = {"noise": nz, "key": k, **kw}
        return lambda: jax.eval_shape(lambda: njf.call_with_neuron_noise_nnx(m, x, **args))

    return [
        ("noise type", linen(noise=0.1), InvalidArgumentError, "noise"),
        ("int key", linen(key=3), InvalidArgumentError, "key"),
        ("key batch", linen(key=KEYS[:2]), InvalidArgumentError, "key"),
        ("raw key wrong shape", linen(key=jnp.zeros(3, jnp.uint32)), InvalidArgumentError, "key"),
        ("module types", linen(module_types=(int,)), InvalidArgumentError, "module_types"),
        ("nnx types in linen", linen(module_types=(nnx.Linear,)), InvalidArgumentError, "module_types"),
        ("empty methods", linen(methods=()), InvalidArgumentError, "methods"),
        ("batch_axes", linen(batch_axes=-1), InvalidArgumentError, "batch_axes"),
        ("too many batch axes", linen(batch_axes=3), ShapeMismatchError, "batch_axes=3"),
        ("callable returns junk", linen(noise=lambda s: 0.1), InvalidArgumentError, "t0"),
        ("nnx model type", nnx_call(model), InvalidArgumentError, "model"),
        ("nnx unknown method", nnx_call(nm, methods=("encode",)), InvalidArgumentError, "encode"),
        ("linen types in nnx", nnx_call(nm, module_types=(nn.Dense,)), InvalidArgumentError, "module_types"),
        ("negative variance", lambda: noise.NeuronNoise(add_uncorrelated=-1.0), InvalidArgumentError, "add_uncorrelated"),
        ("no params collection", lambda: njf.add_weight_noise_linen({"batch_stats": {}}, 10.0, key=k), InvalidArgumentError, "params"),
        ("nan wnr", lambda: njf.add_weight_noise_linen(variables, float("nan"), key=k), InvalidArgumentError, "wnr_db"),
        ("bad scope", lambda: njf.add_weight_noise_linen(variables, 10.0, key=k, scope="layer"), InvalidArgumentError, "scope"),
        ("perturbation", lambda: njf.perturb_weights_linen(variables, 3.0), InvalidArgumentError, "perturbation"),
        ("perturbation needs key", lambda: njf.perturb_weights_nnx(nm, noise.MultiplicativeWeightNoise(0.1)), InvalidArgumentError, "key"),
        ("nnx weight model", lambda: njf.add_weight_noise_nnx(variables, 10.0, key=k), InvalidArgumentError, "model"),
        ("nnx weight key", lambda: njf.add_weight_noise_nnx(nm, 10.0, key=None), InvalidArgumentError, "key"),
        ("nnx no params", lambda: njf.add_weight_noise_nnx(nnx.Sequential(), 10.0, key=k), InvalidArgumentError, "Param"),
    ]


def test_bad_input(linen_probe, nnx_probe, x):
    model, variables = linen_probe
    for name, call, exc, needle in _bad_cases(model, variables, x, nnx_probe):
        with pytest.raises(exc) as info:
            call()
        assert needle in str(info.value), (name, str(info.value))
        assert "\n" not in str(info.value), name
    assert type(nnx_probe.t0) is nnx.Linear  # a failed context left the model intact


# ----------------------------------------------------------------------------------
# BatchNorm statistics re-estimation
# ----------------------------------------------------------------------------------


class _BNNet(nn.Module):
    """Dense → BN → relu → Dense → BN (features on the last axis), for recalibration tests."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(6, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = nn.Dense(4)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3)(x)


def test_recalibrate_batch_stats_equals_training_mode_statistics():
    model = _BNNet()
    rng = np.random.default_rng(21)
    x = jnp.asarray(rng.standard_normal((256, 5)) * 2 + 1, jnp.float32)
    variables = model.init(jax.random.key(0), x)
    params = jax.tree_util.tree_map(  # non-trivial scale/bias so the second layer's input depends on them
        lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype) * 0.5 + (1.0 if a.ndim == 1 else 0.0),
        variables["params"])
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    fixed = jax.jit(lambda v, x: njf.recalibrate_batch_stats(model, v, x))(variables, x)
    # 1) first BatchNorm: the NumPy statistics of x @ W
    h = np.asarray(x, np.float64) @ np.asarray(params["Dense_0"]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(fixed["batch_stats"]["BatchNorm_0"]["mean"]), h.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fixed["batch_stats"]["BatchNorm_0"]["var"]), h.var(0), rtol=1e-4)
    # 2) every layer: flax's own training-mode statistics (zero start, momentum m: new = (1 − m)·batch)
    zero = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
    y_train, upd = model.apply({"params": params, "batch_stats": zero}, x, train=True, mutable=["batch_stats"])
    ref = jax.tree_util.tree_map(lambda a: a / 0.1, upd["batch_stats"])
    for a, b in zip(jax.tree_util.tree_leaves(fixed["batch_stats"]), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-5)
    # 3) inference with the re-estimated statistics is the training-mode forward pass
    np.testing.assert_allclose(np.asarray(model.apply(fixed, x)), np.asarray(y_train), rtol=1e-3, atol=1e-3)
    assert not np.allclose(np.asarray(model.apply(variables, x)), np.asarray(y_train), atol=1e-2)
    for a, b in zip(jax.tree_util.tree_leaves(fixed["params"]), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # params untouched
    # vmapped over noisy copies: each copy gets its own statistics
    keys = jax.random.split(jax.random.key(3), 3)
    noisy = jax.vmap(lambda k: njf.add_weight_noise_linen(variables, 0.0, key=k))(keys)
    out = jax.vmap(lambda v: njf.recalibrate_batch_stats(model, v, x))(noisy)
    for i in range(3):
        one = njf.recalibrate_batch_stats(model, jax.tree_util.tree_map(lambda a: a[i], noisy), x)
        for a, b in zip(jax.tree_util.tree_leaves(out["batch_stats"]), jax.tree_util.tree_leaves(one["batch_stats"])):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_recalibrate_batch_stats_errors():
    x = jnp.ones((4, 5))
    with pytest.raises(InvalidArgumentError, match="batch_stats"):
        njf.recalibrate_batch_stats(_BNNet(), {"params": {}}, x)
    plain = nn.Dense(3)
    v = plain.init(jax.random.key(0), x)
    with pytest.raises(InvalidArgumentError, match="no nn.BatchNorm"):
        njf.recalibrate_batch_stats(plain, {"params": v["params"], "batch_stats": {}}, x)
    with pytest.raises(InvalidArgumentError, match="linen.Module"):
        njf.recalibrate_batch_stats(lambda v, x: x, {"batch_stats": {}}, x)


def test_recalibrated_estimator_recentres_noisy_channels():
    """denoise.Recalibrated(ML) on noisy weights: over the calibration inputs every channel of the
    last BatchNorm has mean β and variance γ²·v/(v+ε) again, which the stored statistics do not give."""
    import functools

    from noisejax import denoise

    model = _BNNet()
    rng = np.random.default_rng(22)
    x = jnp.asarray(rng.standard_normal((512, 5)) + 2.0, jnp.float32)
    variables = model.init(jax.random.key(1), x)
    variables = njf.recalibrate_batch_stats(model, variables, x)  # the clean model's own statistics
    pw = noise.noise_power(variables, -3.0)
    noisy = noise.add_weight_noise(variables, -3.0, key=jax.random.key(4))
    est = denoise.Recalibrated(denoise.ML(), x, functools.partial(njf.recalibrate_batch_stats, model))
    fixed = jax.jit(lambda v: est(v, pw, wnr_db=-3.0))(noisy)
    bn = fixed["params"]["BatchNorm_1"]
    y_fixed, y_noisy = np.asarray(model.apply(fixed, x), np.float64), np.asarray(model.apply(noisy, x), np.float64)
    np.testing.assert_allclose(y_fixed.mean(0), np.asarray(bn["bias"]), atol=1e-3)
    v = np.asarray(fixed["batch_stats"]["BatchNorm_1"]["var"], np.float64)
    np.testing.assert_allclose(y_fixed.var(0), np.asarray(bn["scale"], np.float64) ** 2 * v / (v + 1e-3), rtol=1e-3)
    assert np.max(np.abs(y_noisy.mean(0) - np.asarray(bn["bias"]))) > 0.1  # the noise had moved them
    with pytest.raises(InvalidArgumentError, match="recalibrate"):
        denoise.Recalibrated(denoise.ML(), x)(noisy, pw)
