"""Plant plausible bugs in a copy of noisejax, one at a time, and report which test catches each.

Not part of CI (it runs the relevant tests once per bug: ~10-20 minutes on 2 cores).  The
repository is never modified: ``noisejax/`` and ``tests/`` are copied to a temporary
folder, each bug is a single exact text replacement in one core module (noise, simulate,
rng, moments, denoise, layers), the tests named for it run with ``-x`` against the copy
(``PYTHONPATH`` points there), and the file is restored before the next bug.

    python tools/mutations.py            # all bugs, prints a Markdown table
    python tools/mutations.py --only 1,4 # some of them
    python tools/mutations.py --list     # the bugs without running anything

A bug that no listed test catches is reported as SURVIVED (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    module: str  # file under noisejax/
    bug: str  # what the planted bug does, in words
    old: str  # exact text (must occur once)
    new: str
    tests: tuple[str, ...]  # pytest node ids / files to run


MUTATIONS = (
    # ---- the five bugs of issue 17 ------------------------------------------------------------
    Mutation("simulate.py", "stream merge drops the leftover accumulator for an odd stream count",
             "        if k % 2:\n            rest =", "        if False:\n            rest =",
             ("tests/test_core_mc.py::test_any_stream_count_keeps_every_realization",)),
    Mutation("denoise.py", "compensated MMSE: β's sign flipped in the fallback branch (η+1−λ' <= 0)",
             "rho = jnp.where(ok, _safe_div(v * beta_, denom), beta_ * p)",
             "rho = jnp.where(ok, _safe_div(v * beta_, denom), -beta_ * p)",
             ("tests/test_denoise.py",)),
    Mutation("rng.py", "rng.fold_in(k, i) made equal to split(k)[i]",
             "return _derive(key, _u32(data), _FOLD)", "return _derive(key, _u32(data), _SPLIT)",
             ("tests/test_rng.py",)),
    Mutation("noise.py", "one key reused for every weight leaf",
             "n = jax.random.normal(jax.random.fold_in(key, k), leaf.shape, leaf.dtype)",
             "n = jax.random.normal(jax.random.fold_in(key, 0), leaf.shape, leaf.dtype)",
             ("tests/test_weight_noise.py", "tests/test_denoise.py")),
    Mutation("noise.py", "quantization step Δ = max|w| / (L + 1) instead of max|w| / L",
             "step = jnp.max(jnp.abs(leaf)) / levels", "step = jnp.max(jnp.abs(leaf)) / (levels + 1)",
             ("tests/test_weight_noise.py",)),
    # ---- more plausible bugs in the core ------------------------------------------------------
    Mutation("layers.py", "WeightNoiseDense: bias variance ignored (weight variance used for the bias)",
             "return noise.variance if noise.bias_variance is None else noise.bias_variance",
             "return noise.variance",
             ("tests/test_weight_noise_local.py",)),
    Mutation("moments.py", "Dense weight-noise term uses E[y]² instead of E[y²] = m² + var",
             "term = _dense_weight_noise_term(jnp.square(m) + state.var, w_var, W.shape)",
             "term = _dense_weight_noise_term(jnp.square(m), w_var, W.shape)",
             ("tests/test_moments.py::test_linear_network_matches_numpy_covariance_propagation",)),
    Mutation("moments.py", "Conv weight-noise term: per-output variance not applied (scalar/per-channel path)",
             "        return ws * per_out.reshape([n_out if a == feat else 1 for a in range(ws.ndim)])",
             "        return jnp.broadcast_to(ws, ws.shape[:-1] + (n_out,))",
             ("tests/test_backend_guard.py",)),
    Mutation("moments.py", "neuron-noise rule: ξ_MU term uses m² instead of E[y²] = m² + var",
             "new_diag = _add(new_diag, d_mu * (jnp.square(m) + var))", "new_diag = _add(new_diag, d_mu * jnp.square(m))",
             ("tests/test_moments.py::test_linear_network_matches_numpy_covariance_propagation",)),
    Mutation("moments.py", "gaussian activation rule scales the factors by g² instead of g",
             "factors = None if state.factors is None else state.factors * g[..., None]",
             "factors = None if state.factors is None else state.factors * jnp.square(g)[..., None]",
             ("tests/test_moments.py::test_factored_and_full_covariance_agree_through_nonlinearities",
              "tests/test_moments.py::test_linear_network_matches_numpy_covariance_propagation")),
    Mutation("noise.py", "correlated additive noise drawn per neuron (shape of y instead of the shared shape)",
             "out = out + draw(_TAG_AC, noise.add_correlated, corr_shape)",
             "out = out + draw(_TAG_AC, noise.add_correlated, y.shape)",
             ("tests/test_core_mc.py",)),
    Mutation("noise.py", "multiplicative weight noise with std D instead of √D",
             "return leaf * (1 + jnp.sqrt(self.variance).astype(leaf.dtype) * eps)",
             "return leaf * (1 + self.variance.astype(leaf.dtype) * eps)",
             ("tests/test_weight_noise.py",)),
    Mutation("noise.py", "stochastic rounding biased (floor(x + u/2))",
             "q = jnp.floor(scaled + jax.random.uniform(jax.random.fold_in(key, k), leaf.shape, leaf.dtype))",
             "q = jnp.floor(scaled + 0.5 * jax.random.uniform(jax.random.fold_in(key, k), leaf.shape, leaf.dtype))",
             ("tests/test_weight_noise.py",)),
    Mutation("noise.py", "power reference computed as the variance",
             '    if reference == "power":\n        return sum(jnp.sum(jnp.square(leaf)) for leaf in leaves) / n',
             '    if reference == "power_":\n        return sum(jnp.sum(jnp.square(leaf)) for leaf in leaves) / n',
             ("tests/test_denoise.py",)),
    Mutation("noise.py", "default leaf filter: PyTorch Conv-BN pair (shortcut.1 / downsample.1) no longer skipped",
             'if tok == "1" and prev in _CONV_BN_CONTAINERS:', 'if tok == "2" and prev in _CONV_BN_CONTAINERS:',
             ("tests/test_leaf_filters.py",)),
    Mutation("simulate.py", "Chan merge drops the δ² n_a n_b / n term",
             "m2 = (m2a + m2b) + bar(bar(jnp.square(delta)) * bar(bar(na * nb) * inv))", "m2 = (m2a + m2b)",
             ("tests/test_core_mc.py",)),
    Mutation("simulate.py", "biased variance (divides by n instead of n − 1)",
             "m2 / jnp.maximum(state.count - 1, 1).astype(m2.dtype)", "m2 / jnp.maximum(state.count, 1).astype(m2.dtype)",
             ("tests/test_core_mc.py",)),
    Mutation("simulate.py", "tile mask off by one (realization n counted)",
             "valid = (idx >= start) & (idx < stop)", "valid = (idx >= start) & (idx <= stop)",
             ("tests/test_core_mc.py",)),
    Mutation("rng.py", "random bits ignore the second key word",
             "    bits = _hash(k0, k1, c).reshape(shape)", "    bits = _hash(k0, k0, c).reshape(shape)",
             ("tests/test_rng.py",)),
    Mutation("denoise.py", "mmse_pb: λ' dropped from the denominator (η + 1)",
             "denom = eta + (1.0 - lam_)  # (1 − λ') first", "denom = eta + 1.0  # (1 − λ') first",
             ("tests/test_denoise.py",)),
    Mutation("denoise.py", "MMSE gain σ²/(σ_w² + σ²) instead of σ_w²/(σ_w² + σ²)",
             "theta = _safe_div(v, v + p)", "theta = _safe_div(p, v + p)",
             ("tests/test_denoise.py",)),
)


def _copy_tree(dst: str) -> None:
    for name in ("noisejax", "tests", "docs"):
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, name), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), dst)


def _pytest(copy: str, tests: tuple[str, ...], timeout: int) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=copy, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--tb=line", "-rf", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        return -1, f"timeout after {timeout} s\n{e.stdout or ''}", time.perf_counter() - t0


def _first_failure(output: str) -> str:
    m = re.search(r"^FAILED (\S+)", output, re.M)
    if m:
        return m.group(1).split(" - ")[0]
    m = re.search(r"^ERROR (\S+)", output, re.M)
    return f"ERROR {m.group(1)}" if m else "(no test id; see output)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated bug numbers (1-based)")
    p.add_argument("--list", action="store_true", help="list the bugs and exit")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = p.parse_args(argv)
    chosen = list(range(1, len(MUTATIONS) + 1)) if args.only is None else [int(i) for i in args.only.split(",")]
    if args.list:
        for i in chosen:
            m = MUTATIONS[i - 1]
            print(f"{i:>2}. noisejax/{m.module}: {m.bug}")
        return 0
    survived = 0
    with tempfile.TemporaryDirectory(prefix="noisejax-mutants-") as copy:
        _copy_tree(copy)
        for i in chosen:  # every planted text must exist exactly once before anything runs
            m = MUTATIONS[i - 1]
            n = open(os.path.join(copy, "noisejax", m.module)).read().count(m.old)
            if n != 1:
                raise SystemExit(f"bug {i}: the text to replace occurs {n} times in noisejax/{m.module}")
        union = tuple(sorted({t for i in chosen for t in MUTATIONS[i - 1].tests}))
        rc, out, secs = _pytest(copy, union, args.timeout * 3)
        if rc != 0:
            print(out[-3000:])
            raise SystemExit("the unmutated copy does not pass its tests; fix that first")
        print(f"baseline: {len(union)} test targets pass on the unmutated copy ({secs:.0f} s)\n")
        print("| # | module | planted bug | caught by | time |")
        print("|---|---|---|---|---|")
        for i in chosen:
            m = MUTATIONS[i - 1]
            path = os.path.join(copy, "noisejax", m.module)
            original = open(path).read()
            try:
                with open(path, "w") as f:
                    f.write(original.replace(m.old, m.new, 1))
                rc, out, secs = _pytest(copy, m.tests, args.timeout)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            if rc == 0:
                caught = "**SURVIVED**"
                survived += 1
            elif rc == -1:
                caught = "timeout"
            else:
                caught = f"`{_first_failure(out)}`"
            print(f"| {i} | {m.module[:-3]} | {m.bug} | {caught} | {secs:.0f} s |", flush=True)
    print(f"\n{len(chosen) - survived} of {len(chosen)} planted bugs caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
