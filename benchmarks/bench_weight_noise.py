"""Weight-noise Monte Carlo (issue 7, item 2).

MLP 784-256-256-10 (sigmoid), additive Gaussian weight noise at 10 dB WNR.
  clean-shared   the clean network on the R·B rows (one weight set)          — the limit
  clean-copies   R clean weight copies, each on the B inputs (batched weights)
  sampled        R noisy weight copies (noise.add_weight_noise), each on the B inputs
  local          per-example sampling of the pre-activations (layers.WeightNoiseDense,
                 local reparameterization): exact per-example marginals, no weight draws
Target: sampled ≤ 1.2× clean-copies.  Timed in one run, warm-up, block_until_ready, median.

Run:  python benchmarks/bench_weight_noise.py [--realizations 100 --inputs 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from noisejax import layers, noise, rng, simulate


def timeit(f, repeats):
    jax.block_until_ready(f())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realizations", type=int, default=100)
    p.add_argument("--inputs", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--wnr-db", type=float, default=10.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    R, B = args.realizations, args.inputs

    widths = [784, 256, 256, 10]
    plain = layers.mlp(widths, "sigmoid", noisy=False)
    local = layers.serial(*[layers.serial(layers.WeightNoiseDense(w), layers.Sigmoid()) for w in widths[1:]])
    _, params = plain.init(jax.random.key(0), (784,))
    X = jax.random.uniform(jax.random.key(1), (B, 784))
    idx = jnp.arange(R, dtype=jnp.uint32)
    powers = noise.noise_power(params, args.wnr_db)
    var = float(jax.tree_util.tree_leaves(powers)[0])  # global scope: one σ_n² for all leaves

    fwd = lambda p, x: jax.vmap(lambda xi: plain.apply(p, xi))(x)
    clean_shared = jax.jit(lambda: fwd(params, jnp.tile(X, (R, 1))))
    copies = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (R,) + a.shape), params)
    clean_copies = jax.jit(lambda c: jax.vmap(lambda p: fwd(p, X))(c))

    def sampled_one(k):
        return fwd(noise.add_weight_noise(params, args.wnr_db, key=k), X)

    sampled = jax.jit(lambda k: jax.vmap(sampled_one)(simulate.realization_keys(k, idx)))
    lw = noise.LocalWeightNoise(var)
    local_one = lambda k: layers.apply_batch(local, params, X, key=k, noise=lw)
    local_fn = jax.jit(lambda k: jax.vmap(local_one)(simulate.realization_keys(k, idx)))

    key = rng.key(0)
    res = {
        "clean-shared": timeit(clean_shared, args.repeats),
        "clean-copies": timeit(lambda: clean_copies(copies), args.repeats),
        "sampled": timeit(lambda: sampled(key), args.repeats),
        "local": timeit(lambda: local_fn(key), args.repeats),
    }
    base = res["clean-copies"]
    print(f"weight noise, MLP 784-256-256-10, {R} realizations x {B} inputs, {jax.devices()[0].platform}, median of {args.repeats}")
    for k, v in res.items():
        print(f"{k:<14} {v:>9.4f} s  {v / base:>6.2f}x clean-copies")
    print(f"local reparameterization vs sampled weights: {res['sampled'] / res['local']:.2f}x faster")
    os.makedirs(args.out, exist_ok=True)
    backend = jax.devices()[0].platform
    path = os.path.join(args.out, f"weight_noise_{backend}.json")
    with open(path, "w") as fh:
        json.dump({"benchmark": "weight_noise", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                   "device": jax.devices()[0].device_kind}, "realizations": R, "inputs": B, "seconds": res,
                   "ratio_to_clean_copies": {k: v / base for k, v in res.items()}}, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
