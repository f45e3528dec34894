"""Scale of the Monte Carlo engine (issue 7, item 4).

* peak memory vs realization count: 10⁴, 10⁵, 10⁶ realizations of the MLP
  784-256-256-10 (sigmoid, all four noise types, statistics of every layer), each in a
  fresh subprocess, peak RSS (CPU) or peak device memory (GPU) read at the end;
* throughput vs tile size (realizations vmapped together);
* 1 vs 4 forced host devices (CPU only): wall time and bitwise equality.

Run:  python benchmarks/bench_scale.py [--inputs 1] [--max-exp 6]
Writes benchmarks/results/scale_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np
from noisejax import layers, noise, rng, simulate
n, B, tile, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
net = layers.mlp([784, 256, 256, 10], "sigmoid")
_, params = net.init(jax.random.key(0), (784,))
X = jax.random.uniform(jax.random.key(1), (B, 784))
nz = noise.NeuronNoise(add_uncorrelated=1e-3, add_correlated=1e-3, mul_uncorrelated=1e-3, mul_correlated=1e-3)
fn = lambda k: layers.apply_batch(net, params, X, key=k, noise=nz, return_layers=True)[1]
streams = 8 if len(jax.devices()) <= 8 else len(jax.devices())
warm = simulate.monte_carlo(fn, rng.key(0), 2 * tile * streams, tile_size=tile, streams=streams,
                            chunk_size=16 * tile * streams)
jax.block_until_ready(warm.var)
t = time.perf_counter()
res = simulate.monte_carlo(fn, rng.key(0), n, tile_size=tile, streams=streams, chunk_size=16 * tile * streams)
jax.block_until_ready(res.var)
dt = time.perf_counter() - t
dev = jax.devices()[0]
stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
peak_dev = (stats or {}).get("peak_bytes_in_use")
leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(res)]
digest = float(sum(np.sum(a.astype(np.float64)) for a in leaves))
json.dump({"n": n, "inputs": B, "tile": tile, "devices": len(jax.devices()), "seconds": dt,
           "realizations_per_s": n / dt, "rows_per_s": n * B / dt,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_device_mb": None if peak_dev is None else peak_dev / 2**20,
           "digest": digest, "var_last_mean": float(np.mean(np.asarray(res.var[-1])))}, open(out, "w"))
"""


def child(n, inputs, tile, env_extra=None):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    env = dict(os.environ, **(env_extra or {}))
    subprocess.run([sys.executable, "-c", CHILD, str(n), str(inputs), str(tile), path], check=True, env=env)
    with open(path) as fh:
        out = json.load(fh)
    os.unlink(path)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=1)
    p.add_argument("--max-exp", type=int, default=6)
    p.add_argument("--tiles", default="64,256,1024")
    p.add_argument("--tile", type=int, default=256, help="tile for the memory runs")
    p.add_argument("--throughput-n", type=int, default=100_000)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    import jax

    backend = jax.devices()[0].platform
    report = {"benchmark": "scale", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                 "backend": backend, "device": jax.devices()[0].device_kind}}
    report["memory"] = [child(10**e, args.inputs, args.tile) for e in range(4, args.max_exp + 1)]
    print("realizations  seconds  real/s      peak RSS MB  peak device MB")
    for r in report["memory"]:
        print(f"{r['n']:>12} {r['seconds']:>8.2f} {r['realizations_per_s']:>10.0f} {r['peak_rss_mb']:>12.0f} "
              f"{r['peak_device_mb'] if r['peak_device_mb'] is not None else '-':>14}")
    report["throughput"] = [child(args.throughput_n, args.inputs, int(t)) for t in args.tiles.split(",")]
    print("tile  realizations/s")
    for r in report["throughput"]:
        print(f"{r['tile']:>5} {r['realizations_per_s']:>12.0f}")
    if backend == "cpu":
        one = child(args.throughput_n // 4, args.inputs, args.tile, {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
        four = child(args.throughput_n // 4, args.inputs, args.tile, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
        report["devices"] = {"one": one, "four": four, "bitwise_equal_digest": one["digest"] == four["digest"]
                             and one["var_last_mean"] == four["var_last_mean"]}
        print(f"1 device {one['seconds']:.2f}s, 4 forced host devices {four['seconds']:.2f}s, "
              f"same statistics: {report['devices']['bitwise_equal_digest']}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"scale_{backend}.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
