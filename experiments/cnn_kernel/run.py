"""Noise in a CNN: the kernel's mean carries correlated noise, its mean square uncorrelated noise.

Follow-up of paper A to convolutional networks (Kolesnikov & Semenova 2025): in a CNN the
noise a layer receives is set by its kernel — correlated noise by the kernel's **mean**,
uncorrelated noise by its **mean square**.  Here on the CNN of Flax's MNIST example,
unmodified (``noisejax.study.models.CNN``), trained on 8×8 digits: additive noise of variance
``D`` is switched on after ONE activation (``ξ_AU``, independent per neuron, or ``ξ_AC``, one
draw per example shared by all its neurons) and the noise variance of the outputs of the
next matrix product (``Conv_1``, ``Dense_0``, ``Dense_1``) is measured per output channel
``o`` — by Monte Carlo through ``noisejax.noisy`` and predicted by ``noisejax.analytic``
(both read the model's own jaxpr; ``taps`` returns the layer's output).  Prediction, with
``n`` inputs per output (``3·3·C`` for a 3×3 convolution at interior positions)::

    uncorrelated:  Var z_o = D_eff Σ_s W_so²   = D_eff · n · mean_s W_so²       (mean square)
    correlated:    Var z_o = D (Σ_s W_so)²     = D · n² · (mean_s W_so)²          (mean)

``D_eff = D/4`` when a 2×2 average pooling lies between the activation and the layer (it
averages four independent draws; a shared draw passes unchanged).

Run alone (from the repository root)::

    python -m experiments.cnn_kernel.run --config tiny --out /tmp/cnn_kernel
"""

from __future__ import annotations

import math
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import noisejax
from noisejax import data, rng, simulate, train
from noisejax.study import files
from noisejax.study.claims import Claim, Result, claim
from noisejax.study import models
from noisejax.study.models import CNN

from .. import _common

NAME = "cnn_kernel"
PAPER = "A + follow-ups (CNNs): noise reaching a conv/dense layer vs its kernel's mean and mean square"
#: (source activation site, target matmul site, layer name, pooling factor between them)
PAIRS = ((1, 2, "Conv_1", 4), (3, 4, "Dense_0", 4), (5, 6, "Dense_1", 1))


def _images(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x.reshape(-1, 8, 8, 1) / 16.0, jnp.float32)


def trained_variables(cfg, ds: data.Dataset, seed: int, run: _common.Run) -> tuple[dict, dict]:
    """The CNN trained from ``seed`` on digits (cached ``.npz`` keyed by the recipe)."""
    model = CNN()
    ident = {"model": "flax-mnist-example-cnn", "steps": cfg.steps, "batch_size": cfg.batch_size,
             "lr": cfg.learning_rate, "seed": seed, "dataset": ds.name, "n_train": len(ds.y_train)}
    path = run.out / "models" / f"cnn_s{seed}.npz"
    arrays = files.load_arrays(path, key=ident)
    run.reused += int(arrays is not None)
    x_train = _images(ds.x_train)
    template = models.init(model, jax.random.key(seed), x_train[:1])
    if arrays is None:

        def loss(v, x, y, key):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()

        res = train.fit(loss, template, x_train, jnp.asarray(ds.y_train), key=jax.random.key(seed + 1000),
                        steps=cfg.steps, batch_size=cfg.batch_size, optimizer=optax.adam(cfg.learning_rate))
        arrays = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(res.params).items()}
        files.save_arrays(path, arrays, key=ident)
    variables = flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in arrays.items()})
    acc = float(train.accuracy(model.apply(variables, _images(ds.x_test)), jnp.asarray(ds.y_test)))
    return variables, {"seed": seed, "clean_test_accuracy": acc}


def _interior(v: np.ndarray) -> np.ndarray:
    """Per output channel, averaged over the inputs and (conv) the positions whose 3×3 window is inside the map."""
    v = np.asarray(v, np.float64)
    if v.ndim == 4:  # (B, H, W, C)
        v = v[:, 1:-1, 1:-1, :]
    return v.reshape(-1, v.shape[-1]).mean(axis=0)


