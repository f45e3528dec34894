"""``noisejax reproduce``: run every experiment of ``experiments/`` and write a report.

The orchestrator behind the project's main job.  It knows ONE experiment protocol.
Each experiment lives in its own folder ``experiments/NAME/`` (next to the
``noisejax`` package in a checkout) with

* ``config.py`` — ``CONFIGS = {"tiny": ..., "default": ..., "full": ...}``: ``tiny``
  (tests, seconds), ``default`` (the 2-core CPU, the whole report in ≤ 15 minutes)
  and ``full`` (an accelerator); each value is the experiment's configuration (a
  frozen dataclass);
* ``run.py`` — ``main(config, out_dir, *, data_dir=None, progress=True) -> Result``
  (:class:`noisejax.study.claims.Result`: typed claims, the figures it wrote in
  ``out_dir``, every other number);
* ``README.md`` — the command, what the figure shows, the paper's claim, our result.

Both files are loaded as modules of one package per experiments folder, so
``run.py`` may import its neighbours relatively (``from .config import ...``,
``from .. import _common``: the experiments' shared helpers).

Report folder layout (``--out``, default ``./noisejax-report``)::

    report.md              claims table + embedded figures
    results.json           every number, per experiment (status, timings, result)
    figures/NAME.png       one PNG per figure (NAME__STEM.png for the extra ones)
    runs/NAME/record.json  the finished experiment: result + SHA-256 checksum
    runs/NAME/work/        the experiment's ``out_dir`` (cached models, points, figures)
    runs/NAME/error.log    traceback of a failed run

Resuming: an experiment whose ``record.json`` parses, has a valid checksum, the
same configuration fingerprint (config values, the experiment's source files and the
``noisejax`` package's sources) and intact figures is reused, not recomputed
(``--force`` recomputes).  Every file is written atomically through
:mod:`noisejax.study.files`, so a killed run leaves either the old file or the new
one; a corrupted or partial file fails the checks and is recomputed, never trusted.
Experiments use :func:`~noisejax.study.files.cached_point` /
:func:`~noisejax.study.files.save_arrays` the same way for their own points and
trained models, so a restarted run also skips the finished points of an
interrupted experiment.

Python API::

    >>> from noisejax.study import reproduce
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
import importlib
import importlib.machinery
import importlib.util
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Union

from noisejax.errors import InvalidArgumentError
from noisejax.study.claims import Result, claims_summary
from noisejax.study.files import (
    atomic_write_bytes,
    atomic_write_json,
    code_digest,
    file_sha256,
    fingerprint,
    read_checked_json,
    safe_join,
    sha256,
    sources_digest,
    to_jsonable,
    write_checked_json,
)
from noisejax.study.report import write_report

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
    "run",
    "main",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Experiments in report order: figures 1–3 (paper A), mitigation, then paper B.
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
    "symmetric_depth": 4.2,
    "trained_mlp_snr": 8.7,
    "connection_matrix": 11.5,
    "cnn_kernel": 11.7,
    "mitigation": 12.8,
    "noisy_inference": 69.3,
    "noisy_federated": 21.6,
    "pcm_drift": 303.8,
}
CONFIG_NAMES: tuple[str, ...] = ("tiny", "default", "full")
CONFIG_ENV = "NOISEJAX_REPRODUCE_CONFIG"
RECORD_FORMAT = 2

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_FILE_RE = re.compile(r"[^A-Za-z0-9_.-]+")
_RECORD_KEYS = ("format", "name", "config_name", "fingerprint", "status", "result", "figures", "wall_seconds", "cpu_seconds")


# ----------------------------------------------------------------------------------
# Experiments: the protocol
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
    def main(self) -> Callable[..., Result]:
        return self.run_module.main


def experiments_dir() -> Path:
    """The ``experiments/`` folder of this checkout (``$NOISEJAX_EXPERIMENTS_DIR`` overrides).

    The experiments are not part of the installed package: they are found next to
    the ``noisejax`` package directory (an editable install or a source checkout).
    """
    env = os.environ.get("NOISEJAX_EXPERIMENTS_DIR")
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[2] / "experiments"


def _check_name(name: Any, what: str = "experiment name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name not in EXPERIMENTS:
        raise InvalidArgumentError(f"{what} must be one of {', '.join(EXPERIMENTS)}; got {name!r}")
    return name


def available(root: Optional[PathLike] = None) -> list[str]:
    """Registered experiments whose folder (with ``run.py`` and ``config.py``) exists."""
    base = Path(root) if root is not None else experiments_dir()
    return [n for n in EXPERIMENTS if (base / n / "run.py").is_file() and (base / n / "config.py").is_file()]


def _package(base: Path) -> str:
    """Register ``base`` (the experiments folder) as a package of its own; returns its module name."""
    name = f"noisejax_experiments_{fingerprint(str(base))[:8]}"
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(base)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
    return name


def _import_fresh(module_name: str):
    """Import ``module_name`` from the files as they are now (an edited file is read again)."""
    sys.modules.pop(module_name, None)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise


def load_experiment(name: str, root: Optional[PathLike] = None) -> Experiment:
    """Import ``experiments/NAME/{config,run}.py`` as ``<package of the folder>.NAME.{config,run}``.

    Raises:
      InvalidArgumentError: unknown name, or the experiments folder / the
        experiment's folder is missing, or ``run.py`` has no ``main``.
    """
    _check_name(name)
    base = (Path(root) if root is not None else experiments_dir()).resolve()
    if not base.is_dir():
        raise InvalidArgumentError(
            f"experiments folder not found at {base}: `noisejax reproduce` needs a source checkout "
            "(pip install -e . from the repository) or NOISEJAX_EXPERIMENTS_DIR"
        )
    folder = safe_join(base, name)
    for f in ("config.py", "run.py"):
        if not (folder / f).is_file():
            raise InvalidArgumentError(f"experiment {name!r}: {folder / f} does not exist")
    package = _package(base)
    config_module = _import_fresh(f"{package}.{name}.config")
    run_module = _import_fresh(f"{package}.{name}.run")
    if not callable(getattr(run_module, "main", None)):
        raise InvalidArgumentError(f"experiment {name!r}: run.py has no main(config, out_dir, *, data_dir, progress)")
    return Experiment(name, folder, config_module, run_module)


def get_config(experiment: Experiment, config_name: str) -> Any:
    """``CONFIGS[config_name]`` of the experiment's ``config.py`` (``tiny``, ``default`` or ``full``)."""
    if config_name not in CONFIG_NAMES:
        raise InvalidArgumentError(f"config must be one of {', '.join(CONFIG_NAMES)}; got {config_name!r}")
    table = getattr(experiment.config_module, "CONFIGS", None)
    if not isinstance(table, dict) or config_name not in table:
        raise InvalidArgumentError(f"experiment {experiment.name!r}: config.py has no CONFIGS[{config_name!r}]")
    return table[config_name]


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
        if file_sha256(src) != f.get("sha256"):
            return False
    return True


