"""Analytic moment propagation (noisejax.moments) against Monte Carlo and independent NumPy references.

Monte Carlo, two independent engines:

* :func:`noisejax.simulate.monte_carlo` — ONE compiled run (module fixture,
  ``N_MC = 2**16`` realizations) over the very network objects the analytic side
  propagates: a random 8-12-12-12 network with five activations (linear 0.9,
  sigmoid, tanh, erf, ReLU) x 12 neuron-noise cases (each type alone, mixes,
  correlated noise injected at layer 1 only, and 4 large ones that show where
  linearization fails), and a sigmoid MLP 64-32-16-10 trained on scikit-learn's
  digits (optax, 300 steps) x 8 cases x 2 test digits.  The five activations share
  one compiled program through a test-local *switch* activation whose one-hot
  parameter selects the function (``1·f_k(x) + 0·f_j(x)`` is bitwise ``f_k(x)``).
* a NumPy simulation (its own generator, ``N_NP = 2**15`` realizations) for the
  cases whose XLA compile would cost most: additive weight noise at 10 dB WNR
  (weights redrawn in every realization) and a conv net with per-channel
  correlated noise and per-channel intensities.

Tolerances follow from the sample: the standard error of a variance estimate is
``sqrt(Var[(y - c)²] / n)`` with ``c`` the noise-free output (measured in the same
run, so the heavy tails of multiplicative noise count); exact (linear) cases agree
within 5 of them per neuron.  The issue's bounds are checked on top, per layer
(``Σ_i var_i``): within 2 % for linear networks, within 5 % for the gaussian method
where the layer's SNR is >= 10 dB (neurons with SNR >= 10 dB also individually,
within 5 % + 5 standard errors).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
import scipy.special

from noisejax import data, errors, layers, moments, noise, simulate

N_MC = 2**16
N_NP = 2**15
WIDTHS = (8, 12, 12, 12)
ACTS = ("linear:0.9", "sigmoid", "tanh", "erf", "relu")
NONLINEAR = ACTS[1:]
KEYS = ("add_uncorrelated", "add_correlated", "mul_uncorrelated", "mul_correlated")
WNR_DB = 10.0
_MIX = dict(add_uncorrelated=5e-3, add_correlated=5e-3, mul_uncorrelated=1e-2, mul_correlated=1e-2)


def _every(**kw):
    return (kw, kw, kw)


# neuron-noise cases: name -> variances at each of the 3 sites
CASES = {
    "AU": _every(add_uncorrelated=1e-2),
    "AC": _every(add_correlated=1e-2),
    "MU": _every(mul_uncorrelated=2e-2),
    "MC": _every(mul_correlated=2e-2),
    "mix": _every(**_MIX),
    "correlated": _every(add_correlated=1e-2, mul_correlated=1e-2),
    "AC@1": ({"add_correlated": 2e-2}, {}, {}),
    "MC@1+AU@2": ({"mul_correlated": 2e-2}, {"add_uncorrelated": 5e-3}, {}),
    "AU x10": _every(add_uncorrelated=1e-1),
    "AU x40": _every(add_uncorrelated=4e-1),
    "MU x10": _every(mul_uncorrelated=2e-1),
    "MU x40": _every(mul_uncorrelated=8e-1),
    "weights+mix": _every(**_MIX),  # plus additive weight noise at WNR_DB (simulated in NumPy)
}
ALL = tuple(CASES)  # analytic cases
WEIGHTS = "weights+mix"
NAMES = tuple(n for n in ALL if n != WEIGHTS)  # cases simulated by simulate.monte_carlo
BREAKDOWN = ("AU x10", "AU x40", "MU x10", "MU x40")
REGULAR = tuple(n for n in NAMES if n not in BREAKDOWN)
DIGITS = REGULAR + (WEIGHTS,)

_NP_ACT = {
    "linear": lambda x: x,
    "linear:0.9": lambda x: 0.9 * x,
    "sigmoid": scipy.special.expit,
    "tanh": np.tanh,
    "erf": scipy.special.erf,
    "relu": lambda x: np.maximum(x, 0.0),
}


def _case_noise(names):
    """Three NeuronNoise (one per site) whose leaves stack the cases on axis 0."""
    return [noise.NeuronNoise(**{k: np.array([CASES[n][s].get(k, 0.0) for n in names], np.float32) for k in KEYS}) for s in range(3)]


def _switch_activation(names):
    fns = [layers.activation(n).spec.fn for n in names]

    def init(key, shape):
        return tuple(shape), jnp.zeros(len(fns))

    def apply(p, x, *, key=None, noise=None):
        # the barrier keeps XLA from fusing all five activations into every consumer (slow CPU compiles)
        return jax.lax.optimization_barrier(sum(p[k] * f(x) for k, f in enumerate(fns)))

    return layers.Layer(init, apply, 0, {"kind": "activation", "name": "switch"})


def _wnr_power(Ws, bs, wnr_db):
    """σ² of additive weight noise at ``wnr_db``: variance of all W and b pooled / 10^(WNR/10) (``noise.noise_power``'s default)."""
    flat = np.concatenate([np.ravel(a) for a in list(Ws) + list(bs)]).astype(np.float64)
    return float(np.var(flat) / 10 ** (wnr_db / 10))


def _dense_params(Ws, bs):
    return tuple(({"W": jnp.asarray(W, jnp.float32), "b": jnp.asarray(b, jnp.float32)}, (), ()) for W, b in zip(Ws, bs))


def _rel(a, b):
    return np.abs(a / b - 1.0)


# ----------------------------------------------------------------------------------
# Independent NumPy Monte Carlo
# ----------------------------------------------------------------------------------


def _np_site(y, nz, rng, corr_axes=None):
    """``y (n, *feat) -> y(1 + ξMU + ξMC) + ξAU + ξAC`` with NumPy draws (correlated draws shared over ``corr_axes``)."""
    n, feat = y.shape[0], y.shape[1:]
    cshape = (n,) + tuple(1 if (corr_axes is None or i in corr_axes) else s for i, s in enumerate(feat))
    g = lambda k: np.sqrt(np.asarray(nz.get(k, 0.0), np.float64))  # noqa: E731
    mult = 1.0 + g("mul_uncorrelated") * rng.standard_normal(y.shape) + g("mul_correlated") * rng.standard_normal(cshape)
    return y * mult + g("add_uncorrelated") * rng.standard_normal(y.shape) + g("add_correlated") * rng.standard_normal(cshape)


def _np_conv_same(y, W):
    """SAME 2-D convolution (cross-correlation, as lax.conv) of ``y (n, H, W, C)`` with ``W (kh, kw, C, O)``."""
    kh, kw = W.shape[:2]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    yp = np.pad(y, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            out = out + yp[:, i : i + y.shape[1], j : j + y.shape[2], :] @ W[i, j]
    return out


def _numpy_mc(blocks, x, n, seed, chunk=2048, batch=False):
    """Monte Carlo in NumPy (float64).  ``blocks``: dicts with kind ('dense'|'conv'), W, b, act (name),
    noise (dict of variances), corr_axes, wvar ((σ²_W, σ²_b) weights redrawn per realization, or None).
    ``batch=True``: ``x`` is ``(B, fan_in)`` for a dense network, each realization's weights shared by the B
    inputs (neuron noise independent per input).

    Returns per block ``dict(mean, var, se)`` (``se``: standard error of ``var``, from ``Var[(y - clean)²]``).
    """
    rng = np.random.default_rng(seed)

    def forward(y, noisy):
        outs = []
        for blk in blocks:
            W, b = np.asarray(blk["W"], np.float64), np.asarray(blk["b"], np.float64)
            if blk["kind"] == "conv":
                pre = _np_conv_same(y, W) + b
            else:
                y = y.reshape(y.shape[: 2 if batch else 1] + (-1,))
                if noisy and blk.get("wvar") is not None:
                    sw, sb = np.sqrt(blk["wvar"])
                    Wn = W + sw * rng.standard_normal((y.shape[0],) + W.shape)
                    pre = np.einsum("n...i,nio->n...o", y, Wn) + b + sb * rng.standard_normal(y.shape[:-1] + (W.shape[1],))
                else:
                    pre = y @ W + b
            y = _NP_ACT[blk["act"]](pre)
            if noisy and blk.get("noise"):
                shape = y.shape
                y = _np_site(y.reshape((-1,) + shape[2 if batch else 1 :]), blk["noise"], rng, blk.get("corr_axes")).reshape(shape)
            outs.append(y)
        return outs

    x = np.asarray(x, np.float64)[None]
    clean = forward(x, False)
    acc = [np.zeros((4,) + c.shape[1:]) for c in clean]
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        for a, y, c in zip(acc, forward(np.repeat(x, m, axis=0), True), clean):
            d2 = np.square(y - c)
            a += np.stack([y.sum(0), np.square(y).sum(0), d2.sum(0), np.square(d2).sum(0)])
    out = []
    for a in acc:
        mean = a[0] / n
        var = (a[1] - n * mean**2) / (n - 1)
        var_d2 = (a[3] - a[2] ** 2 / n) / (n - 1)
        out.append(dict(mean=mean, var=var, se=np.sqrt(np.maximum(var_d2, 0.0) / n)))
    return out


# ----------------------------------------------------------------------------------
# Fixtures: networks, the Monte Carlo runs, one analytic run
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    # random network (one set of weights; every activation is in a nonlinear regime with it)
    Ws = [rng.normal(size=(i, o)) * 1.5 / np.sqrt(i) for i, o in zip(WIDTHS[:-1], WIDTHS[1:])]
    bs = [0.2 + 0.3 * rng.normal(size=o) for o in WIDTHS[1:]]
    x_rand = rng.uniform(-1, 1, size=WIDTHS[0])

    # trained digits MLP (sigmoid hidden layers, linear logits)
    dwidths = (64, 32, 16, 10)
    ds = data.load_digits(seed=0)
    dnet = layers.mlp(list(dwidths), "sigmoid", "linear")
    dparams = _dense_params([rng.normal(size=(i, o)) / np.sqrt(i) for i, o in zip(dwidths[:-1], dwidths[1:])], [np.zeros(o) for o in dwidths[1:]])
    opt = optax.adam(1e-2)
    xs, ys = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)

    def loss(p):
        logits = layers.apply_batch(dnet, p, xs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(dparams)
    for _ in range(300):
        dparams, state = step(dparams, state)
    acc = float(np.mean(np.argmax(np.asarray(layers.apply_batch(dnet, dparams, jnp.asarray(ds.x_test))), -1) == ds.y_test))

    # conv net: Conv3x3(3) -> f -> noise (per-channel correlated draws and intensities) -> Flatten -> Dense(6) -> sigmoid -> noise
    conv_W = [rng.normal(size=(3, 3, 2, 3)) / np.sqrt(18), rng.normal(size=(108, 6)) / np.sqrt(108)]
    conv_b = [0.1 * rng.normal(size=3), 0.1 * rng.normal(size=6)]
    x_conv = rng.uniform(0, 1, size=(6, 6, 2))
    conv_noise = [
        dict(add_uncorrelated=5e-3, add_correlated=np.array([2e-2, 1e-2, 5e-3]), mul_uncorrelated=1e-2, mul_correlated=np.array([1e-2, 2e-2, 0.0])),
        _MIX,
    ]
    return dict(
        Ws=Ws,
        bs=bs,
        x_rand=x_rand,
        wvar_rand=_wnr_power(Ws, bs, WNR_DB),
        dnet=dnet,
        dparams=dparams,
        digits_acc=acc,
        x_dig=np.asarray(ds.x_test[:2], np.float64),
        wvar_dig=_wnr_power([np.asarray(b[0]["W"]) for b in dparams], [np.asarray(b[0]["b"]) for b in dparams], WNR_DB),
        conv_W=conv_W,
        conv_b=conv_b,
        conv_noise=conv_noise,
        x_conv=x_conv,
    )


def _conv_net(act):
    return layers.serial(
        layers.serial(layers.Conv(3, (3, 3)), layers.activation(act), layers.NoiseSite()),
        layers.serial(layers.Flatten(), layers.Dense(6), layers.Sigmoid(), layers.NoiseSite()),
    )


def _conv_params(S):
    W, b = S["conv_W"], S["conv_b"]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return (({"W": f32(W[0]), "b": f32(b[0])}, (), ()), ((), {"W": f32(W[1]), "b": f32(b[1])}, (), ()))


def _conv_noise(S):
    return [noise.NeuronNoise(correlated_axes=(0, 1), **S["conv_noise"][0]), noise.NeuronNoise(**S["conv_noise"][1])]


@pytest.fixture(scope="module")
def mc(setup):
    """``{("random", case): {"mean", "var", "se"} with (5 acts, width) per layer, ("digits", case): ... (2 inputs, width)}``,
    from one run of ``simulate.monte_carlo``."""
    S = setup
    sites, dsites = _case_noise(NAMES), _case_noise(REGULAR)
    switch_net = layers.serial(*[layers.serial(layers.Dense(w), _switch_activation(ACTS), layers.NoiseSite()) for w in WIDTHS[1:]])
    sel = jnp.eye(len(ACTS))
    base = _dense_params(S["Ws"], S["bs"])
    sw_params = jax.vmap(lambda s: tuple((blk[0], s, ()) for blk in base))(sel)
    x_rand, x_dig = jnp.asarray(S["x_rand"], jnp.float32), jnp.asarray(S["x_dig"], jnp.float32)
    dnet, dparams = S["dnet"], S["dparams"]
    clean_rand = jax.vmap(lambda p: switch_net.apply(p, x_rand, return_layers=True)[1])(sw_params)
    clean_dig = layers.apply_batch(dnet, dparams, x_dig, return_layers=True)[1]

    def with_d2(ys, clean):
        return ys, tuple(jnp.square(y - c) for y, c in zip(ys, clean))

    def fn(key):
        def rand(p, clean):
            return jax.vmap(lambda nz: with_d2(switch_net.apply(p, x_rand, key=key, noise=nz, return_layers=True)[1], clean))(sites)

        dig = jax.vmap(lambda nz: with_d2(layers.apply_batch(dnet, dparams, x_dig, key=key, noise=nz, return_layers=True)[1], clean_dig))
        return {"random": jax.vmap(rand)(sw_params, clean_rand), "digits": dig(dsites)}

    # precision_check off: some digits-MLP outputs have |mean|/std ≈ 1.5·10⁴, where float32 may shift a
    # mean by up to 1.8 standard errors (docs/precision.md); the tests compare means at 5
    res = simulate.monte_carlo(fn, jax.random.key(11), N_MC, precision_check=False)
    out = {}
    for branch, names, case_axis in (("random", NAMES, 1), ("digits", REGULAR, 0)):
        ys_mean, _ = res.mean[branch]
        ys_var, d2_var = res.var[branch]
        for c, name in enumerate(names):
            take = lambda a: np.take(np.asarray(a, np.float64), c, axis=case_axis)  # noqa: E731
            out[branch, name] = dict(
                mean=[take(v) for v in ys_mean],
                var=[take(v) for v in ys_var],
                se=[np.sqrt(take(v) / N_MC) for v in d2_var],
            )
    return out


@pytest.fixture(scope="module")
def mc_numpy(setup):
    """NumPy Monte Carlo: weight noise (random and digits networks) and the conv nets."""
    S = setup
    out = {}
    for act in ("linear:0.9", "sigmoid", "tanh"):
        blocks = [dict(kind="dense", W=W, b=b, act=act, noise=_MIX, wvar=(S["wvar_rand"],) * 2) for W, b in zip(S["Ws"], S["bs"])]
        out["random+weights", act] = _numpy_mc(blocks, S["x_rand"], N_NP, seed=1)
    dW = [np.asarray(b[0]["W"]) for b in S["dparams"]]
    db = [np.asarray(b[0]["b"]) for b in S["dparams"]]
    blocks = [dict(kind="dense", W=W, b=b, act=a, noise=_MIX, wvar=(S["wvar_dig"],) * 2) for W, b, a in zip(dW, db, ("sigmoid", "sigmoid", "linear"))]
    both = _numpy_mc(blocks, S["x_dig"], N_NP, seed=2, chunk=1024, batch=True)
    for i in range(2):
        out["digits+weights", i] = [{k: v[i] for k, v in layer.items()} for layer in both]
    x_conv = S["x_conv"]
    for act in ("linear", "tanh"):
        blocks = [
            dict(kind="conv", W=S["conv_W"][0], b=S["conv_b"][0], act=act, noise=S["conv_noise"][0], corr_axes=(0, 1)),
            dict(kind="dense", W=S["conv_W"][1], b=S["conv_b"][1], act="sigmoid", noise=S["conv_noise"][1]),
        ]
        out["conv", act] = _numpy_mc(blocks, x_conv, N_NP, seed=4)
    return out


@pytest.fixture(scope="module")
def analytic(setup):
    """Every analytic prediction of this module from one jitted function; ``key -> list of (mean, var) per layer``.

    Random network: cases ``ALL`` on axis 0; digits: cases ``DIGITS`` x inputs.  The
    weight-noise case scales ``weight_noise_var`` (as :class:`moments.NoisyParam`) by a flag.
    """
    S = setup
    rparams = _dense_params(S["Ws"], S["bs"])
    nets = {name: layers.mlp(list(WIDTHS), name) for name in ACTS}
    cnets = {a: _conv_net(a) for a in ("linear", "tanh")}

    def compact(ms):
        return tuple((m.mean, m.var) for m in ms)

    def cases(net, params, x, names, wvar, **kw):
        flags = jnp.asarray([float(n == WEIGHTS) for n in names])

        def one(nz, flag):
            p = moments.with_weight_noise(params, jax.tree_util.tree_map(lambda _: wvar * flag, params))
            return compact(moments.propagate(net, p, x, noise=nz, **kw))

        return jax.vmap(one)(_case_noise(names), flags)

    def run(rparams, dparams, cparams, x_rand, x_dig, x_conv):
        out = {}
        for name in ACTS:
            for method in moments.METHODS if name in ("tanh", "erf", "relu") else ("gaussian",):
                out["random", name, method] = cases(nets[name], rparams, x_rand, ALL, S["wvar_rand"], method=method)
        out["digits", "gaussian"] = jax.vmap(lambda x: cases(S["dnet"], dparams, x, DIGITS, S["wvar_dig"]), out_axes=1)(x_dig)
        for act in ("linear", "tanh"):
            out["conv", act, "gaussian"] = compact(moments.propagate(cnets[act], cparams, x_conv, noise=_conv_noise(S)))
        return out

    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    res = jax.jit(run)(rparams, S["dparams"], _conv_params(S), f32(S["x_rand"]), f32(S["x_dig"]), f32(S["x_conv"]))
    return {k: [(np.asarray(m, np.float64), np.asarray(v, np.float64)) for m, v in layers_] for k, layers_ in res.items()}


def _errors(an_var, mc_stats):
    """Per layer a dict of errors of the analytic variance against Monte Carlo.

    ``lay``: relative error of the layer's noise power ``Σ_i var_i``; ``snr``: layer
    SNR in dB (``Σ m² / Σ var``); ``rel``/``res``: per-neuron relative error and its
    5-standard-error resolution; ``nrm``/``nres``: per-neuron error and resolution in
    units of ``max(var_i, mean_j var_j)`` (quiet neurons measured against the layer's
    noise level); ``silent``: analytic variance of neurons that MC finds exactly silent
    (dead ReLUs), relative to the layer's mean variance.
    """
    out = []
    for l, va in enumerate(an_var):
        va = np.asarray(va).ravel()
        vm, se, mm = (np.asarray(mc_stats[k][l]).ravel() for k in ("var", "se", "mean"))
        ok = vm > 0
        safe = np.where(ok, vm, 1.0)
        scale = np.maximum(vm, vm.mean())
        out.append(
            dict(
                lay=abs(va.sum() / vm.sum() - 1.0),
                snr=10 * np.log10(np.square(mm).sum() / vm.sum()),
                rel=np.where(ok, np.abs(va - vm) / safe, 0.0),
                res=np.where(ok, 5 * se / safe, 0.0),
                nrm=np.abs(va - vm) / scale,
                nres=5 * se / scale,
                silent=va[~ok] / vm.mean(),
            )
        )
    return out


def _random(analytic, mc, act, method, case):
    """(analytic var per layer, MC stats per layer) for one activation and case of the random network."""
    a = ACTS.index(act)
    c = ALL.index(case)
    an = [v[c] for _, v in analytic["random", act, method]]
    st = {k: [v[a] for v in mc["random", case][k]] for k in ("mean", "var", "se")}
    return an, st


def _digits(analytic, mc, method, case, b):
    c = DIGITS.index(case)
    an = [v[c, b] for _, v in analytic["digits", method]]
    st = {k: [v[b] for v in mc["digits", case][k]] for k in ("mean", "var", "se")}
    return an, st


# ----------------------------------------------------------------------------------
# Unit checks of the rules against NumPy
# ----------------------------------------------------------------------------------


def _numpy_gauss(f, mu, v, n=8001):
    """E f, Var f and E f' for x ~ N(mu, v) by a dense trapezoid rule in float64 (E f' = E[(x - mu) f(x)] / v, Stein)."""
    s = np.sqrt(v)
    z = np.linspace(-12, 12, n)
    w = np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)
    fx = f(mu + s * z)
    ef = np.trapezoid(w * fx, z)
    vf = np.trapezoid(w * (fx - ef) ** 2, z)
    g = np.trapezoid(w * z * (fx - ef), z) / s
    return ef, vf, g


_NP_F = {
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "tanh": np.tanh,
    "erf": lambda x: np.vectorize(__import__("math").erf)(x),
    "relu": lambda x: np.maximum(x, 0),
}


@pytest.mark.parametrize("name", sorted(_NP_F))
def test_gaussian_activation_moments_match_numpy_integration(name):
    layer = layers.activation(name)
    kind = name if name in ("relu", "erf") else None
    mus = np.array([-3.0, -0.7, 0.0, 0.4, 2.5])
    vs = np.array([1e-4, 0.05, 0.5, 2.0, 6.0])
    M, V = np.meshgrid(mus, vs)
    ef, vf, g = moments.activation_moments(layer.spec.fn, jnp.asarray(M, jnp.float32), jnp.asarray(V, jnp.float32), kind=kind)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            r_ef, r_vf, r_g = _numpy_gauss(_NP_F[name], M[i, j], V[i, j])
            np.testing.assert_allclose(float(ef[i, j]), r_ef, rtol=1e-3, atol=2e-6)
            np.testing.assert_allclose(float(vf[i, j]), r_vf, rtol=2e-3, atol=1e-8)
            np.testing.assert_allclose(float(g[i, j]), r_g, rtol=2e-3, atol=1e-6)


def test_closed_forms_agree_with_quadrature_and_are_stable_at_zero_variance():
    mu = jnp.linspace(-2, 2, 9)
    v = jnp.full_like(mu, 0.3)

    @jax.jit
    def run(mu, v):
        out = {}
        for name in ("relu", "erf"):
            fn = layers.activation(name).spec.fn
            out[name] = (
                moments.activation_moments(fn, mu, v, kind=name),
                moments.activation_moments(fn, mu, v, quad_nodes=96),
                moments.activation_moments(fn, mu, jnp.zeros_like(mu), kind=name),
                jax.grad(lambda vv: moments.activation_moments(fn, mu, vv, kind=name)[1].sum())(jnp.zeros_like(mu)),  # noqa: B023
            )
        return out

    for name, (closed, quad, at_zero, grad) in run(mu, v).items():
        for a, b in zip(closed, quad):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=3e-3, atol=3e-4)
        # zero variance: reduces to f(mu), 0, f'(mu) with finite gradients
        fn = layers.activation(name).spec.fn
        np.testing.assert_allclose(np.asarray(at_zero[0]), np.asarray(fn(mu)), atol=1e-6)
        np.testing.assert_allclose(np.asarray(at_zero[1]), 0.0, atol=1e-12)
        assert np.all(np.isfinite(np.asarray(grad)))
    # erf at mu = 0 is Williams' (2/pi) arcsin(2v/(1+2v))
    vv = jnp.array([0.01, 0.5, 3.0])
    _, vf, _ = moments.activation_moments(jax.scipy.special.erf, jnp.zeros(3), vv, kind="erf")
    np.testing.assert_allclose(np.asarray(vf), 2 / np.pi * np.arcsin(2 * np.asarray(vv) / (1 + 2 * np.asarray(vv))), rtol=1e-5)


