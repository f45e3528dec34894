"""``noisejax reproduce``: run every experiment of ``experiments/`` and write a report.

The orchestrator behind the project's main job.  Each experiment lives in its own
folder ``experiments/NAME/`` (next to the ``noisejax`` package in a checkout) with

* ``config.py`` — configurations named ``tiny`` (tests, seconds), ``default`` (the
  2-core CPU, the whole report in ≤ 15 minutes) and ``full`` (an accelerator);
  looked up as ``get_config(name)``, a module attribute ``name`` (an object or a
  zero-argument factory) or ``CONFIGS[name]``;
* ``run.py`` — ``main(config, ...) -> dict``; keyword arguments named ``out_dir``
  (the experiment's own work folder inside the report), ``data_dir`` and
  ``progress`` are passed when ``main`` accepts them;
* ``README.md`` — the command, what the figure shows, the paper's claim, our result.

The result dict is stored whole in ``results.json``.  Two keys are read:

* ``"claims"``: a list of ``{"claim", "figure", "measured", "holds", "note"}``
  (see :func:`claim`; ``figure`` is the paper's figure, ``holds`` a bool or
  ``None`` for a claim reported without a threshold), turned into the claims table
  of ``report.md`` under the summary line "N hold, M do not, K reported without a
  threshold";
* ``"figures"``: PNG paths (relative to ``out_dir`` or absolute inside it); without
  it every ``*.png`` of ``out_dir`` is taken.

Report folder layout (``--out``, default ``./noisejax-report``)::

    report.md              claims table + embedded figures
    results.json           every number, per experiment (status, timings, result)
    figures/NAME.png       one PNG per figure (NAME_2.png ... for extra ones)
    runs/NAME/record.json  the finished experiment: result + SHA-256 checksum
    runs/NAME/...          the experiment's work folder (cached models, points)
    runs/NAME/error.log    traceback of a failed run

Resuming: an experiment whose ``record.json`` parses, has a valid checksum, the
same configuration fingerprint (config values, the experiment's source files and the
``noisejax`` package's sources)
and intact figures is reused, not recomputed (``--force`` recomputes).  Every file
is written atomically (temporary file in the same folder, ``fsync``, ``os.replace``),
so a killed run leaves either the old file or the new one; a corrupted or partial
file fails the checks and is recomputed, never trusted.  Experiments use
:func:`cached_point` / :func:`save_arrays` / :func:`load_arrays` the same way for
their own sweep points and trained models, so a restarted run also skips the
finished points of an interrupted experiment.

Python API::

    >>> from noisejax import reproduce
    >>> summary = reproduce.run("noisejax-report", config="tiny", only="symmetric_depth")
    >>> summary["experiments"]["symmetric_depth"]["status"]
    'ok'

The configuration used by ``noisejax reproduce`` is ``default`` (``full`` with
``--full``); the environment variable ``NOISEJAX_REPRODUCE_CONFIG`` (``tiny``,
``default`` or ``full``) overrides it — the tests use ``tiny``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.util
import inspect
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Union


from noisejax.errors import InvalidArgumentError

__all__ = [
    "EXPERIMENTS",
    "CONFIG_NAMES",
    "CONFIG_ENV",
    "RECORD_FORMAT",
    "Experiment",
    "experiments_dir",
    "available",
    "load_experiment",
    "get_config",
    "fingerprint",
    "claim",
    "claims_summary",
    "run",
    "main",
    "import_file",
    "safe_join",
    "atomic_write_bytes",
    "atomic_write_json",
    "read_checked_json",
    "write_checked_json",
    "cached_point",
    "save_arrays",
    "load_arrays",
    "to_jsonable",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Experiments in report order: figures 1–3 (paper A), mitigation, then paper B, then analog hardware (issue 16).
EXPERIMENTS: tuple[str, ...] = (
    "symmetric_depth",
    "trained_mlp_snr",
    "connection_matrix",
    "cnn_kernel",
    "mitigation",
    "noisy_inference",
    "noisy_federated",
    "pcm_drift",
)
#: Wall seconds of each experiment's ``default`` config on the 2-core CPU (a measured run): the
#: weights of the overall progress and ETA.  An experiment missing here counts as the median;
#: a stored record in the report folder (an earlier run on this machine) takes precedence.
_EXPECTED_SECONDS: dict[str, float] = {
    "symmetric_depth": 11.0,
    "trained_mlp_snr": 19.0,
    "connection_matrix": 29.0,
    "cnn_kernel": 60.0,
    "mitigation": 48.0,
    "noisy_inference": 255.0,
    "noisy_federated": 121.0,
}
CONFIG_NAMES: tuple[str, ...] = ("tiny", "default", "full")
CONFIG_ENV = "NOISEJAX_REPRODUCE_CONFIG"
RECORD_FORMAT = 1

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_FILE_RE = re.compile(r"[^A-Za-z0-9_.-]+")
_OUT_DIR_PARAMS = ("out_dir", "output_dir", "work_dir", "out")
_RECORD_KEYS = ("format", "name", "config_name", "fingerprint", "status", "result", "figures", "wall_seconds", "cpu_seconds")


from noisejax.store import (  # noqa: E402  (re-exported: experiments import them from here)
    _file_sha,
    _sha256,
    atomic_write_bytes,
    atomic_write_json,
    cached_point,
    code_digest,
    fingerprint,
    load_arrays,
    read_checked_json,
    safe_join,
    save_arrays,
    to_jsonable,
    write_checked_json,
)


# ----------------------------------------------------------------------------------
# Experiments
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A loaded experiment folder: its ``config`` and ``run`` modules."""

    name: str
    path: Path
    config_module: Any
    run_module: Any

    def config(self, config_name: str) -> Any:
        return get_config(self, config_name)

    @property
    def main(self) -> Callable[..., dict]:
        return self.run_module.main


