"""Does this backend compute noisejax's kernels right?  ``noisejax.selfcheck()`` / ``noisejax selfcheck``.

Run it first on a new machine (a GPU, a TPU pod, a new jaxlib): in well under a minute
it runs a registry of named checks on the default backend and all its devices and
prints a table; the CLI exits non-zero when a check fails.

==========================  ===============================================================
check                       what it compares
==========================  ===============================================================
``xla-guard``               the backend guard of :mod:`noisejax._backend` (warn if it could not act)
``known-miscompiles``       the bare patterns XLA:CPU 0.10.2 miscompiled: a reduction feeding a
                            conv / dot with a broadcast-scalar kernel, ``jit(vmap)`` vs eager
``moments-jit-vs-eager``    :func:`noisejax.moments.predict` (jit of vmap) vs
                            :func:`~noisejax.moments.propagate` per example, op by op: an MLP with
                            the four neuron-noise types and weight noise, a CNN with Conv weight noise
``prng-reference``          noisejax's counter-based PRNG bits (jit and eager) vs a NumPy transcription
``prng-statistics``         its normals: mean, variance, skewness, kurtosis, tail mass, bit balance,
                            correlation between ``fold_in`` streams (6σ bounds)
``mc-invariance``           :func:`noisejax.simulate.monte_carlo` is bitwise the same for two chunk
                            sizes and for all devices vs one device (``streams = 3 × devices``, a
                            partial last tile); the count is exact
``analytic-vs-mc``          exact moments of a one-noisy-layer network vs Monte Carlo (5σ bounds)
==========================  ===============================================================

Checks are plain functions registered by name (:func:`register`); one returns a short
detail string when it passes and raises :class:`CheckFailed` (or any exception) when it
does not; :class:`CheckWarning` marks a non-fatal finding.  Add one with::

    @selfcheck.register("my-check", "what it compares")
    def _my_check():
        ...
        return "max |Δ| 1e-7"

Example::

    >>> import noisejax
    >>> report = noisejax.selfcheck()          # prints the table
    >>> report.ok
    True
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import types
from typing import Callable, Optional, Sequence

import numpy as np

from noisejax.errors import InvalidArgumentError

__all__ = ["CheckFailed", "CheckWarning", "CheckResult", "Report", "register", "CHECKS", "run", "format_table", "selfcheck"]


class CheckFailed(AssertionError):
    """A check found a wrong result (its message is the table's detail)."""


class CheckWarning(Exception):
    """A check found something worth a look that is not a wrong result."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # "pass" | "fail" | "warn"
    detail: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Report:
    """All results plus what they ran on; ``ok`` is False when any check failed."""

    results: tuple[CheckResult, ...]
    platform: str
    devices: tuple[str, ...]
    versions: str
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.status != "fail" for r in self.results)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "platform": self.platform, "devices": list(self.devices), "versions": self.versions,
                "seconds": self.seconds, "checks": [dataclasses.asdict(r) for r in self.results]}


#: name -> (function, description), in registration order (the table's order)
CHECKS: dict[str, tuple[Callable[[], str], str]] = {}


def register(name: str, description: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Decorator adding a check ``fn() -> detail`` to :data:`CHECKS` under ``name``."""

    def deco(fn):
        CHECKS[name] = (fn, description)
        return fn

    return deco


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return math.inf
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# ----------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------


@register("xla-guard", "noisejax._backend: XLA flag against the jaxlib 0.10.2 CPU miscompile")
def _check_guard() -> str:
    from noisejax import _backend

    st = _backend.guard_status()
    detail = f"{st['status']} (jaxlib {st['jaxlib']})"
    if st["status"] in ("too-late", "disabled") and _backend.is_affected():
        raise CheckWarning(detail + ": affected jaxlib, flag not set; see known-miscompiles")
    return detail


def _jit_vmap_vs_eager(f, batched, shared) -> float:
    """``jit(vmap(f))`` vs ``vmap(f)`` run op by op (each primitive its own computation: no fusion)."""
    import jax

    got = jax.jit(jax.vmap(f, in_axes=(0, None)))(batched, shared)
    want = jax.vmap(f, in_axes=(0, None))(batched, shared)
    return _rel(got, want)


@register("known-miscompiles", "reduction -> conv/dot with a broadcast-scalar kernel, jit(vmap) vs eager")
def _check_known_patterns() -> str:
    import jax
    import jax.numpy as jnp
    from jax import lax

    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda W, x: lax.conv_general_dilated(x[None], W, (1, 1), "SAME", dimension_numbers=dn)[0]  # noqa: E731
    c = jnp.float32(0.01)
    F = jax.random.normal(jax.random.key(0), (16, 14, 14, 16, 16))
    e_conv = _jit_vmap_vs_eager(lambda F, c: conv(jnp.full((3, 3, 16, 32), c), jnp.sum(F**2, -1)), F, c)
    G = jax.random.normal(jax.random.key(1), (16, 2000, 3))
    e_dot = _jit_vmap_vs_eager(lambda G, c: jnp.sum(G**2, -1) @ jnp.full((2000, 10), c), G, c)
    detail = f"conv rel. err {e_conv:.1e}, dot rel. err {e_dot:.1e}"
    _require(e_conv < 1e-4 and e_dot < 1e-4, detail + " (set XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= on jaxlib 0.10.2)")
    return detail


@register("moments-jit-vs-eager", "moments.predict (jit of vmap) vs moments.propagate op by op: MLP and CNN")
def _check_moments() -> str:
    import jax
    import jax.numpy as jnp

    from noisejax import layers, moments, noise

    worst = []
    nz = noise.NeuronNoise(add_uncorrelated=1e-2, add_correlated=1e-3, mul_uncorrelated=1e-3, mul_correlated=1e-3)
    mlp = layers.mlp([12, 16, 4], "tanh", "linear")
    _, p = mlp.init(jax.random.key(0), (12,))
    x = jax.random.normal(jax.random.key(1), (2, 12))
    for cov in ("factored",):
        got = moments.predict(mlp, p, x, noise=nz, weight_noise_var=1e-3, covariance=cov)
        for i in range(x.shape[0]):
            want = moments.propagate(mlp, p, x[i], noise=nz, weight_noise_var=jnp.float32(1e-3), covariance=cov)
            worst += [_rel(g.var[i], w.var) for g, w in zip(got, want)] + [_rel(g.mean[i], w.mean) for g, w in zip(got, want)]
    cnn = layers.serial(
        # linear activations: the nonlinear rules are covered by the MLP above, and each of their
        # many primitives costs a compilation in op-by-op mode
        layers.serial(layers.Conv(16, (3, 3)), layers.Linear(0.5), layers.NoiseSite()),
        layers.serial(layers.Conv(32, (3, 3)), layers.Linear(0.5), layers.NoiseSite()),
        layers.serial(layers.Flatten(), layers.Dense(10), layers.Linear()),
    )
    _, cp = cnn.init(jax.random.key(2), (14, 14, 3))
    cx = jax.random.normal(jax.random.key(3), (8, 14, 14, 3))  # a batch of 8: XLA:CPU 0.10.2 fuses the pattern
    cnz = noise.NeuronNoise(add_uncorrelated=1e-2, add_correlated=1e-3, correlated_axes=(0, 1))
    got = moments.predict(cnn, cp, cx, noise=[cnz, cnz], weight_noise_var=1e-2, covariance="lowrank")
    for i in (0, cx.shape[0] - 1):
        want = moments.propagate(cnn, cp, cx[i], noise=[cnz, cnz], weight_noise_var=jnp.float32(1e-2), covariance="lowrank")
        worst += [_rel(g.var[i], w.var) for g, w in zip(got, want)]
    err = max(worst)
    detail = f"max rel. difference {err:.1e} over {len(worst)} layer statistics"
    _require(err < 1e-4, detail)
    return detail


# an independent transcription of noisejax.rng (fmix32 hash keyed by two words)
_M32 = 0xFFFFFFFF


def _np_fmix32(h):
    h = h ^ (h >> np.uint32(16))
    h = (h * np.uint32(0x85EBCA6B)) & _M32
    h = h ^ (h >> np.uint32(13))
    h = (h * np.uint32(0xC2B2AE35)) & _M32
    return h ^ (h >> np.uint32(16))


def _np_hash(k0, k1, c):
    with np.errstate(over="ignore"):
        c = np.asarray(c, np.uint32)
        return _np_fmix32((_np_fmix32((c * np.uint32(0x9E3779B9)) ^ np.uint32(k0)) + np.uint32(k1)).astype(np.uint32))


def _np_key(seed: int):
    lo, hi = np.uint32(seed & _M32), np.uint32(0)
    return np.uint32(_np_hash(lo, 0x27D4EB2F, hi)), np.uint32(_np_hash(hi, lo, 0x27D4EB2F))


def _np_fold_in(key, data: int):
    k0, k1 = key
    with np.errstate(over="ignore"):
        return (np.uint32(_np_hash(k0 ^ np.uint32(0x85EBCA77), k1, data)),
                np.uint32(_np_hash(k1, np.uint32(k0 + np.uint32(0x85EBCA77)), np.uint32(data) ^ np.uint32(0x5BD1E995))))


@register("prng-reference", "noisejax.rng bits (jit and eager) vs a NumPy transcription of the hash")
def _check_prng_reference() -> str:
    import jax
    import jax.numpy as jnp

    from noisejax import rng

    n = 4096
    checked = 0
    for seed, fold in ((0, None), (12345, 7), (2**31 - 1, 123456)):
        key = rng.key(seed)
        ref_key = _np_key(seed)
        if fold is not None:
            key = jax.random.fold_in(key, fold)
            ref_key = _np_fold_in(ref_key, fold)
        want = _np_hash(ref_key[0], ref_key[1], np.arange(n, dtype=np.uint32))
        eager = np.asarray(jax.random.bits(key, (n,), jnp.uint32))
        jitted = np.asarray(jax.jit(lambda k: jax.random.bits(k, (n,), jnp.uint32))(key))
        _require(np.array_equal(eager, want), f"seed {seed}: eager bits differ from the reference")
        _require(np.array_equal(jitted, want), f"seed {seed}: jit bits differ from the reference")
        checked += 2 * n
    return f"{checked} words bitwise equal"


@register("prng-statistics", "noisejax.rng normals: moments, tails, bit balance, stream correlation (6σ)")
def _check_prng_statistics() -> str:
    import jax
    import jax.numpy as jnp

    from noisejax import rng

    n = 1 << 18
    z = np.asarray(jax.jit(lambda k: jax.random.normal(k, (n,)))(rng.key(11)), np.float64)
    se = 1 / math.sqrt(n)
    stats = {
        "mean": (z.mean(), 0.0, se),
        "var": (z.var(), 1.0, math.sqrt(2) * se),
        "skew": (np.mean(z**3), 0.0, math.sqrt(15) * se),
        "kurt": (np.mean(z**4), 3.0, math.sqrt(96) * se),
        "P(|z|>3)": (np.mean(np.abs(z) > 3), 0.0026998, math.sqrt(0.0027 * 0.9973 / n)),
    }
    worst = 0.0
    for name, (got, want, sd) in stats.items():
        k = abs(got - want) / sd
        worst = max(worst, k)
        _require(k < 6, f"{name} = {got:.5g}, expected {want} ({k:.1f} σ away)")
    bits = np.asarray(jax.random.bits(rng.key(12), (n,), jnp.uint32))
    ones = np.unpackbits(bits.view(np.uint8)).reshape(n, 32).mean(0)
    kb = float(np.max(np.abs(ones - 0.5)) / (0.5 / math.sqrt(n)))
    _require(kb < 6 + math.sqrt(2 * math.log(32)), f"bit balance {kb:.1f} σ off")
    key = rng.key(13)
    m = 2048
    s = np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (64,)))(jnp.arange(m)), np.float64)
    r = np.corrcoef(s[:-1].ravel(), s[1:].ravel())[0, 1]
    kr = abs(r) * math.sqrt(s[:-1].size)
    _require(kr < 6, f"correlation of adjacent fold_in streams {r:.2e} ({kr:.1f} σ)")
    return f"{n} normals, worst statistic {max(worst, kr):.1f} σ, bits {kb:.1f} σ"


