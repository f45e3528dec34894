"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_on_host_devices(script: str, n_devices: int, *args: str) -> None:
    """Run ``python -c script *args`` in a fresh process whose JAX sees the CPU as ``n_devices`` devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True, env=env)


@pytest.fixture
def on_host_devices():
    """:func:`run_on_host_devices` (device-count invariance tests)."""
    return run_on_host_devices