def experiments_dir() -> Path:
    """The ``experiments/`` folder of this checkout (``$NOISEJAX_EXPERIMENTS_DIR`` overrides).

    The experiments are not part of the installed package: they are found next to
    the ``noisejax`` package directory (an editable install or a source checkout).
    """
    env = os.environ.get("NOISEJAX_EXPERIMENTS_DIR")
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[1] / "experiments"


def _check_name(name: Any, what: str = "experiment name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgumentError(
            f"{what} must be one of {', '.join(EXPERIMENTS)}; got {name!r}"
        )
    return name


def available(root: Optional[PathLike] = None) -> list[str]:
    """Registered experiments whose folder (with ``run.py`` and ``config.py``) exists."""
    base = Path(root) if root is not None else experiments_dir()
    return [n for n in EXPERIMENTS if (base / n / "run.py").is_file() and (base / n / "config.py").is_file()]


def import_file(path: PathLike, module_name: Optional[str] = None):
    """Import a Python file by path (registered in ``sys.modules`` so dataclasses work).

    The experiments use it to load their sibling ``config.py``; the default module
    name is derived from the file's absolute path, so repeated imports reuse it.
    """
    path = Path(path).resolve()
    if module_name is None:
        module_name = f"noisejax_file_{_FILE_RE.sub('_', path.parent.name)}_{path.stem}_{fingerprint(str(path))[:8]}"
        if module_name in sys.modules:
            return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling-free introspection need it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_experiment(name: str, root: Optional[PathLike] = None) -> Experiment:
    """Import ``experiments/NAME/{config,run}.py`` by file path.

    Raises:
      InvalidArgumentError: unknown name, or the experiments folder / the
        experiment's folder is missing.
    """
    _check_name(name)
    if name not in EXPERIMENTS:
        raise InvalidArgumentError(f"experiment name must be one of {', '.join(EXPERIMENTS)}; got {name!r}")
    base = Path(root) if root is not None else experiments_dir()
    if not base.is_dir():
        raise InvalidArgumentError(
            f"experiments folder not found at {base}: `noisejax reproduce` needs a source checkout "
            "(pip install -e . from the repository) or NOISEJAX_EXPERIMENTS_DIR"
        )
    folder = safe_join(base, name)
    for f in ("config.py", "run.py"):
        if not (folder / f).is_file():
            raise InvalidArgumentError(f"experiment {name!r}: {folder / f} does not exist")
    tag = fingerprint(str(folder))[:8]
    config_module = import_file(folder / "config.py", f"noisejax_experiments_{name}_{tag}_config")
    run_module = import_file(folder / "run.py", f"noisejax_experiments_{name}_{tag}_run")
    if not callable(getattr(run_module, "main", None)):
        raise InvalidArgumentError(f"experiment {name!r}: run.py has no main(config) function")
    return Experiment(name, folder, config_module, run_module)


