"""The ``noisejax reproduce`` orchestrator, on fake experiment folders (fast, no JAX work).

The real experiments run end to end on their tiny configs in
``tests/test_experiments_tiny.py``; here small stand-ins written into ``tmp_path``
exercise the mechanics: report and results files, ``--only``, reuse without
``--force``, detection of corrupted results, failing / missing experiments,
unwritable output folders, path traversal, and resuming after ``SIGKILL``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from noisejax import cli
from noisejax.errors import InvalidArgumentError
from noisejax.study import files, reproduce

# A 1×1 PNG (the orchestrator copies bytes; it does not decode images).
_PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
    b"\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND\xaeB`\x82"
)

_CONFIG = """
CONFIGS = {"tiny": {"n": 3, "value": 1.5}, "default": {"n": 4, "value": 2.5}, "full": {"n": 5, "value": 3.5}}
"""

# Counts its calls in COUNTER_FILE, writes a PNG, returns claims and numbers.
_RUN_OK = """
import os
from pathlib import Path
from noisejax.study.claims import Result, claim

PNG = {png!r}

def main(config, out_dir, *, data_dir=None, progress=True):
    counter = Path(os.environ["NOISEJAX_TEST_COUNTER"]) / "{name}"
    counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
    Path(out_dir, "fig.png").write_bytes(PNG)
    return Result(
        claims=[claim("value is positive", "Fig. 1", config["value"], config["value"] > 0, "a | pipe"),
                claim("synonym keys work", "Fig. 2", [1, 2], False),
                claim("a measured number", "Fig. 3", 0.5, None)],
        figures=["fig.png"],
        values={{"numbers": [config["value"] * i for i in range(config["n"])], "inf": float("inf")}},
    )
"""

_RUN_FAIL = """
def main(config, out_dir, *, data_dir=None, progress=True):
    raise RuntimeError("boom: this experiment is broken")
"""

_RUN_ESCAPE = """
from pathlib import Path
from noisejax.study.claims import Result
PNG = {png!r}

def main(config, out_dir, *, data_dir=None, progress=True):
    Path(out_dir, "ok.png").write_bytes(PNG)
    return Result(claims=[], figures=["ok.png", "../../../../evil.png", "/etc/passwd"])
"""

# A slow sweep: each point is stored with cached_point; COUNTER_FILE logs computed points.
_RUN_SWEEP = """
import os, time
from pathlib import Path
from noisejax.study.claims import Result, claim
from noisejax.study.files import cached_point

def main(config, out_dir, *, data_dir=None, progress=True):
    log = Path(os.environ["NOISEJAX_TEST_COUNTER"]) / "sweep_points"
    values = []
    for i in range(config["n"]):
        def compute(i=i):
            time.sleep(0.25)
            with open(log, "a") as f:
                f.write(f"{i}\\n")
            return {"i": i, "x": (i * 0.1) ** 2}
        v, _ = cached_point(Path(out_dir) / "points", f"p{i}", compute, key={"i": i, "config": config})
        values.append(v)
    return Result(claims=[claim("sum", "-", sum(v["x"] for v in values), True)], figures=[], values={"values": values})