@register("mc-invariance", "simulate.monte_carlo: bitwise equal across chunk sizes and device counts")
def _check_mc_invariance() -> str:
    import jax

    from noisejax import layers, noise, rng, simulate

    devices = jax.devices()
    net = layers.mlp([8, 16, 4], "tanh")
    _, params = net.init(jax.random.key(0), (8,))
    x = jax.random.normal(jax.random.key(1), (3, 8))
    nz = noise.NeuronNoise(add_uncorrelated=1e-2, mul_correlated=1e-3)

    def fn(k):
        return layers.apply_batch(net, params, x, key=k, noise=nz)

    n, tile, streams = 1000, 64, 3 * len(devices)  # a partial last tile; a non-power-of-two stream count
    key = rng.key(5)
    runs = {
        f"{len(devices)} dev, chunk 128": simulate.monte_carlo(fn, key, n, tile_size=tile, streams=streams, chunk_size=128),
        f"{len(devices)} dev, chunk 640": simulate.monte_carlo(fn, key, n, tile_size=tile, streams=streams, chunk_size=640),
        "1 dev, default chunk": simulate.monte_carlo(fn, key, n, tile_size=tile, streams=streams, devices=devices[:1]),
    }
    ref_name, ref = next(iter(runs.items()))
    for name, res in runs.items():
        _require(int(res.count) == n, f"{name}: count {int(res.count)}, expected {n}")
        for field in ("mean", "var"):
            a, b = np.asarray(getattr(ref, field)), np.asarray(getattr(res, field))
            _require(np.array_equal(a, b), f"{name} vs {ref_name}: {field} differs by {np.max(np.abs(a - b)):.2e}")
    return f"{len(runs)} runs bitwise equal, {len(devices)} device(s), streams={streams}, count={n}"


