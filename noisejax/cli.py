"""The ``noisejax`` command line.

Sub-commands:

* ``noisejax propagate WEIGHTS.npz --input X.npy --activation NAME ...`` — per-layer
  noise statistics of a network whose trained weights come from elsewhere
  (Monte Carlo and/or analytic), as a table or as JSON (a stable contract).
* ``noisejax demo`` — train a small sigmoid MLP on scikit-learn's digits and print
  its per-layer noise table for the four noise types.
* ``noisejax reproduce`` — every figure of both papers (see ``experiments/``).

Any user error prints one line on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Optional, Sequence

import numpy as np

__all__ = ["main", "build_parser"]

_EXIT_USAGE = 2


class _CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------
# Input loading and validation (outside jit)
# ----------------------------------------------------------------------------------

_KEY_RE = re.compile(r"^([Wb])(\d+)$")


def _load_weights(path: str):
    if not os.path.isfile(path):
        raise _CliError(f"WEIGHTS file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except ValueError as e:
        raise _CliError(f"WEIGHTS {path}: cannot read .npz without pickle ({e})") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError ...
        raise _CliError(f"WEIGHTS {path}: not a valid .npz file ({type(e).__name__}: {e})") from None
    ws, bs = {}, {}
    for k, v in arrays.items():
        m = _KEY_RE.match(k)
        if not m:
            raise _CliError(f"WEIGHTS {path}: unexpected key {k!r}; expected W0, b0, W1, b1, ...")
        (ws if m.group(1) == "W" else bs)[int(m.group(2))] = v
    if not ws:
        raise _CliError(f"WEIGHTS {path}: no weight matrices; expected keys W0, W1, ...")
    n = len(ws)
    if sorted(ws) != list(range(n)):
        raise _CliError(f"WEIGHTS {path}: weight keys are misnumbered {sorted('W%d' % i for i in ws)}; expected W0..W{n - 1}")
    extra_b = sorted(set(bs) - set(range(n)))
    if extra_b:
        raise _CliError(f"WEIGHTS {path}: bias b{extra_b[0]} has no matching W{extra_b[0]}")
    weights, biases = [], []
    for l in range(n):
        W = ws[l]
        if W.ndim != 2:
            raise _CliError(f"WEIGHTS {path}: W{l} must be 2-D (fan_in, fan_out), got shape {W.shape}")
        if not np.issubdtype(W.dtype, np.floating) and not np.issubdtype(W.dtype, np.integer):
            raise _CliError(f"WEIGHTS {path}: W{l} must be numeric, got dtype {W.dtype}")
        if not np.all(np.isfinite(W)):
            raise _CliError(f"WEIGHTS {path}: W{l} contains NaN or infinite values")
        if l and W.shape[0] != weights[-1].shape[1]:
            raise _CliError(
                f"WEIGHTS {path}: shape mismatch, W{l} has fan_in {W.shape[0]} but W{l - 1} has fan_out {weights[-1].shape[1]}"
            )
        b = bs.get(l)
        if b is not None:
            if b.shape != (W.shape[1],):
                raise _CliError(f"WEIGHTS {path}: b{l} must have shape ({W.shape[1]},), got {b.shape}")
            if not np.all(np.isfinite(b)):
                raise _CliError(f"WEIGHTS {path}: b{l} contains NaN or infinite values")
        weights.append(W.astype(np.float32))
        biases.append(None if b is None else b.astype(np.float32))
    return weights, biases


def _load_input(path: str, fan_in: int) -> np.ndarray:
    if not os.path.isfile(path):
        raise _CliError(f"--input file not found: {path}")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:
        raise _CliError(f"--input {path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
        raise _CliError(f"--input {path}: expected a numeric array, got dtype {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim not in (1, 2):
        raise _CliError(f"--input {path}: expected shape (fan_in,) or (B, fan_in), got {x.shape}")
    if x.shape[-1] != fan_in:
        raise _CliError(f"--input {path}: shape mismatch, input has {x.shape[-1]} features but W0 expects {fan_in}")
    if x.size == 0:
        raise _CliError(f"--input {path}: empty array")
    if not np.all(np.isfinite(x)):
        raise _CliError(f"--input {path}: contains NaN or infinite values")
    return x.astype(np.float32)


def _variance_arg(name: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite variance >= 0, got {text}")
        return v

    return parse


def _int_arg(name: str, minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {v}")
        return v

    return parse


def _activation_arg(text: str) -> str:
    from noisejax import layers
    from noisejax.errors import NoisejaxError

    try:
        layers.activation(text)
    except NoisejaxError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and exits 2."""

    def error(self, message):  # noqa: D401
        raise _CliError(f"{self.prog}: {message}")


# ----------------------------------------------------------------------------------
# propagate
# ----------------------------------------------------------------------------------