def measure(variables: dict, x, cfg, key) -> dict:
    """Monte Carlo and analytic variance of each target layer's outputs, per channel: ``{layer: (mc (2, C), an (2, C))}``."""
    model = CNN()
    nz2 = _common.noise_stack(cfg.noise_variance, ("add_uncorrelated", "add_correlated"))
    out = {}
    for src, dst, name, _ in PAIRS:
        kw = dict(sites=lambda s, src=src: s.index == src, taps=lambda s, dst=dst: s.index == dst)

        pred = jax.vmap(lambda nz, kw=kw: noisejax.analytic(model.apply, neuron=nz, **kw)(variables, x))(nz2)
        an, ref = pred.var[1][0], pred.mean[1][0]

        def one(k, kw=kw, ref=ref):
            # deviations from the predicted mean: float32 sums of the raw taps (|mean|/std ~ 1e5) would
            # shift the variance by up to 15 % (PrecisionWarning); the variance does not depend on the shift
            tap = jax.vmap(lambda nz: noisejax.noisy(model.apply, neuron=nz, **kw)(k, variables, x)[1][0])(nz2)
            return tap - ref

        res = simulate.monte_carlo(one, jax.random.fold_in(key, dst), cfg.realizations)
        out[name] = (np.stack([_interior(v) for v in np.asarray(res.var)]), np.stack([_interior(v) for v in np.asarray(an)]))
    return out


