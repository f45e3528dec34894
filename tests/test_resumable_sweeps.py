"""Resumable WNR sweeps: atomic per-point files, SIGKILL at random moments, corrupted points.

The driver below runs :func:`noisejax.sweeps.accuracy_sweep` with ``store=PointStore(folder)`` on a
fixed linear classifier of scikit-learn's digits; ``on_point`` logs each point it
computed (after the point's file is stored) and sleeps, so kills land between and
inside points.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from noisejax import denoise, sweeps
from noisejax.errors import InvalidArgumentError
from noisejax.study import files
from noisejax.study.files import PointStore

_DRIVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np
    from sklearn.datasets import load_digits
    from noisejax import denoise, sweeps
    from noisejax.study.files import PointStore

    store, log, result = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)[:400]
    y = y[:400]
    r = np.random.default_rng(0)
    variables = {"Dense_0": {"kernel": r.normal(size=(64, 10)).astype(np.float32) * 0.3,
                             "bias": np.zeros(10, np.float32)}}
    f = lambda v, xb: xb @ v["Dense_0"]["kernel"] + v["Dense_0"]["bias"]

    def on_point(i, reused):
        if not reused:
            with open(log, "a") as fh:
                fh.write(f"{i}\\n")
        time.sleep(0.25)

    res = sweeps.accuracy_sweep(f, variables, x, y, np.linspace(-6.0, 15.0, 8), key=jax.random.key(3),
                                n_realizations=16, estimators={"ml": denoise.ML(), "mmse": denoise.MMSE()},
                                store=PointStore(store), on_point=on_point)
    np.savez(result, ml=res["ml"], mmse=res["mmse"], reused=res["_reused"])
    """
)