def get_config(experiment: Experiment, config_name: str) -> Any:
    """The configuration ``config_name`` (``tiny``/``default``/``full``) of an experiment."""
    if config_name not in CONFIG_NAMES:
        raise InvalidArgumentError(f"config must be one of {', '.join(CONFIG_NAMES)}; got {config_name!r}")
    mod = experiment.config_module
    for getter_name in ("get_config", "get"):
        getter = getattr(mod, getter_name, None)
        if inspect.isfunction(getter):
            return getter(config_name)
    for table in ("CONFIGS", "configs"):
        t = getattr(mod, table, None)
        if isinstance(t, dict) and config_name in t:
            value = t[config_name]
            return value() if callable(value) and not isinstance(value, type) else value
    value = getattr(mod, config_name, None)
    if value is None:
        value = getattr(mod, config_name.upper(), None)
    if value is None:
        raise InvalidArgumentError(f"experiment {experiment.name!r}: config.py defines no {config_name!r} configuration")
    if inspect.isfunction(value):
        return value()
    return value


def _sources_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def claim(text: str, figure: str, measured: Any, holds: Optional[bool], note: str = "") -> dict:
    """One row of the claims table: the paper's ``text`` and ``figure``, our ``measured`` value, ``holds``."""
    return {"claim": str(text), "figure": str(figure), "measured": to_jsonable(measured),
            "holds": None if holds is None else bool(holds), "note": str(note)}


def _normalize_claims(result: Any) -> list[dict]:
    raw = result.get("claims") if isinstance(result, dict) else None
    if not isinstance(raw, (list, tuple)):
        return []
    out = []
    for c in raw:
        if dataclasses.is_dataclass(c) and not isinstance(c, type):
            c = dataclasses.asdict(c)
        if not isinstance(c, dict):
            out.append(claim(str(c), "", "", None))
            continue
        pick = lambda *ks, default="": next((c[k] for k in ks if k in c and c[k] is not None), default)  # noqa: E731
        holds = pick("holds", "ok", "passed", default=None)
        out.append(
            claim(
                pick("claim", "text", "statement", "name"),
                pick("figure", "paper_figure", "paper", "ref", "reference"),
                pick("measured", "value", "ours", "result"),
                None if holds is None else bool(holds),
                pick("note", "notes", "why", "comment"),
            )
        )
    return out


# ----------------------------------------------------------------------------------
# Running one experiment
# ----------------------------------------------------------------------------------


def _record_valid(record: Any, name: str, config_name: str, fp: str, out: Path) -> bool:
    if not isinstance(record, dict) or any(k not in record for k in _RECORD_KEYS):
        return False
    if record["format"] != RECORD_FORMAT or record["name"] != name or record["status"] != "ok":
        return False
    if record["config_name"] != config_name or record["fingerprint"] != fp:
        return False
    figs = record["figures"]
    if not isinstance(figs, list):
        return False
    for f in figs:
        try:
            src = safe_join(out, *Path(f["source"]).parts)
        except (InvalidArgumentError, KeyError, TypeError):
            return False
        if _file_sha(src) != f.get("sha256"):
            return False
    return True


def _call_main(exp: Experiment, config: Any, work: Path, data_dir: Optional[str], progress: bool) -> Any:
    """Call ``main`` with the work folder, data folder and progress flag it accepts.

    When ``main`` has no such parameter but its config is a dataclass with a
    matching field (``out_dir``, ``cache_dir``, ``data_dir``, ``progress``), a copy
    of the config pointing there is passed instead, so nothing is written outside
    the report folder.
    """
    fn = exp.main
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    names = set()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        names = {f.name for f in dataclasses.fields(config)}
    out_param = next((p for p in _OUT_DIR_PARAMS if p in params), None)
    if out_param is not None:
        kwargs[out_param] = str(work)
    else:
        field = next((p for p in _OUT_DIR_PARAMS if p in names), None)
        if field is not None:
            fields[field] = str(work)
    if "cache_dir" in names and getattr(config, "cache_dir") is None:
        fields["cache_dir"] = str(work / "cache")
    if "data_dir" not in params and "data_dir" in names and data_dir is not None:
        fields["data_dir"] = data_dir
    if "progress" not in params and "progress" in names:
        fields["progress"] = progress
    if fields:
        config = dataclasses.replace(config, **fields)
    if "data_dir" in params:
        kwargs["data_dir"] = data_dir
    if "progress" in params:
        kwargs["progress"] = progress
    return fn(config, **kwargs)