def _kernel_stats(variables: dict, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output channel: ``Σ_s W_so²``, ``(Σ_s W_so)²`` and the number of inputs ``n``."""
    W = np.asarray(variables["params"][name]["kernel"], np.float64)
    W = W.reshape(-1, W.shape[-1])  # (n, channels)
    return np.sum(W * W, axis=0), np.square(np.sum(W, axis=0)), W.shape[0]


def _fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Slope of ``y = k x`` through the origin, Pearson r, median and max |y/x − 1|."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rel = np.abs(y[x > 0] / x[x > 0] - 1)
    return {"slope": float(np.sum(x * y) / np.sum(x * x)), "r": float(np.corrcoef(x, y)[0, 1]) if x.size > 2 else float("nan"),
            "median_abs_rel": float(np.median(rel)), "max_abs_rel": float(np.max(rel)), "n": int(x.size)}


def analyse(measured: list[dict], variables: list[dict], cfg) -> dict:
    d = cfg.noise_variance
    points = {"uncorrelated": {"x": [], "mc": [], "an": [], "layer": [], "net": []},
              "correlated": {"x": [], "mc": [], "an": [], "layer": [], "net": []}}
    layers = []
    for n, (meas, v) in enumerate(zip(measured, variables)):
        for _, _, name, pool in PAIRS:
            mc, an = meas[name]
            sq, s2, n_in = _kernel_stats(v, name)
            for row, kind, pred in ((0, "uncorrelated", d / pool * sq), (1, "correlated", d * s2)):
                p = points[kind]
                p["x"] += pred.tolist()
                p["mc"] += mc[row].tolist()
                p["an"] += an[row].tolist()
                p["layer"] += [name] * len(pred)
                p["net"] += [n] * len(pred)
            W = np.asarray(v["params"][name]["kernel"], np.float64).reshape(n_in, -1)
            layers.append({"net": n, "layer": name, "inputs_per_output": n_in, "mean_W": float(W.mean()),
                           "mean_W2": float(np.mean(W * W)), "uncorrelated_var": float(mc[0].mean()),
                           "correlated_var": float(mc[1].mean())})
    fits = {}
    for kind, p in points.items():
        fits[kind] = _fit(np.array(p["x"]), np.array(p["mc"]))
        fits[kind + "_analytic_vs_mc"] = _fit(np.array(p["mc"]), np.array(p["an"]))
    return {"points": points, "layers": layers, "fits": fits}


def evaluate(an: dict, cfg) -> tuple[list[Claim], dict]:
    f = an["fits"]
    se = math.sqrt(2.0 / (cfg.realizations - 1))  # relative standard error of one Gaussian variance estimate
    tol = 5 * se
    u, c = f["uncorrelated"], f["correlated"]
    n_layers = len({(r["net"], r["layer"]) for r in an["layers"]})
    claims = [
        claim(
            "Uncorrelated noise reaching a conv or dense layer is set by the mean square of its kernel: "
            "Var z_o = D_eff · n · mean_s W_so² per output channel",
            PAPER + " (uncorrelated)",
            f"{u['n']} output channels of {n_layers} trained layers (Conv_1, Dense_0, Dense_1): slope {u['slope']:.4f} "
            f"(prediction 1), r = {u['r']:.5f}, median |measured/predicted − 1| = {u['median_abs_rel']:.4f}",
            abs(u["slope"] - 1) < tol and u["r"] > 0.99,
            f"Monte Carlo tolerance 5σ = {tol:.3f} ({cfg.realizations} realizations)",
        ),
        claim(
            "Correlated noise reaching a conv or dense layer is set by the mean of its kernel: "
            "Var z_o = D · n² · (mean_s W_so)² per output channel",
            PAPER + " (correlated)",
            f"{c['n']} output channels: slope {c['slope']:.4f} (prediction 1), r = {c['r']:.5f}, "
            f"median |measured/predicted − 1| = {c['median_abs_rel']:.4f}",
            abs(c["slope"] - 1) < tol and c["r"] > 0.99,
            "one draw per example is shared by all neurons, so it adds up coherently over the n inputs (n², not n)",
        ),
    ]
    diffs = np.abs(np.concatenate([np.array(an["points"][k]["an"]) / np.array(an["points"][k]["mc"]) - 1
                                   for k in ("uncorrelated", "correlated")]))
    claims.append(claim(
        "The analytic prediction (noisejax.analytic on the unmodified Flax model) equals Monte Carlo for every channel",
        PAPER + " (analytic vs Monte Carlo)",
        f"{diffs.size} channel variances: median |analytic/MC − 1| = {np.median(diffs):.4f}, max {diffs.max():.4f} "
        f"(5σ of the Monte Carlo estimate: {tol:.3f})",
        bool(np.max(diffs) < tol),
    ))
    return claims, {"relative_tolerance_5sigma": tol, "fits": f}


def figure(an: dict, cfg, n_nets: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8), dpi=100)
    colors = {"Conv_1": "C0", "Dense_0": "C1", "Dense_1": "C2"}
    markers = "osD^v"
    labels = {"uncorrelated": ("D_eff · Σ_s W_so²  (= D_eff · n · mean square of the kernel)", "uncorrelated noise ξ_AU"),
              "correlated": ("D · (Σ_s W_so)²  (= D · n² · mean of the kernel, squared)", "correlated noise ξ_AC (one draw per digit)")}
    for k, kind in enumerate(("uncorrelated", "correlated")):
        ax = fig.add_subplot(1, 2, k + 1)
        p = an["points"][kind]
        x, mc, a = np.asarray(p["x"]), np.asarray(p["mc"]), np.asarray(p["an"])
        layer, net = np.asarray(p["layer"]), np.asarray(p["net"])
        for name, col in colors.items():
            for n in range(n_nets):
                sel = (layer == name) & (net == n)
                ax.plot(x[sel], mc[sel], markers[n % len(markers)], color=col, mfc="none", ms=5, alpha=0.8)
        ax.plot(x, a, "k+", ms=4, alpha=0.6, label="analytic (noisejax.analytic)")
        pos = np.concatenate([x[x > 0], mc[mc > 0]])
        lo, hi = pos.min() / 2, pos.max() * 2
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="prediction: measured = statistic")
        for name, col in colors.items():
            ax.plot([], [], "o", color=col, mfc="none", label=f"output channel of {name} (Monte Carlo)")
        for n in range(n_nets):
            ax.plot([], [], markers[n % len(markers)], color="0.4", mfc="none", label=f"network trained from seed {cfg.seeds[n]}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(labels[kind][0], fontsize=9)
        ax.set_ylabel("noise variance of the layer's output")
        ax.set_title(labels[kind][1], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Noise after one activation of the Flax MNIST-example CNN reaching the next layer "
                 f"(D = {cfg.noise_variance:g}, {cfg.realizations} realizations, {n_nets} trained networks)", fontsize=10)
    fig.tight_layout()
    return fig


def main(config, out_dir, *, data_dir: Optional[str] = None, progress: bool = True) -> Result:
    """Run the experiment in ``out_dir`` (trained models, finished points, figure).

    ``data_dir`` is unused: the experiment runs on the 8×8 digits shipped with scikit-learn.
    """
    cfg = config
    with _common.Run(NAME, out_dir, steps=2 * len(cfg.seeds) + 1, progress=progress) as run:
        ds = data.load_digits(seed=0)
        x = _images(ds.x_test[: cfg.n_inputs])
        variables, infos, measured = [], [], []
        for s in cfg.seeds:
            v, info = run.stage("train", trained_variables, cfg, ds, s, run)
            variables.append(v)
            infos.append(info)
            ident = {"config": cfg, "model": info, "dataset": ds.name}
            m = run.stage("measure", run.point, f"measure_s{s}",
                          lambda v=v, s=s: measure(v, x, cfg, jax.random.fold_in(rng.key(cfg.seed), s)), key=ident)
            measured.append({k: tuple(np.asarray(a) for a in val) for k, val in m.items()})
        an = analyse(measured, variables, cfg)
        claims, summary = evaluate(an, cfg)
        fig = run.stage("figure", run.figure, f"{NAME}.png", figure(an, cfg, len(cfg.seeds)))
        return run.result(claims, [fig], config=cfg, dataset=ds.name, models=infos, summary=summary,
                          layers=an["layers"], points=an["points"])


if __name__ == "__main__":  # pragma: no cover
    from .config import CONFIGS

    _common.cli(main, CONFIGS, __doc__)
