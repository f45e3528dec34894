"""The `noisejax propagate` contract: JSON shape, reproducibility, and one-line errors."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from noisejax import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    r = np.random.default_rng(0)
    W0, b0, W1 = r.normal(size=(5, 4)) / 2, r.normal(size=4) / 4, r.normal(size=(4, 3)) / 2
    np.savez(d / "w.npz", W0=W0, b0=b0, W1=W1)
    np.save(d / "x1.npy", r.normal(size=5).astype(np.float32))
    np.save(d / "xb.npy", r.normal(size=(2, 5)).astype(np.float32))
    bad = {
        "misnumbered.npz": dict(W0=W0, W2=W1),
        "mismatch.npz": dict(W0=W0, W1=r.normal(size=(3, 3))),
        "nan.npz": dict(W0=np.where(np.eye(5, 4) > 0, np.nan, W0), W1=W1),
        "badbias.npz": dict(W0=W0, b0=np.zeros(7), W1=W1),
        "orphanbias.npz": dict(W0=W0, W1=W1, b5=np.zeros(3)),
        "nokeys.npz": dict(foo=W0),
        "oned.npz": dict(W0=np.zeros(5)),
    }
    for name, arrays in bad.items():
        np.savez(d / name, **arrays)
    np.save(d / "x_wrong.npy", np.zeros(7, np.float32))
    np.save(d / "x_nan.npy", np.array([np.nan, 0, 0, 0, 0], np.float32))
    np.save(d / "x_3d.npy", np.zeros((1, 2, 5), np.float32))
    np.save(d / "x_str.npy", np.array(["a"] * 5))
    (d / "garbage.npz").write_bytes(b"not a zip file")
    np.save(d / "x_obj.npy", np.array([object()] * 5, dtype=object), allow_pickle=True)
    np.save(d / "w.npy", W0)
    np.savez(d / "torch_layout.npz", W0=W0.T, W1=W1.T)  # PyTorch's (out, in)
    np.savez(d / "torch_one.npz", W0=W0.T)  # one layer: the input shows it
    np.savez(d / "state_dict.npz", **{"0.weight": W0.T, "0.bias": b0, "2.weight": W1.T})
    np.savez(d / "xb.npz", x=np.zeros(5))
    return d, dict(W0=W0, b0=b0, W1=W1)


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_contract_single_input_and_batch(files, capsys):
    d, _ = files
    rc, out, err = run(capsys, "propagate", d / "w.npz", "--input", d / "x1.npy", "--activation", "tanh",
                       "--add-uncorrelated", "1e-2", "--realizations", "64", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["realizations"] == 64 and doc["seed"] == 0
    assert [layer["index"] for layer in doc["layers"]] == [0, 1]
    assert np.shape(doc["layers"][0]["mc"]["mean"]) == (4,) and np.shape(doc["layers"][1]["mc"]["var"]) == (3,)
    assert "analytic" not in doc["layers"][0]
    rc, out, _ = run(capsys, "propagate", d / "w.npz", "--input", d / "xb.npy", "--activation", "tanh",
                     "--activation-out", "linear", "--mul-correlated", "1e-2", "--realizations", "64", "--json")
    doc = json.loads(out)
    assert np.shape(doc["layers"][1]["mc"]["mean"]) == (2, 3)


def test_json_mean_matches_clean_forward_without_noise(files, capsys):
    d, w = files
    rc, out, _ = run(capsys, "propagate", d / "w.npz", "--input", d / "x1.npy", "--activation", "linear:0.5",
                     "--realizations", "8", "--json")
    x = np.load(d / "x1.npy").astype(np.float64)
    h = 0.5 * (x @ w["W0"] + w["b0"])
    y = 0.5 * (h @ w["W1"])
    doc = json.loads(out)
    np.testing.assert_allclose(doc["layers"][0]["mc"]["mean"], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(doc["layers"][1]["mc"]["mean"], y, rtol=1e-5, atol=1e-6)
    assert np.max(doc["layers"][1]["mc"]["var"]) < 1e-10


def test_same_seed_same_numbers_for_any_chunk_size(files, capsys):
    d, _ = files
    outs = []
    for chunk in ("1", "7", "64"):
        rc, out, _ = run(capsys, "propagate", d / "w.npz", "--input", d / "xb.npy", "--activation", "sigmoid",
                         "--add-uncorrelated", "1e-2", "--add-correlated", "1e-3", "--realizations", "70",
                         "--chunk-size", chunk, "--seed", "3", "--json")
        doc = json.loads(out)
        assert doc.pop("seconds")["compile"] >= 0  # timings differ between runs; the numbers may not
        outs.append(json.dumps(doc))
    assert outs[0] == outs[1] == outs[2]
    rc, other, _ = run(capsys, "propagate", d / "w.npz", "--input", d / "xb.npy", "--activation", "sigmoid",
                       "--add-uncorrelated", "1e-2", "--add-correlated", "1e-3", "--realizations", "70", "--seed", "4", "--json")
    other = json.loads(other)
    other.pop("seconds")
    assert json.dumps(other) != outs[0]


def test_table_output(files, capsys):
    d, _ = files
    rc, out, err = run(capsys, "propagate", d / "w.npz", "--input", d / "x1.npy", "--activation", "sigmoid",
                       "--add-uncorrelated", "1e-3", "--realizations", "32", "--method", "both")
    assert rc == 0 and err == ""
    lines = out.strip().splitlines()
    # the run's settings first, then the table: header, rule, one row per layer
    assert f"{d / 'w.npz'}" in lines[0] and "widths 5-4-3" in lines[0] and "1 example" in lines[0]
    assert "activation sigmoid" in lines[1] and "add_uncorrelated=0.001" in lines[1]
    assert "realizations=32" in lines[2] and "seed=0" in lines[2] and "moment-method=gaussian" in lines[2]
    assert lines[3].startswith("SNR = 10 log10(sum mean^2 / sum var)")
    table = lines[4:]
    assert len(table) == 4 and "MC SNR dB" in table[0] and "analytic SNR dB" in table[0]
    # aligned: the rule's dash runs are the columns; every cell fills its column's right end
    # (numbers right-aligned) and a space separates it from the previous column
    spans = [m.span() for m in re.finditer(r"-+", table[1])]
    assert len(spans) == 9
    for t in [table[0]] + table[2:]:
        assert len(t) == spans[-1][1], t
        for a, b in spans[1:]:
            assert t[b - 1] != " " and t[a - 1] == " ", (t, a, b)


def test_json_has_settings_snr_and_standard_errors(files, capsys):
    d, _ = files
    rc, out, _ = run(capsys, "propagate", d / "w.npz", "--input", d / "xb.npy", "--activation", "tanh",
                     "--activation-out", "linear", "--add-correlated", "1e-2", "--realizations", "128",
                     "--method", "both", "--json")
    doc = json.loads(out)
    st = doc["settings"]
    assert st["noise"] == {"add_uncorrelated": 0.0, "add_correlated": 0.01, "mul_uncorrelated": 0.0, "mul_correlated": 0.0}
    assert st["activation"] == "tanh" and st["activation_out"] == "linear" and st["widths"] == [5, 4, 3]
    assert st["realizations"] == 128 and st["inputs"] == 2 and st["method"] == "both" and st["rng"] == "fast"
    assert "sum(mean^2)/sum(var)" in doc["snr_definition"]
    for layer, width in zip(doc["layers"], (4, 3)):
        assert layer["width"] == width
        mc = layer["mc"]
        m, v = np.asarray(mc["mean"]), np.asarray(mc["var"])
        np.testing.assert_allclose(mc["mean_stderr"], np.sqrt(v / 128), rtol=1e-6)
        assert mc["snr_db"] == pytest.approx(10 * np.log10((m**2).sum() / v.sum()), abs=1e-6)
        assert 0 < mc["snr_db_stderr_bound"] < 3
        assert abs(mc["snr_db"] - layer["analytic"]["snr_db"]) < 3 * mc["snr_db_stderr_bound"]


def test_zero_noise_warns_and_json_stays_valid(files, capsys):
    d, _ = files
    rc, out, err = run(capsys, "propagate", d / "w.npz", "--input", d / "x1.npy", "--activation", "tanh",
                       "--method", "analytic", "--json")
    assert rc == 0 and err.startswith("noisejax: warning: all noise variances are 0") and len(err.splitlines()) == 1
    doc = json.loads(out)  # strict JSON: an infinite SNR is null, not Infinity
    assert doc["layers"][0]["analytic"]["snr_db"] is None and "Infinity" not in out


def test_sweep_writes_table_json_and_png(files, capsys, tmp_path):
    d, _ = files
    out_dir = tmp_path / "sweep"
    rc, out, err = run(capsys, "propagate", d / "w.npz", "--input", d / "xb.npy", "--activation", "sigmoid",
                       "--add-uncorrelated", "1e-4:1e-1:4", "--mul-correlated", "1e-3", "--realizations", "256",
                       "--method", "both", "--seed", "2", "--sweep", out_dir)
    assert rc == 0, err
    assert (out_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out_dir / "sweep.txt").read_text()
    assert table.strip() in out and "add_uncorrelated D" in table and "MC L1 SNR dB" in table
    doc = json.loads((out_dir / "sweep.json").read_text())
    assert doc["swept"]["add_uncorrelated"] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert doc["settings"]["noise"]["mul_correlated"] == 1e-3
    mc1 = doc["layers"][1]["mc"]["snr_db"]
    assert len(mc1) == 4 and all(a > b for a, b in zip(mc1, mc1[1:]))  # more noise, lower SNR
    # each point is the plain run at that intensity (same seed: same draws), and near the analytic value
    rc, out, _ = run(capsys, "propagate", d / "w.npz", "--input", d / "xb.npy", "--activation", "sigmoid",
                     "--add-uncorrelated", "1e-2", "--mul-correlated", "1e-3", "--realizations", "256",
                     "--seed", "2", "--json")
    single = json.loads(out)["layers"][1]["mc"]["snr_db"]
    assert mc1[2] == pytest.approx(single, abs=1e-3)
    an1 = doc["layers"][1]["analytic"]["snr_db"]
    bound = doc["layers"][1]["mc"]["snr_db_stderr_bound"]
    assert all(abs(a - b) < 3 * e for a, b, e in zip(mc1, an1, bound))


def test_help_shows_defaults_and_version(capsys):
    assert cli.main(["propagate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 10000)" in out and "(default: gaussian)" in out and "(default: fast)" in out
    assert "START:STOP:N" in out
    assert cli.main(["demo", "--help"]) == 0
    assert "(default: 30)" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    from noisejax import __version__

    assert capsys.readouterr().out.startswith(f"noisejax {__version__} (jax ")


def test_python_dash_m_noisejax(files):
    proc = subprocess.run([sys.executable, "-m", "noisejax", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("noisejax ")
    d, _ = files
    proc = subprocess.run([sys.executable, "-m", "noisejax", "propagate", str(d / "w.npz"), "--input", str(d / "x1.npy"),
                           "--activation", "tanh", "--add_uncorrelated", "1e-3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "did you mean --add-uncorrelated?" in proc.stderr
    # the prompt exit (cli.run: os._exit after main) still delivers the whole output, status 0
    proc = subprocess.run([sys.executable, "-m", "noisejax", "propagate", str(d / "w.npz"), "--input", str(d / "x1.npy"),
                           "--activation", "tanh", "--add-uncorrelated", "1e-3", "--realizations", "64", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["realizations"] == 64 and proc.stdout.endswith("}\n") and len(doc["layers"]) >= 1


def test_demo_end_to_end_and_save(tmp_path, capsys):
    """The demo trains, prints its table and saves a network that propagate reads (tiny settings)."""
    w, x = tmp_path / "demo.npz", tmp_path / "x.npy"
    rc, out, err = run(capsys, "demo", "--epochs", "1", "--realizations", "32", "--inputs", "3",
                       "--save", w, "--save-inputs", x)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("sigmoid MLP 64-64-64-10 on scikit-learn digits") and "clean test accuracy" in lines[0]
    for name in ("add_uncorrelated", "add_correlated", "mul_uncorrelated", "mul_correlated"):
        assert any(line.startswith(name) for line in lines)
    assert f"saved the trained network to {w}" in out
    with np.load(w) as z:
        assert sorted(z.files) == ["W0", "W1", "W2", "b0", "b1", "b2"] and z["W0"].shape == (64, 64) and z["W2"].shape == (64, 10)
    assert np.load(x).shape == (3, 64)
    rc, out, err = run(capsys, "propagate", w, "--input", x, "--activation", "sigmoid", "--add-uncorrelated", "1e-3",
                       "--realizations", "32", "--json")
    assert rc == 0, err
    assert [layer["width"] for layer in json.loads(out)["layers"]] == [64, 64, 10]


BAD = [
    (["propagate", "{d}/missing.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "not found"),
    (["propagate", "{d}/garbage.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "npz"),
    (["propagate", "{d}/misnumbered.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "misnumbered"),
    (["propagate", "{d}/mismatch.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "W1"),
    (["propagate", "{d}/nan.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "NaN"),
    (["propagate", "{d}/badbias.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "b0"),
    (["propagate", "{d}/orphanbias.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "b5"),
    (["propagate", "{d}/nokeys.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "foo"),
    (["propagate", "{d}/oned.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "2-D"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x_wrong.npy", "--activation", "tanh"], "features"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x_nan.npy", "--activation", "tanh"], "NaN"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x_3d.npy", "--activation", "tanh"], "shape"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x_str.npy", "--activation", "tanh"], "numeric"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x_obj.npy", "--activation", "tanh"], "input"),
    (["propagate", "{d}/w.npz", "--input", "{d}/nope.npy", "--activation", "tanh"], "not found"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "softplus"], "unknown activation"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "linear:abc"], "SLOPE"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--activation-out", "x"], "unknown activation"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--add-uncorrelated", "-1"], "add-uncorrelated"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--add-correlated", "nan"], "add-correlated"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--mul-uncorrelated", "inf"], "mul-uncorrelated"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--mul-correlated", "x"], "mul-correlated"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--realizations", "1"], "realizations"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--realizations", "0"], "realizations"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--chunk-size", "0"], "chunk-size"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--seed", "-3"], "seed"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--method", "magic"], "method"),
    (["propagate", "{d}/w.npz", "--activation", "tanh"], "--input"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy"], "--activation"),
    (["frobnicate"], "invalid choice"),
    (["propogate"], "did you mean propagate?"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--add_uncorrelated", "1e-3"],
     "did you mean --add-uncorrelated?"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--realisations", "9"],
     "did you mean --realizations?"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--method", "bot"], "did you mean both?"),
    (["propagate", "{d}/w.npy", "--input", "{d}/x1.npy", "--activation", "tanh"], "not an .npz archive"),
    (["propagate", "{d}/torch_layout.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "transpose"),
    (["propagate", "{d}/torch_one.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "transpose"),
    (["propagate", "{d}/state_dict.npz", "--input", "{d}/x1.npy", "--activation", "tanh"], "noisejax convert"),
    (["propagate", "{d}/w.npz", "--input", "{d}/xb.npz", "--activation", "tanh"], "npz"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--add-uncorrelated", "1e-3:1e-1:4"],
     "--sweep"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--sweep", "{d}/s"], "range"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--add-uncorrelated", "0:1:4"], "> 0"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--add-uncorrelated", "1e-3:1"], "START:STOP:N"),
    (["propagate", "{d}/w.npz", "--input", "{d}/x1.npy", "--activation", "tanh", "--add-uncorrelated", "1e-3:1e-1:4",
      "--mul-uncorrelated", "1e-3:1e-1:3", "--sweep", "{d}/s"], "same number of points"),
    (["demo", "--epochs", "0"], "epochs"),
    (["demo", "--noise-variance", "-1"], "noise-variance"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_gives_one_line_and_nonzero_exit(files, capsys, argv, needle):
    d, _ = files
    rc, out, err = run(capsys, *[a.format(d=d) for a in argv])
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle.lower() in lines[0].lower(), lines[0]


def test_console_script_exits_nonzero_without_traceback(files):
    d, _ = files
    proc = subprocess.run(
        [sys.executable, "-m", "noisejax.cli", "propagate", str(d / "misnumbered.npz"), "--input", str(d / "x1.npy"),
         "--activation", "tanh"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "misnumbered" in proc.stderr