def _collect_figures(result: Any, work: Path, out: Path, name: str) -> tuple[list[dict], list[str]]:
    """Copy the experiment's PNGs into ``figures/``; returns (entries, notes)."""
    notes: list[str] = []
    listed = result.get("figures") if isinstance(result, dict) else None
    candidates: list[Path] = []
    if isinstance(listed, (list, tuple)):
        for f in listed:
            f = f.get("path") if isinstance(f, dict) else f
            if not isinstance(f, (str, os.PathLike)):
                continue
            p = Path(f)
            p = p if p.is_absolute() else work / p
            rp = p.resolve()
            if rp != work.resolve() and work.resolve() not in rp.parents:
                notes.append(f"figure {str(f)!r} is outside the experiment's folder and was not copied")
                continue
            candidates.append(rp)
    else:
        candidates = sorted(work.rglob("*.png"))
    entries = []
    for i, src in enumerate(p for p in candidates if p.is_file() and p.suffix.lower() == ".png"):
        stem = _FILE_RE.sub("_", src.stem)[:60] or "figure"
        dest_name = f"{name}.png" if i == 0 else f"{name}__{stem}.png"
        dest = safe_join(out, "figures", dest_name)
        data = src.read_bytes()
        atomic_write_bytes(dest, data)
        entries.append({"file": f"figures/{dest_name}", "source": str(src.relative_to(out.resolve())), "sha256": _sha256(data)})
    return entries, notes


def _run_one(name: str, *, out: Path, config_name: str, force: bool, data_dir: Optional[str], progress: bool, root: Optional[Path]) -> dict:
    """Run (or reuse) one experiment; never raises for a failing experiment."""
    base = Path(root) if root is not None else experiments_dir()
    if not (base / name / "run.py").is_file() or not (base / name / "config.py").is_file():
        return {"name": name, "status": "missing", "error": f"experiments/{name}/ (config.py + run.py) does not exist yet"}
    run_dir = safe_join(out, "runs", name)
    record_path = run_dir / "record.json"
    try:
        exp = load_experiment(name, base)
        config = get_config(exp, config_name)
        fp = fingerprint({"config": config, "sources": _sources_digest(exp.path), "library": code_digest(),
                          "data_dir": data_dir})
    except Exception as e:  # a broken experiment folder: report it, go on
        return _failed(name, run_dir, e, 0.0, 0.0, "import")
    if not force:
        record = read_checked_json(record_path)
        if _record_valid(record, name, config_name, fp, out):
            for f in record["figures"]:  # restore figures/ from the run folder if needed
                dest = safe_join(out, *Path(f["file"]).parts)
                if _file_sha(dest) != f["sha256"]:
                    atomic_write_bytes(dest, safe_join(out, *Path(f["source"]).parts).read_bytes())
            return dict(record, reused=True)
        if record_path.exists():
            _note(progress, f"{name}: stored result is missing, corrupted or stale; recomputing")
    else:  # --force: recompute everything, the experiment's finished points and cached models included
        if record_path.exists():
            record_path.unlink()
        if (run_dir / "work").is_dir():
            shutil.rmtree(safe_join(out, "runs", name, "work"))
    work = run_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = _call_main(exp, config, work, data_dir, progress)
        if not isinstance(result, dict):
            raise TypeError(f"main() returned {type(result).__name__}; expected a dict of results")
        figures, notes = _collect_figures(result, work, out, name)
    except Exception as e:
        return _failed(name, run_dir, e, time.perf_counter() - t0, time.process_time() - c0, "run")
    record = {
        "format": RECORD_FORMAT,
        "name": name,
        "config_name": config_name,
        "config": to_jsonable(config),
        "fingerprint": fp,
        "status": "ok",
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "result": result,
        "claims": _normalize_claims(result),
        "figures": figures,
        "notes": notes,
    }
    record = write_checked_json(record_path, record)
    err = run_dir / "error.log"
    if err.exists():
        err.unlink()
    return dict(record, reused=False)