@register("analytic-vs-mc", "exact moments of a one-noisy-layer network vs Monte Carlo (5σ)")
def _check_analytic_vs_mc() -> str:
    import jax

    from noisejax import layers, moments, noise, rng, simulate

    net = layers.mlp([16, 32, 3], "sigmoid", "linear")
    _, params = net.init(jax.random.key(2), (16,))
    x = jax.random.normal(jax.random.key(3), (16,))
    v = 1e-2
    sites = [noise.NeuronNoise(add_uncorrelated=v, add_correlated=v, mul_uncorrelated=v, mul_correlated=v), None]
    n = 1 << 15
    mc = simulate.monte_carlo(lambda k: net.apply(params, x, key=k, noise=sites), rng.key(4), n)
    an = moments.predict(net, params, x, noise=sites)[-1]
    m_mc, v_mc = np.asarray(mc.mean, np.float64), np.asarray(mc.var, np.float64)
    m_an, v_an = np.asarray(an.mean, np.float64), np.asarray(an.var, np.float64)
    z_mean = float(np.max(np.abs(m_mc - m_an) / np.sqrt(v_an / n)))
    # sd of a sample variance: v·sqrt((κ − 1)/n), κ ≤ 9 for these products of Gaussians
    z_var = float(np.max(np.abs(v_mc - v_an) / (v_an * math.sqrt(8.0 / n))))
    detail = f"{n} realizations: mean {z_mean:.1f} σ, variance {z_var:.1f} σ"
    _require(z_mean < 5 and z_var < 5, detail)
    return detail