"""


def _make(root: Path, name: str, run_src: str, config_src: str = _CONFIG) -> None:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.py").write_text(config_src)
    (d / "run.py").write_text(textwrap.dedent(run_src))


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """Experiments folder: symmetric_depth and trained_mlp_snr succeed, mitigation fails, the rest are missing."""
    root = tmp_path / "experiments"
    _make(root, "symmetric_depth", _RUN_OK.format(png=_PNG, name="symmetric_depth"))
    _make(root, "trained_mlp_snr", _RUN_OK.format(png=_PNG, name="trained_mlp_snr"))
    _make(root, "mitigation", _RUN_FAIL)
    counter = tmp_path / "counter"
    counter.mkdir()
    monkeypatch.setenv("NOISEJAX_TEST_COUNTER", str(counter))
    return root, counter


def _count(counter: Path, name: str) -> int:
    p = counter / name
    return int(p.read_text()) if p.exists() else 0


def test_end_to_end_report(fake, tmp_path):
    root, counter = fake
    out = tmp_path / "report"
    summary = reproduce.run(out, config="tiny", root=root, progress=False)
    exps = summary["experiments"]
    assert list(exps) == list(reproduce.EXPERIMENTS)
    assert exps["symmetric_depth"]["status"] == "ok" and exps["trained_mlp_snr"]["status"] == "ok"
    assert exps["mitigation"]["status"] == "failed" and "boom" in exps["mitigation"]["error"]
    assert (out / "runs" / "mitigation" / "error.log").read_text().count("RuntimeError") >= 1
    for name in ("connection_matrix", "noisy_inference", "noisy_federated"):
        assert exps[name]["status"] == "missing"
    # files
    results = json.loads((out / "results.json").read_text())
    assert results["config"] == "tiny"
    rec = results["experiments"]["symmetric_depth"]
    assert rec["result"]["numbers"] == [0.0, 1.5, 3.0] and rec["result"]["inf"] == "inf"
    assert (out / "figures" / "symmetric_depth.png").read_bytes() == _PNG
    report = (out / "report.md").read_text()
    assert "| # | claim | paper's figure | our measured value | holds |" in report
    assert "value is positive (`symmetric_depth`) | Fig. 1 | 1.5 — a \\| pipe | **holds** |" in report
    assert "synonym keys work (`trained_mlp_snr`) | Fig. 2 | [1, 2] | **does not hold** |" in report
    assert "a measured number (`symmetric_depth`) | Fig. 3 | 0.5 | reported (no threshold) |" in report
    assert "not evaluated" not in report
    # the summary line, at the top and over the claims table
    assert report.count("2 hold, 2 do not, 2 reported without a threshold") == 2
    assert results["claims"] == {"hold": 2, "do_not_hold": 2, "no_threshold": 2}
    assert "![symmetric_depth](figures/symmetric_depth.png)" in report
    assert "`mitigation`: **failed** — RuntimeError: boom" in report
    assert "`noisy_federated`: **missing**" in report
    assert _count(counter, "symmetric_depth") == 1


def test_progress_lines_without_a_terminal_and_weighted_eta(fake, tmp_path, capsys, monkeypatch):
    """stderr is not a terminal here: one plain line per step (no carriage returns), ETA from expected times."""
    root, _ = fake
    monkeypatch.setattr(reproduce, "_EXPECTED_SECONDS", {"symmetric_depth": 30.0, "trained_mlp_snr": 600.0,
                                                         "mitigation": 1.0, "connection_matrix": 1.0,
                                                         "noisy_inference": 1.0, "noisy_federated": 1.0})
    reproduce.run(tmp_path / "report", config="tiny", root=root, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = [line for line in err.splitlines() if line.startswith("noisejax reproduce: [")]
    n = len(reproduce.EXPERIMENTS)
    assert lines[0].startswith(f"noisejax reproduce: [1/{n}] symmetric_depth: running (expected ~30 s; all remaining ~11 min")
    assert lines[1].startswith(f"noisejax reproduce: [1/{n}] symmetric_depth: done in ")
    # the second step's estimate is scaled by the first one's actual/expected time: far below 10 min
    assert lines[2].startswith(f"noisejax reproduce: [2/{n}] trained_mlp_snr: running (expected ~")
    assert "expected ~10 min" not in lines[2]
    assert any(f"[{n}/{n}]" in line for line in lines) and "report written to" in err


def test_eta_is_weighted_by_expected_time():
    # nothing computed yet: the sum of the expected times
    assert reproduce._eta_seconds([10.0, 250.0, 120.0], 0.0, 0.0) == 380.0
    # the machine ran the first experiments at half the expected time: the rest scales with it
    assert reproduce._eta_seconds([250.0, 120.0], 15.0, 30.0) == pytest.approx(185.0)
    # one long experiment left among many done ones is not "one of seven"
    assert reproduce._eta_seconds([255.0], 100.0, 100.0) == 255.0
    assert reproduce._expected_seconds("no_such_experiment", Path("/nonexistent")) > 0


def _numbers(summary: dict) -> dict:
    """Each experiment's status, claims and result (the numbers), without its timing."""
    return {n: (r["status"], r.get("claims"), r.get("result")) for n, r in summary["experiments"].items()}


