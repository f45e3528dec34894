"""noisejax.selfcheck(): the registry of backend checks, its table, the CLI's exit status,
and the Monte Carlo device invariance with 4 forced host devices (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import noisejax
from noisejax import cli, selfcheck
from noisejax.errors import InvalidArgumentError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_all_checks_pass_on_this_backend(capsys):
    report = noisejax.selfcheck()  # the module is callable
    out = capsys.readouterr().out
    assert report.ok, out
    assert [r.name for r in report.results] == list(selfcheck.CHECKS)
    assert {r.status for r in report.results} <= {"pass", "warn"}
    for name in selfcheck.CHECKS:
        assert name in out
    assert f"all {len(selfcheck.CHECKS)} checks passed" in out


def test_a_failing_check_fails_the_cli(monkeypatch, capsys):
    def bad():
        raise selfcheck.CheckFailed("planted: jit and eager differ by 3e+33")

    def crash():
        raise RuntimeError("backend cannot compile this\nsecond line")

    monkeypatch.setitem(selfcheck.CHECKS, "planted", (bad, "always fails"))
    monkeypatch.setitem(selfcheck.CHECKS, "crash", (crash, "raises"))
    monkeypatch.setitem(selfcheck.CHECKS, "note", (lambda: (_ for _ in ()).throw(selfcheck.CheckWarning("look")), "warns"))
    assert cli.main(["selfcheck", "--only", "xla-guard,planted,crash,note"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "planted: jit and eager differ by 3e+33" in out
    assert "RuntimeError: backend cannot compile this" in out and "second line" not in out
    assert "WARN" in out and "FAILED: planted, crash" in out
    assert cli.main(["selfcheck", "--only", "xla-guard,note"]) == 0  # a warning is not a failure
    capsys.readouterr()
    assert cli.main(["selfcheck", "--only", "nonsense"]) == 2
    assert "unknown check(s) 'nonsense'" in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match="unknown check"):
        selfcheck.run(["nonsense"])


def test_register_adds_a_named_check(monkeypatch):
    monkeypatch.setattr(selfcheck, "CHECKS", dict(selfcheck.CHECKS))

    @selfcheck.register("interpreter-rule", "a check the jaxpr interpreter adds later")
    def _check():
        return "42 rules agree"

    report = selfcheck.run(["interpreter-rule"])
    assert report.ok and report.results[0].detail == "42 rules agree"
    assert report.to_dict()["checks"][0]["status"] == "pass"


def test_cli_with_four_forced_host_devices():
    """Bitwise chunk/device invariance of monte_carlo across 4 devices (streams = 12), and the guard
    still appends its flag to a user's XLA_FLAGS that sets something else."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import sys; from noisejax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "selfcheck", "--json", "--only", "xla-guard,mc-invariance"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["ok"] and len(rep["devices"]) == 4
    checks = {c["name"]: c for c in rep["checks"]}
    assert "4 device(s), streams=12" in checks["mc-invariance"]["detail"]
    from noisejax import _backend

    if _backend.is_affected():
        assert checks["xla-guard"]["detail"].startswith("applied")
