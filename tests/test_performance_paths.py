"""Start-up and caching paths of issue 15: no Flax on the command line's path, the persistent
compilation cache, no recompilation for a new closure of the same structure, and the
Flax-free dataclass pytrees (noisejax._struct)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import _struct, layers, noise, rng, simulate
from noisejax.study import files as study_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("perf")
    r = np.random.default_rng(0)
    np.savez(d / "w.npz", W0=r.standard_normal((6, 8)).astype(np.float32), b0=np.zeros(8, np.float32),
             W1=r.standard_normal((8, 3)).astype(np.float32))
    np.save(d / "x.npy", r.uniform(size=(4, 6)).astype(np.float32))
    return d


def _propagate(files, cache, extra_code=""):
    code = ("import sys, json\nfrom noisejax.cli import main\nrc = main(sys.argv[1:])\n" + extra_code)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", NOISEJAX_COMPILATION_CACHE=str(cache))
    proc = subprocess.run(
        [sys.executable, "-c", code, "propagate", str(files / "w.npz"), "--input", str(files / "x.npy"),
         "--activation", "sigmoid", "--add-uncorrelated", "1e-2", "--realizations", "100", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_propagate_imports_no_flax_and_reuses_compiled_programs(files, tmp_path):
    cache = tmp_path / "xla"
    out = _propagate(files, cache, "import sys\nprint('FLAX' if any(m.split('.')[0] in ('flax', 'optax') for m in sys.modules) else 'NOFLAX')\n")
    doc, flag = out.rsplit("\n", 2)[0], out.split("\n")[-2]
    assert flag == "NOFLAX"
    first = json.loads(doc)
    assert set(first["seconds"]) == {"total", "compile"} and first["seconds"]["compile"] > 0
    entries = os.listdir(cache)
    assert len(entries) > 0  # compiled programs were written
    second = json.loads(_propagate(files, cache).rsplit("\n", 1)[0])
    assert first["layers"] == second["layers"]  # the cached executables give the same numbers
    assert second["seconds"]["compile"] < first["seconds"]["compile"]


def test_compilation_cache_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv(study_files.COMPILATION_CACHE_ENV, "off")
    assert study_files.compilation_cache_dir() is None
    monkeypatch.setenv(study_files.COMPILATION_CACHE_ENV, str(tmp_path / "c"))
    assert study_files.compilation_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(study_files.COMPILATION_CACHE_ENV)
    monkeypatch.setenv("NOISEJAX_CACHE", str(tmp_path / "nj"))
    assert study_files.compilation_cache_dir() == tmp_path / "nj" / "jax-compilation"


def test_prune_compilation_cache_drops_the_least_recently_used_entries(tmp_path):
    sizes = [300, 200, 500, 100]  # entry i last used at time 1000 + 100 i
    for i, size in enumerate(sizes):
        (tmp_path / f"k{i}-cache").write_bytes(b"x" * size)
        (tmp_path / f"k{i}-atime").write_bytes(b"t")  # JAX's own LRU stamp, deleted with its entry
        os.utime(tmp_path / f"k{i}-cache", (1000 + 100 * i, 1000 + 100 * i))
    (tmp_path / "notes.txt").write_text("not an entry")
    assert study_files.prune_compilation_cache(tmp_path, max_bytes=1100) == 0  # 1100 bytes: nothing to do
    # 600 bytes: drop k0 (300, oldest) and k1 (200) -> 600 left
    assert study_files.prune_compilation_cache(tmp_path, max_bytes=600) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2-atime", "k2-cache", "k3-atime", "k3-cache", "notes.txt"]
    os.utime(tmp_path / "k2-cache", (5000, 1200))  # k2 read since: now the most recently used
    assert study_files.prune_compilation_cache(tmp_path, max_bytes=550) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2-atime", "k2-cache", "notes.txt"]
    assert study_files.prune_compilation_cache(tmp_path / "missing") == 0
    with pytest.raises(study_files.InvalidArgumentError, match="max_bytes"):
        study_files.prune_compilation_cache(tmp_path, max_bytes=-1)


def test_compilation_cache_is_on_only_inside_the_command(monkeypatch, tmp_path, without_session_compilation_cache):
    """The command line switches JAX's cache on for one command; programs compiled afterwards in
    the same process (a test suite, a notebook calling cli.main) are not written to disk."""
    from noisejax import cli

    assert not jax.config.jax_compilation_cache_dir
    cache = tmp_path / "c"
    monkeypatch.setenv(study_files.COMPILATION_CACHE_ENV, str(cache))

    def written():
        return sorted(p.name for p in cache.glob("*-cache"))

    x = jnp.ones(7)
    with study_files.compilation_cache() as path:
        assert path == cache and jax.config.jax_compilation_cache_dir == str(cache)
        jax.jit(lambda a: a * 3.0 + 1.0)(x).block_until_ready()
        inside = written()
    assert [n.split("-")[0] for n in inside] == ["jit__lambda"]
    assert jax.config.jax_compilation_cache_dir is None
    jax.jit(lambda a: a * 5.0 - 2.0)(x).block_until_ready()
    assert written() == inside  # nothing written after the block
    # the command line restores the settings even when the command fails
    assert cli.main(["reproduce", "--only", "no_such_experiment", "--out", str(tmp_path / "r")]) != 0
    assert jax.config.jax_compilation_cache_dir is None


def test_new_closure_with_the_same_structure_does_not_recompile():
    net = layers.mlp([5, 7, 3], "tanh")
    _, params = net.init(jax.random.key(0), (5,))
    x = jnp.ones((2, 5))

    def job(scale, variance):
        p = jax.tree_util.tree_map(lambda a: a * scale, params)
        nz = noise.NeuronNoise(add_uncorrelated=variance)
        return lambda k: layers.apply_batch(net, p, x, key=k, noise=nz, return_layers=True)[1]

    compiles = []
    listener = lambda event, *a, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        a = simulate.monte_carlo(job(1.0, 1e-2), rng.key(1), 256)
        n_first = len(compiles)
        b = simulate.monte_carlo(job(2.0, 4e-2), rng.key(1), 256)  # new closure, new values, same structure
        assert len(compiles) == n_first, "a new closure of the same structure was compiled again"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # the values are arguments, not baked-in constants: the second job's statistics are its own
    assert float(jnp.mean(b.var[1])) > 2 * float(jnp.mean(a.var[1]))
    direct = simulate.monte_carlo(job(2.0, 4e-2), rng.key(1), 256, tile_size=32)  # another program
    np.testing.assert_allclose(np.asarray(direct.mean[1]), np.asarray(b.mean[1]), rtol=1e-5, atol=1e-6)


@_struct.dataclass
class _Spec:
    scale: jax.Array
    name: str = _struct.field(pytree_node=False, default="a")


def test_struct_dataclass_semantics():
    s = _Spec(jnp.ones(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.scale = 2.0
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 1 and "a" in str(treedef)  # the static field is structure, not a leaf
    t = s.replace(name="b")
    assert t.name == "b" and jax.tree_util.tree_structure(t) != treedef
    doubled = jax.jit(lambda v: jax.tree_util.tree_map(lambda a: 2 * a, v))(s)
    assert isinstance(doubled, _Spec) and doubled.name == "a" and float(doubled.scale[0]) == 2.0
    # vmap over a pytree leaf: a sweep over intensities
    out = jax.vmap(lambda v: v.scale.sum())(_Spec(jnp.ones((4, 3))))
    assert out.shape == (4,)


def test_struct_checkpoint_roundtrip(tmp_path):
    nz = noise.NeuronNoise(add_uncorrelated=0.5, correlated_axes=(0,))
    path = study_files.save(tmp_path / "n.ckpt", nz)
    back, _ = study_files.load(path, target=noise.NeuronNoise(add_uncorrelated=0.0, correlated_axes=(0,)))
    assert isinstance(back, noise.NeuronNoise) and float(back.add_uncorrelated) == 0.5 and back.correlated_axes == (0,)