def _run(driver, *args, env):
    return subprocess.Popen([sys.executable, str(driver), *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _inodes(folder):
    return {p: os.stat(os.path.join(folder, p)).st_ino for p in os.listdir(folder) if p.endswith(".npz")}


def test_sweep_killed_at_random_moments_resumes_bitwise(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    ref = _run(driver, tmp_path / "ref_store", tmp_path / "ref.log", tmp_path / "ref.npz", env=env)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()

    store, log = tmp_path / "store", tmp_path / "computed.log"
    rnd = random.Random(1)
    kills = 0
    for target in (1, 3, 5):  # kill once the sweep has finished `target` points, at a random moment after
        p = _run(driver, store, log, tmp_path / "killed.npz", env=env)
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline:
            if log.exists() and len(log.read_text().split()) >= target:
                break
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.0, 0.4))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 2, "the driver finished before it could be killed"
    assert not (tmp_path / "killed.npz").exists()

    before = _inodes(store)
    assert 1 <= len(before) < 8
    # a damaged point is never trusted: truncate one stored point, overwrite another with garbage
    damaged = sorted(before)[:2]
    path0 = store / damaged[0]
    path0.write_bytes(path0.read_bytes()[: path0.stat().st_size // 2])
    if len(damaged) > 1:
        (store / damaged[1]).write_bytes(b"garbage")

    final = _run(driver, store, log, tmp_path / "final.npz", env=env)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()

    computed = [int(v) for v in log.read_text().split()]
    intact = {name for name in before if name not in damaged}
    # every point was computed; no finished point was computed twice (the damaged ones excepted)
    assert sorted(set(computed)) == list(range(8))
    assert len(computed) == 8 + len(damaged)
    after = _inodes(store)
    assert all(after[name] == before[name] for name in intact), "an intact stored point was rewritten"
    a, b = np.load(tmp_path / "final.npz"), np.load(tmp_path / "ref.npz")
    assert int(a["reused"]) == len(intact)
    np.testing.assert_array_equal(a["ml"], b["ml"])
    np.testing.assert_array_equal(a["mmse"], b["mmse"])


@pytest.fixture(scope="module")
def tiny_problem():
    r = np.random.default_rng(0)
    x = r.normal(size=(64, 8)).astype(np.float32)
    w = r.normal(size=(8, 3)).astype(np.float32)
    y = np.argmax(x @ w, -1)
    return (lambda v, xb: xb @ v["Dense_0"]["kernel"]), {"Dense_0": {"kernel": w}}, x, y


def test_store_reuses_only_matching_points(tiny_problem, tmp_path):
    f, v, x, y = tiny_problem
    kw = dict(n_realizations=4, estimators={"ml": denoise.ML()}, store=PointStore(tmp_path / "s"))
    first = sweeps.accuracy_sweep(f, v, x, y, [0.0, 10.0], key=jax.random.key(0), **kw)
    again = sweeps.accuracy_sweep(f, v, x, y, [0.0, 10.0], key=jax.random.key(0), **kw)
    assert first["_reused"] == 0 and again["_reused"] == 2
    np.testing.assert_array_equal(first["ml"], again["ml"])
    # another key, another WNR grid, other weights: stored points are not reused
    assert sweeps.accuracy_sweep(f, v, x, y, [0.0, 10.0], key=jax.random.key(1), **kw)["_reused"] == 0
    assert sweeps.accuracy_sweep(f, v, x, y, [0.0, 12.0], key=jax.random.key(1), **kw)["_reused"] == 1
    v2 = {"Dense_0": {"kernel": v["Dense_0"]["kernel"] * 2}}
    assert sweeps.accuracy_sweep(f, v2, x, y, [0.0, 12.0], key=jax.random.key(1), **kw)["_reused"] == 0


def test_grid_store_resumes(tiny_problem, tmp_path):
    f, v, x, y = tiny_problem
    grid = denoise.compensated_grid([0.5, 1.0], [0.0, 0.1])
    kw = dict(key=jax.random.key(0), n_realizations=3, store=PointStore(tmp_path / "g"))
    seen = []
    a = sweeps.grid_accuracies(f, v, {"val": (x, y)}, [0.0, 5.0], grid, on_point=lambda i, r: seen.append(r), **kw)
    b = sweeps.grid_accuracies(f, v, {"val": (x, y)}, [0.0, 5.0], grid, on_point=lambda i, r: seen.append(r), **kw)
    assert seen == [False, False, True, True]
    np.testing.assert_array_equal(a["val"], b["val"])


def test_store_must_be_a_folder(tiny_problem, tmp_path):
    f, v, x, y = tiny_problem
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="store must be a writable folder"):
        sweeps.accuracy_sweep(f, v, x, y, [0.0], key=jax.random.key(0), n_realizations=2,
                              estimators={"ml": denoise.ML()}, store=PointStore(tmp_path / "file"))
    with pytest.raises(InvalidArgumentError, match="store must be None or a point store"):
        sweeps.accuracy_sweep(f, v, x, y, [0.0], key=jax.random.key(0), n_realizations=2,
                              estimators={"ml": denoise.ML()}, store=3)


def test_store_folder_path_names_the_point_store(tiny_problem, tmp_path):
    f, v, x, y = tiny_problem
    with pytest.raises(InvalidArgumentError, match=r"pass store=noisejax\.study\.files\.PointStore"):
        sweeps.accuracy_sweep(f, v, x, y, [0.0], key=jax.random.key(0), n_realizations=2,
                              estimators={"ml": denoise.ML()}, store=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_points_of_another_library_version_are_recomputed(tiny_problem, tmp_path, monkeypatch):
    f, v, x, y = tiny_problem
    kw = dict(key=jax.random.key(0), n_realizations=2, estimators={"ml": denoise.ML()}, store=PointStore(tmp_path / "s"))
    assert sweeps.accuracy_sweep(f, v, x, y, [0.0], **kw)["_reused"] == 0
    assert sweeps.accuracy_sweep(f, v, x, y, [0.0], **kw)["_reused"] == 1
    calls = []
    compute = lambda: calls.append(1) or {"acc": 0.5}  # noqa: E731
    files.cached_point(tmp_path / "p", "a", compute, key={"w": 0})
    files.cached_point(tmp_path / "p", "a", compute, key={"w": 0})
    assert len(calls) == 1
    monkeypatch.setattr(files, "code_digest", lambda: "another-version")
    assert sweeps.accuracy_sweep(f, v, x, y, [0.0], **kw)["_reused"] == 0
    files.cached_point(tmp_path / "p", "a", compute, key={"w": 0})
    assert len(calls) == 2


_DEVICES = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from noisejax import denoise, rng, sweeps
    from noisejax.study import models

    cfg = models.ModelConfig(kind="resnet1d", dataset="mnist1d", stage_channels=(4, 8), blocks_per_stage=1, n_samples=400)
    ds = models.load_dataset(cfg)
    variables = models.init(models.build(cfg), jax.random.key(0), ds.x_train[:2], train=False)
    f = models.logits_fn(cfg)
    assert len(jax.devices()) == int(sys.argv[2])
    sw = sweeps.accuracy_sweep(f, variables, ds.x_test, ds.y_test, [0.0, 10.0], key=rng.key(1), n_realizations=4,
                               estimators={"ML": denoise.ML(), "MMSE": denoise.MMSE()}, batch_size=2)
    grid = sweeps.grid_accuracies(f, variables, {"val": (ds.x_val, ds.y_val)}, [5.0], denoise.compensated_grid((0.5, 1.0), (0.0,)),
                                  key=rng.key(2), n_realizations=4)
    np.savez(sys.argv[1], ml=sw["ML"], mmse=sw["MMSE"], grid=grid["val"])
    """
)


def test_sweep_and_grid_split_over_devices_are_bitwise_the_same(tmp_path, on_host_devices):
    """Realizations split over 2 CPU devices (shard_map) give the accuracies of 1 device, bit for bit."""
    res = {}
    for n in (1, 2):
        out = tmp_path / f"d{n}.npz"
        on_host_devices(_DEVICES, n, out, n)
        with np.load(out) as z:
            res[n] = {k: z[k] for k in z.files}
    assert res[1]["ml"].shape == (2, 4) and res[1]["grid"].shape == (1, 2, 4)
    for k in res[1]:
        np.testing.assert_array_equal(res[1][k], res[2][k])