def _failed(name: str, run_dir: Path, exc: BaseException, wall: float, cpu: float, stage: str) -> dict:
    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    try:
        atomic_write_bytes(run_dir / "error.log", "".join(traceback.format_exception(exc)).encode())
        log = f"runs/{name}/error.log"
    except OSError:
        log = None
    return {"name": name, "status": "failed", "stage": stage, "error": msg, "log": log,
            "wall_seconds": wall, "cpu_seconds": cpu}


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _expected_seconds(name: str, out: Path) -> float:
    """Expected wall time of an experiment: an earlier run's in this report folder, else the table."""
    stored = read_checked_json(safe_join(out, "runs", name, "record.json"))
    if isinstance(stored, dict) and isinstance(stored.get("wall_seconds"), (int, float)) and stored["wall_seconds"] > 0 \
            and not stored.get("result", {}).get("points_reused"):
        return float(stored["wall_seconds"])
    if name in _EXPECTED_SECONDS:
        return _EXPECTED_SECONDS[name]
    known = sorted(_EXPECTED_SECONDS.values())
    return known[len(known) // 2] if known else 60.0


def _eta_seconds(remaining_expected: list, actual_done: float, expected_done: float) -> float:
    """Time left: the remaining experiments' expected times, scaled by this run's actual/expected ratio so far."""
    speed = actual_done / expected_done if expected_done > 0 else 1.0
    return speed * float(sum(remaining_expected))


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _note(progress: bool, msg: str) -> None:
    if progress:
        try:
            from tqdm.auto import tqdm

            tqdm.write(f"noisejax reproduce: {msg}", file=sys.stderr)
            return
        except ImportError:  # pragma: no cover
            pass
    print(f"noisejax reproduce: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------


def _cell(x: Any) -> str:
    if isinstance(x, float):
        x = f"{x:.4g}"
    elif not isinstance(x, str):
        x = json.dumps(to_jsonable(x), allow_nan=False)
    return x.replace("|", "\\|").replace("\n", " ")


def _holds_text(h: Optional[bool]) -> str:
    return "reported (no threshold)" if h is None else ("**holds**" if h else "**does not hold**")


def claims_summary(experiments: dict) -> dict:
    """Counts over every claim of the report: ``{"hold", "do_not_hold", "no_threshold"}``."""
    claims = [c for rec in experiments.values() for c in (rec.get("claims") or [])]
    return {"hold": sum(c["holds"] is True for c in claims),
            "do_not_hold": sum(c["holds"] is False for c in claims),
            "no_threshold": sum(c["holds"] is None for c in claims)}


def claims_summary_line(experiments: dict) -> str:
    """``"N hold, M do not, K reported without a threshold"`` (the report's summary line)."""
    c = claims_summary(experiments)
    return f"{c['hold']} hold, {c['do_not_hold']} do not, {c['no_threshold']} reported without a threshold"


def _write_report(out: Path, summary: dict) -> None:
    exps = summary["experiments"]
    lines = [
        "# noisejax reproduce — report",
        "",
        f"Configuration `{summary['config']}` · generated {summary['generated']} · noisejax {summary['noisejax_version']}"
        f" · JAX {summary['jax_version']} on {summary['devices']} · Python {summary['python']}",
        "",
        f"Claims: {claims_summary_line(exps)}.",
        "",
        "Papers: **A** = Semenova, Larger & Brunner, *Understanding and mitigating noise in trained deep neural networks*,"
        " Neural Networks 146 (2022); **B** = Shao, Liew & Gündüz, *Denoising noisy neural networks: a Bayesian approach"
        " with compensation*, IEEE TSP 71 (2023).",
        "",
        "## Experiments",
        "",
        "| experiment | status | wall time (s) | CPU time (s) | claims holding |",
        "|---|---|---:|---:|---|",
    ]
    for name, rec in exps.items():
        status = rec["status"]
        if status == "ok":
            status = "reused" if rec.get("reused") else "ok"
            resumed = (rec.get("result") or {}).get("points_reused") if isinstance(rec.get("result"), dict) else None
            if isinstance(resumed, int) and resumed > 0:
                status += f" (resumed {resumed} stored point{'s' if resumed > 1 else ''})"
            claims = rec.get("claims") or []
            held = sum(1 for c in claims if c["holds"] is True)
            ch = f"{held} / {len(claims)}" if claims else "no claims reported"
        else:
            ch = "—"
        wall = rec.get("wall_seconds")
        cpu = rec.get("cpu_seconds")
        lines.append(
            f"| `{name}` | {status} | {'' if wall is None else f'{wall:.1f}'} | {'' if cpu is None else f'{cpu:.1f}'} | {ch} |"
        )
    lines += ["", "Times are those of the run that computed the result (a reused result keeps its original time; "
              "a resumed one only counts the points computed in that run — `--force` recomputes everything).", ""]
    lines += ["## Claims", "", f"**{claims_summary_line(exps)}.** A claim without a threshold in the paper is "
              "reported with our measured value, not judged.", "",
              "| # | claim | paper's figure | our measured value | holds |", "|---:|---|---|---|---|"]
    k = 0
    for name, rec in exps.items():
        for c in rec.get("claims") or []:
            k += 1
            measured = _cell(c["measured"])
            if c.get("note"):
                measured += f" — {_cell(c['note'])}"
            lines.append(f"| {k} | {_cell(c['claim'])} (`{name}`) | {_cell(c['figure'])} | {measured} | {_holds_text(c['holds'])} |")
    if k == 0:
        lines.append("| | no claims were produced | | | |")
    not_ok = [(n, r) for n, r in exps.items() if r["status"] != "ok"]
    if not_ok:
        lines += ["", "## Not included", ""]
        for n, r in not_ok:
            extra = f" (traceback: `{r['log']}`)" if r.get("log") else ""
            lines.append(f"- `{n}`: **{r['status']}** — {r.get('error', '')}{extra}")
    lines += ["", "## Figures", ""]
    for name, rec in exps.items():
        figs = rec.get("figures") or []
        if figs:
            lines += [f"### {name}", ""]
            readme = f"experiments/{name}/README.md"
            lines += [f"What the figure shows, the paper's claim and our result: `{readme}`.", ""]
        for f in figs:
            lines += [f"![{name}]({f['file']})", ""]
    lines += ["Every number is in `results.json`; each experiment's README explains its figure.", ""]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())


# ----------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------


def _prepare_out(out: PathLike) -> Path:
    try:
        path = Path(out).expanduser()
    except TypeError:
        raise InvalidArgumentError(f"--out must be a folder path, got {out!r}") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(f"--out {str(out)!r}: cannot create the report folder ({e.strerror or e})") from None
    if not path.is_dir():
        raise InvalidArgumentError(f"--out {str(out)!r}: exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InvalidArgumentError(f"--out {str(out)!r}: the report folder is not writable ({e.strerror or e})") from None
    return path.resolve()


def run(
    out: PathLike = "noisejax-report",
    *,
    only: Optional[str] = None,
    config: str = "default",
    force: bool = False,
    data_dir: Optional[PathLike] = None,
    progress: bool = True,
    root: Optional[PathLike] = None,
) -> dict:
    """Run (or reuse) the experiments and write the report folder; returns the summary.

    Args:
      out: report folder (created; must be writable).
      only: one experiment name (the others' stored results still appear in the report).
      config: ``"tiny"``, ``"default"`` or ``"full"``.
      force: recompute even when a valid stored result exists.
      data_dir: folder with real MNIST / CIFAR-10 files, passed to experiments that take it.
      progress: tqdm bars and status lines on stderr.
      root: the experiments folder (default :func:`experiments_dir`).

    Returns:
      ``{"config", "experiments": {name: record}, ...}`` as written to ``results.json``;
      a record's ``status`` is ``ok``, ``failed``, ``missing`` or ``not run``.
    """
    if config not in CONFIG_NAMES:
        raise InvalidArgumentError(f"config must be one of {', '.join(CONFIG_NAMES)}; got {config!r}")
    if only is not None:
        _check_name(only, "--only")
        if only not in EXPERIMENTS:
            raise InvalidArgumentError(f"--only must be one of {', '.join(EXPERIMENTS)}; got {only!r}")
    if data_dir is not None:
        if not Path(data_dir).expanduser().is_dir():
            raise InvalidArgumentError(f"--data-dir {str(data_dir)!r}: not a folder")
        data_dir = str(Path(data_dir).expanduser().resolve())
    out_path = _prepare_out(out)
    base = Path(root).resolve() if root is not None else experiments_dir()
    if not base.is_dir():
        raise InvalidArgumentError(
            f"experiments folder not found at {base}: `noisejax reproduce` runs from a source checkout "
            "(pip install -e . in the repository)"
        )
    import jax

    names = [only] if only else list(EXPERIMENTS)
    records: dict[str, dict] = {}
    # Progress: a bar weighted by each experiment's expected time on a terminal; plain
    # lines (no carriage returns) when stderr is a log file or a pipe.
    interactive = progress and _isatty(sys.stderr)
    expected = {n: _expected_seconds(n, out_path) for n in names}
    done = {"actual": 0.0, "expected": 0.0}  # computed (not reused) experiments: the machine's speed
    bar = None
    if interactive:
        from tqdm.auto import tqdm

        bar = tqdm(total=round(sum(expected.values()), 1), desc="noisejax reproduce",
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}", position=0)
    t_start = time.perf_counter()
    try:
        for i, name in enumerate(names):
            eta = _eta_seconds([expected[n] for n in names[i:]], done["actual"], done["expected"])
            step = f"[{i + 1}/{len(names)}] {name}"
            if bar is not None:
                bar.set_postfix_str(f"{step}, about {_duration(eta)} left", refresh=True)
            elif progress:
                this = _eta_seconds([expected[name]], done["actual"], done["expected"])
                _note(progress, f"{step}: running (expected ~{_duration(this)}; all remaining ~{_duration(eta)}; "
                                f"{_duration(time.perf_counter() - t_start)} elapsed)")
            rec = _run_one(name, out=out_path, config_name=config, force=force, data_dir=data_dir, progress=interactive, root=base)
            records[name] = rec
            if rec["status"] == "ok" and not rec.get("reused") and rec.get("wall_seconds"):
                done["actual"] += rec["wall_seconds"]
                done["expected"] += expected[name]
            if progress:
                if rec["status"] == "ok":
                    how = "reused" if rec.get("reused") else f"done in {rec['wall_seconds']:.1f} s (CPU {rec['cpu_seconds']:.1f} s)"
                else:
                    how = f"{rec['status']}: {rec.get('error', '')}"
                _note(progress, f"{step}: {how}")
            if bar is not None:
                bar.update(round(expected[name], 1))
    finally:
        if bar is not None:
            bar.close()
    # experiments not run now: show their stored results (same config), if valid
    for name in EXPERIMENTS:
        if name in records:
            continue
        stored = read_checked_json(safe_join(out_path, "runs", name, "record.json"))
        if isinstance(stored, dict) and stored.get("status") == "ok" and stored.get("config_name") == config:
            records[name] = dict(stored, reused=True)
        else:
            status = "missing" if name not in available(base) else "not run"
            records[name] = {"name": name, "status": status,
                             "error": "not selected by --only" if status == "not run" else f"experiments/{name}/ does not exist yet"}
    ordered = {n: records[n] for n in EXPERIMENTS}
    from noisejax import __version__

    summary = {
        "noisejax_version": __version__,
        "config": config,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "devices": ", ".join(sorted({d.platform for d in jax.devices()})) + f" ({len(jax.devices())} device(s))",
        "python": platform.python_version(),
        "only": only,
        "claims": claims_summary(ordered),
        "experiments": ordered,
    }
    atomic_write_json(out_path / "results.json", summary)
    _write_report(out_path, summary)
    if progress:
        _note(progress, f"report written to {out_path / 'report.md'}")
    return summary


def main(args) -> int:
    """CLI hook (``noisejax reproduce``): ``args.out``, ``args.only``, ``args.full``, ``args.force``, ``args.data_dir``.

    Returns 0 when every selected experiment finished (missing ones are reported,
    not errors), 1 when one failed.
    """
    config = os.environ.get(CONFIG_ENV) or ("full" if getattr(args, "full", False) else "default")
    if config not in CONFIG_NAMES:
        raise InvalidArgumentError(f"{CONFIG_ENV} must be one of {', '.join(CONFIG_NAMES)}; got {config!r}")
    summary = run(
        getattr(args, "out", "noisejax-report"),
        only=getattr(args, "only", None),
        config=config,
        force=bool(getattr(args, "force", False)),
        data_dir=getattr(args, "data_dir", None),
        progress=True,
    )
    selected = [summary["experiments"][args.only]] if getattr(args, "only", None) else summary["experiments"].values()
    return 1 if any(r["status"] == "failed" for r in selected) else 0
