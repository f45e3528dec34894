"""The XLA:CPU miscompile guard (noisejax._backend) and noisejax's own avoidance of the pattern.

jaxlib 0.10.2's XLA:CPU computes garbage for a reduction feeding a conv/dot with a
broadcast-scalar kernel inside one YNNPACK fusion, under ``jit(vmap)``.  Importing
noisejax adds ``--xla_cpu_experimental_ynn_fusion_type=`` to ``XLA_FLAGS`` (affected
jaxlib, flag not set by the user, before the backend starts), and noisejax's moment
rules write the weight-noise term without that pattern.  Run this file with
``NOISEJAX_XLA_GUARD=0`` to see the bare-pattern tests fail on jaxlib 0.10.2.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import noisejax
from noisejax import _backend, layers, moments, noise, rules

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(W, x):
    return lax.conv_general_dilated(x[None], W, (1, 1), "SAME", dimension_numbers=_DN)[0]


def _jit_vmap_vs_eager(f, batched, shared):
    """Max relative difference between ``jit(vmap(f))`` and per-example eager calls."""
    got = np.asarray(jax.jit(jax.vmap(f, in_axes=(0, None)))(batched, shared))
    want = np.stack([np.asarray(f(batched[i], shared)) for i in range(batched.shape[0])])
    assert np.all(np.isfinite(want))
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# The two bare patterns, at sizes where jaxlib 0.10.2 takes the conv / dot into the YNNPACK
# fusion (measured here without the guard: relative errors of 2e33 and NaN).
def test_bare_conv_pattern_jit_vmap_matches_eager():
    F = jax.random.normal(jax.random.key(0), (16, 14, 14, 16, 16))
    c = jnp.float32(0.01)
    err = _jit_vmap_vs_eager(lambda F, c: _conv(jnp.full((3, 3, 16, 32), c), jnp.sum(F**2, -1)), F, c)
    assert err < 1e-5, f"conv(full(k.shape, c), sum(F**2, -1)): jit(vmap) vs eager relative error {err:.3g}"


def test_bare_dot_pattern_jit_vmap_matches_eager():
    F = jax.random.normal(jax.random.key(0), (16, 2000, 3))
    c = jnp.float32(0.01)
    err = _jit_vmap_vs_eager(lambda F, c: jnp.sum(F**2, -1) @ jnp.full((2000, 10), c), F, c)
    assert err < 1e-5, f"sum(F**2, -1) @ full((n, o), c): jit(vmap) vs eager relative error {err:.3g}"


def _conv_net():
    """Conv(16) → tanh → correlated noise → Conv(32) → tanh → Flatten → Dense(10): the second conv's
    weight-noise term convolves E[y²] = m² + d + Σ_r F_r² (a reduction) with σ²."""
    return layers.serial(
        layers.serial(layers.Conv(16, (3, 3)), layers.Tanh(), layers.NoiseSite()),
        layers.serial(layers.Conv(32, (3, 3)), layers.Tanh(), layers.NoiseSite()),
        layers.serial(layers.Flatten(), layers.Dense(10), layers.Sigmoid()),
    )


@pytest.mark.parametrize("which", ["conv", "dense"])
def test_weight_noise_moments_jit_vmap_match_eager(which):
    """moments.predict (jit of vmap over a batch) equals moments.propagate per example, eagerly,
    with scalar weight noise on the second Conv (or on the Dense after Flatten, 6272 features)."""
    net = _conv_net()
    _, params = net.init(jax.random.key(1), (14, 14, 3))
    x = jax.random.normal(jax.random.key(2), (8, 14, 14, 3))
    nz = noise.NeuronNoise(add_uncorrelated=1e-2, add_correlated=1e-3, mul_correlated=1e-3, correlated_axes=(0, 1))
    sites = [nz, nz]
    f32 = jnp.float32
    off = {"W": None, "b": None}
    wvar = (
        (off, (), ()),
        ({"W": f32(1e-2) if which == "conv" else None, "b": None}, (), ()),
        ((), {"W": f32(1e-2) if which == "dense" else None, "b": None}, ()),
    )
    got = moments.predict(net, params, x, noise=sites, weight_noise_var=wvar, covariance="lowrank")
    wrapped = moments.with_weight_noise(params, wvar)
    for i in (0, x.shape[0] - 1):  # the batch of 8 makes XLA take the fused path; two eager references suffice
        want = moments.propagate(net, wrapped, x[i], noise=sites, covariance="lowrank")
        for layer, (g, w) in enumerate(zip(got, want)):
            g_var, w_var = np.asarray(g.var[i]), np.asarray(w.var)
            assert np.all(np.isfinite(g_var)), f"layer {layer}: non-finite variance under jit(vmap)"
            np.testing.assert_allclose(g_var, w_var, rtol=1e-4, atol=1e-7, err_msg=f"example {i}, layer {layer}")


def test_window_sum_is_a_constant_kernel_convolution():
    """rules.window_sum (the pattern-free form) equals conv with ones, for strides, paddings and layouts."""
    rs = np.random.default_rng(0)
    for dn, x_shape, k_shape in ((_DN, (7, 9, 3), (3, 2, 3, 1)), (("NCHW", "OIHW", "NCHW"), (3, 7, 9), (1, 3, 3, 2))):
        x = jnp.asarray(rs.random(x_shape), jnp.float32)
        for pad in ("SAME", "VALID", ((1, 2), (0, 1))):
            for st in ((1, 1), (2, 3)):
                ref = lax.conv_general_dilated(x[None], jnp.asarray(np.ones(k_shape), jnp.float32), st, pad, dimension_numbers=dn)[0]
                np.testing.assert_allclose(rules.window_sum(x, k_shape, st, pad, dn), ref, rtol=1e-5)


# ---- the guard's decision (no backend involved: a fake environment) ------------------------


def test_guard_status_after_import():
    st = noisejax._backend.guard_status()
    assert st["status"] in ("applied", "already-applied", "user-set", "not-affected", "disabled", "too-late")
    if _backend.is_affected() and st["status"] in ("applied", "already-applied"):
        import os

        assert "--xla_cpu_experimental_ynn_fusion_type=" in os.environ["XLA_FLAGS"].split()


def test_guard_appends_once_and_respects_the_user(monkeypatch):
    monkeypatch.setattr(_backend, "jaxlib_version", lambda: (0, 10, 2))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert _backend.apply_xla_guard(env) == "applied"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type="
    for user in ("--xla_cpu_experimental_ynn_fusion_type=reduce", "--xla_cpu_experimental_ynn_fusion_type=-reduce"):
        env = {"XLA_FLAGS": user}
        assert _backend.apply_xla_guard(env) == "user-set" and env["XLA_FLAGS"] == user
    env = {"NOISEJAX_XLA_GUARD": "0"}
    assert _backend.apply_xla_guard(env) == "disabled" and "XLA_FLAGS" not in env
    monkeypatch.setattr(_backend, "jaxlib_version", lambda: (0, 10, 1))
    env = {}
    assert _backend.apply_xla_guard(env) == "not-affected" and "XLA_FLAGS" not in env
    monkeypatch.setattr(_backend, "jaxlib_version", lambda: (0, 12, 0))
    assert _backend.apply_xla_guard({}) == "not-affected"


def test_guard_is_too_late_once_a_backend_runs(monkeypatch):
    jnp.ones(1).block_until_ready()  # the test process's backend is running
    monkeypatch.setattr(_backend, "jaxlib_version", lambda: (0, 10, 2))
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("NOISEJAX_XLA_GUARD", raising=False)
    with pytest.warns(RuntimeWarning, match="cannot be applied"):
        assert _backend.apply_xla_guard() == "too-late"
    assert "ynn" not in __import__("os").environ["XLA_FLAGS"]


def test_version_parsing():
    assert _backend._parse_version("0.10.2") == (0, 10, 2)
    assert _backend._parse_version("0.11.0rc1") == (0, 11, 0)
    assert _backend._parse_version("1.0") == (1, 0, 0)
    assert _backend.is_affected((0, 10, 2)) and _backend.is_affected((0, 11, 3))
    assert not _backend.is_affected((0, 10, 1)) and not _backend.is_affected((0, 12, 0))


def _numpy_conv_var(x2, v, b_var, k=3):
    """Σ over the k×k window (SAME, stride 1) and input channels of σ²[dy, dx, c, o]·x²[y+dy−1, x+dx−1, c] + σ_b²."""
    H, W, C = x2.shape
    O = v.shape[-1]
    pad = np.zeros((H + k - 1, W + k - 1, C))
    pad[k // 2:k // 2 + H, k // 2:k // 2 + W] = x2
    out = np.zeros((H, W, O))
    for i in range(H):
        for j in range(W):
            out[i, j] = np.einsum("abc,abco->o", pad[i:i + k, j:j + k], v)
    return out + b_var


@pytest.mark.parametrize("kind", ["scalar", "per_output", "full"])
def test_conv_weight_noise_variance_against_numpy(kind):
    """A noise-free input through Conv with weight noise: Var = conv(σ², x²) + σ_b², written out in NumPy."""
    net = layers.serial(layers.Conv(4, (3, 3)), layers.Linear())
    _, p = net.init(jax.random.key(3), (5, 6, 2))
    x = np.asarray(jax.random.normal(jax.random.key(4), (5, 6, 2)), np.float64)
    rs = np.random.default_rng(0)
    v = {"scalar": np.float32(0.03), "per_output": rs.random(4).astype(np.float32) * 0.1,
         "full": rs.random((3, 3, 2, 4)).astype(np.float32) * 0.1}[kind]
    wvar = ({"W": jnp.asarray(v), "b": jnp.float32(0.002)}, ())
    got = np.asarray(moments.predict(net, p, jnp.asarray(x, jnp.float32), weight_noise_var=wvar)[-1].var)
    want = _numpy_conv_var(np.square(x), np.broadcast_to(np.asarray(v, np.float64), (3, 3, 2, 4)), 0.002)
    np.testing.assert_allclose(got, want, rtol=2e-5)


@pytest.mark.parametrize("kind", ["scalar", "per_output", "per_input", "full"])
def test_dense_weight_noise_variance_against_numpy(kind):
    net = layers.serial(layers.Dense(5), layers.Linear())
    _, p = net.init(jax.random.key(5), (7,))
    x = np.asarray(jax.random.normal(jax.random.key(6), (7,)), np.float64)
    rs = np.random.default_rng(1)
    v = {"scalar": np.float32(0.03), "per_output": rs.random(5).astype(np.float32), "per_input": rs.random((7, 1)).astype(np.float32),
         "full": rs.random((7, 5)).astype(np.float32)}[kind]
    got = np.asarray(moments.predict(net, p, jnp.asarray(x, jnp.float32), weight_noise_var=({"W": jnp.asarray(v), "b": None}, ()))[-1].var)
    np.testing.assert_allclose(got, np.square(x) @ np.broadcast_to(np.asarray(v, np.float64), (7, 5)), rtol=2e-5)


def test_use_host_devices_sets_a_power_of_two_once():
    from noisejax import _backend

    env = {}
    assert _backend.use_host_devices(environ=env) in ("set", "single-core")
    if env:
        n = int(env["XLA_FLAGS"].split("=")[1])
        assert n >= 2 and n & (n - 1) == 0 and n <= 8  # the engine's default 8 streams stay divisible
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    assert _backend.use_host_devices(environ=env) == "user-set" and env["XLA_FLAGS"].endswith("=3")
    env = {"XLA_FLAGS": "--foo"}
    assert _backend.use_host_devices(4, environ=env) == "set" and env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert _backend.use_host_devices(1, environ={}) == "single-core"