# ----------------------------------------------------------------------------------
# running and printing
# ----------------------------------------------------------------------------------


def run(names: Optional[Sequence[str]] = None) -> Report:
    """Run the checks ``names`` (default: all of :data:`CHECKS`, in order); never raises for a failed check."""
    import jax
    import jaxlib

    if names is None:
        names = list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise InvalidArgumentError(f"unknown check(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(CHECKS)}")
    t_all = time.perf_counter()
    results = []
    for name in names:
        fn, _ = CHECKS[name]
        t0 = time.perf_counter()
        try:
            status, detail = "pass", str(fn())
        except CheckWarning as w:
            status, detail = "warn", str(w)
        except Exception as e:  # a crash is a failure too (a backend that cannot run the kernel)
            status, detail = "fail", (str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}").splitlines()[0]
        results.append(CheckResult(name, status, detail, time.perf_counter() - t0))
    devices = tuple(str(d) for d in jax.devices())
    return Report(tuple(results), jax.default_backend(), devices,
                  f"jax {jax.__version__}, jaxlib {jaxlib.__version__}", time.perf_counter() - t_all)


def format_table(report: Report) -> str:
    """The report as a text table with a header line and a verdict line."""
    devs = report.devices
    shown = ", ".join(devs[:4]) + (f", … ({len(devs)} in all)" if len(devs) > 4 else "")
    lines = [f"noisejax selfcheck: {report.versions}; backend {report.platform}, {len(devs)} device(s): {shown}"]
    width = max(len(r.name) for r in report.results) if report.results else 5
    lines.append(f"{'check':<{width}}  result  {'time':>6}  detail")
    for r in report.results:
        lines.append(f"{r.name:<{width}}  {r.status.upper():<6}  {r.seconds:>5.1f}s  {r.detail}")
    failed = [r.name for r in report.results if r.status == "fail"]
    verdict = f"FAILED: {', '.join(failed)}" if failed else f"all {len(report.results)} checks passed"
    lines.append(f"{verdict} ({report.seconds:.1f} s)")
    return "\n".join(lines)


def selfcheck(names: Optional[Sequence[str]] = None, *, verbose: bool = True) -> Report:
    """Run the checks and (``verbose``) print the table; ``noisejax.selfcheck()`` calls this."""
    report = run(names)
    if verbose:
        print(format_table(report))
    return report


class _CallableModule(types.ModuleType):
    """``noisejax.selfcheck`` is this module and, called, :func:`selfcheck`."""

    def __call__(self, names: Optional[Sequence[str]] = None, *, verbose: bool = True) -> Report:
        return selfcheck(names, verbose=verbose)


sys.modules[__name__].__class__ = _CallableModule
