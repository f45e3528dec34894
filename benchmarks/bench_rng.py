"""Nanoseconds per standard normal: JAX's transform vs ``noisejax.rng.normal`` (issue 15).

Times, in the same run, ``jax.random.normal`` with JAX's threefry key, ``jax.random.normal``
with noisejax's fast key (the noise sampler before issue 15: the fast generator's bits,
JAX's inverse-error-function transform) and ``noisejax.rng.normal`` with the fast key
(Box–Muller from one 32-bit word, the sampler now).  Two settings: the draws written
to memory (``z``) and fused into a noise site (``y + z``, as in a noisy layer, where
memory traffic is shared with the layer).  Minimum over ``--repeats`` calls after a
warm-up, with ``block_until_ready()``; ratios are to the fast key's ``jax.random.normal``.

Run:  python benchmarks/bench_rng.py [--size 4194304 --repeats 30]
Writes benchmarks/results/rng_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from noisejax import rng


def best(f, repeats):
    jax.block_until_ready(f())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1 << 22)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (the minimum is kept)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    n = args.size
    y = jnp.ones((n,), jnp.float32)
    samplers = {
        "threefry, jax.random.normal": (jax.random.key(0), jax.random.normal),
        "fast key, jax.random.normal (before)": (rng.key(0), jax.random.normal),
        "fast key, rng.normal (now)": (rng.key(0), rng.normal),
    }
    cases = {}
    for name, (key, normal) in samplers.items():
        cases[f"z | {name}"] = (jax.jit(lambda k, y, normal=normal: normal(k, y.shape, y.dtype)), key)
        cases[f"y + z | {name}"] = (jax.jit(lambda k, y, normal=normal: y + normal(k, y.shape, y.dtype)), key)
    cases["y * 2 (memory only)"] = (jax.jit(lambda k, y: y * 2.0), rng.key(0))
    ns = {}
    for _ in range(args.rounds):  # alternate the cases: a noisy machine disturbs them alike
        for name, (f, key) in cases.items():
            t = best(lambda f=f, key=key: f(key, y), args.repeats) * 1e9 / n
            ns[name] = min(ns.get(name, float("inf")), t)
    load = os.getloadavg()
    print(f"ns per normal, {n} float32 draws on {jax.devices()[0].platform} ({os.cpu_count()} CPU threads), "
          f"min over {args.rounds}x{args.repeats} calls, load {load[0]:.2f}")
    for setting in ("z", "y + z"):
        ref = ns[f"{setting} | fast key, jax.random.normal (before)"]
        for name in samplers:
            v = ns[f"{setting} | {name}"]
            print(f"{setting:6} {name:40} {v:7.3f} ns   x{v / ref:.2f}")
    print(f"{'':6} {'y * 2 (memory only)':40} {ns['y * 2 (memory only)']:7.3f} ns")
    os.makedirs(args.out, exist_ok=True)
    backend = jax.devices()[0].platform
    path = os.path.join(args.out, f"rng_{backend}.json")
    with open(path, "w") as fh:
        json.dump({"benchmark": "rng", "size": n, "ns_per_normal": ns, "load_average": load,
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__}},
                  fh, indent=2)
    print(f"wrote {path}")
    return ns


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
