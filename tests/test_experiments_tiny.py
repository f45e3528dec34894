"""Every experiment of ``experiments/`` on its tiny config, through ``noisejax reproduce``.

One orchestrator run (module fixture) covers all existing experiments end to end:
report folder, results, figures and the claims table.  It runs them two side by side, as
``noisejax reproduce`` does; two of them are checked against a run alone, number for number.  Experiments whose folder does
not exist yet are skipped with that reason.  The tiny configs check that the code
runs and returns well-formed results; their numbers are not meant to reproduce the
papers (the default configs do, see ``noisejax reproduce``).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax.study import files, reproduce

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    summary = reproduce.run(out, config="tiny", progress=False, jobs=2)
    return out, summary


def _untimed(value):
    """``value`` without its timings (keys naming seconds or timing), which differ from run to run."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items()
                if not any(t in k for t in ("second", "timing", "compile_s", "run_s")) and k != "cache"}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


@pytest.mark.parametrize("name", ["trained_mlp_snr", "noisy_inference"])
def test_side_by_side_equals_alone(report, tmp_path, name):
    """Run beside other experiments (threads of one process), an experiment computes exactly what it computes alone."""
    _require(name)
    rec = report[1]["experiments"][name]
    alone = reproduce.run(tmp_path, config="tiny", progress=False, only=name)["experiments"][name]
    assert rec["side_by_side"] and rec["cpu_seconds"] is None and alone["cpu_seconds"] is not None
    assert alone["claims"] == rec["claims"]
    assert _untimed(alone["result"]) == _untimed(rec["result"])


def _require(name: str):
    assert name in reproduce.available(), f"experiments/{name}/ is missing (config.py + run.py)"


def test_report_folder(report):
    out, summary = report
    assert summary["config"] == "tiny"
    results = json.loads((out / "results.json").read_text())
    assert list(results["experiments"]) == list(reproduce.EXPERIMENTS)
    text = (out / "report.md").read_text()
    assert "| # | claim | paper's figure | our measured value | holds |" in text
    ok = [n for n, r in summary["experiments"].items() if r["status"] == "ok"]
    assert set(reproduce.available()) == set(ok), {n: r.get("error") for n, r in summary["experiments"].items()}
    for name in ok:
        assert f"![{name}](figures/{name}.png)" in text
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


@pytest.mark.parametrize("name", reproduce.EXPERIMENTS)
def test_experiment_tiny(report, name):
    _require(name)
    out, summary = report
    rec = summary["experiments"][name]
    assert rec["status"] == "ok", rec.get("error")
    assert rec["figures"], "no figure produced"
    claims = rec["claims"]
    assert claims, f"{name}: main() returned no 'claims' (list of claim/figure/measured/holds/note)"
    for c in claims:
        assert c["claim"] and c["figure"] and c["measured"] not in ("", None)
        assert c["holds"] in (True, False, None)
    # the stored record is exactly what the run returned
    stored = files.read_checked_json(out / "runs" / name / "record.json")
    assert stored["result"] == rec["result"]


def test_symmetric_depth_scan_is_the_deep_network(report):
    """The scanned layer draws exactly the noise of layer n of meanfield.symmetric_network (bitwise)."""
    from noisejax import layers, meanfield, noise, rng

    exp = reproduce.load_experiment("symmetric_depth")
    run = exp.run_module
    cfg = exp.config("tiny")
    case = run.cases(cfg)[0]
    width, depth = 4, 3
    net, params = meanfield.symmetric_network(width, width, depth, coupling=case["scale"] * case["coupling"],
                                              activation="linear", bias=case["scale"] * case["bias"])
    nz = noise.NeuronNoise(add_uncorrelated=1e-2, add_correlated=2e-2, mul_uncorrelated=3e-2, mul_correlated=4e-2)
    key = rng.key(3)
    x0 = jnp.full((width,), case["level"])
    _, deep = net.apply(params, x0, key=key, noise=nz, return_layers=True)
    blk = run.block("linear")
    p = jax.tree_util.tree_map(lambda a: a[0], run.block_params([case], width))
    y = x0
    for n in range(depth):
        y = blk.apply(p, y, key=jax.random.fold_in(key, n), noise=nz)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(deep[n]))
    # the noise-free signal is the same in every layer (the bias choice of the experiment)
    clean = net.apply(params, x0, return_layers=True)[1]
    np.testing.assert_allclose(np.asarray(clean[-1]), case["level"], rtol=1e-5)


