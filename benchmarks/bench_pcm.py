"""PCM drift Monte Carlo: R fresh programmings × T times × B inputs of a 784-256-256-10 MLP (issue 16).

The workload of aihwkit's flagship study: program a network onto PCM crossbars (512 × 512
tiles: the first layer on two), read it at T times after programming (1 s … 10 years),
compensate the drift (global compensation read out through the periphery, as aihwkit's
default) and run B inputs through the crossbars' periphery (noise management, DAC, output
noise, ADC, iterative bound management) — R times with fresh device variability.

Cases (all in the same run, warm-up first, ``block_until_ready()``):

  jax/<rng>        noisejax: ``hardware.drift_forward`` for one realization (all T times
                   ``vmap``-ped, the programming shared), ``jax.lax.map`` over chunks of
                   realizations inside one jit; rng = noisejax's fast generator / threefry
  jax/digital      the limit: the same R·T·B rows through the digital network (no hardware)
  torch-loop       PyTorch, a Python loop over realizations doing the same per realization
                   (a direct transcription: programming, re-split, drift, read noise,
                   compensation readouts, the periphery with per-row bound management);
                   timed on ``--torch-realizations`` of them and scaled to R (a loop's cost
                   is linear in R)
  aihwkit          aihwkit 1.1.0 (``AnalogSequential`` of ``AnalogLinear`` with
                   ``TorchInferenceRPUConfig``: ``program_analog_weights`` once per realization,
                   ``drift_analog_weights(t)`` + forward per time), only when run with
                   ``--aihwkit-python`` pointing at an interpreter that imports aihwkit
                   (an optional extra of this benchmark only); timed on
                   ``--aihwkit-realizations`` realizations and scaled to R (per-realization
                   cost is constant in a loop)

A statistical cross-check compares the mean outputs of jax/fast and torch-loop (same model,
independent draws): the largest |difference| in units of its standard error is printed.

Run:  python benchmarks/bench_pcm.py [--realizations 1000 --inputs 100 --chunk 50 --repeats 1]
      [--aihwkit-python /path/to/venv/bin/python]
Writes benchmarks/results/pcm_<backend>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

TIMES = (1.0, 3600.0, 86400.0, 30 * 86400.0, 365 * 86400.0, 3650 * 86400.0)
WIDTHS = (784, 256, 256, 10)
TILE = 512


def make_problem(inputs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    Ws = [(rng.normal(size=(a, b)) / math.sqrt(a)).astype(np.float32) for a, b in zip(WIDTHS[:-1], WIDTHS[1:])]
    bs = [(0.1 * rng.normal(size=(b,))).astype(np.float32) for b in WIDTHS[1:]]
    X = rng.uniform(0.0, 1.0, size=(inputs, WIDTHS[0])).astype(np.float32)
    return Ws, bs, X


def _median_time(f, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------------
# noisejax
# ----------------------------------------------------------------------------------


def jax_cases(Ws, bs, X, R, chunk, repeats):
    import jax
    import jax.numpy as jnp

    from noisejax import hardware as hw, layers, rng, simulate

    net = layers.mlp(list(WIDTHS), "sigmoid", "linear", noisy=False, dense=hw.AnalogDense)
    params = tuple(({"W": jnp.asarray(W), "b": jnp.asarray(b)}, ()) for W, b in zip(Ws, bs))
    x = jnp.asarray(X)
    times = jnp.asarray(TIMES)
    chip = hw.AnalogHardware()  # PCM, aihwkit periphery, readout compensation, 512 x 512 tiles
    n_chunks = -(-R // chunk)

    @jax.jit
    def run_chunk(params, x, keys):
        return jax.lax.map(lambda k: hw.drift_forward(net, params, x, times, key=k, hardware=chip), keys)

    @jax.jit
    def digital_chunk(params, x):
        # the same rows, digitally: chunk·T copies of the B inputs
        xr = jnp.broadcast_to(x, (chunk * len(TIMES),) + x.shape).reshape(-1, x.shape[-1])
        return layers.apply_batch(net, params, xr).reshape(chunk, len(TIMES), x.shape[0], -1)

    out = {}
    samples = {}
    for name, key in (("fast", rng.key(0)), ("threefry", jax.random.key(0))):
        all_keys = simulate.realization_keys(key, jnp.arange(n_chunks * chunk, dtype=jnp.uint32))
        jax.block_until_ready(run_chunk(params, x, all_keys[:chunk]))  # warm-up: compile + one chunk

        def full():
            outs = [run_chunk(params, x, all_keys[i * chunk:(i + 1) * chunk]) for i in range(n_chunks)]
            return jax.block_until_ready(outs)

        out[f"jax/{name}"] = _median_time(full, repeats)
        if name == "fast":
            samples["jax"] = np.asarray(full()[0])
    jax.block_until_ready(digital_chunk(params, x))
    out["jax/digital"] = _median_time(lambda: jax.block_until_ready([digital_chunk(params, x) for _ in range(n_chunks)]),
                                      repeats)
    return out, samples


# ----------------------------------------------------------------------------------
# PyTorch: the same model, a loop over realizations
# ----------------------------------------------------------------------------------


def _splits(n, max_size):
    k = -(-n // max_size)
    base, extra = divmod(n, k)
    sizes = [base + (i < extra) for i in range(k)]
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def torch_model():
    import torch

    g_max = 25.0
    inp_step, out_step = 2.0 / 126.0, 2.0 * 12.0 / 510.0
    limit = min(1000.0, 0.25 / inp_step)

    def sigma_prog(g):
        gr = g / g_max
        return 0.26348 + 1.9650 * gr - 1.1731 * gr * gr

    def nu(g):
        lg = torch.log(torch.clamp(g / g_max, min=1e-7))
        mu = torch.clamp(-0.0155 * lg + 0.0244, 0.049, 0.1)
        sd = torch.clamp(-0.0125 * lg - 0.0059, 0.008, 0.045)
        return torch.abs(mu + sd * torch.randn_like(g))

    def program(W):  # one tile: (g+, g-, nu+, nu-, scale) after the re-split
        s = g_max / torch.clamp(W.abs().max(), min=1e-7)
        gp, gn = torch.clamp(W * s, 0, g_max), torch.clamp(-W * s, 0, g_max)
        gpp = torch.clamp(gp + sigma_prog(gp) * torch.randn_like(gp), min=0)
        gnp = torch.clamp(gn + sigma_prog(gn) * torch.randn_like(gn), min=0)
        nup, nun = nu(gp), nu(gn)
        wp = (gpp - gnp) / s
        s2 = g_max / torch.clamp(wp.abs().max(), min=1e-7)
        return torch.clamp(wp * s2, 0, g_max), torch.clamp(-wp * s2, 0, g_max), nup, nun, s2

    def read(state, t):
        gp, gn, nup, nun, s = state
        tp = t + 20.0
        growth = math.sqrt(math.log((tp + 250e-9) / (2 * 250e-9)))

        def dev(g, nu_):
            gd = g * (tp / 20.0) ** (-nu_)
            q = torch.clamp(0.0088 / torch.clamp((g / g_max) ** 0.65, min=1e-3), max=0.2)
            return torch.clamp(gd + gd.abs() * q * growth * torch.randn_like(g), min=0)

        return (dev(gp, nup) - dev(gn, nun)) / s

    def quant(v, step):
        return torch.round(v / step) * step

    def passes(product, rows, n_out):
        r = torch.ones(rows, 1)
        y = torch.zeros(rows, n_out)
        done = torch.zeros(rows, dtype=torch.bool)
        while True:
            z = product(r) + 0.06 * torch.randn(rows, n_out)
            zq = quant(z, out_step)
            ok = (zq.abs() <= 12.0).all(-1)
            y = torch.where(done[:, None], y, torch.clamp(zq, -12.0, 12.0))
            new_done = done | ok | (r[:, 0] > limit)
            if bool(new_done.all()):
                return y * r
            r = torch.where(new_done[:, None], r, 2 * r)
            done = new_done

    def mvm(x, W):
        m = x.abs().max(-1, keepdim=True).values
        m = torch.where(m > 0, m, torch.ones_like(m))
        y_r = passes(lambda r: torch.clamp(quant(x / (m * r), inp_step), -1, 1) @ W, x.shape[0], W.shape[1])
        return y_r * m

    def readout(W):
        y = passes(lambda r: torch.clamp(quant(1.0 / r, inp_step), -1, 1) * W, W.shape[0], W.shape[1])
        return torch.clamp(y.abs().mean(), min=1e-4)

    return program, read, mvm, readout


def torch_cases(Ws, bs, X, R, repeats, n_timed):
    try:
        import torch
    except ImportError:
        return {}, {}
    torch.set_num_threads(os.cpu_count() or 1)
    program, read, mvm, readout = torch_model()
    Wt = [torch.tensor(W) for W in Ws]
    bt = [torch.tensor(b) for b in bs]
    Xt = torch.tensor(X)
    tiles = [_splits(W.shape[0], TILE) for W in Ws]

    def realization():
        states = [[program(W[si]) for si in tl] for W, tl in zip(Wt, tiles)]
        bases = [[readout((s[0] - s[1]) / s[4]) for s in layer] for layer in states]
        outs = []
        for t in TIMES:
            x = Xt
            for l, (layer, base, tl) in enumerate(zip(states, bases, tiles)):
                y = bt[l]
                for st, b0, si in zip(layer, base, tl):
                    W_t = read(st, t)
                    y = y + (b0 / readout(W_t)) * mvm(x[:, si], W_t)
                x = torch.sigmoid(y) if l < len(states) - 1 else y
            outs.append(x)
        return torch.stack(outs)

    with torch.no_grad():
        realization()  # warm-up
        outs = []
        secs = _median_time(lambda: outs.append([realization() for _ in range(n_timed)]), repeats)
        sample = torch.stack(outs[-1]).numpy()
    return {"torch-loop": secs * R / n_timed}, {"torch": sample}


# ----------------------------------------------------------------------------------
# aihwkit (optional, in another interpreter)
# ----------------------------------------------------------------------------------


def aihwkit_child(R, inputs):
    """Run inside an interpreter with aihwkit: time R realizations, print JSON."""
    import torch
    import aihwkit
    from aihwkit.nn import AnalogLinear, AnalogSequential
    from aihwkit.simulator.configs import TorchInferenceRPUConfig

    torch.set_num_threads(os.cpu_count() or 1)
    Ws, bs, X = make_problem(inputs)
    layers = []
    for l, (W, b) in enumerate(zip(Ws, bs)):
        lin = AnalogLinear(W.shape[0], W.shape[1], bias=True, rpu_config=TorchInferenceRPUConfig())
        lin.set_weights(torch.tensor(W.T.copy()), torch.tensor(b))
        layers.append(lin)
        if l < len(Ws) - 1:
            layers.append(torch.nn.Sigmoid())
    model = AnalogSequential(*layers).eval()
    Xt = torch.tensor(X)

    def realization():
        model.program_analog_weights()  # fresh devices
        outs = []
        for t in TIMES:
            model.drift_analog_weights(t)
            outs.append(model(Xt))
        return torch.stack(outs)

    with torch.no_grad():
        realization()
        t0 = time.perf_counter()
        for _ in range(R):
            realization()
        secs = time.perf_counter() - t0
    print(json.dumps({"aihwkit_version": aihwkit.__version__, "torch_version": torch.__version__,
                      "seconds": secs, "realizations": R}))


def aihwkit_case(python, R, inputs):
    cmd = [python, os.path.abspath(__file__), "--aihwkit-child", "--realizations", str(R), "--inputs", str(inputs)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--realizations", type=int, default=1000)
    p.add_argument("--inputs", type=int, default=100)
    p.add_argument("--chunk", type=int, default=50)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--torch-realizations", type=int, default=100,
                   help="realizations the torch loop is timed on (its cost is linear in R: scaled to R)")
    p.add_argument("--aihwkit-python", default=None, help="an interpreter that imports aihwkit (optional)")
    p.add_argument("--aihwkit-realizations", type=int, default=20)
    p.add_argument("--aihwkit-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.aihwkit_child:
        return aihwkit_child(args.realizations, args.inputs)
    import jax

    R = args.realizations
    Ws, bs, X = make_problem(args.inputs)
    t0 = time.time()
    results, samples = jax_cases(Ws, bs, X, R, args.chunk, args.repeats)
    if not args.no_torch:
        res, smp = torch_cases(Ws, bs, X, R, args.repeats, min(R, args.torch_realizations))
        results.update(res)
        samples.update(smp)
    aih = None
    if args.aihwkit_python:
        aih = aihwkit_case(args.aihwkit_python, args.aihwkit_realizations, args.inputs)
        if "seconds" in aih:
            results["aihwkit"] = aih["seconds"] * R / aih["realizations"]
    check = None
    if "jax" in samples and "torch" in samples:
        a, b = samples["jax"], samples["torch"]
        se = np.sqrt(a.var(0, ddof=1) / a.shape[0] + b.var(0, ddof=1) / b.shape[0])
        z = np.abs(a.mean(0) - b.mean(0)) / se
        check = {"jax_realizations": int(a.shape[0]), "torch_realizations": int(b.shape[0]),
                 "max_abs_z": float(z.max()), "median_abs_z": float(np.median(z)), "n_outputs": int(z.size)}
    backend = jax.devices()[0].platform
    base = results["jax/fast"]
    print(f"PCM drift MC: R={R} programmings x {len(TIMES)} times x {args.inputs} inputs, MLP {'-'.join(map(str, WIDTHS))}, "
          f"{backend}, load {os.getloadavg()[0]:.1f}")
    print(f"{'case':<16}{'seconds':>10}{'x jax/fast':>12}")
    for name, sec in results.items():
        print(f"{name:<16}{sec:>10.2f}{sec / base:>12.2f}")
    if check:
        print(f"jax vs torch mean outputs: max |z| = {check['max_abs_z']:.2f} over {check['n_outputs']} outputs "
              f"(median {check['median_abs_z']:.2f}; ≈ 0.67 expected for agreeing models)")
    if aih is not None:
        print(f"aihwkit: {aih}")
    payload = {"realizations": R, "times": list(TIMES), "inputs": args.inputs, "chunk": args.chunk, "repeats": args.repeats,
               "widths": list(WIDTHS), "seconds": results, "ratio_to_jax_fast": {k: v / base for k, v in results.items()},
               "cross_check": check, "aihwkit": aih, "backend": backend, "devices": str(jax.devices()),
               "jax": jax.__version__, "python": platform.python_version(), "load_avg": os.getloadavg(),
               "cpu_count": os.cpu_count(), "wall_seconds": time.time() - t0}
    try:
        import torch

        payload["torch"] = torch.__version__
        payload["torch_realizations_timed"] = min(R, args.torch_realizations)
    except ImportError:
        pass
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"pcm_{backend}.json")
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