def test_linearized_is_first_order():
    mu, v = jnp.array([-1.0, 0.3, 2.0]), jnp.array([0.1, 0.2, 0.3])
    ef, vf, g = moments.activation_moments(jnp.tanh, mu, v, method="linearized")
    d = 1 - np.tanh(np.asarray(mu)) ** 2
    np.testing.assert_allclose(np.asarray(ef), np.tanh(np.asarray(mu)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), d, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(vf), d**2 * np.asarray(v), rtol=1e-5)


def test_noise_site_full_covariance_against_numpy_sampling():
    """Exact site algebra (off-diagonal terms, per-neuron intensities, two correlated groups) vs 10^5 NumPy draws."""
    rng = np.random.default_rng(1)
    shape, n = (2, 3), 100_000  # features (2, 3); correlated draws shared over axis 0 -> 3 groups
    m = rng.normal(size=shape)
    F = rng.normal(size=shape + (2,)) * 0.3
    d = rng.uniform(0.01, 0.05, size=shape)
    nz = noise.NeuronNoise(
        add_uncorrelated=np.array([0.01, 0.02, 0.03]),
        add_correlated=0.02,
        mul_uncorrelated=0.05,
        mul_correlated=np.array([0.04, 0.0, 0.09]),
        correlated_axes=(0,),
    )
    state = moments.LayerMoments(jnp.asarray(m, jnp.float32), jnp.asarray(d, jnp.float32), jnp.asarray(F, jnp.float32))
    rule = moments.neuron_noise_rule()
    out = rule((), state, noise=nz)
    cov = np.asarray(out.covariance_matrix(), np.float64)
    full = rule((), moments.LayerMoments(state.mean, cov=state.covariance_matrix(), covariance="full"), noise=nz)
    np.testing.assert_allclose(np.asarray(full.cov), cov, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out.mean), m, rtol=1e-6)

    # independent sampling: y = m + F z + sqrt(d) e, then the four noise types
    z = rng.normal(size=(n, 2))
    y = m + np.einsum("...r,nr->n...", F, z) + np.sqrt(d) * rng.normal(size=(n,) + shape)
    au = np.sqrt([0.01, 0.02, 0.03]) * rng.normal(size=(n,) + shape)
    mu_ = np.sqrt(0.05) * rng.normal(size=(n,) + shape)
    mc = np.sqrt([0.04, 0.0, 0.09]) * rng.normal(size=(n, 1, 3))
    ac = np.sqrt(0.02) * rng.normal(size=(n, 1, 3))
    zz = (y * (1 + mu_ + mc) + au + ac).reshape(n, -1)
    emp = np.cov(zz, rowvar=False)
    # standard error of each covariance entry, from the sample
    c = zz - zz.mean(0)
    se = np.sqrt(np.var(c[:, :, None] * c[:, None, :], axis=0) / n)
    assert np.all(np.abs(emp - cov) <= 5 * se + 1e-6), np.max(np.abs(emp - cov) / se)
    assert np.abs(cov[0, 3]) > 0.01  # features (0, 0) and (1, 0) share their correlated draws