def _collect_figures(result: Result, work: Path, out: Path, name: str) -> tuple[list[dict], list[str]]:
    """Copy the experiment's PNGs (``result.figures``, in order) into ``figures/``; returns (entries, notes)."""
    notes: list[str] = []
    candidates: list[Path] = []
    for f in result.figures:
        p = Path(f)
        rp = (p if p.is_absolute() else work / p).resolve()
        if rp != work.resolve() and work.resolve() not in rp.parents:
            notes.append(f"figure {str(f)!r} is outside the experiment's folder and was not copied")
            continue
        candidates.append(rp)
    entries = []
    for i, src in enumerate(p for p in candidates if p.is_file() and p.suffix.lower() == ".png"):
        stem = _FILE_RE.sub("_", src.stem)[:60] or "figure"
        dest_name = f"{name}.png" if i == 0 else f"{name}__{stem}.png"
        data = src.read_bytes()
        atomic_write_bytes(safe_join(out, "figures", dest_name), data)
        entries.append({"file": f"figures/{dest_name}", "source": str(src.relative_to(out.resolve())),
                        "sha256": sha256(data)})
    return entries, notes


def _reuse(name: str, record_path: Path, config_name: str, fp: str, out: Path, progress: bool) -> Optional[dict]:
    """The stored record when it is valid (its figures restored into ``figures/``), else ``None``."""
    record = read_checked_json(record_path)
    if _record_valid(record, name, config_name, fp, out):
        for f in record["figures"]:
            dest = safe_join(out, *Path(f["file"]).parts)
            if file_sha256(dest) != f["sha256"]:
                atomic_write_bytes(dest, safe_join(out, *Path(f["source"]).parts).read_bytes())
        return dict(record, reused=True)
    if record_path.exists():
        _note(progress, f"{name}: stored result is missing, corrupted or stale; recomputing")
    return None


