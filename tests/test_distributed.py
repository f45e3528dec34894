"""Multi-process Monte Carlo: two processes joined by jax.distributed (localhost coordinator,
gloo CPU collectives) give bitwise the same statistics as one process — the path that scales
to multi-host GPU/TPU pods."""

import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = r"""
import sys
pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)
import numpy as np
from noisejax import layers, noise, rng, simulate
assert jax.process_count() == nproc and len(jax.devices()) == nproc
net = layers.mlp([6, 8, 5], "sigmoid", "linear:0.8")
_, params = net.init(jax.random.key(0), (6,))
x = jax.random.normal(jax.random.key(1), (3, 6))
nz = noise.NeuronNoise(add_uncorrelated=1e-2, add_correlated=5e-3, mul_uncorrelated=2e-2, mul_correlated=1e-2)
fn = lambda k: layers.apply_batch(net, params, x, key=k, noise=nz, return_layers=True)[1]
res = simulate.monte_carlo(fn, rng.key(9), 1000, chunk_size=512)
np.savez(out, *[np.asarray(a) for a in jax.tree_util.tree_leaves(res)])
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _load(path):
    with np.load(path) as z:
        return [z[k] for k in sorted(z.files, key=lambda s: int(s.split("_")[1]))]


@pytest.mark.slow
def test_two_processes_match_one_process_bitwise(tmp_path):
    env_cmd = [sys.executable, "-c", WORKER]
    single = tmp_path / "single.npz"
    subprocess.run(env_cmd + ["0", "1", "0", str(single)], check=True, timeout=300)
    port = str(_free_port())
    procs = [
        subprocess.Popen(env_cmd + [str(i), "2", port, str(tmp_path / f"multi{i}.npz")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-2000:]
    ref = _load(single)
    for i in range(2):
        got = _load(tmp_path / f"multi{i}.npz")
        assert len(got) == len(ref) > 0
        for a, b in zip(ref, got):
            assert np.array_equal(a, b)
