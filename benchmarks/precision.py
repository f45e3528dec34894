"""float32 accumulation error of simulate.monte_carlo against float64 statistics of the same samples.

Prints one row per (|mean|/std, n, tile_size, streams): the error of the mean in standard
errors, of the variance in standard deviations of a sample variance, and the bounds
B_mean / B_var of noisejax._precision (docs/precision.md).  ~2 minutes on 2 CPU cores.

    python benchmarks/precision.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import _precision, simulate

D = 16  # independent output entries per realization (the error reported is the max over them)


def measure(ratio: float, n: int, tile: int = 64, streams: int = 8):
    fn = lambda k: ratio + jax.random.normal(k, (D,), jnp.float32)  # noqa: E731
    res = simulate.monte_carlo(fn, jax.random.key(0), n, tile_size=tile, streams=streams, precision_check=False)
    sample = jax.jit(jax.vmap(fn))
    s1, s2 = np.zeros(D), np.zeros(D)
    for start in range(0, n, 200_000):
        keys = simulate.realization_keys(jax.random.key(0), jnp.arange(start, min(n, start + 200_000), dtype=jnp.uint32))
        x = np.asarray(sample(keys)).astype(np.float64) - ratio  # the known offset removed: exact in float64
        s1, s2 = s1 + x.sum(0), s2 + np.square(x).sum(0)
    mean, var = ratio + s1 / n, (s2 - s1 * s1 / n) / (n - 1)
    em = np.max(np.abs(np.asarray(res.mean, np.float64) - mean) / np.sqrt(var / n))
    ev = np.max(np.abs(np.asarray(res.var, np.float64) - var) / (var * np.sqrt(2 / n)))
    eps = float(np.finfo(np.float32).eps)
    return em, ev, _precision.mean_error_bound(ratio, n, tile, streams, eps), _precision.var_error_bound(ratio, n, tile, streams, eps)


def main():
    print("| |mean|/std | n | tile | streams | mean error (stderr) | B_mean | variance error (sd) | B_var |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(r, n, 64, 8) for r in (0.0, 1e2, 1e3, 1e4, 1e5) for n in (10_000, 100_000, 1_000_000, 4_000_000)]
    rows += [(1e4, 4_000_000, 1024, 8), (1e4, 4_000_000, 64, 64)]
    for ratio, n, tile, streams in rows:
        em, ev, bm, bv = measure(ratio, n, tile, streams)
        print(f"| {ratio:.0e} | {n:.0e} | {tile} | {streams} | {em:.3f} | {bm:.3g} | {ev:.3f} | {bv:.3g} |", flush=True)


if __name__ == "__main__":
    main()