def _numpy_linear_network(Ws, bs, slope, x, site_noise, wvar=None):
    """Dense covariance propagation in float64 from the definitions (linear f = slope·x)."""
    m = np.asarray(x, np.float64)
    C = np.zeros((m.size, m.size))
    outs = []
    for l, (W, b) in enumerate(zip(Ws, bs)):
        W, b = np.asarray(W, np.float64), np.asarray(b, np.float64)
        Ey2 = m**2 + np.diag(C)
        m, C = m @ W + b, W.T @ C @ W
        if wvar is not None:
            C = C + np.diag(np.full(m.size, wvar[l][0] * Ey2.sum() + wvar[l][1]))
        m, C = slope * m, slope**2 * C
        nz = site_noise[l]
        au, ac, mu, mc = (nz.get(k, 0.0) for k in KEYS)
        one = np.ones_like(m)
        C = C + mu * np.diag(m**2 + np.diag(C)) + mc * (C + np.outer(m, m)) + au * np.eye(m.size) + ac * np.outer(one, one)
        outs.append((m, C))
    return outs


def test_linear_network_matches_numpy_covariance_propagation():
    """Exact in the linear regime at any depth: correlated noise of layer 1 reaching layer 3, weight noise,
    multiplicative terms — all three covariance forms against dense float64 NumPy propagation."""
    rng = np.random.default_rng(2)
    widths = [5, 7, 6, 4]
    Ws = [rng.normal(size=(widths[i], widths[i + 1])) / np.sqrt(widths[i]) for i in range(3)]
    bs = [rng.normal(size=widths[i + 1]) * 0.5 for i in range(3)]
    net, params = layers.from_weights([jnp.asarray(W, jnp.float32) for W in Ws], [jnp.asarray(b, jnp.float32) for b in bs], "linear:0.9")
    x = rng.normal(size=5).astype(np.float32)
    site = [dict(add_correlated=0.03, mul_correlated=0.02), dict(add_uncorrelated=0.01, mul_uncorrelated=0.02), {}]
    wv = [(1e-3, 2e-3), (1e-3, 2e-3), (1e-3, 2e-3)]
    ref = _numpy_linear_network(Ws, bs, 0.9, x, site, wv)
    wvar = tuple(({"W": jnp.float32(a), "b": jnp.float32(b)}, (), ()) for a, b in wv)
    nz = [noise.NeuronNoise(**s) if s else None for s in site]

    @jax.jit
    def all_forms(params, x):
        p = moments.with_weight_noise(params, wvar)
        return {c: moments.propagate(net, p, x, noise=nz, covariance=c) for c in moments.COVARIANCES}

    got = all_forms(params, x)
    got["predict"] = moments.predict(net, params, x, noise=nz, weight_noise_var=wvar, keep_covariance=True)  # public path
    for form, res in got.items():
        for l, ((m, C), g) in enumerate(zip(ref, res)):
            np.testing.assert_allclose(np.asarray(g.mean), m, rtol=1e-5, atol=1e-6)
            if form == "lowrank" and l == 2:
                # layer 1's weight noise (independent) has crossed two linear layers here: lowrank is
                # approximate by design (see test_lowrank_drops_cross_covariance_after_two_linear_layers)
                continue
            np.testing.assert_allclose(np.asarray(g.var), np.diag(C), rtol=2e-5, err_msg=f"{form} layer {l}")
            if form != "lowrank":
                np.testing.assert_allclose(np.asarray(g.covariance_matrix()), C, rtol=2e-5, atol=1e-7)


