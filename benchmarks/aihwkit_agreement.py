"""noisejax.hardware against aihwkit 1.1.0 itself (optional; needs an interpreter with aihwkit).

Trains the digits MLP of ``experiments/pcm_drift`` (plain, default config), puts its second
layer on one aihwkit ``AnalogLinear`` with ``TorchInferenceRPUConfig`` (aihwkit's pure-torch
inference tile; its RPUCuda tile needs the torch it was built against), and for ``--realizations``
programmings reads it at 1 s, 1 h and 1 year (``program_analog_weights`` once per
realization, ``drift_analog_weights(t)`` per time).  Compared with noisejax:

* the per-weight mean and variance of aihwkit's drifted weights vs
  ``PCMNoise.weight_moments`` (exact): median |z| of the means (0.67 for agreeing models),
  ratio of the variances;
* aihwkit's drift-compensation gain ``alpha`` vs ``hardware.drift_compensation`` through
  ``AnalogMVM`` (mean ± std over programmings).

Run:  PYTHONPATH=. /path/to/aihwkit-venv/bin/python benchmarks/aihwkit_agreement.py
Writes benchmarks/results/aihwkit_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

TIMES = (1.0, 3600.0, 365 * 86400.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--realizations", type=int, default=200)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    import aihwkit
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from aihwkit.nn import AnalogLinear
    from aihwkit.simulator.configs import TorchInferenceRPUConfig

    from noisejax import data, hardware as hw, layers, train

    ds = data.load_digits(seed=0)
    net = layers.mlp([64, 64, 64, 10], "sigmoid", "linear", noisy=False, dense=hw.AnalogDense)
    _, p0 = net.init(jax.random.key(0), (64,))
    params = train.train_plain(net, p0, ds.x_train, ds.y_train, key=jax.random.key(1), steps=1500, batch_size=128,
                               optimizer=optax.adam(3e-3)).params
    W = np.asarray(params[1][0]["W"])

    torch.manual_seed(0)
    lin = AnalogLinear(W.shape[0], W.shape[1], bias=False, rpu_config=TorchInferenceRPUConfig())
    lin.set_weights(torch.tensor(W.T.copy()))
    lin.eval()
    alphas = {t: [] for t in TIMES}
    weights = {t: [] for t in TIMES}
    with torch.no_grad():
        for _ in range(args.realizations):
            lin.program_analog_weights()
            for t in TIMES:
                lin.drift_analog_weights(t)
                alphas[t].append(float(lin.analog_module.alpha))
                weights[t].append(lin.get_weights()[0].numpy().T.copy())

    pcm, mvm = hw.PCMNoise(), hw.AnalogMVM()

    def gain(k, t):
        st = pcm.program(jnp.asarray(W), key=jax.random.fold_in(k, 0))
        W_t = pcm.read(st, t, key=jax.random.fold_in(k, 1))
        base = hw.compensation_readout(st.weights, mvm=mvm, key=jax.random.fold_in(k, 2))
        return base / hw.compensation_readout(W_t, mvm=mvm, key=jax.random.fold_in(k, 3))

    keys = jax.random.split(jax.random.key(5), args.realizations)
    out = {"aihwkit_version": aihwkit.__version__, "torch_version": torch.__version__,
           "realizations": args.realizations, "layer_shape": list(W.shape), "times": {}}
    for t in TIMES:
        s = np.stack(weights[t])
        mo = pcm.weight_moments(jnp.asarray(W), t)
        mean, var = np.asarray(mo.mean), np.asarray(mo.var)
        z = (s.mean(0) - mean) / np.sqrt(var / s.shape[0])
        g = np.asarray(jax.jit(jax.vmap(lambda k: gain(k, t)))(keys))
        out["times"][str(t)] = {
            "weights_mean_median_abs_z": float(np.median(np.abs(z))),
            "weights_mean_max_abs_z": float(np.abs(z).max()),
            "weights_var_ratio_aihwkit_over_noisejax": float(s.var(0, ddof=1).mean() / var.mean()),
            "gain_aihwkit": [float(np.mean(alphas[t])), float(np.std(alphas[t], ddof=1))],
            "gain_noisejax": [float(g.mean()), float(g.std(ddof=1))],
        }
        print(t, out["times"][str(t)])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "aihwkit_agreement.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
