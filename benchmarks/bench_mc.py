"""Neuron-noise Monte Carlo vs its limit, the clean forward pass (issues 2 and 7).

MLP 784-256-256-10 (sigmoid), noise after every layer, R realizations × B inputs.
Every case is timed in the same run as the baseline — the clean forward of the
same R·B rows — after a warm-up, with ``block_until_ready()``, median of
``--repeats`` runs.  Ratios, not seconds, are the result.

Cases
  clean            clean forward of R·B rows (the limit the issue names)
  clean-shared-input  the first layer once on the B inputs, the rest on R·B rows: the
                   limit when every realization sees the same inputs (the noisy
                   cases get this for free: vmap leaves the noise-free first layer
                   unbatched)
  <gen>/<noise>    noisy forward, vmapped over R realization keys, for each PRNG
                   generator (threefry = JAX default, fast = noisejax.rng) and
                   noise set (AU only, all four types, correlated only)
  mc/<gen>/<noise> the same through ``simulate.monte_carlo`` (streamed statistics
                   of every layer, the engine's defaults: tiles of 64 realizations,
                   8 streams); "engine / forward" is its ratio to <gen>/<noise>
  mc-1tile/...     the engine with one tile of all R realizations (tile_size=R, streams=1)
  torch-loop/...   PyTorch, a Python loop over realizations (what users of
                   hardware-noise simulators write), if torch is installed
  torch-batched/.. PyTorch, all realizations in one batched pass

Run:  python benchmarks/bench_mc.py [--realizations 1000 --inputs 100 --repeats 5]
Writes benchmarks/results/mc_<backend>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import layers, noise, rng, simulate

NOISES = {
    "AU": dict(add_uncorrelated=1e-3),
    "all4": dict(add_uncorrelated=1e-3, add_correlated=1e-3, mul_uncorrelated=1e-3, mul_correlated=1e-3),
    "corr": dict(add_correlated=1e-3, mul_correlated=1e-3),
}


def timeit(f, repeats):
    jax.block_until_ready(f())  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def torch_cases(W, b, X, R, noises, repeats):
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if (jax.devices()[0].platform == "gpu" and torch.cuda.is_available()) else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    Wt = [torch.tensor(np.asarray(w), device=dev) for w in W]
    bt = [torch.tensor(np.asarray(v), device=dev) for v in b]
    Xt = torch.tensor(np.asarray(X), device=dev)
    out = {}

    def noisy(y, d):
        if d.get("mul_uncorrelated") or d.get("mul_correlated"):
            f = 1.0
            if d.get("mul_uncorrelated"):
                f = f + d["mul_uncorrelated"] ** 0.5 * torch.randn_like(y)
            if d.get("mul_correlated"):
                f = f + d["mul_correlated"] ** 0.5 * torch.randn(y.shape[:-1] + (1,), device=y.device)
            y = y * f
        if d.get("add_uncorrelated"):
            y = y + d["add_uncorrelated"] ** 0.5 * torch.randn_like(y)
        if d.get("add_correlated"):
            y = y + d["add_correlated"] ** 0.5 * torch.randn(y.shape[:-1] + (1,), device=y.device)
        return y

    def forward(x, d):
        for w, bb in zip(Wt, bt):
            x = noisy(torch.sigmoid(x @ w + bb), d)
        return x

    def timed(f):
        f()
        sync()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    with torch.no_grad():
        for name, d in noises.items():
            out[f"torch-loop/{name}"] = timed(lambda: [forward(Xt, d) for _ in range(R)])
            Xr = Xt.expand(R, *Xt.shape)
            out[f"torch-batched/{name}"] = timed(lambda: forward(Xr, d))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realizations", type=int, default=1000)
    p.add_argument("--inputs", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    R, B = args.realizations, args.inputs

    net = layers.mlp([784, 256, 256, 10], "sigmoid")
    _, params = net.init(jax.random.key(0), (784,))
    X = jax.random.uniform(jax.random.key(1), (B, 784))
    Xbig = jnp.tile(X, (R, 1))

    # Weights and inputs are jit *arguments* everywhere: closed-over constants would let XLA
    # fold the noise-free first layer at compile time and flatter the noisy cases.
    clean = jax.jit(lambda p, x: layers.apply_batch(net, p, x))
    results = {"clean": timeit(lambda: clean(params, Xbig), args.repeats)}

    # The tighter limit for R realizations of the *same* B inputs: the first (noise-free)
    # layer once on B rows — vmap leaves it unbatched in the noisy cases too — then R·B rows.
    def clean_shared(p, x):
        (d0, act0, _), rest = p[0], p[1:]
        h = jax.nn.sigmoid(x @ d0["W"] + d0["b"])
        h = jnp.tile(h, (R, 1))
        for (d, _, _) in rest[:-1]:
            h = jax.nn.sigmoid(h @ d["W"] + d["b"])
        d = rest[-1][0]
        return jax.nn.sigmoid(h @ d["W"] + d["b"])

    clean_shared = jax.jit(clean_shared)
    results["clean-shared-input"] = timeit(lambda: clean_shared(params, X), args.repeats)

    idx = jnp.arange(R, dtype=jnp.uint32)
    for gen in ("threefry", "fast"):
        key = rng.make_key(0, gen)
        for name, d in NOISES.items():
            nz = noise.NeuronNoise(**d)
            one = lambda k, p, x, nz=nz: layers.apply_batch(net, p, x, key=k, noise=nz)
            f = jax.jit(lambda k, p, x, one=one: jax.vmap(lambda kk: one(kk, p, x))(simulate.realization_keys(k, idx)))
            results[f"{gen}/{name}"] = timeit(lambda f=f: f(key, params, X), args.repeats)
    for gen in ("fast",):
        key = rng.make_key(0, gen)
        for name in ("AU", "all4"):
            nz = noise.NeuronNoise(**NOISES[name])
            one = lambda k, nz=nz: layers.apply_batch(net, params, X, key=k, noise=nz, return_layers=True)[1]
            results[f"mc/{gen}/{name}"] = timeit(lambda one=one: simulate.monte_carlo(one, key, R).var, args.repeats)
            results[f"mc-1tile/{gen}/{name}"] = timeit(
                lambda one=one: simulate.monte_carlo(one, key, R, tile_size=R, streams=1).var, args.repeats
            )
    if not args.no_torch:
        W = [params[i][0]["W"] for i in range(3)]
        b = [params[i][0]["b"] for i in range(3)]
        results.update(torch_cases(W, b, X, R, NOISES, max(2, args.repeats // 2)))

    base = results["clean"]
    flops = 2.0 * R * B * (784 * 256 + 256 * 256 + 256 * 10)
    print(f"MLP 784-256-256-10 sigmoid, {R} realizations x {B} inputs on {jax.devices()[0].platform} "
          f"({os.cpu_count()} CPU threads), median of {args.repeats}")
    print(f"{'case':<24} {'seconds':>9} {'x clean':>8} {'matmul TFLOP/s':>15}")
    for k, v in results.items():
        print(f"{k:<24} {v:>9.4f} {v / base:>8.2f} {flops / v / 1e12:>15.3f}")
    for name in ("AU", "all4"):
        fwd = results[f"fast/{name}"]
        print(f"engine / bare vmapped noisy forward, {name}: {results[f'mc/fast/{name}'] / fwd:.2f} "
              f"(one tile of R: {results[f'mc-1tile/fast/{name}'] / fwd:.2f})")
    for name in NOISES:
        if f"torch-loop/{name}" in results:
            print(f"speed-up of fast/{name} over torch-loop: {results[f'torch-loop/{name}'] / results[f'fast/{name}']:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    backend = jax.devices()[0].platform
    payload = {
        "benchmark": "mc",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": backend,
                    "device": str(jax.devices()[0].device_kind), "jax": jax.__version__},
        "realizations": R, "inputs": B, "repeats": args.repeats,
        "seconds": results, "ratio_to_clean": {k: v / base for k, v in results.items()},
        "engine_over_forward": {name: results[f"mc/fast/{name}"] / results[f"fast/{name}"] for name in ("AU", "all4")},
        "load_average": os.getloadavg(),
        "matmul_flops": flops, "tflops": {k: flops / v / 1e12 for k, v in results.items()},
    }
    path = os.path.join(args.out, f"mc_{backend}.json")
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
