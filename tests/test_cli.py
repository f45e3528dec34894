"""The `noisejax propagate` contract: JSON shape, reproducibility, and one-line errors."""

import json
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
    rc, out, _ = run(capsys, "propagate", d / "w.npz", "--input", d / "x1.npy", "--activation", "sigmoid",
                     "--add-uncorrelated", "1e-3", "--realizations", "32")
    assert rc == 0 and "SNR dB" in out and len(out.strip().splitlines()) == 5


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
