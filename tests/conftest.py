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

# Compiled programs: JAX's persistent compilation cache, one folder for the whole pytest run,
# shared by its xdist workers, so a program one test compiled is loaded, not compiled again, by
# the next test that builds the same program (the same executable: the numbers do not change).
# Programs that compile in under 0.2 s are not stored.  The process that starts the run (xdist's
# controller, or pytest without xdist) creates the folder, hands it to its workers through the
# environment and deletes it at exit.  ``NOISEJAX_TESTS_JAX_CACHE=off`` switches it off.
_JAX_CACHE_ENV = "NOISEJAX_TESTS_JAX_CACHE_DIR"
_JAX_CACHE = None
if os.environ.get("NOISEJAX_TESTS_JAX_CACHE", "").lower() not in ("off", "0", "false"):
    _JAX_CACHE = os.environ.get(_JAX_CACHE_ENV)
    if _JAX_CACHE is None:  # this process starts the run
        _JAX_CACHE = tempfile.mkdtemp(prefix="noisejax-tests-jax-")
        os.environ[_JAX_CACHE_ENV] = _JAX_CACHE
        atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
    import jax

    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def without_session_compilation_cache():
    """This test runs with JAX's persistent compilation cache switched off (restored afterwards)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    from noisejax.study.files import _CACHE_OPTIONS  # the settings the command line's cache changes

    before = {n: getattr(jax.config, n) for n in _CACHE_OPTIONS}
    jax.config.update("jax_compilation_cache_dir", None)
    jax_cache.reset_cache()
    yield
    for n, v in before.items():
        jax.config.update(n, v)
    jax_cache.reset_cache()


if os.environ.get("NOISEJAX_TESTS_COMPILE_STATS"):  # measurement: compile seconds and cache hits per test
    import json

    import jax

    _STATS = {"compile_s": 0.0, "saved_s": 0.0, "hits": 0, "misses": 0}

    def _on_duration(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            _STATS["compile_s"] += duration
        elif event == "/jax/compilation_cache/compile_time_saved_sec":
            _STATS["saved_s"] += duration

    def _on_event(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            _STATS["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            _STATS["misses"] += 1

    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        before = dict(_STATS)
        yield
        row = {k: _STATS[k] - before[k] for k in _STATS}
        with open(os.environ["NOISEJAX_TESTS_COMPILE_STATS"], "a") as fh:
            fh.write(json.dumps({"test": item.nodeid, **row}) + "\n")


def run_on_host_devices(script: str, n_devices: int, *args: str) -> None:
    """Run ``python -c script *args`` in a fresh process whose JAX sees the CPU as ``n_devices`` devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True, env=env)


@pytest.fixture
def on_host_devices():
    """:func:`run_on_host_devices` (device-count invariance tests)."""
    return run_on_host_devices
