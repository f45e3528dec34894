"""Whole-process benchmark: ``noisejax propagate`` vs a PyTorch loop with the same statistics (issue 15).

The job of the issue: MLP 784-256-256-10 (sigmoid, random weights), 100 inputs,
additive uncorrelated noise (variance 1e-3), per-layer mean and variance over R
realizations, printed as JSON.  Each command is timed as a *whole process* (Python
start-up, imports, set-up, compilation, computation, output) — what a user waits
for — in alternation (noisejax cold, noisejax warm, PyTorch, then the next R), and
the whole set is repeated; medians are reported with the machine load.

* ``noisejax (cold)``: a fresh, empty compilation cache (``NOISEJAX_COMPILATION_CACHE``
  pointing to a new folder): everything is traced and compiled.
* ``noisejax (warm)``: the same command again: compiled programs come from the cache.
* ``torch loop``: the PyTorch program a researcher writes (``--torch-loop`` mode of this
  file, about 25 lines): one noisy forward per realization in a Python loop, running
  per-layer sums and sums of squares in float64 — the same statistics.

The *fixed cost* is the whole-process time at R = 2 (nothing but start-up, set-up and
compilation); the noisejax JSON also reports its own compile seconds.

Run:  python benchmarks/bench_cli.py [--realizations 1000,5000,20000 --repeats 3]
Needs torch (the ``bench`` extra: ``pip install torch==2.13.0``); writes
``benchmarks/results/cli_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (784, 256, 256, 10)
NOISE_VAR = 1e-3


def make_inputs(folder: str, n_inputs: int = 100, seed: int = 0) -> tuple[str, str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for l, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        arrays[f"W{l}"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        arrays[f"b{l}"] = (0.1 * rng.standard_normal(b)).astype(np.float32)
    w, x = os.path.join(folder, "w.npz"), os.path.join(folder, "x.npy")
    np.savez(w, **arrays)
    np.save(x, rng.uniform(size=(n_inputs, WIDTHS[0])).astype(np.float32))
    return w, x


def torch_loop(weights: str, inputs: str, realizations: int, seed: int = 0) -> None:
    """The PyTorch baseline: a loop over realizations, per-layer sums in float64, JSON out."""
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    z = np.load(weights)
    Ws = [torch.from_numpy(z[f"W{l}"]) for l in range(len(WIDTHS) - 1)]
    bs = [torch.from_numpy(z[f"b{l}"]) for l in range(len(WIDTHS) - 1)]
    x = torch.from_numpy(np.load(inputs))
    std = NOISE_VAR**0.5
    sums = [torch.zeros(x.shape[0], W.shape[1], dtype=torch.float64) for W in Ws]
    sqs = [torch.zeros_like(s) for s in sums]
    with torch.no_grad():
        for _ in range(realizations):
            h = x
            for l, (W, b) in enumerate(zip(Ws, bs)):
                h = torch.sigmoid(h @ W + b)
                h = h + std * torch.randn_like(h)
                hd = h.double()
                sums[l] += hd
                sqs[l] += hd * hd
    layers = []
    for l, (s, q) in enumerate(zip(sums, sqs)):
        mean = s / realizations
        var = (q - s * mean) / (realizations - 1)
        layers.append({"index": l, "mc": {"mean": mean.tolist(), "var": var.tolist()}})
    json.dump({"realizations": realizations, "seed": seed, "layers": layers}, sys.stdout)


def _run(cmd: list, env: dict) -> tuple[float, dict]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout)


def _load() -> float:
    return os.getloadavg()[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realizations", default="1000,5000,20000", help="comma-separated R values")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--torch-loop", nargs=3, metavar=("WEIGHTS", "INPUTS", "R"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_loop:
        torch_loop(args.torch_loop[0], args.torch_loop[1], int(args.torch_loop[2]))
        return {}
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("torch is not installed (pip install torch==2.13.0), or pass --no-torch")
    counts = [2] + [int(r) for r in args.realizations.split(",")]
    work = tempfile.mkdtemp(prefix="noisejax-bench-cli-")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    try:
        w, x = make_inputs(work)
        nj = [sys.executable, "-m", "noisejax", "propagate", w,  # what the `noisejax` console script runs
              "--input", x, "--activation", "sigmoid", "--add-uncorrelated", str(NOISE_VAR), "--json", "--realizations"]
        th = [sys.executable, os.path.abspath(__file__), "--torch-loop", w, x]
        rows = {r: {"noisejax_cold": [], "noisejax_warm": [], "compile_cold": [], "compile_warm": [], "torch": [], "load": []}
                for r in counts}
        for rep in range(args.repeats):
            for r in counts:
                cache = os.path.join(work, f"xla-{rep}-{r}")
                env_nj = dict(env, NOISEJAX_COMPILATION_CACHE=cache)
                row = rows[r]
                row["load"].append(_load())
                t, doc = _run(nj + [str(r)], env_nj)
                row["noisejax_cold"].append(t)
                row["compile_cold"].append(doc.get("seconds", {}).get("compile"))  # absent before issue 15
                t, doc = _run(nj + [str(r)], env_nj)
                row["noisejax_warm"].append(t)
                row["compile_warm"].append(doc.get("seconds", {}).get("compile"))
                if not args.no_torch:
                    t, _ = _run(th + [str(r)], env)
                    row["torch"].append(t)
                print(f"repeat {rep} R={r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in row.items() if v and v[-1] is not None), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {r: {k: (statistics.median(v) if v and None not in v else None) for k, v in row.items()} for r, row in rows.items()}
    print(f"\nnoisejax propagate vs a PyTorch loop, MLP 784-256-256-10 sigmoid, 100 inputs, AU 1e-3, "
          f"whole processes, median of {args.repeats} (load {min(rows[counts[0]]['load']):.1f}-"
          f"{max(v for row in rows.values() for v in row['load']):.1f})")
    print(f"{'R':>7} {'noisejax cold':>14} {'noisejax warm':>14} {'torch loop':>11} {'speed-up (warm)':>16} {'compile cold/warm':>18}")
    for r, m in med.items():
        sp = f"{m['torch'] / m['noisejax_warm']:.2f}x" if m["torch"] else ""
        tt = f"{m['torch']:.2f}" if m["torch"] else ""
        cc = "" if m["compile_cold"] is None else f"{m['compile_cold']:.2f} / {m['compile_warm']:.2f}"
        print(f"{r:>7} {m['noisejax_cold']:>14.2f} {m['noisejax_warm']:>14.2f} {tt:>11} {sp:>16} {cc:>18}")
    payload = {
        "benchmark": "cli",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "job": {"widths": WIDTHS, "inputs": 100, "noise": {"add_uncorrelated": NOISE_VAR}},
        "repeats": args.repeats, "raw": {str(r): row for r, row in rows.items()},
        "median": {str(r): m for r, m in med.items()},
        "fixed_cost_warm_seconds": med[2]["noisejax_warm"],
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cli_cpu.json")
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
    print(f"fixed cost (R = 2, warm cache): {med[2]['noisejax_warm']:.2f} s; wrote {path}")
    return payload


if __name__ == "__main__":
    main()