def test_side_by_side(fake, tmp_path, capsys, monkeypatch):
    """``jobs=2``: the same records and report as one after the other; the process's CPU time is the run's, not
    an experiment's; every experiment announced, longest expected first, with what runs beside it."""
    root, counter = fake
    _make(root, "noisy_inference", _RUN_OK.format(png=_PNG, name="noisy_inference"))
    alone = reproduce.run(tmp_path / "alone", config="tiny", root=root, progress=False)
    monkeypatch.setattr(reproduce, "_EXPECTED_SECONDS", {"noisy_inference": 60.0, "trained_mlp_snr": 30.0,
                                                         "symmetric_depth": 20.0})
    both = reproduce.run(tmp_path / "both", config="tiny", root=root, progress=True, jobs=2)
    assert _numbers(both) == _numbers(alone)
    assert list(both["experiments"]) == list(reproduce.EXPERIMENTS)
    assert (alone["jobs"], both["jobs"]) == (1, 2) and both["wall_seconds"] > 0 and both["cpu_seconds"] > 0
    for name in ("symmetric_depth", "trained_mlp_snr", "noisy_inference"):
        assert _count(counter, name) == 2
        assert alone["experiments"][name]["cpu_seconds"] is not None and not alone["experiments"][name]["side_by_side"]
        assert both["experiments"][name]["cpu_seconds"] is None and both["experiments"][name]["side_by_side"]
    assert both["experiments"]["mitigation"]["status"] == "failed"
    err = capsys.readouterr().err
    started = [line.split("] ")[1].split(":")[0] for line in err.splitlines() if ": running (" in line]
    assert started[0] == "noisy_inference" and sorted(started) == sorted(reproduce.EXPERIMENTS)
    assert "(beside other experiments)" in err and "; beside " in err
    report = (tmp_path / "both" / "report.md").read_text()
    assert "| `symmetric_depth` | ok | " in report
    # a stored result is reused side by side too
    again = reproduce.run(tmp_path / "both", config="tiny", root=root, progress=False, jobs=3)
    assert again["experiments"]["symmetric_depth"]["reused"] and _count(counter, "symmetric_depth") == 2


def test_several_devices_run_one_after_the_other(fake, tmp_path, capsys, monkeypatch):
    """Sharded programs side by side can wait forever in their collectives: with several devices, jobs=1."""
    root, _ = fake
    monkeypatch.setattr(reproduce, "_device_count", lambda: 2)
    res = reproduce.run(tmp_path / "r", config="tiny", root=root, progress=True, jobs=2)
    err = capsys.readouterr().err
    assert res["jobs"] == 1 and "2 devices: experiments run one after the other (jobs=1), not 2 side by side" in err
    assert "beside" not in err and not any(r.get("side_by_side") for r in res["experiments"].values())


@pytest.mark.parametrize("jobs", [0, -1, 1.5, "2", True, None])
def test_bad_jobs(fake, tmp_path, jobs):
    root, _ = fake
    with pytest.raises(InvalidArgumentError, match="jobs must be a positive integer"):
        reproduce.run(tmp_path / "r", config="tiny", root=root, progress=False, jobs=jobs)
    assert not (tmp_path / "r").exists()