def test_lowrank_drops_cross_covariance_after_two_linear_layers():
    """lowrank keeps Σ_j W_ij² σ_j² (exact after one layer) but not the covariance it creates: wrong two layers on."""
    rng = np.random.default_rng(3)
    Ws = [rng.normal(size=(6, 6)) / np.sqrt(6) + 0.3 for _ in range(3)]  # non-zero mean weights
    net, params = layers.from_weights([jnp.asarray(W, jnp.float32) for W in Ws], [None] * 3, "linear")
    nz = [noise.NeuronNoise(add_uncorrelated=0.01), None, None]
    corr = [noise.NeuronNoise(add_correlated=0.01, mul_correlated=0.02), None, None]
    exact, low, corr_exact, corr_low = jax.jit(
        lambda p, x: [moments.propagate(net, p, x, noise=n, covariance=c) for n in (nz, corr) for c in ("factored", "lowrank")]
    )(params, jnp.ones(6))
    ref = _numpy_linear_network(Ws, [np.zeros(6)] * 3, 1.0, np.ones(6), [dict(add_uncorrelated=0.01), {}, {}])
    np.testing.assert_allclose(np.asarray(exact[2].var), np.diag(ref[2][1]), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(low[1].var), np.diag(ref[1][1]), rtol=2e-5)  # one layer: exact
    assert np.max(_rel(np.asarray(low[2].var), np.diag(ref[2][1]))) > 0.2  # two layers: cross terms missing
    # purely correlated sources (one rank each) propagate exactly in the lowrank form at any depth
    np.testing.assert_allclose(np.asarray(corr_low[2].var), np.asarray(corr_exact[2].var), rtol=1e-5)


