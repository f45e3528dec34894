"""Analytic moment propagation vs Monte Carlo on the same network and inputs (issue 3).

MLP 784-256-256-10 (sigmoid at every layer), all four neuron-noise types after every
layer, B inputs (default 100).  Both are measured in this one run, each after a
warm-up (compilation excluded; the compile times are reported separately), with
``block_until_ready()``:

* analytic: ``moments.predict`` (per-layer mean and variance of every neuron),
  median of ``--repeats`` (>= 5) runs, for the default (``gaussian`` activations,
  ``factored`` covariance: exact in the linear regime) and the other modes;
* Monte Carlo: ``simulate.monte_carlo`` with ``--realizations`` (default 10^4)
  realizations of the noisy forward pass over the same B inputs, statistics of
  every layer, median of ``--mc-repeats`` runs.

The headline ratio is MC / analytic (default mode).  The run also reports how far
the two estimates of each layer's noise variance are apart (with 10^4 realizations
the MC standard error of one neuron's variance is ~1.4 %).

Run:  python benchmarks/bench_analytic_vs_mc.py [--inputs 100 --realizations 10000 --repeats 7]
Writes benchmarks/results/analytic_vs_mc.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import layers, moments, noise, simulate

WIDTHS = (784, 256, 256, 10)
NOISE = dict(add_uncorrelated=1e-3, add_correlated=1e-4, mul_uncorrelated=1e-3, mul_correlated=1e-4)


def _timed(f, repeats):
    """(first call incl. compile, median of ``repeats`` warm calls, all warm times)."""
    t = time.perf_counter()
    jax.block_until_ready(f())
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--realizations", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=7, help="analytic repeats (median)")
    ap.add_argument("--mc-repeats", type=int, default=2, help="Monte Carlo repeats (median)")
    ap.add_argument("--tile-size", type=int, default=64, help="simulate.monte_carlo tile (64: CPU default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "analytic_vs_mc.json"))
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    net = layers.mlp(list(WIDTHS), "sigmoid")
    params = tuple(
        (
            {"W": jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i), jnp.float32), "b": jnp.asarray(0.1 * rng.normal(size=o), jnp.float32)},
            (),
            (),
        )
        for i, o in zip(WIDTHS[:-1], WIDTHS[1:])
    )
    X = jnp.asarray(rng.uniform(0.0, 1.0, size=(args.inputs, WIDTHS[0])), jnp.float32)
    nz = noise.NeuronNoise(**NOISE)

    # ---------------- analytic ----------------
    analytic = {}
    results = {}
    modes = [("gaussian", "factored"), ("gaussian", "lowrank"), ("linearized", "factored"), ("gaussian", "full")]
    for method, cov in modes:
        f = lambda: moments.predict(net, params, X, noise=nz, method=method, covariance=cov, keep_covariance=False)  # noqa: E731,B023
        first, med, times = _timed(f, args.repeats)
        analytic[f"{method}/{cov}"] = dict(first_call_s=first, median_s=med, times_s=times)
        results[f"{method}/{cov}"] = f()
        print(f"analytic {method:10s} {cov:8s}: median {med * 1e3:9.2f} ms   (first call incl. compile {first:6.2f} s)", flush=True)

    # ---------------- Monte Carlo ----------------
    def fn(key):
        return layers.apply_batch(net, params, X, key=key, noise=nz, return_layers=True)[1]

    key = jax.random.key(1)
    warm_n = min(args.realizations, 4 * args.tile_size * 8)  # same compiled chunk program as the timed runs
    t = time.perf_counter()
    jax.block_until_ready(simulate.monte_carlo(fn, key, warm_n, tile_size=args.tile_size).var)
    mc_warm = time.perf_counter() - t
    mc_times = []
    for r in range(args.mc_repeats):
        t = time.perf_counter()
        mc = simulate.monte_carlo(fn, jax.random.fold_in(key, r + 1), args.realizations, tile_size=args.tile_size)
        jax.block_until_ready(mc.var)
        mc_times.append(time.perf_counter() - t)
    mc_med = statistics.median(mc_times)
    print(f"Monte Carlo {args.realizations} realizations: median {mc_med:.2f} s (warm-up incl. compile {mc_warm:.2f} s)", flush=True)

    # ---------------- agreement ----------------
    agreement = {}
    for name, res in results.items():
        layers_ = []
        for l, (a, v_mc) in enumerate(zip(res, mc.var)):
            va, vm = np.asarray(a.var, np.float64), np.asarray(v_mc, np.float64)
            rel = np.abs(va / vm - 1)
            layers_.append(
                dict(
                    layer=l,
                    noise_power_rel_err=float(abs(va.sum() / vm.sum() - 1)),
                    neuron_rel_err_median=float(np.median(rel)),
                    neuron_rel_err_p99=float(np.quantile(rel, 0.99)),
                    snr_db_mc=float(10 * np.log10(np.square(np.asarray(mc.mean[l])).sum() / vm.sum())),
                )
            )
        agreement[name] = layers_
    se = float(np.sqrt(2 / (args.realizations - 1)))

    ratio = mc_med / analytic["gaussian/factored"]["median_s"]
    out = dict(
        network=list(WIDTHS),
        activation="sigmoid",
        noise=NOISE,
        inputs=args.inputs,
        realizations=args.realizations,
        device=str(jax.devices()[0]),
        backend=jax.default_backend(),
        cpu_count=os.cpu_count(),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        jax_version=jax.__version__,
        python=platform.python_version(),
        analytic=analytic,
        monte_carlo=dict(warmup_incl_compile_s=mc_warm, warmup_realizations=warm_n, times_s=mc_times, median_s=mc_med, tile_size=args.tile_size),
        ratio_mc_over_analytic=ratio,
        ratios_by_mode={k: mc_med / v["median_s"] for k, v in analytic.items()},
        mc_variance_rel_std_error=se,
        agreement=agreement,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"MC / analytic (gaussian, factored): {ratio:,.0f}x   (target >= 1000x)")
    for k, v in out["ratios_by_mode"].items():
        print(f"  {k:22s} {v:12,.0f}x")
    print(f"agreement with MC (per-neuron variance std. error {100 * se:.1f} %):")
    for k, ls in agreement.items():
        print("  " + k + ": " + "; ".join(f"L{d['layer']} power {100 * d['noise_power_rel_err']:.2f}% median {100 * d['neuron_rel_err_median']:.2f}%" for d in ls))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