class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (or loading compiled programs).

    Listens to JAX's monitoring spans of those three stages and adds up their union
    (nested traces are not counted twice).
    """

    _EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
               "/jax/core/compile/backend_compile_duration")

    def __enter__(self):
        from jax import monitoring

        self.spans = []
        self._listener = lambda event, start, end, **kw: self.spans.append((start, end)) if event in self._EVENTS else None
        monitoring.register_event_time_span_listener(self._listener)
        return self

    def __exit__(self, *exc):
        from jax import monitoring

        monitoring.unregister_event_time_span_listener(self._listener)

    @property
    def seconds(self) -> float:
        total, end = 0.0, -math.inf
        for a, b in sorted(self.spans):
            if b > end:
                total += b - max(a, end)
                end = b
        return total


def _propagate(args) -> int:
    import time

    t_start = time.perf_counter()
    import jax
    import jax.numpy as jnp

    from noisejax import layers, noise, rng, simulate

    weights, biases = _load_weights(args.weights)
    x = _load_input(args.input, weights[0].shape[0])
    nz = noise.NeuronNoise(
        add_uncorrelated=args.add_uncorrelated,
        add_correlated=args.add_correlated,
        mul_uncorrelated=args.mul_uncorrelated,
        mul_correlated=args.mul_correlated,
    )
    net, params = layers.from_weights(weights, biases, args.activation, args.activation_out)
    key = rng.make_key(args.seed, args.rng)
    xj = jnp.asarray(x)
    batched = x.ndim == 2

    report = {"realizations": args.realizations, "seed": args.seed, "layers": []}
    compile_s = None
    per_layer = [{"index": l, "width": int(W.shape[1])} for l, W in enumerate(weights)]

    if args.method in ("mc", "both"):
        if batched:
            fn = lambda k: layers.apply_batch(net, params, xj, key=k, noise=nz, return_layers=True)[1]
        else:
            fn = lambda k: net.apply(params, xj, key=k, noise=nz, return_layers=True)[1]
        with _CompileClock() as clock:
            res = simulate.monte_carlo(fn, key, args.realizations, chunk_size=args.chunk_size, progress=args.progress)
            jax.block_until_ready(res)
        compile_s = clock.seconds
        for l, (m, v) in enumerate(zip(res.mean, res.var)):
            per_layer[l]["mc"] = {"mean": np.asarray(m, np.float64), "var": np.asarray(v, np.float64)}
    if args.method in ("analytic", "both"):
        try:
            from noisejax import moments
        except ImportError:
            raise _CliError("--method analytic needs noisejax.moments, which is not installed in this version") from None
        preds = moments.predict(net, params, xj, noise=nz, method=args.moment_method)
        for l, p in enumerate(preds):
            per_layer[l]["analytic"] = {"mean": np.asarray(p.mean, np.float64), "var": np.asarray(p.var, np.float64)}

    report["layers"] = per_layer
    if args.json:
        out = {
            "realizations": args.realizations,
            "seed": args.seed,
            "layers": [
                {"index": e["index"], **{m: {k: e[m][k].tolist() for k in ("mean", "var")} for m in ("mc", "analytic") if m in e}}
                for e in per_layer
            ],
            # wall time of this command after start-up, and the part of the Monte Carlo run spent
            # tracing and compiling (or loading compiled programs from the compilation cache)
            "seconds": {"total": time.perf_counter() - t_start, "compile": compile_s},
        }
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_table(per_layer, args)
    return 0


def _snr_db(mean: np.ndarray, var: np.ndarray) -> float:
    """Layer SNR in dB: mean over neurons (and inputs) of mean² / mean of variance."""
    signal = float(np.mean(np.square(mean)))
    noise_v = float(np.mean(var))
    if noise_v <= 0:
        return math.inf
    return 10.0 * math.log10(signal / noise_v) if signal > 0 else -math.inf


def _print_table(per_layer, args) -> None:
    methods = [m for m in ("mc", "analytic") if m in per_layer[0]]
    print(f"noisejax propagate: {args.weights}  realizations={args.realizations}  seed={args.seed}")
    head = f"{'layer':>5} {'width':>6}"
    for m in methods:
        head += f" | {m + ' mean|y|':>14} {m + ' noise var':>14} {m + ' SNR dB':>12}"
    print(head)
    print("-" * len(head))
    for e in per_layer:
        row = f"{e['index']:>5} {e['width']:>6}"
        for m in methods:
            mean, var = e[m]["mean"], e[m]["var"]
            row += f" | {float(np.mean(np.abs(mean))):>14.5g} {float(np.mean(var)):>14.5g} {_snr_db(mean, var):>12.2f}"
        print(row)


# ----------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------


def _demo(args) -> int:
    import jax
    import jax.numpy as jnp
    import optax

    from noisejax import data, layers, noise, rng, simulate

    ds = data.load_digits(seed=args.seed)
    net = layers.mlp([64, 64, 64, 10], "sigmoid")
    _, params = net.init(jax.random.key(args.seed), (64,))

    def loss_fn(p, xb, yb):
        logits = layers.apply_batch(net, p, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    rng = np.random.default_rng(args.seed)
    for _ in range(args.epochs):
        order = rng.permutation(len(ds.y_train))
        for i in range(0, len(order), 64):
            b = order[i : i + 64]
            params, state, _ = step(params, state, ds.x_train[b], ds.y_train[b])
    x_test = jnp.asarray(ds.x_test)
    acc = float(jnp.mean(jnp.argmax(layers.apply_batch(net, params, x_test), -1) == ds.y_test))
    print(f"sigmoid MLP 64-64-64-10 on scikit-learn digits: clean test accuracy {acc:.3f}")

    x = jnp.asarray(ds.x_test[:16])
    cases = {
        "add_uncorrelated": noise.NeuronNoise(add_uncorrelated=1e-3),
        "add_correlated": noise.NeuronNoise(add_correlated=1e-3),
        "mul_uncorrelated": noise.NeuronNoise(mul_uncorrelated=1e-3),
        "mul_correlated": noise.NeuronNoise(mul_correlated=1e-3),
    }
    print(f"per-layer noise, {args.realizations} realizations, 16 test inputs, variance 1e-3 per type")
    print(f"{'noise type':>18} {'layer':>5} {'mean|y|':>10} {'noise var':>11} {'SNR dB':>8}")
    for name, nz in cases.items():
        fn = lambda k, nz=nz: layers.apply_batch(net, params, x, key=k, noise=nz, return_layers=True)[1]
        res = simulate.monte_carlo(fn, rng.key(args.seed + 1), args.realizations)
        for l, (m, v) in enumerate(zip(res.mean, res.var)):
            m, v = np.asarray(m), np.asarray(v)
            print(f"{name:>18} {l:>5} {np.mean(np.abs(m)):>10.4f} {np.mean(v):>11.3e} {_snr_db(m, v):>8.2f}")
    return 0


# ----------------------------------------------------------------------------------
# reproduce
# ----------------------------------------------------------------------------------


def _reproduce(args) -> int:
    try:
        from noisejax import reproduce
    except ImportError:
        raise _CliError("noisejax reproduce is not available in this version; run `noisejax demo`") from None
    return reproduce.main(args)


# ----------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="noisejax", description="Simulate, predict and mitigate noise in neural networks.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("propagate", help="per-layer noise statistics of given weights")
    p.add_argument("weights", metavar="WEIGHTS.npz", help="W0, b0, W1, b1, ... with W_l of shape (fan_in, fan_out)")
    p.add_argument("--input", required=True, metavar="X.npy", help="one input (fan_in,) or a batch (B, fan_in)")
    p.add_argument("--activation", required=True, type=_activation_arg, metavar="NAME",
                   help="linear, linear:SLOPE, sigmoid, tanh, relu or erf")
    p.add_argument("--activation-out", type=_activation_arg, default=None, metavar="NAME",
                   help="activation of the last layer (default: --activation)")
    for flag in ("add-uncorrelated", "add-correlated", "mul-uncorrelated", "mul-correlated"):
        p.add_argument(f"--{flag}", type=_variance_arg(f"--{flag}"), default=None, metavar="V", help="noise variance")
    p.add_argument("--realizations", type=_int_arg("--realizations", 2), default=10_000, metavar="N")
    p.add_argument("--chunk-size", type=_int_arg("--chunk-size", 1), default=None, metavar="C")
    p.add_argument("--seed", type=_int_arg("--seed", 0), default=0, metavar="S")
    p.add_argument("--method", choices=("mc", "analytic", "both"), default="mc")
    p.add_argument("--moment-method", choices=("linearized", "gaussian"), default="gaussian")
    p.add_argument("--rng", choices=("fast", "threefry", "rbg"), default="fast",
                   help="PRNG: noisejax's fast counter-based generator (default) or JAX's threefry / rbg")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.set_defaults(func=_propagate)

    d = sub.add_parser("demo", help="train a sigmoid MLP on digits and print its per-layer noise table")
    d.add_argument("--seed", type=_int_arg("--seed", 0), default=0)
    d.add_argument("--epochs", type=_int_arg("--epochs", 1), default=30)
    d.add_argument("--realizations", type=_int_arg("--realizations", 2), default=4096)
    d.set_defaults(func=_demo)

    r = sub.add_parser("reproduce", help="reproduce every figure of both papers into a report folder")
    r.add_argument("--out", default="noisejax-report", help="report folder (default ./noisejax-report)")
    r.add_argument("--only", default=None, metavar="NAME", help="run one experiment")
    r.add_argument("--full", action="store_true", help="full-size configs for an accelerator")
    r.add_argument("--force", action="store_true", help="recompute finished experiments")
    r.add_argument("--data-dir", default=None, help="folder with real MNIST / CIFAR-10 files")
    r.set_defaults(func=_reproduce)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``noisejax`` console script; returns the exit status."""
    from noisejax.errors import NoisejaxError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return _EXIT_USAGE
        if args.command in ("propagate", "demo", "reproduce"):
            from noisejax import checkpoint

            checkpoint.enable_compilation_cache()  # compiled programs are reused by the next run
        return int(args.func(args) or 0)
    except (_CliError, NoisejaxError) as e:
        print(f"noisejax: error: {e}", file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        print("noisejax: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `noisejax propagate ... --json | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
