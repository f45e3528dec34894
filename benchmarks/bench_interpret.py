"""noisejax.analytic vs Monte Carlo through noisejax.noisy on an unmodified Flax CNN (issue 12).

The CNN of Flax's MNIST example (Conv 32 → relu → avg_pool → Conv 64 → relu →
avg_pool → Dense 256 → relu → Dense 10) on B 8×8 digits (default 100), noise after
every activation; one case per noise model (additive uncorrelated neuron noise,
correlated multiplicative neuron noise, additive kernel noise at 20 dB).  Both
sides are measured in this one run, after a warm-up, with ``block_until_ready()``:

* analytic: ``noisejax.analytic(model.apply, ...)(variables, x)`` — per-logit mean
  and variance; trace time (``jax.make_jaxpr`` + site analysis), compile time
  (first call minus a warm call) and the median of ``--repeats`` warm calls;
* Monte Carlo: ``simulate.monte_carlo(lambda k: noisy_fn(k, variables, x), key, R)``
  with ``--realizations`` R (default 10⁴: the standard error of one logit's
  variance is then ≈ 1.4 %, the precision the analytic side is compared at),
  median of ``--mc-repeats`` warm runs.

Reports MC / analytic (warm) and how far the two variance estimates are apart.

Run:  python benchmarks/bench_interpret.py [--inputs 100 --realizations 10000]
Writes benchmarks/results/cpu/interpret_cpu.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import noisejax
from noisejax import data, interpret, noise, rng, simulate
from noisejax.study.models import CNN  # Flax's MNIST example, verbatim


def _kernels(path, leaf):
    return "kernel" in noise.path_names(path)


CASES = {
    "AU 1e-3 after every activation": dict(neuron=noise.NeuronNoise(add_uncorrelated=1e-3)),
    "MC 1e-3 after every activation": dict(neuron=noise.NeuronNoise(mul_correlated=1e-3)),
    "kernel noise 20 dB": dict(weight=noise.AdditiveWeightNoise(20.0, leaf_filter=_kernels)),
}


def _timed(f, repeats):
    """(first call incl. compile, median of ``repeats`` warm calls): ``bench_analytic_vs_mc``'s timer."""
    from bench_analytic_vs_mc import _timed as timed  # a sibling script (benchmarks/ is on sys.path)

    return timed(f, repeats)[:2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--realizations", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5, help="analytic warm repeats (median)")
    ap.add_argument("--mc-repeats", type=int, default=2, help="Monte Carlo warm repeats (median)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu" / "interpret_cpu.json")
    args = ap.parse_args(argv)

    ds = data.load_digits(seed=0)
    x = jnp.asarray(ds.x_test[: args.inputs].reshape(-1, 8, 8, 1) / 16.0, jnp.float32)
    model = CNN()
    variables = model.init(jax.random.key(0), x[:1])
    rows = []
    for name, kw in CASES.items():
        t = time.perf_counter()
        interpret._trace(model.apply, (variables, x[:1]), 0, {})
        trace_s = time.perf_counter() - t
        af = noisejax.analytic(model.apply, **kw)
        first_a, warm_a = _timed(lambda: af(variables, x).var, args.repeats)
        nf = noisejax.noisy(model.apply, **kw)
        fn = lambda k: nf(k, variables, x)  # noqa: E731
        first_m, warm_m = _timed(lambda: simulate.monte_carlo(fn, rng.key(1), args.realizations).var, args.mc_repeats)
        pred = af(variables, x)
        res = simulate.monte_carlo(fn, rng.key(1), args.realizations)
        err = np.abs(np.asarray(pred.var) / np.asarray(res.var) - 1.0).ravel()
        row = dict(
            case=name,
            analytic_trace_s=trace_s,
            analytic_compile_s=max(first_a - warm_a, 0.0),
            analytic_warm_s=warm_a,
            mc_compile_s=max(first_m - warm_m, 0.0),
            mc_warm_s=warm_m,
            mc_over_analytic=warm_m / warm_a,
            var_rel_diff_median=float(np.median(err)),
            var_rel_diff_p90=float(np.quantile(err, 0.9)),
            mc_var_rel_stderr=float(np.sqrt(2.0 / args.realizations)),
        )
        rows.append(row)
        print(
            f"{name:32s} analytic {warm_a * 1e3:8.1f} ms (trace {trace_s:.2f} s, compile {row['analytic_compile_s']:.1f} s) | "
            f"MC R={args.realizations} {warm_m:7.2f} s | MC/analytic {row['mc_over_analytic']:7.0f}x | "
            f"|Δvar|/var median {row['var_rel_diff_median']:.3f} (MC s.e. {row['mc_var_rel_stderr']:.3f})"
        )
    out = dict(
        inputs=args.inputs,
        realizations=args.realizations,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), backend=jax.default_backend(), jax=jax.__version__,
                     load=os.getloadavg()),
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
