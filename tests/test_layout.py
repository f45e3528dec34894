"""The package's layout (docs/architecture.md): a pure core, the edge in noisejax.study, no import cycle,
deprecated names that still work."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import denoise, layers, noise

ROOT = Path(__file__).resolve().parents[1] / "noisejax"
_SHIMS = {"store", "checkpoint", "convert", "models", "reproduce"}  # deprecated aliases of noisejax.study modules


def _imports() -> dict[str, set[str]]:
    """``{module: noisejax modules it imports}``, also through ``importlib.import_module("...")`` and function bodies."""
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        mod = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("noisejax"):
                base = node.module
                deps |= {f"{base}.{a.name}" for a in node.names} if base in ("noisejax", "noisejax.study") else {base}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("noisejax")}
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("noisejax"):
                deps.add(node.args[0].value)
        out[mod] = {d for d in deps if d != mod}
    return out


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()

    def reach(m, seen):
        for d in graph.get(m, ()):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    cycles = [(m, d) for m, ds in graph.items() for d in ds if m in reach(d, set())]
    assert not cycles, cycles


def test_the_core_imports_nothing_from_the_edge():
    edge_users = {m for m, ds in _imports().items() if any(d.startswith("noisejax.study") for d in ds)}
    allowed = {"noisejax.cli"} | {f"noisejax.{s}" for s in _SHIMS}  # the command line; the deprecated aliases
    assert {m for m in edge_users if not m.startswith("noisejax.study")} <= allowed


def test_moved_modules_forward_with_a_deprecation_warning():
    import noisejax
    from noisejax.study import claims, files

    with pytest.warns(DeprecationWarning, match="noisejax.study.files.fingerprint"):
        assert noisejax.store.fingerprint({"a": 1}) == files.fingerprint({"a": 1})
    with pytest.warns(DeprecationWarning, match="noisejax.study.files.fingerprint"):
        assert noisejax.checkpoint.config_hash({"a": 1}) == files.fingerprint({"a": 1})
    with pytest.warns(DeprecationWarning, match="noisejax.study.claims.claim"):
        assert noisejax.reproduce.claim is claims.claim
    with pytest.warns(DeprecationWarning, match="noisejax.train.accuracy"):
        assert float(noisejax.models.accuracy(jnp.eye(3), jnp.array([0, 1, 1]))) == pytest.approx(2 / 3)
    with pytest.raises(AttributeError):
        noisejax.store.no_such_name  # noqa: B018


def test_deprecated_names_of_layers_and_denoise():
    with pytest.warns(DeprecationWarning, match="NoiseSite"):
        site = layers.NeuronNoise()
    assert isinstance(site.spec, layers.NoiseSiteSpec) and site.n_sites == 1
    with pytest.warns(DeprecationWarning, match="typed"):
        assert layers.Linear(0.5).spec["slope"] == 0.5
    tree = {"Dense_0": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "bias": jnp.zeros(3)}}
    pw = noise.noise_power(tree, 0.0)
    noisy = noise.add_weight_noise(tree, 0.0, key=jax.random.key(0))
    with pytest.warns(DeprecationWarning, match="CompensatedMMSE"):
        old = denoise.compensated(noisy, pw, lam=0.5, beta=-0.1)
    new = denoise.CompensatedMMSE(lam=0.5, beta=-0.1)(noisy, pw)
    np.testing.assert_array_equal(np.asarray(old["Dense_0"]["kernel"]), np.asarray(new["Dense_0"]["kernel"]))


def test_layers_are_hashable_and_compare_by_their_functions():
    net = layers.mlp([4, 3, 2], "sigmoid")
    assert hash(net) == hash(net) and net == net
    assert net != layers.mlp([4, 3, 2], "sigmoid")  # other closures: another network for the caches
    assert layers.Dense(3).spec == layers.DenseSpec(3) and hash(layers.Dense(3).spec) == hash(layers.DenseSpec(3))
    assert isinstance(net.spec, layers.SerialSpec) and isinstance(net.spec.children[0].children[2], layers.NoiseSiteSpec)