def test_factored_and_full_covariance_agree_through_nonlinearities():
    """Same mathematics in two representations, through quadrature (tanh, sigmoid) and closed-form (erf)
    activations; per-neuron correlated multiplicative intensities and a Flatten between Dense layers make
    the lazy block of the factored form materialize inside a noise site and a reshape."""
    rng = np.random.default_rng(4)
    net = layers.serial(
        layers.serial(layers.Dense(9), layers.Tanh(), layers.NoiseSite()),
        layers.serial(layers.Dense(7), layers.Erf(), layers.NoiseSite(), layers.Flatten()),
        layers.serial(layers.Dense(3), layers.Sigmoid(), layers.NoiseSite()),
    )
    dense = _dense_params([rng.normal(size=(i, o)) / np.sqrt(i) for i, o in ((6, 9), (9, 7), (7, 3))], [0.3 * rng.normal(size=o) for o in (9, 7, 3)])
    params = ((dense[0][0], (), ()), (dense[1][0], (), (), ()), (dense[2][0], (), ()))
    x = jnp.asarray(rng.normal(size=6), jnp.float32)
    nz = [
        noise.NeuronNoise(add_uncorrelated=1e-2, mul_correlated=jnp.linspace(0.0, 0.05, 9)),
        noise.NeuronNoise(**_MIX),  # scalar MC: the lazy block survives the site and meets the Flatten
        noise.NeuronNoise(add_correlated=1e-2, mul_uncorrelated=2e-2, mul_correlated=jnp.linspace(0.05, 0.0, 3)),
    ]
    fact, full = jax.jit(lambda p, x: [moments.propagate(net, p, x, noise=nz, covariance=c) for c in ("factored", "full")])(params, x)
    for la, lb in zip(fact, full):
        np.testing.assert_allclose(np.asarray(la.mean), np.asarray(lb.mean), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(la.var), np.asarray(lb.var), rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(np.asarray(la.covariance_matrix()), np.asarray(lb.cov), rtol=1e-4, atol=1e-7)
    assert fact[1].lazy is None and fact[2].lazy is None and fact[2].n_factors > 9  # materialized by Flatten / per-neuron MC


# ----------------------------------------------------------------------------------
# Against Monte Carlo
# ----------------------------------------------------------------------------------


def test_linear_network_exact_within_sampling_and_2_percent(mc, analytic):
    for case in NAMES:
        for l, e in enumerate(_errors(*_random(analytic, mc, "linear:0.9", "gaussian", case))):
            assert np.all(e["rel"] <= e["res"] + 1e-5), (case, l, e["rel"].max(), e["res"].max())
            assert e["lay"] <= 0.02, (case, l, e["lay"])


def test_linear_network_means_exact(mc, analytic):
    for case in NAMES:
        c = ALL.index(case)
        for l in range(3):
            m_a = analytic["random", "linear:0.9", "gaussian"][l][0][c]
            m_m, v_m = mc["random", case]["mean"][l][0], mc["random", case]["var"][l][0]
            assert np.all(np.abs(m_a - m_m) <= 5 * np.sqrt(v_m / N_MC) + 1e-5), (case, l)


def _check_gaussian(e, where, per_neuron=True):
    """The issue's bound per layer where the layer SNR is >= 10 dB, and (smooth activations) per neuron
    within 5 % of max(var_i, layer mean) + 5 standard errors; below 10 dB 10 % and 25 % (always asserted).

    ReLU is checked per layer only: Stein's first-order cross-covariance misses the
    correlation of the rectified parts, so single neurons near the kink deviate by up
    to ~15 % of the layer's noise level (up to ~50 % when one correlated source drives
    everything), while the layer's noise power stays within 5 %.
    """
    assert np.all(e["silent"] <= 1e-3), (where, e["silent"])  # MC-silent (dead ReLU) neurons are ~silent analytically
    if e["snr"] < 10:
        # outside the regime the 5 % claim is made for, a looser bound still catches gross errors: the
        # largest errors measured there are 6.3 % per layer (erf, AC@1, 9.7 dB) and 18 % per neuron
        # (tanh, AC@1, 9.6 dB)
        assert e["lay"] <= 0.10, (where, "below the 10 dB gate", e["lay"], e["snr"])
        if per_neuron:
            assert np.all(e["nrm"] <= 0.25 + e["nres"]), (where, "below the 10 dB gate", e["nrm"].max())
        return False
    assert e["lay"] <= 0.05, (where, e["lay"], e["snr"])
    if per_neuron:
        assert np.all(e["nrm"] <= 0.05 + e["nres"]), (where, e["nrm"].max())
    return True


@pytest.mark.parametrize("act", NONLINEAR)
def test_gaussian_method_within_5_percent_where_snr_at_least_10db(mc, analytic, act):
    checked = 0
    for case in NAMES:
        for l, e in enumerate(_errors(*_random(analytic, mc, act, "gaussian", case))):
            checked += _check_gaussian(e, (act, case, l), per_neuron=act != "relu")
    assert checked >= 12, checked


def test_correlated_noise_from_layer_one_reaches_layer_three(mc, analytic):
    """AC (or MC) injected at layer 1 only: layer 3's noise is all propagated correlated noise."""
    for case in ("AC@1", "MC@1+AU@2"):
        for act in ACTS:
            e = _errors(*_random(analytic, mc, act, "gaussian", case))[2]
            if act.startswith("linear"):
                assert e["lay"] <= 0.02 and np.all(e["rel"] <= e["res"] + 1e-5), (case, e["lay"])
            else:
                _check_gaussian(e, (case, act), per_neuron=act != "relu")


def test_weight_noise_matches_monte_carlo(mc_numpy, analytic):
    """Additive weight noise at WNR_DB on every W and b (redrawn per realization) plus neuron noise."""
    for act in ("linear:0.9", "sigmoid", "tanh"):
        an = [v[ALL.index(WEIGHTS)] for _, v in analytic["random", act, "gaussian"]]
        st = {k: [d[k] for d in mc_numpy["random+weights", act]] for k in ("mean", "var", "se")}
        for l, e in enumerate(_errors(an, st)):
            if act.startswith("linear"):
                assert np.all(e["rel"] <= e["res"] + 1e-5), (act, l, e["rel"].max())
            assert e["lay"] <= (0.02 if act.startswith("linear") else 0.05), (act, l, e["lay"])
        # the weight noise is visible: it adds at least 10 % to the output noise power
        mix_only = analytic["random", act, "gaussian"][2][1][ALL.index("mix")]
        assert an[2].sum() > 1.1 * mix_only.sum(), (act, an[2].sum() / mix_only.sum())
    for b in range(2):
        an = [v[DIGITS.index(WEIGHTS), b] for _, v in analytic["digits", "gaussian"]]
        st = {k: [d[k] for d in mc_numpy["digits+weights", b]] for k in ("mean", "var", "se")}
        for l, e in enumerate(_errors(an, st)):
            assert e["lay"] <= 0.05, (b, l, e["lay"], e["snr"])


def test_trained_digits_sigmoid_mlp(setup, mc, analytic):
    assert setup["digits_acc"] > 0.85
    checked = 0
    for case in REGULAR:
        for b in range(2):
            for l, e in enumerate(_errors(*_digits(analytic, mc, "gaussian", case, b))):
                checked += _check_gaussian(e, (case, b, l))
    assert checked >= 30, checked


def test_conv_net_with_per_channel_correlated_noise(mc_numpy, analytic):
    for act in ("linear", "tanh"):
        an = [v for _, v in analytic["conv", act, "gaussian"]]
        st = {k: [d[k] for d in mc_numpy["conv", act]] for k in ("mean", "var", "se")}
        for l, e in enumerate(_errors(an, st)):
            if act == "linear" and l == 0:  # exact
                assert np.all(e["rel"] <= e["res"] + 1e-5), (act, e["rel"].max())
                assert e["lay"] <= 0.02, e["lay"]
            else:
                assert e["lay"] <= 0.05, (act, l, e["lay"])


def test_linearized_breaks_down_where_gaussian_holds(mc, analytic):
    """Linearization fails for tanh/erf at large noise and for ReLU near its kink; the gaussian method holds."""
    lin, gau = {}, {}
    for act in ("tanh", "erf"):
        for case in BREAKDOWN:
            lin[act, case] = _errors(*_random(analytic, mc, act, "linearized", case))[2]["lay"]
            gau[act, case] = _errors(*_random(analytic, mc, act, "gaussian", case))[2]["lay"]
    assert max(lin.values()) > 0.5, lin  # output noise power off by more than 50 %
    assert max(gau.values()) < 0.1, gau
    # ReLU: the linearization is off by > 10 % of a layer's noise power already at small noise
    # (neurons near the kink), where the gaussian method is within 2 %
    lin_lay = _errors(*_random(analytic, mc, "relu", "linearized", "AU"))[1]["lay"]
    gau_lay = _errors(*_random(analytic, mc, "relu", "gaussian", "AU"))[1]["lay"]
    assert lin_lay > 0.1 and gau_lay < 0.02, (lin_lay, gau_lay)


# ----------------------------------------------------------------------------------
# API: batch, jit, grad, validation
# ----------------------------------------------------------------------------------


def test_batch_equals_single_and_compiles_once():
    rng = np.random.default_rng(6)
    net = layers.mlp([4, 5, 3], "tanh")
    params = _dense_params([rng.normal(size=(4, 5)), rng.normal(size=(5, 3))], [np.zeros(5), np.zeros(3)])
    X = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    nz = noise.NeuronNoise(add_uncorrelated=1e-2, mul_correlated=1e-2)
    batch = moments.predict(net, params, X, noise=nz)
    for b in range(3):
        single = moments.predict(net, params, X[b], noise=nz)
        for lb, ls in zip(batch, single):
            np.testing.assert_allclose(np.asarray(lb.var[b]), np.asarray(ls.var), rtol=1e-5)
            assert ls.var.shape == (lb.var.shape[-1],)
    fn = moments._compiled(net, method="gaussian", covariance="factored", quad_nodes=moments._DEFAULT_QUAD, batched=True, keep_covariance=False)
    n_before = fn._cache_size()
    assert n_before >= 1  # the batched call above went through this cached function
    moments.predict(net, params, X * 2, noise=noise.NeuronNoise(add_uncorrelated=3e-2, mul_correlated=1e-3))
    assert fn._cache_size() == n_before  # new values, same shapes: no retrace
    assert batch[-1].factors is None and batch[-1].lazy is None  # by default only mean and var come back
    full = moments.predict(net, params, X, noise=nz, keep_covariance=True)
    np.testing.assert_allclose(np.asarray(full[-1].var), np.asarray(batch[-1].var), rtol=1e-5)
    assert full[-1].n_factors > 0


def test_gradients_match_finite_differences_in_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        net = layers.mlp([3, 4, 2], "sigmoid")
        params = tuple(
            ({"W": jnp.asarray(rng.normal(size=(i, o)), jnp.float64), "b": jnp.asarray(rng.normal(size=o), jnp.float64)}, (), ())
            for i, o in ((3, 4), (4, 2))
        )
        x = jnp.array([[0.3, -0.5, 1.0], [1.0, 0.2, -0.4]], jnp.float64)

        def loss(p, d):
            nz = noise.NeuronNoise(add_uncorrelated=d, add_correlated=0.5 * d, mul_uncorrelated=d, mul_correlated=d)
            return moments.output_variance(net, p, x, noise=nz, weight_noise_var=1e-3).sum()

        d0 = jnp.asarray(0.02, jnp.float64)
        gp, gd = jax.grad(loss, argnums=(0, 1))(params, d0)
        eps = 1e-6
        W = params[0][0]["W"]
        for idx in [(0, 0), (2, 3)]:
            bump = lambda e: (({"W": W.at[idx].add(e), "b": params[0][0]["b"]}, (), ()), params[1])  # noqa: E731
            fd = (loss(bump(eps), d0) - loss(bump(-eps), d0)) / (2 * eps)
            np.testing.assert_allclose(float(gp[0][0]["W"][idx]), float(fd), rtol=1e-5)
        fd = (loss(params, d0 + eps) - loss(params, d0 - eps)) / (2 * eps)
        np.testing.assert_allclose(float(gd), float(fd), rtol=1e-5)
        # gradients at zero noise are finite (safe square roots)
        g0 = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(0.0, jnp.float64))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(g0))


