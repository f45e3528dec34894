"""Bad input at the Python API boundary: one table, one exception type and message per case.

Each row calls a public function with one bad argument and states the exception type
and a regular expression the message must match (it names the argument and what was
expected).  Every message must be one line: the CLI prints it as is.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisejax import data, denoise, layers, meanfield, mitigate, moments, noise, rng
from noisejax.study import files
from noisejax.study import reproduce
from noisejax import simulate, sweeps, train
from noisejax.errors import DataFormatError, InvalidArgumentError, NoisejaxError, ShapeMismatchError

NET = layers.mlp([4, 3, 2], "sigmoid", noisy=True)
_, PARAMS = NET.init(jax.random.key(0), (4,))
X = jnp.ones((4,), jnp.float32)
KEY = jax.random.key(1)
OK_NOISE = noise.NeuronNoise(add_uncorrelated=1e-2)
W_TREE = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}


def _with(tree_leaf_index, value):
    """PARAMS with one leaf replaced by ``value``."""
    leaves, treedef = jax.tree_util.tree_flatten(PARAMS)
    leaves = list(leaves)
    leaves[tree_leaf_index] = value
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _nan_weights():
    W = np.array(PARAMS[0][0]["W"])
    W[0, 0] = np.nan
    return _with(0, jnp.asarray(W))


def _write(path, payload: bytes):
    path.write_bytes(payload)
    return path


# (id, call(tmp_path), exception type, message pattern)
CASES = [
    # --- noise models: variances and WNRs -------------------------------------------------
    ("neuron-noise-negative", lambda t: noise.NeuronNoise(add_uncorrelated=-1e-3), InvalidArgumentError,
     r"NeuronNoise\.add_uncorrelated must be a variance >= 0"),
    ("neuron-noise-nan", lambda t: noise.NeuronNoise(mul_correlated=float("nan")), InvalidArgumentError,
     r"NeuronNoise\.mul_correlated must be finite"),
    ("neuron-noise-inf", lambda t: noise.NeuronNoise(add_correlated=np.array([0.1, np.inf])), InvalidArgumentError,
     r"NeuronNoise\.add_correlated must be finite"),
    ("neuron-noise-string", lambda t: noise.NeuronNoise(mul_uncorrelated="big"), InvalidArgumentError,
     r"NeuronNoise\.mul_uncorrelated must be a real number"),
    ("neuron-noise-complex", lambda t: noise.NeuronNoise(add_uncorrelated=1j), InvalidArgumentError,
     r"NeuronNoise\.add_uncorrelated must be a real number"),
    ("wnr-nan", lambda t: noise.add_weight_noise(W_TREE, float("nan"), key=KEY), InvalidArgumentError,
     r"wnr_db must be finite"),
    ("wnr-inf", lambda t: noise.AdditiveWeightNoise(wnr_db=np.inf), InvalidArgumentError,
     r"AdditiveWeightNoise\.wnr_db must be finite"),
    ("wnr-bool", lambda t: noise.noise_power(W_TREE, True), InvalidArgumentError, r"wnr_db must be a real number"),
    ("wnr-reference", lambda t: noise.add_weight_noise(W_TREE, 10.0, key=KEY, reference="energy"),
     InvalidArgumentError, r"reference must be one of 'variance', 'power'"),
    ("wnr-scope", lambda t: noise.noise_power(W_TREE, 10.0, scope="per_leaf"), InvalidArgumentError,
     r"scope must be one of"),
    ("mul-weight-noise-negative", lambda t: noise.MultiplicativeWeightNoise(variance=-0.1), InvalidArgumentError,
     r"MultiplicativeWeightNoise\.variance must be a variance >= 0"),
    ("quantization-bits", lambda t: noise.Quantization(bits=1), InvalidArgumentError,
     r"Quantization\.bits must be >= 2"),
    ("quantization-bits-float", lambda t: noise.Quantization(bits=4.5), InvalidArgumentError,
     r"Quantization\.bits must be an integer"),
    ("local-noise-nan", lambda t: noise.LocalWeightNoise(variance=float("nan")), InvalidArgumentError,
     r"LocalWeightNoise\.variance must be finite"),
    # --- layers and networks --------------------------------------------------------------
    ("activation-unknown", lambda t: layers.activation("swish"), InvalidArgumentError, r"activation .*swish"),
    ("activation-not-string", lambda t: layers.activation(3), InvalidArgumentError,
     r"activation name must be a string"),
    ("mlp-widths", lambda t: layers.mlp([4]), InvalidArgumentError, r"widths must list >= 2 positive sizes"),
    ("mlp-activation", lambda t: layers.mlp([4, 2], "softsign"), InvalidArgumentError, r"activation .*softsign"),
    ("dense-zero", lambda t: layers.Dense(0), InvalidArgumentError, r"Dense\.out_dim must be >= 1"),
    ("linear-slope-nan", lambda t: layers.Linear(float("nan")), InvalidArgumentError, r"Linear\.slope must be finite"),
    ("serial-empty", lambda t: layers.serial(), InvalidArgumentError, r"serial\(\.\.\.\) needs one or more Layer"),
    ("from-weights-shapes", lambda t: layers.from_weights([np.ones((4, 3)), np.ones((2, 2))], [None, None], "tanh"),
     ShapeMismatchError, r"W1 .*fan_in"),
    ("from-weights-bias", lambda t: layers.from_weights([np.ones((4, 3))], [np.ones(5)], "tanh"),
     ShapeMismatchError, r"b0 must have shape \(3,\)"),
    ("params-length", lambda t: NET.apply(PARAMS[:-1], X), ShapeMismatchError,
     r"params must be a tuple of \d+ entries"),
    ("input-width", lambda t: NET.apply(PARAMS, jnp.ones((7,))), ShapeMismatchError,
     r"x has 7 features on its last axis; the layer's W expects 4"),
    ("input-nan", lambda t: NET.apply(PARAMS, jnp.array([0.0, np.nan, 0.0, 0.0])), InvalidArgumentError,
     r"x contains 1 NaN or infinite value"),
    ("input-dtype", lambda t: NET.apply(PARAMS, jnp.ones((4,), jnp.int32)), InvalidArgumentError,
     r"x must be a floating-point array, got dtype int32"),
    ("noise-without-key", lambda t: NET.apply(PARAMS, X, noise=OK_NOISE), InvalidArgumentError,
     r"needs key="),
    ("noise-sites", lambda t: NET.apply(PARAMS, X, key=KEY, noise=[OK_NOISE] * 5), InvalidArgumentError,
     r"noise has 5 entries; this network has 2 noise sites"),
    ("weights-nan-predict", lambda t: moments.predict(NET, _nan_weights(), X, noise=OK_NOISE), InvalidArgumentError,
     r"params\[0\]\[0\]\['W'\] contains 1 NaN or infinite value"),
    # --- Monte Carlo ----------------------------------------------------------------------
    ("mc-zero-realizations", lambda t: simulate.monte_carlo(lambda k: X, KEY, 0), InvalidArgumentError,
     r"n_realizations must be >= 2"),
    ("mc-one-realization", lambda t: simulate.monte_carlo(lambda k: X, KEY, 1), InvalidArgumentError,
     r"n_realizations must be >= 2"),
    ("mc-float-realizations", lambda t: simulate.monte_carlo(lambda k: X, KEY, 100.0), InvalidArgumentError,
     r"n_realizations must be an integer"),
    ("mc-chunk", lambda t: simulate.monte_carlo(lambda k: X, KEY, 8, chunk_size=0), InvalidArgumentError,
     r"chunk_size must be >= 1"),
    ("mc-not-callable", lambda t: simulate.monte_carlo("net", KEY, 8), InvalidArgumentError, r"fn must be callable"),
    ("mc-int-output", lambda t: simulate.monte_carlo(lambda k: jnp.ones(3, jnp.int32), KEY, 8), InvalidArgumentError,
     r"fn must return floating-point arrays"),
    ("rng-unknown-impl", lambda t: rng.make_key(0, "philox"), InvalidArgumentError, r"rng must be one of"),
    # --- moments --------------------------------------------------------------------------
    ("moments-method", lambda t: moments.predict(NET, PARAMS, X, noise=OK_NOISE, method="taylor"),
     InvalidArgumentError, r"method must be one of"),
    ("moments-covariance", lambda t: moments.predict(NET, PARAMS, X, noise=OK_NOISE, covariance="dense"),
     InvalidArgumentError, r"covariance must be one of"),
    ("meanfield-depth", lambda t: meanfield.symmetric(0, width=4, noise=OK_NOISE), InvalidArgumentError,
     r"depth must be >= 1"),
    # --- mitigation and training ----------------------------------------------------------
    ("pool-copies", lambda t: mitigate.pool(NET, PARAMS, 0), InvalidArgumentError, r"copies\[0\] must be >= 1"),
    ("train-loss-name", lambda t: train.plain_loss(NET, loss="hinge"), InvalidArgumentError, r"loss must be one of"),
    ("train-realizations", lambda t: train.noise_aware_loss(NET, noise=OK_NOISE, n_realizations=0),
     InvalidArgumentError, r"n_realizations must be >= 1"),
    ("train-label-shape", lambda t: train.train_plain(NET, PARAMS, np.ones((5, 4), np.float32), np.zeros(6, np.int32),
                                                      key=KEY, steps=1), ShapeMismatchError, r"y .*5"),
    # --- denoisers and sweeps -------------------------------------------------------------
    ("estimator-unknown", lambda t: denoise.estimator("wiener"), InvalidArgumentError, r"estimator .*wiener"),
    ("mmse-noise-negative", lambda t: denoise.MMSE()(W_TREE, -1.0), InvalidArgumentError,
     r"noise_power must be a variance >= 0"),
    ("sweep-target", lambda t: sweeps.wnr_at_accuracy([0.0, 10.0], [0.5, 0.9], float("nan")), InvalidArgumentError,
     r"target must be finite"),
    ("sweep-lengths", lambda t: sweeps.gain_db([0.0, 10.0], [0.5, 0.9], [0.5], 0.6), ShapeMismatchError,
     r"wnr_db \(2,\) and acc \(1,\) must be matching"),
    # --- files ----------------------------------------------------------------------------
    ("idx-magic", lambda t: data.read_idx(_write(t / "bad-idx", b"\x00\x00\x09\x01" + b"\x00" * 8)), DataFormatError,
     r"magic"),
    ("idx-truncated", lambda t: data.read_idx(_write(t / "short-idx", b"\x00\x00\x08\x01\x00\x00\x00\x10" + b"\x01" * 3)),
     DataFormatError, r"truncated|expected 16"),
    ("cifar-size", lambda t: data.read_cifar10_batch(_write(t / "data_batch_1.bin", b"\x00" * 3000)), DataFormatError,
     r"3073"),
    ("dataset-unknown", lambda t: data.load("imagenet"), InvalidArgumentError, r"dataset .*imagenet"),
    ("mnist-missing-dir", lambda t: data.load_mnist(t / "nowhere"), InvalidArgumentError, r"data_dir .*nowhere.* does not exist"),
    ("checkpoint-garbage", lambda t: files.load(_write(t / "model.msgpack", b"not a checkpoint")), DataFormatError,
     r"model\.msgpack"),
    ("checkpoint-unwritable", lambda t: files.save(_a_file(t) / "m.msgpack", W_TREE), InvalidArgumentError,
     r"cannot write .*m\.msgpack"),
    ("reproduce-unwritable", lambda t: reproduce.run(out=_a_file(t) / "report", only="symmetric_depth"),
     InvalidArgumentError, r"--out .*cannot create the report folder"),
]


def _a_file(tmp_path):
    """A regular file: a folder below it cannot be created, whoever runs the tests (root too)."""
    f = tmp_path / "not-a-folder"
    f.write_text("x")
    return f


def test_table_has_at_least_40_cases():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("name, call, exc, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(name, call, exc, pattern, tmp_path):
    with pytest.raises(exc) as info:
        call(tmp_path)
    message = str(info.value)
    assert isinstance(info.value, NoisejaxError) and isinstance(info.value, ValueError)
    assert re.search(pattern, message), f"{name}: message {message!r} does not match {pattern!r}"
    assert "\n" not in message, f"{name}: message must be one line"
