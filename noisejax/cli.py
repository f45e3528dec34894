"""The ``noisejax`` command line.

Sub-commands:

* ``noisejax propagate WEIGHTS.npz --input X.npy --activation NAME ...`` — per-layer
  noise statistics of a network whose trained weights come from elsewhere
  (Monte Carlo and/or analytic), as a table or as JSON (a stable contract).
  A noise flag given as a range ``START:STOP:N`` (log-spaced) with ``--sweep DIR``
  sweeps it: SNR per layer vs intensity as a table, JSON and PNG in ``DIR``.
* ``noisejax demo`` — train a small sigmoid MLP on scikit-learn's digits and print
  its per-layer noise table for the four noise types (``--save`` writes the network).
* ``noisejax convert`` — a PyTorch ``state_dict`` (``.npz`` / ``.safetensors``) or Flax
  params (msgpack) of dense layers into the ``WEIGHTS.npz`` format (:mod:`noisejax.study.convert`).
* ``noisejax reproduce`` — every figure of both papers (see ``experiments/``).
* ``noisejax leaves PARAMS.npz`` — which arrays weight noise would perturb (the CLI has
  no weight-noise run; this lists the default leaf filter's choice on, e.g., a PyTorch
  ``state_dict`` saved with ``np.savez``).
* ``noisejax selfcheck`` — does this backend compute noisejax's kernels right? (exit 1 if not)

SNR is the one definition of :mod:`noisejax.snr` (layer summary
``10·log10(Σ mean² / Σ var)``).  Any user error prints one line on stderr and exits
with status 2; no traceback.  ``python -m noisejax`` is the same command.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import difflib
import io
import json
import math
import os
import re
import sys
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["main", "run", "build_parser"]

_EXIT_USAGE = 2


class _CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------
# Input loading and validation (outside jit)
# ----------------------------------------------------------------------------------

_KEY_RE = re.compile(r"^([Wb])(\d+)$")


_TORCH_HINT = "weights look like PyTorch's (out, in) layout: transpose them (W.T) or use `noisejax convert`"


def _load_weights(path: str):
    from noisejax.study import convert
    from noisejax.errors import DataFormatError

    if not os.path.isfile(path):
        raise _CliError(f"WEIGHTS file not found: {path}")
    try:
        arrays = convert.load_arrays(path)
    except DataFormatError as e:
        hint = ""
        if path.endswith((".safetensors", ".msgpack", ".pt", ".pth", ".bin")):
            hint = f"; convert it first: noisejax convert {path} --out weights.npz"
        raise _CliError(f"WEIGHTS {e}{hint}") from None
    if convert.looks_like_torch(list(arrays)):
        raise _CliError(
            f"WEIGHTS {path}: keys {sorted(arrays)[:3]} look like a PyTorch state_dict; "
            f"convert it first: noisejax convert {path} --out weights.npz"
        )
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
    transposed_chain = all(ws[l].ndim == 2 for l in range(n)) and all(
        ws[l].shape[1] == ws[l - 1].shape[0] for l in range(1, n)
    )
    weights, biases = [], []
    for l in range(n):
        W = ws[l]
        if W.ndim != 2:
            raise _CliError(f"WEIGHTS {path}: W{l} must be 2-D (fan_in, fan_out), got shape {W.shape}")
        if not np.issubdtype(W.dtype, np.floating) and not np.issubdtype(W.dtype, np.integer):
            raise _CliError(f"WEIGHTS {path}: W{l} must be numeric, got dtype {W.dtype}")
        if not np.all(np.isfinite(W)):
            raise _CliError(f"WEIGHTS {path}: W{l} contains NaN or infinite values")
        b = bs.get(l)
        if l and W.shape[0] != weights[-1].shape[1]:
            hint = f"; {_TORCH_HINT}" if transposed_chain else ""
            raise _CliError(
                f"WEIGHTS {path}: shape mismatch, W{l} has fan_in {W.shape[0]} but W{l - 1} has fan_out {weights[-1].shape[1]}{hint}"
            )
        if b is not None:
            if b.shape != (W.shape[1],):
                hint = f"; {_TORCH_HINT}" if b.shape == (W.shape[0],) else ""
                raise _CliError(f"WEIGHTS {path}: b{l} must have shape ({W.shape[1]},), got {b.shape}{hint}")
            if not np.all(np.isfinite(b)):
                raise _CliError(f"WEIGHTS {path}: b{l} contains NaN or infinite values")
        weights.append(W.astype(np.float32))
        biases.append(None if b is None else b.astype(np.float32))
    return weights, biases


def _load_input(path: str, fan_in: int, fan_out: Optional[int] = None) -> np.ndarray:
    if not os.path.isfile(path):
        raise _CliError(f"--input file not found: {path}")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:
        raise _CliError(f"--input {path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(x, np.ndarray):
        raise _CliError(f"--input {path}: an .npz archive; expected one .npy array of shape (fan_in,) or (B, fan_in)")
    if x.dtype.kind not in "fiu":
        raise _CliError(f"--input {path}: expected a numeric array, got dtype {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim not in (1, 2):
        raise _CliError(f"--input {path}: expected shape (fan_in,) or (B, fan_in), got {x.shape}")
    if x.shape[-1] != fan_in:
        hint = f"; {_TORCH_HINT}" if fan_out is not None and x.shape[-1] == fan_out else ""
        raise _CliError(f"--input {path}: shape mismatch, input has {x.shape[-1]} features but W0 expects {fan_in}{hint}")
    if x.size == 0:
        raise _CliError(f"--input {path}: empty array")
    if not np.all(np.isfinite(x)):
        raise _CliError(f"--input {path}: contains NaN or infinite values")
    return x.astype(np.float32)


class _Range(NamedTuple):
    """A noise flag given as ``START:STOP:N``: ``N`` log-spaced variances."""

    text: str
    values: tuple[float, ...]


_NOISE_FLAGS = ("add-uncorrelated", "add-correlated", "mul-uncorrelated", "mul-correlated")


def _noise_arg(name: str):
    single = _variance_arg(name)

    def parse(text: str):
        if ":" not in text:
            return single(text)
        parts = text.split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"{name} range must be START:STOP:N (log-spaced), got {text!r}")
        try:
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} range must be START:STOP:N with numbers, got {text!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo > 0 and hi > 0):
            raise argparse.ArgumentTypeError(f"{name} range START and STOP must be finite variances > 0 (log-spaced), got {text!r}")
        if n < 2:
            raise argparse.ArgumentTypeError(f"{name} range needs N >= 2 points, got {n}")
        return _Range(text, tuple(float(v) for v in np.logspace(math.log10(lo), math.log10(hi), n)))

    return parse


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


_CHOICE_RE = re.compile(r"invalid choice: '?([^' ]*)'? \(choose from (.*)\)")


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not close and word.startswith("--"):  # --add_uncorrelated, --Seed ...
        norm = word.lower().replace("_", "-")
        close = [c for c in candidates if c == norm] or difflib.get_close_matches(norm, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (with a close-match hint) and exits 2."""

    def error(self, message):  # noqa: D401
        m = _CHOICE_RE.search(message)
        if m:
            choices = [c.strip(" '") for c in m.group(2).split(",")]
            message += _did_you_mean(m.group(1), choices)
        raise _CliError(f"{self.prog}: {message}")

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self
            command = getattr(ns, "command", None)
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                    parser = action.choices[command]
            flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
            first = next((e for e in extras if e.startswith("-")), extras[0])
            hint = _did_you_mean(first.split("=", 1)[0], flags) if first.startswith("-") else ""
            parser.error(f"unrecognized argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}{hint}")
        return ns


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options whose default is a value (not None / False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _package_version() -> str:
    from noisejax import __version__

    return __version__


def _version() -> str:
    from importlib import metadata

    from noisejax import __version__

    try:
        jax_version = metadata.version("jax")
    except metadata.PackageNotFoundError:  # pragma: no cover
        jax_version = "not installed"
    return f"noisejax {__version__} (jax {jax_version}, Python {sys.version.split()[0]})"


# ----------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------


def _num(x: Any) -> Optional[float]:
    """A float for JSON; ``None`` where not finite (e.g. the SNR of a noise-free layer)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns sized to their widest cell; the first column left-aligned, the rest right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    return out + [line(r) for r in rows]


def _warn(message: str) -> None:
    print(f"noisejax: warning: {message}", file=sys.stderr)


def _layer_stats(mean: np.ndarray, var: np.ndarray, count: Optional[int] = None, axis=None) -> dict:
    """Per-layer summary: mean |y|, mean noise variance, SNR (dB) and, for Monte Carlo, its error bound."""
    from noisejax import snr

    ax = None if axis is None else tuple(axis)
    out = {
        "mean_abs": np.mean(np.abs(mean), axis=ax),
        "noise_var": np.mean(var, axis=ax),
        "snr_db": snr.layer_snr_db(mean, var, ax),
    }
    if count is not None:
        out["snr_db_stderr_bound"] = snr.layer_snr_db_stderr_bound(mean, var, count, ax)
    return out


# ----------------------------------------------------------------------------------
# propagate
# ----------------------------------------------------------------------------------


def _noise_settings(args) -> dict:
    return {flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag in _NOISE_FLAGS}


def _settings(args, weights, x) -> dict:
    widths = [int(weights[0].shape[0])] + [int(W.shape[1]) for W in weights]
    noise = {}
    for k, v in _noise_settings(args).items():
        noise[k] = list(v.values) if isinstance(v, _Range) else (0.0 if v is None else v)
    return {
        "weights": args.weights,
        "input": args.input,
        "inputs": 1 if x.ndim == 1 else int(x.shape[0]),
        "widths": widths,
        "activation": args.activation,
        "activation_out": args.activation_out or args.activation,
        "noise": noise,
        "method": args.method,
        "moment_method": args.moment_method,
        "realizations": args.realizations,
        "seed": args.seed,
        "rng": args.rng,
    }


def _settings_lines(st: dict) -> list[str]:
    noise = ", ".join(
        f"{k}={v[0]:g}..{v[-1]:g} ({len(v)} points)" if isinstance(v, list) else f"{k}={v:g}"
        for k, v in st["noise"].items() if (v if isinstance(v, list) else v > 0)
    ) or "none (all variances 0)"
    act = st["activation"] + ("" if st["activation_out"] == st["activation"] else f" (output layer: {st['activation_out']})")
    mc = f"  realizations={st['realizations']}  seed={st['seed']}  rng={st['rng']}" if st["method"] != "analytic" else ""
    an = f"  moment-method={st['moment_method']}" if st["method"] != "mc" else ""
    return [
        f"noisejax propagate  {st['weights']}  widths {'-'.join(map(str, st['widths']))}  "
        f"input {st['input']} ({st['inputs']} example{'s' if st['inputs'] > 1 else ''})",
        f"activation {act}  noise: {noise}",
        f"method={st['method']}{mc}{an}",
        "SNR = 10 log10(sum mean^2 / sum var) over the layer's outputs and inputs; "
        "+- = upper bound of its Monte Carlo standard error",
    ]


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
    import jax.numpy as jnp

    from noisejax import layers, noise, rng
    from noisejax import snr as snr_lib

    weights, biases = _load_weights(args.weights)
    x = _load_input(args.input, weights[0].shape[0], weights[0].shape[1])
    settings = _noise_settings(args)
    ranges = _check_ranges(args, settings)
    net, params = layers.from_weights(weights, biases, args.activation, args.activation_out)
    key = rng.make_key(args.seed, args.rng)
    xj = jnp.asarray(x)
    st = _settings(args, weights, x)
    if ranges:
        return _sweep(args, st, net, params, xj, key, settings, ranges)
    per_layer, compile_s = _propagate_stats(args, net, params, xj, key, noise.NeuronNoise(**settings),
                                            [int(W.shape[1]) for W in weights])
    if args.json:
        out = {
            "noisejax_version": _package_version(),
            "realizations": args.realizations,
            "seed": args.seed,
            "settings": st,
            "snr_definition": snr_lib.DEFINITION,
            "layers": [
                {"index": e["index"], "width": e["width"],
                 **{m: _layer_json(e[m]) for m in ("mc", "analytic") if m in e}}
                for e in per_layer
            ],
            # wall time of this command after start-up, and the part of the Monte Carlo run spent
            # tracing and compiling (or loading compiled programs from the compilation cache)
            "seconds": {"total": time.perf_counter() - t_start, "compile": compile_s},
        }
        _write_json(out)
    else:
        print("\n".join(_settings_lines(st)))
        print("\n".join(_propagate_table(per_layer)))
    return 0


def _check_ranges(args, settings: dict) -> dict:
    """The swept noise flags (``START:STOP:N``), checked against ``--sweep``; warns when every variance is 0."""
    ranges = {k: v for k, v in settings.items() if isinstance(v, _Range)}
    if ranges and not args.sweep:
        k, r = next(iter(ranges.items()))
        raise _CliError(f"--{k.replace('_', '-')} {r.text} is a range: add --sweep DIR (the table, JSON and PNG of the sweep go there)")
    if args.sweep and not ranges:
        raise _CliError("--sweep needs a range START:STOP:N on a noise flag, e.g. --add-uncorrelated 1e-4:1e-1:10")
    if len({len(r.values) for r in ranges.values()}) > 1:
        raise _CliError("swept noise flags must have the same number of points N (they are swept together)")
    if all(v is None or (not isinstance(v, _Range) and v == 0) for v in settings.values()):
        _warn("all noise variances are 0: the statistics are those of the noise-free network (SNR = inf; a Monte "
              "Carlo variance is float32 rounding); add e.g. --add-uncorrelated 1e-3")
    return ranges


def _forward(net, params, xj):
    """``(key, noise) -> per-layer outputs`` of one realization, for one input or a batch."""
    from noisejax import layers

    if xj.ndim == 2:
        return lambda k, nz: layers.apply_batch(net, params, xj, key=k, noise=nz, return_layers=True)[1]
    return lambda k, nz: net.apply(params, xj, key=k, noise=nz, return_layers=True)[1]


def _propagate_stats(args, net, params, xj, key, nz, widths: list) -> tuple[list, Optional[float]]:
    """Per-layer Monte Carlo and/or analytic statistics; the Monte Carlo run's compile seconds."""
    import jax

    from noisejax import simulate

    per_layer = [{"index": l, "width": w} for l, w in enumerate(widths)]
    compile_s = None
    if args.method in ("mc", "both"):
        forward = _forward(net, params, xj)
        with _CompileClock() as clock:
            res = simulate.monte_carlo(lambda k: forward(k, nz), key, args.realizations, chunk_size=args.chunk_size,
                                       progress=args.progress)
            jax.block_until_ready(res)
        compile_s = clock.seconds
        for l, (m, v) in enumerate(zip(res.mean, res.var)):
            m, v = np.asarray(m, np.float64), np.asarray(v, np.float64)
            per_layer[l]["mc"] = {"mean": m, "var": v, "mean_stderr": np.sqrt(v / args.realizations),
                                  **_layer_stats(m, v, args.realizations)}
    if args.method in ("analytic", "both"):
        from noisejax import moments

        preds = moments.predict(net, params, xj, noise=nz, method=args.moment_method)
        for l, p in enumerate(preds):
            m, v = np.asarray(p.mean, np.float64), np.asarray(p.var, np.float64)
            per_layer[l]["analytic"] = {"mean": m, "var": v, **_layer_stats(m, v)}
    return per_layer, compile_s


def _write_json(doc: dict, *, allow_nan: bool = False) -> None:
    """``doc`` as one line of JSON on stdout (``json.dumps``: C-accelerated, unlike ``json.dump``'s
    pure-Python chunked encoder — 0.15 s for the ~10⁵ numbers of a ``propagate --json``)."""
    sys.stdout.write(json.dumps(doc, allow_nan=allow_nan) + "\n")


def _layer_json(e: dict) -> dict:
    out = {k: np.asarray(e[k]).tolist() for k in ("mean", "var", "mean_stderr") if k in e}
    out.update({k: _num(e[k]) for k in ("snr_db", "snr_db_stderr_bound", "mean_abs", "noise_var") if k in e})
    return out


def _propagate_table(per_layer) -> list[str]:
    methods = [m for m in ("mc", "analytic") if m in per_layer[0]]
    name = {"mc": "MC", "analytic": "analytic"}
    header = ["layer", "width"]
    for m in methods:
        header += [f"{name[m]} mean|y|", f"{name[m]} noise var", f"{name[m]} SNR dB"] + (["+-"] if m == "mc" else [])
    rows = []
    for e in per_layer:
        row = [str(e["index"]), str(e["width"])]
        for m in methods:
            d = e[m]
            row += [_fmt(float(d["mean_abs"]), ".5g"), _fmt(float(d["noise_var"]), ".5g"), _fmt(float(d["snr_db"]), ".2f")]
            if m == "mc":
                row.append(_fmt(float(d["snr_db_stderr_bound"]), ".2f"))
        rows.append(row)
    return _table(header, rows)


def _sweep(args, st, net, params, xj, key, settings, ranges) -> int:
    """SNR per layer at every point of the swept noise flags: table, JSON and PNG in ``args.sweep``."""
    from noisejax import snr as snr_lib

    n_points = len(next(iter(ranges.values())).values)
    n_layers = len(st["widths"]) - 1
    result = _sweep_stats(args, net, params, xj, key, settings, n_points, n_layers)
    swept = list(ranges)
    x_values = np.asarray(ranges[swept[0]].values)
    header = [f"{k} D" for k in swept]
    for method in result:
        for l in range(n_layers):
            header.append(f"{'MC' if method == 'mc' else 'analytic'} L{l} SNR dB")
            if method == "mc":
                header.append("+-")
    rows = []
    for i in range(n_points):
        row = [f"{ranges[k].values[i]:.4g}" for k in swept]
        for method, layers_ in result.items():
            for d in layers_:
                row.append(_fmt(float(d["snr_db"][i]), ".2f"))
                if method == "mc":
                    row.append(_fmt(float(d["snr_db_stderr_bound"][i]), ".2f"))
        rows.append(row)
    lines = _settings_lines(st) + _table(header, rows)
    doc = {
        "noisejax_version": _package_version(),
        "settings": st,
        "snr_definition": snr_lib.DEFINITION,
        "swept": {k: list(ranges[k].values) for k in swept},
        "layers": [
            {"index": l, "width": st["widths"][l + 1],
             **{method: {k: [_num(v) for v in np.asarray(d[k])] for k in d} for method, layers_ in result.items()
                for d in [layers_[l]]}}
            for l in range(n_layers)
        ],
    }
    out_dir = args.sweep
    _write_sweep(out_dir, lines, doc, _sweep_figure(x_values, swept, result, st))
    if args.json:
        _write_json(doc)
    else:
        print("\n".join(lines))
        print(f"wrote {os.path.join(out_dir, 'sweep.txt')}, sweep.json and sweep.png")
    return 0


def _sweep_stats(args, net, params, xj, key, settings: dict, n_points: int, n_layers: int) -> dict:
    """Per-layer statistics ``{"mc"|"analytic": [layer stats over the points]}`` at every point of the sweep."""
    import jax

    from noisejax import noise, simulate

    def column(v):
        if isinstance(v, _Range):
            return np.asarray(v.values, np.float32)
        return None if v is None else np.full(n_points, v, np.float32)

    result: dict[str, list] = {}
    if args.method in ("mc", "both"):
        stack = noise.NeuronNoise(**{k: column(v) for k, v in settings.items()})
        forward = _forward(net, params, xj)
        # the realization function vmaps over the intensities (same noise draws at every point)
        fn = lambda k: jax.vmap(lambda nz: forward(k, nz))(stack)  # noqa: E731
        res = simulate.monte_carlo(fn, key, args.realizations, chunk_size=args.chunk_size, progress=args.progress)
        result["mc"] = []
        for m, v in zip(res.mean, res.var):
            m, v = np.asarray(m, np.float64), np.asarray(v, np.float64)
            result["mc"].append(_layer_stats(m, v, args.realizations, axis=range(1, m.ndim)))
    if args.method in ("analytic", "both"):
        from noisejax import moments

        per_point = []
        for i in range(n_points):
            nz = noise.NeuronNoise(**{k: (None if c is None else float(c[i])) for k, c in
                                      ((k, column(v)) for k, v in settings.items())})
            per_point.append(moments.predict(net, params, xj, noise=nz, method=args.moment_method))
        result["analytic"] = []
        for l in range(n_layers):
            m = np.stack([np.asarray(p[l].mean, np.float64) for p in per_point])
            v = np.stack([np.asarray(p[l].var, np.float64) for p in per_point])
            result["analytic"].append(_layer_stats(m, v, axis=range(1, m.ndim)))
    return result


def _write_sweep(out_dir: str, lines: list, doc: dict, fig) -> None:
    """``sweep.txt``, ``sweep.json`` and ``sweep.png`` in ``out_dir``, atomically (:mod:`noisejax.study.files`)."""
    from noisejax.errors import NoisejaxError
    from noisejax.study import files
    from noisejax.study.plots import png_bytes

    try:
        files.atomic_write_bytes(os.path.join(out_dir, "sweep.txt"), ("\n".join(lines) + "\n").encode())
        files.atomic_write_json(os.path.join(out_dir, "sweep.json"), doc)
        files.atomic_write_bytes(os.path.join(out_dir, "sweep.png"), png_bytes(fig))
    except (OSError, NoisejaxError) as e:
        raise _CliError(f"--sweep {out_dir}: cannot write the results ({getattr(e, 'strerror', None) or e})") from None


def _sweep_figure(x_values, swept, result: dict, st: dict):
    """Layer SNR vs the swept noise variance: a Matplotlib figure (no pyplot state)."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    n_layers = len(st["widths"]) - 1
    for l in range(n_layers):
        c = colors[l % len(colors)]
        label = f"layer {l} ({st['widths'][l + 1]} neurons{', output' if l == n_layers - 1 else ''})"
        if "analytic" in result:
            ax.plot(x_values, result["analytic"][l]["snr_db"], "-", color=c, lw=1.5, label=label + (": analytic" if "mc" in result else ""))
        if "mc" in result:
            d = result["mc"][l]
            ax.errorbar(x_values, d["snr_db"], yerr=d["snr_db_stderr_bound"], fmt="o", color=c, ms=4, mfc="none", capsize=2,
                        label=label + (": Monte Carlo" if "analytic" in result else ""))
    ax.set_xscale("log")
    others = [k for k in swept[1:]]
    ax.set_xlabel(f"noise variance D ({swept[0]})" + (f", swept together with {', '.join(others)}" if others else ""))
    ax.set_ylabel("layer SNR (dB) = 10 log10(Σ mean² / Σ var)")
    fixed = ", ".join(f"{k}={v:g}" for k, v in st["noise"].items() if not isinstance(v, list) and v > 0)
    title = f"{os.path.basename(st['weights'])}: widths {'-'.join(map(str, st['widths']))}, {st['activation']}"
    sub = f"{st['realizations']} realizations (error bars: bound of the standard error)" if "mc" in result else "analytic"
    ax.set_title(title + (f", fixed {fixed}" if fixed else "") + "\n" + sub, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------

_DEMO_WIDTHS = (64, 64, 64, 10)
_NOISE_NAMES = ("add_uncorrelated", "add_correlated", "mul_uncorrelated", "mul_correlated")


def _demo(args) -> int:
    import jax
    import jax.numpy as jnp
    import optax

    from noisejax import data, layers, moments, noise, rng, simulate, train
    from noisejax.errors import NoisejaxError
    from noisejax.study import convert, files

    ds = data.load_digits(seed=args.seed)
    net = layers.mlp(list(_DEMO_WIDTHS), "sigmoid")
    _, params = net.init(jax.random.key(args.seed), (_DEMO_WIDTHS[0],))
    steps = args.epochs * -(-len(ds.y_train) // 64)
    fit = train.train_plain(net, params, ds.x_train, ds.y_train, key=jax.random.key(args.seed + 2),
                            optimizer=optax.adam(3e-3), steps=steps, batch_size=64)
    params = fit.params
    acc = float(train.accuracy(layers.apply_batch(net, params, jnp.asarray(ds.x_test)), jnp.asarray(ds.y_test)))
    arch = "-".join(map(str, _DEMO_WIDTHS))
    print(f"sigmoid MLP {arch} on scikit-learn digits, {steps} Adam steps: clean test accuracy {acc:.3f}")

    x = jnp.asarray(ds.x_test[: args.inputs])
    d = args.noise_variance
    print(f"per-layer noise: {args.realizations} Monte Carlo realizations vs analytic (Gaussian moments), "
          f"{x.shape[0]} test inputs, variance {d:g} of one noise type at every layer")
    print("SNR = 10 log10(sum mean^2 / sum var) over the layer's neurons and inputs; "
          "+- = upper bound of the Monte Carlo standard error")
    rows = []
    for name in _NOISE_NAMES:
        nz = noise.NeuronNoise(**{name: d})
        fn = lambda k, nz=nz: layers.apply_batch(net, params, x, key=k, noise=nz, return_layers=True)[1]
        res = simulate.monte_carlo(fn, rng.key(args.seed + 1), args.realizations)
        preds = moments.predict(net, params, x, noise=nz)
        for l, (m, v) in enumerate(zip(res.mean, res.var)):
            st = _layer_stats(np.asarray(m, np.float64), np.asarray(v, np.float64), args.realizations)
            an = _layer_stats(np.asarray(preds[l].mean, np.float64), np.asarray(preds[l].var, np.float64))
            rows.append([name if l == 0 else "", str(l), str(_DEMO_WIDTHS[l + 1]), _fmt(float(st["mean_abs"]), ".4f"),
                         _fmt(float(st["noise_var"]), ".3e"), _fmt(float(st["snr_db"]), ".2f"),
                         _fmt(float(st["snr_db_stderr_bound"]), ".2f"), _fmt(float(an["snr_db"]), ".2f")])
    print("\n".join(_table(["noise type", "layer", "width", "mean|y|", "noise var", "MC SNR dB", "+-", "analytic SNR dB"], rows)))
    if args.save:
        weights = [np.asarray(p[0]["W"]) for p in params]
        biases = [np.asarray(p[0]["b"]) for p in params]
        try:
            convert.save_dense(args.save, weights, biases)
            if args.save_inputs:
                buf = io.BytesIO()
                np.save(buf, np.asarray(x, np.float32))
                files.atomic_write_bytes(args.save_inputs, buf.getvalue())
        except (OSError, NoisejaxError) as e:
            raise _CliError(f"--save {args.save}: cannot write ({getattr(e, 'strerror', None) or e})") from None
        inputs = args.save_inputs or "X.npy"
        print(f"saved the trained network to {args.save}" + (f" and its {x.shape[0]} test inputs to {args.save_inputs}" if args.save_inputs else ""))
        print(f"next: noisejax propagate {args.save} --input {inputs} --activation sigmoid --add-uncorrelated {d:g} --method both")
    return 0


# ----------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------


def _convert(args) -> int:
    from noisejax.study import convert

    src = args.source
    if not os.path.isfile(src):
        raise _CliError(f"SOURCE file not found: {src}")
    kind = args.from_
    if kind == "auto":
        if src.endswith(".safetensors"):
            kind = "torch"
        elif src.endswith((".msgpack", ".flax")):
            kind = "flax"
        elif src.endswith(".npz"):
            kind = "torch"
        else:
            raise _CliError(f"SOURCE {src}: cannot tell the format from the name; give --from torch or --from flax")
    if os.path.abspath(src) == os.path.abspath(args.out):
        raise _CliError("--out must differ from SOURCE")
    layers_ = None if args.layers is None else [p for p in args.layers.split(",") if p]
    from noisejax.errors import NoisejaxError

    try:
        weights, biases, what, note = _read_dense(src, kind, layers_)
    except NoisejaxError as e:
        msg = str(e)
        raise _CliError(msg if msg.startswith(src) else f"SOURCE {src}: {msg}") from None
    try:
        convert.save_dense(args.out, weights, biases)
    except (OSError, NoisejaxError) as e:
        raise _CliError(f"--out {args.out}: cannot write ({getattr(e, 'strerror', None) or e})") from None
    widths = [weights[0].shape[0]] + [W.shape[1] for W in weights]
    nb = sum(b is not None for b in biases)
    print(f"converted {len(weights)} dense layers ({'-'.join(map(str, widths))}, {nb} biases) from a {what} "
          f"to {args.out}; {note}")
    return 0


def _read_dense(src: str, kind: str, layers_):
    from noisejax.study import convert

    if kind == "torch":
        if src.endswith(".safetensors"):
            state, natural, what = convert.read_safetensors(src), True, "PyTorch state_dict (safetensors)"
        else:
            state, natural, what = convert.load_arrays(src), False, "PyTorch state_dict (.npz)"
            if state and all(_KEY_RE.match(k) for k in state):
                raise _CliError(f"SOURCE {src} is already in the WEIGHTS.npz format (W0, b0, ...); nothing to convert")
        weights, biases = convert.from_torch_state_dict(state, layers_, natural_order=natural)
        note = "weights transposed from (out, in) to (in, out)"
    else:
        weights, biases = convert.from_flax_params(convert.read_flax_msgpack(src), layers_)
        what, note = "Flax params (msgpack)", "kernels kept as (in, out)"
    return weights, biases, what, note


# ----------------------------------------------------------------------------------
# leaves (what weight noise perturbs) and selfcheck
# ----------------------------------------------------------------------------------


def _print_leaf_selection(rows, out=None) -> None:
    """Print :func:`noisejax.noise.selected_leaves` rows as a table and a one-line summary."""
    out = out or sys.stdout
    width = max([len(r.name) for r in rows] + [4])
    print(f"{'leaf':<{width}}  {'shape':<18} {'dtype':<8} {'noise':<5} skipped because", file=out)
    for r in rows:
        print(f"{r.name:<{width}}  {str(r.shape):<18} {r.dtype:<8} {'yes' if r.selected else 'no':<5} {r.reason}", file=out)
    chosen = [r for r in rows if r.selected]
    values = sum(int(np.prod(r.shape)) for r in chosen)
    total = sum(int(np.prod(r.shape)) for r in rows)
    print(f"weight noise perturbs {len(chosen)} of {len(rows)} leaves ({values} of {total} values)", file=out)


def _leaves(args) -> int:
    from noisejax import noise

    if not os.path.isfile(args.params):
        raise _CliError(f"PARAMS file not found: {args.params}")
    try:
        with np.load(args.params, allow_pickle=False) as z:
            tree = {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:
        raise _CliError(f"PARAMS {args.params}: not a readable .npz file ({type(e).__name__}: {e})") from None
    filt = noise.state_dict_leaf_filter(tree) if args.filter == "state-dict" else noise.default_leaf_filter
    _print_leaf_selection(noise.selected_leaves(tree, filt))
    return 0


def _selfcheck(args) -> int:
    from noisejax import selfcheck

    only = None if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    report = selfcheck.run(only)
    if args.json:
        _write_json(report.to_dict(), allow_nan=True)
    else:
        print(selfcheck.format_table(report))
    return 0 if report.ok else 1


# ----------------------------------------------------------------------------------
# reproduce
# ----------------------------------------------------------------------------------


def _reproduce(args) -> int:
    try:
        from noisejax.study import reproduce
    except ImportError:
        raise _CliError("noisejax reproduce is not available in this version; run `noisejax demo`") from None
    return reproduce.main(args)


# ----------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = _Parser(prog="noisejax", description="Simulate, predict and mitigate noise in neural networks.",
                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    _add_propagate(sub, fmt)
    d = sub.add_parser("demo", help="train a sigmoid MLP on digits and print its per-layer noise table",
                       formatter_class=fmt)
    d.add_argument("--seed", type=_int_arg("--seed", 0), default=0, metavar="S", help="PRNG seed (data split, init, noise)")
    d.add_argument("--epochs", type=_int_arg("--epochs", 1), default=30, metavar="E", help="training epochs")
    d.add_argument("--realizations", type=_int_arg("--realizations", 2), default=4096, metavar="N",
                   help="Monte Carlo realizations per noise type")
    d.add_argument("--inputs", type=_int_arg("--inputs", 1), default=16, metavar="B", help="test inputs the noise is measured on")
    d.add_argument("--noise-variance", type=_variance_arg("--noise-variance"), default=1e-3, metavar="D",
                   help="variance of each noise type")
    d.add_argument("--save", default=None, metavar="WEIGHTS.npz",
                   help="write the trained network in the format `noisejax propagate` reads")
    d.add_argument("--save-inputs", default=None, metavar="X.npy", help="write the test inputs used (for --input)")
    d.set_defaults(func=_demo)

    c = sub.add_parser("convert", help="PyTorch state_dict (.npz / .safetensors) or Flax params -> WEIGHTS.npz",
                       formatter_class=fmt,
                       description="Convert the dense layers of a PyTorch state_dict (nn.Linear: '<prefix>.weight' "
                                   "(out, in), transposed) or of Flax params (nn.Dense: 'kernel' (in, out)) into "
                                   "the WEIGHTS.npz format of `noisejax propagate`.")
    c.add_argument("source", metavar="SOURCE", help="state_dict .npz / .safetensors, or Flax .msgpack")
    c.add_argument("--out", required=True, metavar="WEIGHTS.npz", help="the converted file")
    c.add_argument("--from", dest="from_", choices=("auto", "torch", "flax"), default="auto",
                   help="source format (auto: from the file name)")
    c.add_argument("--layers", default=None, metavar="P1,P2,...",
                   help="layer names in network order (default: the file's order; natural name order for safetensors)")
    c.set_defaults(func=_convert)

    r = sub.add_parser("reproduce", help="reproduce every figure of both papers into a report folder", formatter_class=fmt)
    r.add_argument("--out", default="noisejax-report", help="report folder")
    r.add_argument("--only", default=None, metavar="NAME", help="run one experiment")
    r.add_argument("--full", action="store_true", help="full-size configs for an accelerator")
    r.add_argument("--force", action="store_true", help="recompute finished experiments")
    r.add_argument("--data-dir", default=None, help="folder with real MNIST / CIFAR-10 files")
    r.add_argument("--jobs", type=_int_arg("--jobs", 1), default=2, metavar="N",
                   help="experiments run side by side (1: one after the other, each with its own progress bars)")
    r.set_defaults(func=_reproduce)

    lv = sub.add_parser("leaves", help="list which arrays of a .npz weight noise would perturb")
    lv.add_argument("params", metavar="PARAMS.npz", help="named arrays, e.g. a PyTorch state_dict saved with np.savez")
    lv.add_argument("--filter", choices=("default", "state-dict"), default="default",
                    help="default: names only; state-dict: also modules with running statistics or a 1-D weight")
    lv.set_defaults(func=_leaves)

    sc = sub.add_parser("selfcheck", help="check that this backend computes noisejax's kernels right (exit 1 if not)")
    sc.add_argument("--only", default=None, metavar="NAMES", help="comma-separated check names (default: all)")
    sc.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    sc.set_defaults(func=_selfcheck)
    return parser


def _add_propagate(sub, fmt) -> None:
    """The ``propagate`` subcommand's arguments."""
    p = sub.add_parser("propagate", help="per-layer noise statistics of given weights", formatter_class=fmt,
                       description="Per-layer mean, noise variance and SNR of a dense network under neuron noise "
                                   "(Monte Carlo and/or analytic).  SNR = 10 log10(sum mean^2 / sum var) per layer.")
    p.add_argument("weights", metavar="WEIGHTS.npz",
                   help="W0, b0, W1, b1, ... with W_l of shape (fan_in, fan_out) (see `noisejax convert`)")
    p.add_argument("--input", required=True, metavar="X.npy", help="one input (fan_in,) or a batch (B, fan_in)")
    p.add_argument("--activation", required=True, type=_activation_arg, metavar="NAME",
                   help="linear, linear:SLOPE, sigmoid, tanh, relu or erf")
    p.add_argument("--activation-out", type=_activation_arg, default=None, metavar="NAME",
                   help="activation of the last layer (default: --activation)")
    for flag in _NOISE_FLAGS:
        p.add_argument(f"--{flag}", type=_noise_arg(f"--{flag}"), default=None, metavar="D",
                       help=f"{flag.replace('add-', 'additive ').replace('mul-', 'multiplicative ')} noise "
                            "variance D at every layer (default: 0); "
                            "START:STOP:N sweeps N log-spaced values (needs --sweep)")
    p.add_argument("--sweep", default=None, metavar="DIR",
                   help="folder for a sweep's table (sweep.txt), JSON (sweep.json) and plot (sweep.png)")
    p.add_argument("--realizations", type=_int_arg("--realizations", 2), default=10_000, metavar="N",
                   help="Monte Carlo realizations")
    p.add_argument("--chunk-size", type=_int_arg("--chunk-size", 1), default=None, metavar="C",
                   help="realizations per compiled call (results do not depend on it)")
    p.add_argument("--seed", type=_int_arg("--seed", 0), default=0, metavar="S", help="PRNG seed")
    p.add_argument("--method", choices=("mc", "analytic", "both"), default="mc",
                   help="Monte Carlo, analytic moment propagation, or both")
    p.add_argument("--moment-method", choices=("linearized", "gaussian"), default="gaussian",
                   help="analytic method: first order, or Gaussian moment matching")
    p.add_argument("--rng", choices=("fast", "threefry", "rbg"), default="fast",
                   help="PRNG: noisejax's fast counter-based generator or JAX's threefry / rbg")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.set_defaults(func=_propagate)


def run() -> None:
    """The ``noisejax`` console script (and ``python -m noisejax``): :func:`main`, then a prompt exit.

    After JAX has run, Python's own interpreter teardown (garbage-collecting JAX's modules,
    the CPU client and its thread pools) takes 0.1–0.2 s of a command that otherwise
    starts and finishes in about a second.  Everything the command writes is written by
    then: the standard streams are flushed, the ``atexit`` handlers run (logging, JAX's
    own), and the process leaves with :func:`os._exit` and :func:`main`'s status.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a closed pipe or stream: nothing left to deliver
        pass
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None:  # pragma: no cover - not CPython: the ordinary exit
        sys.exit(code)
    run_exitfuncs()
    os._exit(code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (:func:`run` is the console script)."""
    from noisejax.errors import NoisejaxError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return _EXIT_USAGE
        if args.command == "reproduce" and args.jobs == 1:  # the cores as JAX devices: sharded runs go side by side
            # (not with experiments side by side: their lanes fill the cores, and a sharded program's
            # collectives would wait on devices the other lane holds; see reproduce.run)
            from noisejax import _backend

            _backend.use_host_devices()
        cache = contextlib.nullcontext()
        if args.command in ("propagate", "demo", "reproduce"):
            from noisejax.study import files

            cache = files.compilation_cache()  # compiled programs are reused by the next run
        with cache:
            return int(args.func(args) or 0)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
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