def test_validation_messages():
    net = layers.mlp([4, 3], "sigmoid")
    params = _dense_params([np.ones((4, 3))], [np.zeros(3)])
    x = jnp.ones(4)
    with pytest.raises(errors.InvalidArgumentError, match="method"):
        moments.predict(net, params, x, method="taylor")
    with pytest.raises(errors.InvalidArgumentError, match="covariance"):
        moments.predict(net, params, x, covariance="dense")
    with pytest.raises(errors.ShapeMismatchError, match="dimensions"):
        moments.predict(net, params, jnp.ones((2, 2, 4)))
    with pytest.raises(errors.InvalidArgumentError, match="noise"):
        moments.predict(net, params, x, noise={"add_uncorrelated": 1.0})
    with pytest.raises(errors.InvalidArgumentError, match="weight_noise_var"):
        moments.predict(net, params, x, weight_noise_var=-1.0)
    with pytest.raises(errors.InvalidArgumentError, match="finite"):
        moments.predict(net, params, jnp.array([1.0, np.nan, 0.0, 0.0]))
    with pytest.raises(errors.ShapeMismatchError, match="Dense moments"):
        moments.predict(net, params, jnp.ones(5))
    # a layer built on a primitive that has no moment rule (sort)
    custom = layers.serial(layers.Dense(3), layers.Layer(lambda k, s: (s, ()), lambda p, x, **kw: jnp.sort(x)))
    with pytest.raises(errors.InvalidArgumentError, match="moment rule"):
        moments.predict(custom, (params[0][0], ()), x, weight_noise_var=1e-3)
    with pytest.raises(errors.InvalidArgumentError, match="sites"):
        moments.predict(net, params, x, noise=[None, None])
