"""Shared test helpers."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# The suite writes no cache into the user's home: models, denoisers and compiled programs of
# commands run here (in this process or in subprocesses, which inherit the variable) go to a
# folder of this session, deleted at exit.
_CACHE = tempfile.mkdtemp(prefix="noisejax-tests-cache-")
os.environ["NOISEJAX_CACHE"] = _CACHE
os.environ.pop("NOISEJAX_COMPILATION_CACHE", None)
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def run_on_host_devices(script: str, n_devices: int, *args: str) -> None:
    """Run ``python -c script *args`` in a fresh process whose JAX sees the CPU as ``n_devices`` devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True, env=env)


@pytest.fixture
def on_host_devices():
    """:func:`run_on_host_devices` (device-count invariance tests)."""
    return run_on_host_devices
