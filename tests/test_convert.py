"""`noisejax convert`: PyTorch state_dicts (.npz, .safetensors) and Flax params into WEIGHTS.npz, round trips.

The tests write the source files themselves: PyTorch layout (out, in) arrays saved with
NumPy, safetensors files written by a small writer of the documented format here (and by
the `safetensors` package when it is installed), Flax params serialized by Flax.  The
converted network's noise-free output is compared with a NumPy forward pass in the
source framework's convention.
"""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import cli
from noisejax.study import convert
from noisejax.errors import DataFormatError, InvalidArgumentError, ShapeMismatchError

_ST = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64"}


def write_safetensors(path, tensors, dtype_names=None, header_extra=None):
    """A writer of the documented format: u64 header length, JSON header, concatenated little-endian bytes."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.tobytes()
        dt = (dtype_names or {}).get(name) or _ST[arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype]
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    header.update(header_extra or {})
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def torch_forward(x, state, order, act=np.tanh):
    """nn.Linear convention: y = f(x @ W.T + b)."""
    for p in order:
        x = x @ state[f"{p}.weight"].T + state.get(f"{p}.bias", 0.0)
        x = act(x)
    return x


@pytest.fixture(scope="module")
def torch_state():
    r = np.random.default_rng(0)
    # network order fc1 -> fc2 -> fc10 (name order would put fc10 before fc2)
    return {
        "fc1.weight": r.normal(size=(6, 5)).astype(np.float32) / 2, "fc1.bias": r.normal(size=6).astype(np.float32) / 4,
        "fc2.weight": r.normal(size=(4, 6)).astype(np.float32) / 2, "fc2.bias": r.normal(size=4).astype(np.float32) / 4,
        "fc10.weight": r.normal(size=(3, 4)).astype(np.float32) / 2,
    }, ["fc1", "fc2", "fc10"], r.normal(size=(2, 5)).astype(np.float32)


def cli_mean(capsys, weights, x_path, activation="tanh"):
    """The noise-free output of the converted network, through `noisejax propagate --method analytic`."""
    rc = cli.main(["propagate", str(weights), "--input", str(x_path), "--activation", activation,
                   "--method", "analytic", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return np.asarray(json.loads(out)["layers"][-1]["analytic"]["mean"])


def convert_cli(capsys, *argv):
    rc = cli.main(["convert", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return rc, out, err


def test_torch_npz_round_trip(torch_state, tmp_path, capsys):
    state, order, x = torch_state
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "sd.npz", **state)  # file order = module order
    rc, out, err = convert_cli(capsys, tmp_path / "sd.npz", "--out", tmp_path / "w.npz")
    assert rc == 0, err
    assert "converted 3 dense layers (5-6-4-3, 2 biases) from a PyTorch state_dict (.npz)" in out
    with np.load(tmp_path / "w.npz") as z:
        assert sorted(z.files) == ["W0", "W1", "W2", "b0", "b1"]
        np.testing.assert_array_equal(z["W2"], state["fc10.weight"].T)
    np.testing.assert_allclose(cli_mean(capsys, tmp_path / "w.npz", tmp_path / "x.npy"),
                               torch_forward(x, state, order), rtol=1e-5, atol=1e-6)


def test_torch_safetensors_round_trip(torch_state, tmp_path, capsys):
    state, order, x = torch_state
    np.save(tmp_path / "x.npy", x)
    # the header's order is the name order, as the safetensors package writes it
    write_safetensors(tmp_path / "sd.safetensors", dict(sorted(state.items())))
    assert list(convert.read_safetensors(tmp_path / "sd.safetensors")) == sorted(state)
    rc, out, err = convert_cli(capsys, tmp_path / "sd.safetensors", "--out", tmp_path / "w.npz")
    assert rc == 0, err
    np.testing.assert_allclose(cli_mean(capsys, tmp_path / "w.npz", tmp_path / "x.npy"),
                               torch_forward(x, state, order), rtol=1e-5, atol=1e-6)


def test_safetensors_dtypes_and_the_official_writer(torch_state, tmp_path):
    state, _, _ = torch_state
    import ml_dtypes

    w = state["fc1.weight"]
    tensors = {"a": w.astype(np.float16), "b": w.astype(np.float64), "c": w.astype(ml_dtypes.bfloat16),
               "d": np.arange(6, dtype=np.int64)}
    write_safetensors(tmp_path / "t.safetensors", tensors, dtype_names={"c": "BF16"})
    got = convert.read_safetensors(tmp_path / "t.safetensors")
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
    st = pytest.importorskip("safetensors.numpy")
    st.save_file(state, str(tmp_path / "official.safetensors"))
    got = convert.read_safetensors(tmp_path / "official.safetensors")
    assert set(got) == set(state)
    for k in state:
        np.testing.assert_array_equal(got[k], state[k])


@pytest.mark.parametrize("damage", ["short", "huge_header", "not_json", "offsets", "dtype"])
def test_corrupted_safetensors_one_line_error(torch_state, tmp_path, capsys, damage):
    state, _, _ = torch_state
    p = tmp_path / "bad.safetensors"
    write_safetensors(p, {"fc1.weight": state["fc1.weight"]})
    raw = p.read_bytes()
    if damage == "short":
        p.write_bytes(raw[:5])
    elif damage == "huge_header":
        p.write_bytes(struct.pack("<Q", 10**9) + raw[8:])
    elif damage == "not_json":
        p.write_bytes(raw[:8] + b"\xff" * (len(raw) - 8))
    elif damage == "offsets":
        p.write_bytes(raw[:-4])  # data shorter than the header says
    elif damage == "dtype":
        write_safetensors(p, {"fc1.weight": state["fc1.weight"]}, dtype_names={"fc1.weight": "F8_E4M3"})
    with pytest.raises(DataFormatError):
        convert.read_safetensors(p)
    rc, out, err = convert_cli(capsys, p, "--out", tmp_path / "w.npz")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and str(p) in err
    assert not (tmp_path / "w.npz").exists()


def test_flax_msgpack_round_trip(tmp_path, capsys):
    import flax.linen as nn
    from flax import serialization

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            # created in this order; the names sort the other way round
            x = jnp.tanh(nn.Dense(7, name="z_in")(x))
            x = jnp.tanh(nn.Dense(5, name="m_hidden")(x))
            return jnp.tanh(nn.Dense(3, use_bias=False, name="a_out")(x))

    model = MLP()
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    (tmp_path / "params.msgpack").write_bytes(serialization.to_bytes(variables))
    np.save(tmp_path / "x.npy", x)
    rc, out, err = convert_cli(capsys, tmp_path / "params.msgpack", "--out", tmp_path / "w.npz")
    assert rc == 0, err
    assert "converted 3 dense layers (6-7-5-3, 2 biases) from a Flax params (msgpack)" in out
    np.testing.assert_allclose(cli_mean(capsys, tmp_path / "w.npz", tmp_path / "x.npy"),
                               np.asarray(model.apply(variables, x)), rtol=1e-5, atol=1e-6)
    # the Python API on the params dict, with an explicit order
    ws, bs = convert.from_flax_params(variables["params"], layers=["z_in", "m_hidden", "a_out"])
    assert [w.shape for w in ws] == [(6, 7), (7, 5), (5, 3)] and bs[2] is None
    with pytest.raises(ShapeMismatchError, match="do not chain"):
        convert.from_flax_params(variables, layers=["a_out", "z_in", "m_hidden"])


def test_layer_order_option_and_errors(torch_state, tmp_path, capsys):
    state, order, x = torch_state
    np.save(tmp_path / "x.npy", x)
    shuffled = {k: state[k] for k in ("fc10.weight", "fc2.weight", "fc2.bias", "fc1.weight", "fc1.bias")}
    np.savez(tmp_path / "sd.npz", **shuffled)
    rc, _, err = convert_cli(capsys, tmp_path / "sd.npz", "--out", tmp_path / "w.npz")
    assert rc == 2 and "do not chain" in err and "--layers" in err
    rc, _, err = convert_cli(capsys, tmp_path / "sd.npz", "--out", tmp_path / "w.npz", "--layers", "fc1,fc2,fc10")
    assert rc == 0, err
    np.testing.assert_allclose(cli_mean(capsys, tmp_path / "w.npz", tmp_path / "x.npy"),
                               torch_forward(x, state, order), rtol=1e-5, atol=1e-6)
    rc, _, err = convert_cli(capsys, tmp_path / "sd.npz", "--out", tmp_path / "w.npz", "--layers", "fc1,fc3")
    assert rc == 2 and "'fc3' is not a dense layer" in err
    # not a stack of nn.Linear: BatchNorm statistics, a convolution
    np.savez(tmp_path / "bn.npz", **state, **{"bn.running_mean": np.zeros(6), "conv.weight": np.zeros((3, 1, 2, 2))})
    rc, _, err = convert_cli(capsys, tmp_path / "bn.npz", "--out", tmp_path / "w2.npz")
    assert rc == 2 and "not a stack of nn.Linear layers" in err and "bn.running_mean" in err
    # already converted, unknown suffix, same file, missing file
    rc, _, err = convert_cli(capsys, tmp_path / "w.npz", "--out", tmp_path / "w3.npz")
    assert rc == 2 and "already in the WEIGHTS.npz format" in err
    (tmp_path / "sd.bin").write_bytes(b"x")
    rc, _, err = convert_cli(capsys, tmp_path / "sd.bin", "--out", tmp_path / "w3.npz")
    assert rc == 2 and "--from torch or --from flax" in err
    rc, _, err = convert_cli(capsys, tmp_path / "sd.npz", "--out", tmp_path / "sd.npz")
    assert rc == 2 and "differ" in err
    rc, _, err = convert_cli(capsys, tmp_path / "nope.npz", "--out", tmp_path / "w3.npz")
    assert rc == 2 and "not found" in err
    (tmp_path / "junk.msgpack").write_bytes(b"\xc1\xc1\xc1")
    rc, _, err = convert_cli(capsys, tmp_path / "junk.msgpack", "--out", tmp_path / "w3.npz")
    assert rc == 2 and "not a Flax msgpack file" in err


def test_python_api_round_trip(torch_state, tmp_path):
    state, order, _ = torch_state
    ws, bs = convert.from_torch_state_dict(state)  # dict order
    path = convert.save_dense(tmp_path / "w.npz", ws, bs)
    weights, biases = cli._load_weights(str(path))
    for l, p in enumerate(order):
        np.testing.assert_array_equal(weights[l], state[f"{p}.weight"].T)
        if f"{p}.bias" in state:
            np.testing.assert_array_equal(biases[l], state[f"{p}.bias"])
        else:
            assert biases[l] is None
    with pytest.raises(DataFormatError, match="has no matching"):
        convert.from_torch_state_dict({"fc.bias": np.zeros(3)})
    with pytest.raises(InvalidArgumentError):
        convert.save_dense(tmp_path / "x.npz", ws, bs[:1])
    with pytest.raises(DataFormatError, match="no Dense"):
        convert.from_flax_params({"params": {}})