def test_symmetric_depth_claims_are_computed(report):
    _, summary = report
    res = summary["experiments"]["symmetric_depth"]["result"]
    texts = [c["claim"] for c in res["claims"]]
    assert any("slope < 1" in t for t in texts) and any("slope is > 1" in t for t in texts)
    # the mean-field limit of the slope-0.5 network is finite, the slope-1.5 one is not
    by = {p["case"]["name"]: p for p in res["points"]}
    assert all(l["bounded"] for l in by["linear_0.5"]["limits"])
    assert not any(l["bounded"] for l in by["linear_1.5"]["limits"])
    assert all(l["var"] == "inf" for l in by["linear_1.5"]["limits"])


def test_trained_mlp_snr_resumes_from_its_points(report):
    """A second run in the same folder loads the cached model and points and returns the same numbers."""
    out, summary = report
    rec = summary["experiments"]["trained_mlp_snr"]
    exp = reproduce.load_experiment("trained_mlp_snr")
    cfg = exp.config("tiny")
    again = exp.main(cfg, str(out / "runs" / "trained_mlp_snr" / "work"), progress=False).to_json()
    # the model, the per-layer SNR point and one point per (noise type, intensity) of the accuracy sweep
    assert again["points_reused"] == 2 + 4 * len(cfg.intensities)
    for k in ("claims", "snr", "accuracy", "model", "summary"):
        assert again[k] == rec["result"][k], k
    assert (out / "runs" / "trained_mlp_snr" / "work" / "model.npz").exists()


def test_connection_matrix_uncorrelated_layer_identity(report):
    """Uncorrelated noise reaching a layer, normalized by D·N, equals mean(W²) within Monte Carlo error."""
    _, summary = report
    res = summary["experiments"]["connection_matrix"]["result"]
    n = res["config"]["realizations"]
    for row in res["layers"]:
        # averaging over fan_out neurons with independent draws: relative sd ≈ sqrt(2/(n-1)) (worst case, correlated)
        assert math.isclose(row["uncorrelated_normalized"], row["mean_W2"], rel_tol=5 * math.sqrt(2 / (n - 1)))


def test_pcm_drift_curves_gains_and_resnet(report):
    """pcm_drift (issue 16): every (model, compensation) curve over all times, analytic next to MC, gains, the ResNet."""
    _, summary = report
    res = summary["experiments"]["pcm_drift"]["result"]
    n_t = len(res["times"])
    assert res["time_labels"][0] == "1 s" and res["time_labels"][-1] == "10 years"
    curves = {"plain/readout", "hwa/readout", "plain/exact", "hwa/exact", "plain/none"}
    assert set(res["mc"]) == curves and set(res["analytic"]) == curves - {"plain/none"}
    for v in res["mc"].values():
        assert len(v["mean"]) == n_t and all(0.0 <= a <= 1.0 for a in v["mean"]) and all(s >= 0 for s in v["std"])
    for v in res["analytic"].values():
        assert len(v) == n_t and all(0.0 <= a <= 1.0 for a in v)
    lv = res["layer_variances"]
    for an in lv["analytic_mean_var"]:
        assert an[-1] > an[0] > 0  # drift and read noise spread the weights over time
    # a decade of drift needs gains > 1 in every layer, with either readout
    assert all(g[-1] > 1.0 for g in res["gains"]["exact_mean"]) and all(g[-1] > 1.0 for g in res["gains"]["readout_mean"])
    assert set(res["resnet"]["mc"]) == curves
    assert len(res["claims"]) == 7  # six on the MLP and the ResNet, plus the ResNet analytic prediction