def _execute(exp: Experiment, config: Any, work: Path, data_dir: Optional[str], progress: bool) -> tuple[Result, float, float]:
    """``main(config, work, data_dir=..., progress=...)``, checked; returns (result, wall s, CPU s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = exp.main(config, str(work), data_dir=data_dir, progress=progress)
    if not isinstance(result, Result):
        raise TypeError(f"main() returned {type(result).__name__}; expected a noisejax.study.claims.Result")
    return result, time.perf_counter() - t0, time.process_time() - c0


def _run_one(name: str, *, out: Path, config_name: str, force: bool, data_dir: Optional[str], progress: bool, root: Path,
             alone: bool = True) -> dict:
    """Run (or reuse) one experiment; never raises for a failing experiment.

    ``alone=False``: other experiments ran in the same process meanwhile, so the process's
    CPU time over this one's run is not its own (``cpu_seconds`` is then ``None``).
    """
    if name not in available(root):
        return {"name": name, "status": "missing", "error": f"experiments/{name}/ (config.py + run.py) does not exist yet"}
    run_dir = safe_join(out, "runs", name)
    record_path = run_dir / "record.json"
    try:
        exp = load_experiment(name, root)
        config = get_config(exp, config_name)
        fp = fingerprint({"config": config, "sources": sources_digest(exp.path), "library": code_digest(),
                          "data_dir": data_dir})
    except Exception as e:  # a broken experiment folder: report it, go on
        return _failed(name, run_dir, e, 0.0, 0.0, "import")
    if not force:
        reused = _reuse(name, record_path, config_name, fp, out, progress)
        if reused is not None:
            return reused
    else:  # --force: recompute everything, the experiment's finished points and cached models included
        if record_path.exists():
            record_path.unlink()
        if (run_dir / "work").is_dir():
            shutil.rmtree(safe_join(out, "runs", name, "work"))
    work = run_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result, wall, cpu = _execute(exp, config, work, data_dir, progress)
        figures, notes = _collect_figures(result, work, out, name)
    except Exception as e:
        return _failed(name, run_dir, e, time.perf_counter() - t0, time.process_time() - c0 if alone else None, "run")
    record = write_checked_json(record_path, {
        "format": RECORD_FORMAT, "name": name, "config_name": config_name, "config": to_jsonable(config),
        "fingerprint": fp, "status": "ok", "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": wall, "cpu_seconds": cpu if alone else None, "side_by_side": not alone,
        "result": result.to_json(),
        "claims": [c.to_json() for c in result.claims], "figures": figures, "notes": notes,
    })
    if (run_dir / "error.log").exists():
        (run_dir / "error.log").unlink()
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


# ----------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------


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
# Entry points
# ----------------------------------------------------------------------------------


class _Progress:
    """Progress of a reproduce run: a bar weighted by each experiment's expected time on a
    terminal; plain lines (no carriage returns) when stderr is a log file or a pipe.

    Safe to call from the threads of a side-by-side run (``jobs > 1``): the estimate of the
    time left is then the remaining experiments' expected time shared over the ``jobs`` lanes.
    """

    def __init__(self, names: list, out: Path, progress: bool, jobs: int = 1):
        self.names, self.progress, self.jobs = names, progress, jobs
        self.interactive = progress and _isatty(sys.stderr)
        self.expected = {n: _expected_seconds(n, out) for n in names}
        self.actual_done = self.expected_done = 0.0  # computed (not reused) experiments: the machine's speed
        self.pending = list(names)  # not finished yet
        self.running: list = []
        self.t_start = time.perf_counter()
        self._lock = threading.Lock()
        self.bar = None
        if self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=round(sum(self.expected.values()), 1), desc="noisejax reproduce",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}", position=0)

    def _eta(self, names: list) -> float:
        lanes = max(1, min(self.jobs, len(names)))
        return _eta_seconds([self.expected[n] for n in names], self.actual_done, self.expected_done) / lanes

    def start(self, i: int) -> str:
        with self._lock:
            name = self.names[i]
            step = f"[{i + 1}/{len(self.names)}] {name}"
            self.running.append(name)
            eta = self._eta(self.pending)
            if self.bar is not None:
                what = step if self.jobs == 1 else "running " + ", ".join(self.running)
                self.bar.set_postfix_str(f"{what}, about {_duration(eta)} left", refresh=True)
            elif self.progress:
                beside = "" if len(self.running) == 1 else f"; beside {', '.join(n for n in self.running if n != name)}"
                _note(True, f"{step}: running (expected ~{_duration(self._eta([name]))}; all remaining ~{_duration(eta)}; "
                            f"{_duration(time.perf_counter() - self.t_start)} elapsed{beside})")
            return step

    def done(self, step: str, name: str, rec: dict) -> None:
        with self._lock:
            self.pending.remove(name)
            self.running.remove(name)
            if rec["status"] == "ok" and not rec.get("reused") and rec.get("wall_seconds"):
                # side by side, an experiment's wall time is shared with the other lanes'
                self.actual_done += rec["wall_seconds"] / (self.jobs if rec.get("side_by_side") else 1)
                self.expected_done += self.expected[name]
            if self.progress:
                if rec["status"] != "ok":
                    how = f"{rec['status']}: {rec.get('error', '')}"
                elif rec.get("reused"):
                    how = "reused"
                elif rec.get("cpu_seconds") is None:
                    how = f"done in {rec['wall_seconds']:.1f} s (beside other experiments)"
                else:
                    how = f"done in {rec['wall_seconds']:.1f} s (CPU {rec['cpu_seconds']:.1f} s)"
                _note(True, f"{step}: {how}")
            if self.bar is not None:
                self.bar.update(round(self.expected[name], 1))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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


def _check_arguments(config: str, only: Optional[str], data_dir: Optional[PathLike], root: Optional[PathLike]):
    """Validated ``(data_dir, experiments folder)``; raises InvalidArgumentError with the bad argument named."""
    if config not in CONFIG_NAMES:
        raise InvalidArgumentError(f"config must be one of {', '.join(CONFIG_NAMES)}; got {config!r}")
    if only is not None:
        _check_name(only, "--only")
    if data_dir is not None:
        if not Path(data_dir).expanduser().is_dir():
            raise InvalidArgumentError(f"--data-dir {str(data_dir)!r}: not a folder")
        data_dir = str(Path(data_dir).expanduser().resolve())
    base = Path(root).resolve() if root is not None else experiments_dir()
    if not base.is_dir():
        raise InvalidArgumentError(
            f"experiments folder not found at {base}: `noisejax reproduce` runs from a source checkout "
            "(pip install -e . in the repository)"
        )
    return data_dir, base


def _stored_or_absent(name: str, out: Path, config: str, base: Path) -> dict:
    """An experiment not run now: its stored result (same config) if valid, else why it is absent."""
    stored = read_checked_json(safe_join(out, "runs", name, "record.json"))
    if isinstance(stored, dict) and stored.get("status") == "ok" and stored.get("config_name") == config:
        return dict(stored, reused=True)
    status = "missing" if name not in available(base) else "not run"
    return {"name": name, "status": status,
            "error": "not selected by --only" if status == "not run" else f"experiments/{name}/ does not exist yet"}


def _summary(config: str, only: Optional[str], experiments: dict) -> dict:
    import jax

    from noisejax import __version__

    return {
        "noisejax_version": __version__,
        "config": config,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "devices": ", ".join(sorted({d.platform for d in jax.devices()})) + f" ({len(jax.devices())} device(s))",
        "python": platform.python_version(),
        "only": only,
        "claims": claims_summary(experiments),
        "experiments": experiments,
    }


def run(
    out: PathLike = "noisejax-report",
    *,
    only: Optional[str] = None,
    config: str = "default",
    force: bool = False,
    data_dir: Optional[PathLike] = None,
    progress: bool = True,
    root: Optional[PathLike] = None,
    jobs: int = 1,
) -> dict:
    """Run (or reuse) the experiments and write the report folder; returns the summary.

    With ``jobs > 1`` up to ``jobs`` experiments run side by side in threads of this
    process, the longest expected first.  XLA compiles one program at a time on about
    1.7 of two cores (measured) and a running program leaves cores idle between its kernels; a
    second experiment fills them (``noisejax reproduce`` runs 2 by default).  Every
    experiment's numbers are the same as when run alone (each computes with its own
    programs and keys; tested); its ``cpu_seconds`` is then ``None`` (the process's CPU time
    is shared) and the summary's ``wall_seconds`` / ``cpu_seconds`` are those of the whole run.

    Args:
      out: report folder (created; must be writable).
      only: one experiment name (the others' stored results still appear in the report).
      config: ``"tiny"``, ``"default"`` or ``"full"``.
      force: recompute even when a valid stored result exists.
      data_dir: folder with real MNIST / CIFAR-10 files, passed to every experiment's ``main``.
      progress: tqdm bars and status lines on stderr.
      root: the experiments folder (default :func:`experiments_dir`).
      jobs: experiments run at the same time (``1``: one after the other, in report order,
        each with its own progress bars). With several devices (e.g. the CPU split by
        ``--xla_force_host_platform_device_count``) the experiments run one after the other
        whatever ``jobs`` says, with a note: a program sharded over the devices would wait in
        its collectives for a device the other experiment's program holds (measured: XLA:CPU
        aborted ``noisejax reproduce`` after 40 s when ``trained_mlp_snr``'s sharded engine ran
        beside ``pcm_drift``). ``noisejax reproduce`` splits the CPU into devices only with
        ``--jobs 1``.

    Returns:
      ``{"config", "experiments": {name: record}, "jobs", "wall_seconds", "cpu_seconds", ...}``
      as written to ``results.json``;
      a record's ``status`` is ``ok``, ``failed``, ``missing`` or ``not run``.
    """
    data_dir, base = _check_arguments(config, only, data_dir, root)
    jobs = _check_jobs(jobs)
    out_path = _prepare_out(out)
    names = [only] if only else list(EXPERIMENTS)
    jobs = min(jobs, len(names))
    devices = _device_count() if jobs > 1 else 1
    if devices > 1:
        _note(progress, f"{devices} devices: experiments run one after the other (jobs=1), not {jobs} side by side "
                        "(a program sharded over the devices waits in its collectives for devices the other experiment "
                        "holds; XLA:CPU aborts the process after 40 s)")
        jobs = 1
    records: dict[str, dict] = {}
    bar = _Progress(names, out_path, progress, jobs)
    t0, c0 = time.perf_counter(), time.process_time()

    def one(i: int) -> None:
        step = bar.start(i)
        records[names[i]] = _run_one(names[i], out=out_path, config_name=config, force=force, data_dir=data_dir,
                                     progress=bar.interactive and jobs == 1, root=base, alone=jobs == 1)
        bar.done(step, names[i], records[names[i]])

    try:
        if jobs == 1:
            for i in range(len(names)):
                one(i)
        else:
            _side_by_side(one, sorted(range(len(names)), key=lambda i: -bar.expected[names[i]]), jobs)
    finally:
        bar.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ordered = {n: records[n] if n in records else _stored_or_absent(n, out_path, config, base) for n in EXPERIMENTS}
    summary = dict(_summary(config, only, ordered), jobs=jobs, wall_seconds=wall, cpu_seconds=cpu)
    atomic_write_json(out_path / "results.json", summary)
    write_report(out_path, summary)
    if progress:
        _note(progress, f"report written to {out_path / 'report.md'}")
    return summary


def _device_count() -> int:
    """This process's JAX devices (starts the backend)."""
    import jax

    return jax.local_device_count()


def _check_jobs(jobs: Any) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidArgumentError(f"jobs must be a positive integer (experiments run side by side), got {jobs!r}")
    return jobs


def _side_by_side(one: Callable[[int], None], order: list, jobs: int) -> None:
    """``one(i)`` for every ``i`` of ``order`` on ``jobs`` threads, started in that order.

    ``one`` never raises for a failing experiment (:func:`_run_one`); anything else (a bug,
    ``KeyboardInterrupt`` in the waiting thread) cancels the experiments not started yet
    and is raised once the running ones are left (they cannot be stopped from outside:
    the CLI exits the process at once).
    """
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="reproduce")
    try:
        for fut in [pool.submit(one, i) for i in order]:
            fut.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


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
        jobs=getattr(args, "jobs", 1),
    )
    selected = [summary["experiments"][args.only]] if getattr(args, "only", None) else summary["experiments"].values()
    return 1 if any(r["status"] == "failed" for r in selected) else 0