def test_cli_jobs(fake, tmp_path, monkeypatch, capsys):
    root, _ = fake
    monkeypatch.setenv("NOISEJAX_EXPERIMENTS_DIR", str(root))
    monkeypatch.setenv(reproduce.CONFIG_ENV, "tiny")
    out = tmp_path / "r"
    assert cli.main(["reproduce", "--jobs", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--jobs must be >= 1, got 0" in err and "\n" not in err and not out.exists()
    from noisejax import _backend

    split = []  # the CPU is split into devices only for experiments one after the other
    monkeypatch.setattr(_backend, "use_host_devices", lambda *a, **k: split.append(1) or "set")
    assert cli.main(["reproduce", "--out", str(out), "--jobs", "1"]) == 1  # mitigation fails
    assert json.loads((out / "results.json").read_text())["jobs"] == 1 and split == [1]
    assert cli.main(["reproduce", "--out", str(out), "--force"]) == 1
    assert json.loads((out / "results.json").read_text())["jobs"] == 2 and split == [1]  # the default


def test_rerun_reuses_and_force_recomputes(fake, tmp_path):
    root, counter = fake
    out = tmp_path / "report"
    reproduce.run(out, config="tiny", root=root, progress=False)
    record = out / "runs" / "symmetric_depth" / "record.json"
    before = (record.stat().st_mtime_ns, record.read_bytes())
    s2 = reproduce.run(out, config="tiny", root=root, progress=False)
    assert _count(counter, "symmetric_depth") == 1 and _count(counter, "trained_mlp_snr") == 1
    assert s2["experiments"]["symmetric_depth"]["reused"] is True
    assert (record.stat().st_mtime_ns, record.read_bytes()) == before
    # the failed experiment is retried, not cached
    assert s2["experiments"]["mitigation"]["status"] == "failed"
    # a deleted report figure is restored from the run folder without recomputing
    (out / "figures" / "symmetric_depth.png").unlink()
    reproduce.run(out, config="tiny", root=root, progress=False)
    assert (out / "figures" / "symmetric_depth.png").read_bytes() == _PNG
    assert _count(counter, "symmetric_depth") == 1
    # --force recomputes, and drops the experiment's stored points / models too
    stale = out / "runs" / "symmetric_depth" / "work" / "points" / "old.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    s3 = reproduce.run(out, config="tiny", root=root, progress=False, force=True)
    assert _count(counter, "symmetric_depth") == 2 and s3["experiments"]["symmetric_depth"]["reused"] is False
    assert not stale.exists()
    # another config is another result
    reproduce.run(out, config="default", root=root, progress=False, only="symmetric_depth")
    assert _count(counter, "symmetric_depth") == 3
    # editing the experiment's source invalidates its stored result
    run_py = root / "symmetric_depth" / "run.py"
    run_py.write_text(run_py.read_text() + "\n# edited\n")
    reproduce.run(out, config="default", root=root, progress=False, only="symmetric_depth")
    assert _count(counter, "symmetric_depth") == 4


@pytest.mark.parametrize(
    "corrupt",
    ["truncate", "flip_payload", "not_json", "empty", "wrong_checksum_field", "missing_keys", "figure_changed"],
)
def test_corrupted_result_is_recomputed(fake, tmp_path, corrupt):
    root, counter = fake
    out = tmp_path / "report"
    reproduce.run(out, config="tiny", root=root, progress=False, only="symmetric_depth")
    record = out / "runs" / "symmetric_depth" / "record.json"
    raw = record.read_bytes()
    obj = json.loads(raw)
    if corrupt == "truncate":
        record.write_bytes(raw[: len(raw) // 2])
    elif corrupt == "flip_payload":  # still valid JSON, numbers changed: the checksum catches it
        obj["payload"]["result"]["numbers"][1] = 99.0
        record.write_text(json.dumps(obj))
    elif corrupt == "not_json":
        record.write_bytes(b"\x00\xffgarbage")
    elif corrupt == "empty":
        record.write_bytes(b"")
    elif corrupt == "wrong_checksum_field":
        obj["sha256"] = "0" * 64
        record.write_text(json.dumps(obj))
    elif corrupt == "missing_keys":  # consistent checksum, but not a complete record
        payload = {k: v for k, v in obj["payload"].items() if k != "figures"}
        files.write_checked_json(record, payload)
    elif corrupt == "figure_changed":
        (out / "runs" / "symmetric_depth" / "work" / "fig.png").write_bytes(b"not the figure")
    s = reproduce.run(out, config="tiny", root=root, progress=False, only="symmetric_depth")
    assert _count(counter, "symmetric_depth") == 2
    rec = s["experiments"]["symmetric_depth"]
    assert rec["status"] == "ok" and rec["reused"] is False
    assert rec["result"]["numbers"] == [0.0, 1.5, 3.0]
    assert files.read_checked_json(record)["result"]["numbers"] == [0.0, 1.5, 3.0]


def test_only(fake, tmp_path):
    root, counter = fake
    out = tmp_path / "report"
    s = reproduce.run(out, config="tiny", root=root, progress=False, only="trained_mlp_snr")
    assert s["experiments"]["trained_mlp_snr"]["status"] == "ok"
    assert s["experiments"]["symmetric_depth"]["status"] == "not run"  # exists, not selected
    assert s["experiments"]["noisy_inference"]["status"] == "missing"
    assert _count(counter, "symmetric_depth") == 0 and _count(counter, "trained_mlp_snr") == 1
    # a later --only of another experiment keeps the first one's stored result in the report
    s = reproduce.run(out, config="tiny", root=root, progress=False, only="symmetric_depth")
    assert s["experiments"]["trained_mlp_snr"]["status"] == "ok" and s["experiments"]["trained_mlp_snr"]["reused"]
    assert "(`trained_mlp_snr`)" in (out / "report.md").read_text()


@pytest.mark.parametrize("name", ["../symmetric_depth", "symmetric_depth/../x", "/etc", "nope", "", "Symmetric_Depth", ".."])
def test_only_rejects_bad_names(fake, tmp_path, name):
    root, _ = fake
    with pytest.raises(InvalidArgumentError, match="--only must be one of"):
        reproduce.run(tmp_path / "r", config="tiny", root=root, progress=False, only=name)


def test_bad_arguments(fake, tmp_path):
    root, _ = fake
    with pytest.raises(InvalidArgumentError, match="config must be one of"):
        reproduce.run(tmp_path / "r", config="huge", root=root, progress=False)
    with pytest.raises(InvalidArgumentError, match="--data-dir"):
        reproduce.run(tmp_path / "r", config="tiny", root=root, progress=False, data_dir=tmp_path / "nowhere")
    with pytest.raises(InvalidArgumentError, match="experiments folder not found"):
        reproduce.run(tmp_path / "r", config="tiny", root=tmp_path / "no_experiments", progress=False)
    with pytest.raises(InvalidArgumentError, match="experiment name must be one of"):
        reproduce.load_experiment("../../etc", root)


def test_unwritable_out(fake, tmp_path):
    root, _ = fake
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for bad in (blocker, blocker / "sub"):  # (root ignores permission bits, so use a file in the way)
        with pytest.raises(InvalidArgumentError, match=r"^--out .*(not a folder|cannot create)"):
            reproduce.run(bad, config="tiny", root=root, progress=False)
    if os.geteuid() != 0:  # permission bits are only enforced for non-root users
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(InvalidArgumentError, match="not writable"):
                reproduce.run(ro, config="tiny", root=root, progress=False)
        finally:
            ro.chmod(0o700)


def test_cli_one_line_errors_and_env_config(fake, tmp_path, monkeypatch, capsys):
    root, counter = fake
    monkeypatch.setenv("NOISEJAX_EXPERIMENTS_DIR", str(root))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(["reproduce", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("noisejax: error: --out") and "\n" not in err
    assert cli.main(["reproduce", "--only", "../etc", "--out", str(tmp_path / "r")]) == 2
    assert "must be one of" in capsys.readouterr().err
    monkeypatch.setenv(reproduce.CONFIG_ENV, "tiny")
    out = tmp_path / "r"
    assert cli.main(["reproduce", "--only", "symmetric_depth", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["config"] == "tiny"
    assert cli.main(["reproduce", "--out", str(out)]) == 1  # mitigation fails: non-zero, report still written
    assert (out / "report.md").exists()
    monkeypatch.setenv(reproduce.CONFIG_ENV, "bogus")
    assert cli.main(["reproduce", "--out", str(out)]) == 2
    assert reproduce.CONFIG_ENV in capsys.readouterr().err


def test_paths_never_escape(fake, tmp_path):
    root, _ = fake
    _make(root, "connection_matrix", _RUN_ESCAPE.format(png=_PNG))
    out = tmp_path / "deep" / "report"
    s = reproduce.run(out, config="tiny", root=root, progress=False, only="connection_matrix")
    rec = s["experiments"]["connection_matrix"]
    assert rec["status"] == "ok"
    assert [f["file"] for f in rec["figures"]] == ["figures/connection_matrix.png"]
    assert sum("outside the experiment's folder" in n for n in rec["notes"]) == 2
    assert not (tmp_path / "evil.png").exists()
    for p in out.rglob("*"):
        assert out.resolve() in p.resolve().parents
    with pytest.raises(InvalidArgumentError):
        files.safe_join(out, "..", "x")
    with pytest.raises(InvalidArgumentError):
        files.safe_join(out, "/etc/passwd")
    with pytest.raises(InvalidArgumentError):
        files.cached_point(out, "../escape", lambda: 1)
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(InvalidArgumentError):
        files.safe_join(out, "link", "x.json")
    assert files.safe_join(out, "figures", "a.png") == out.resolve() / "figures" / "a.png"


def test_checked_files_and_arrays(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(3, dtype=np.float32), "b": float("nan")}

    v1, r1 = files.cached_point(tmp_path, "p", compute, key={"x": 1})
    v2, r2 = files.cached_point(tmp_path, "p", compute, key={"x": 1})
    assert (r1, r2) == (False, True) and v1 == v2 == {"a": [0.0, 1.0, 2.0], "b": "nan"} and len(calls) == 1
    files.cached_point(tmp_path, "p", compute, key={"x": 2})  # another key: recomputed
    assert len(calls) == 2
    (tmp_path / "p.json").write_text((tmp_path / "p.json").read_text().replace("1.0", "7.0"))
    v3, r3 = files.cached_point(tmp_path, "p", compute, key={"x": 2})
    assert not r3 and v3["a"] == [0.0, 1.0, 2.0] and len(calls) == 3
    # arrays (.npz, no pickle)
    arrs = {"W0": np.ones((2, 3), np.float32), "b0": np.zeros(3, np.float32)}
    path = tmp_path / "m.npz"
    files.save_arrays(path, arrs, key="k")
    got = files.load_arrays(path, key="k")
    assert set(got) == {"W0", "b0"} and np.array_equal(got["W0"], arrs["W0"])
    assert files.load_arrays(path, key="other") is None
    raw = path.read_bytes()
    for bad in (raw[: len(raw) // 2], raw[:-30], b"", b"PK\x03\x04junk"):
        path.write_bytes(bad)
        assert files.load_arrays(path, key="k") is None
    with pytest.raises(InvalidArgumentError, match="dtype object"):
        files.save_arrays(path, {"x": np.array([{"a": 1}], dtype=object)})
    assert files.load_arrays(tmp_path / "missing.npz") is None
    # no temp files left behind by atomic writes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


_DRIVER = """
import sys
from noisejax.study import reproduce
reproduce.run(sys.argv[1], config="tiny", root=sys.argv[2], progress=False, only="symmetric_depth")
"""


def test_killed_run_resumes_identically(tmp_path, monkeypatch):
    """SIGKILL at random moments, restart: same results as an uninterrupted run, no point computed twice."""
    root = tmp_path / "experiments"
    cfg = 'CONFIGS = {"tiny": {"n": 8}, "default": {"n": 8}, "full": {"n": 8}}\n'
    _make(root, "symmetric_depth", _RUN_SWEEP, cfg)
    env = dict(os.environ, NOISEJAX_TEST_COUNTER=str(tmp_path), JAX_PLATFORMS="cpu")
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    out = tmp_path / "killed"
    rnd = random.Random(0)
    log = tmp_path / "sweep_points"
    kills = 0
    for target in (2, 4, 6):  # kill once the sweep has reached point `target`, at a random moment within it
        p = subprocess.Popen([sys.executable, str(driver), str(out), str(root)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:
            if log.exists() and len(log.read_text().split()) >= target:
                break
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 0.25))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 2
    subprocess.run([sys.executable, str(driver), str(out), str(root)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    computed = [int(x) for x in (tmp_path / "sweep_points").read_text().split()]
    # a point killed after logging but before its file was renamed may run twice; never a finished one
    assert sorted(set(computed)) == list(range(8))
    assert len(computed) <= 8 + kills
    (tmp_path / "sweep_points").unlink()
    ref = tmp_path / "reference"  # an uninterrupted run (in-process: the fake experiment does no JAX work)
    monkeypatch.setenv("NOISEJAX_TEST_COUNTER", str(tmp_path))
    reproduce.run(ref, config="tiny", root=root, progress=False, only="symmetric_depth")
    a = files.read_checked_json(out / "runs" / "symmetric_depth" / "record.json")
    b = files.read_checked_json(ref / "runs" / "symmetric_depth" / "record.json")
    assert a["result"] == b["result"] and a["claims"] == b["claims"]
    leftovers = [p for p in out.rglob(".*.tmp")]
    assert len(leftovers) <= kills  # a kill mid-write may leave a temp file; never a partial result
