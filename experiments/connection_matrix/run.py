"""Figure 3 — the role of the connection matrix (paper A and its follow-ups).

For sigmoid MLPs trained on digits (several hidden widths and seeds), additive noise
of variance ``D`` is injected at the output of one layer only (uncorrelated ``ξ_AU``
or correlated ``ξ_AC``, through the network's own noise site) and the noise variance
reaching the pre-activations ``x_i = Σ_j W_ji y_j + b_i`` of the next layer is
measured by Monte Carlo.  The prediction::

    uncorrelated:  Var x_i = D Σ_j W_ji²   = D N  · mean_j(W_ji²)
    correlated:    Var x_i = D (Σ_j W_ji)² = D N² · mean_j(W_ji)²

per neuron, and averaged over a layer's neurons (``N`` = fan-in)::

    uncorrelated:  ⟨Var x⟩ = D N  · mean(W²)                      (exact)
    correlated:    ⟨Var x⟩ = D N² · (mean(W)² + Var_i mean_j W_ji) (mean field keeps only mean(W)²)

— the mean of the connection matrix carries correlated noise, its mean square the
uncorrelated noise.  The figure plots the measured, normalized variance against
``mean(W²)`` and ``mean(W)²`` per layer (top) and per neuron (bottom).

Run alone (from the repository root)::

    python -m experiments.connection_matrix.run --config tiny --out /tmp/connection_matrix
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from noisejax import data, layers, rng, simulate
from noisejax.study.claims import Claim, Result, claim

from .. import _common

NAME = "connection_matrix"
PAPER = "A + follow-ups: noise reaching a layer vs connection-matrix statistics"


def trained_weights(cfg, ds: data.Dataset, width: int, seed: int, run: _common.Run) -> tuple[list, list, dict]:
    """Weights and biases of the sigmoid MLP with hidden ``width`` trained from ``seed`` (cached ``.npz``)."""
    _, params, info, reused = _common.trained_mlp(
        ds, [width] * cfg.n_hidden, steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        loss=cfg.loss, seed=seed, train_seed=seed + 1000, path=run.out / "models" / f"mlp_w{width}_s{seed}.npz")
    run.reused += int(reused)
    Ws = [np.asarray(p[0]["W"]) for p in params]
    bs = [np.asarray(p[0]["b"]) for p in params]
    return Ws, bs, {"width": width, "seed": seed, "widths": info["widths"], "clean_test_accuracy": info["clean_test_accuracy"]}


def measure(models: list[tuple[list, list]], x, cfg, key) -> list[list[np.ndarray]]:
    """Pre-activation noise variance of layer ``s+1`` with noise at site ``s`` only.

    Returns ``[net][s]`` arrays ``(2, width_{s+1})``: row 0 uncorrelated (``ξ_AU``),
    row 1 correlated (``ξ_AC``) additive noise of variance ``D``, averaged over inputs.
    """
    nz2 = _common.noise_stack(cfg.noise_variance, ("add_uncorrelated", "add_correlated"))
    nets = [layers.from_weights([jnp.asarray(w) for w in Ws], [jnp.asarray(b) for b in bs], "sigmoid") for Ws, bs in models]

    def one(k):
        out = []
        for n, ((net, params), (Ws, bs)) in enumerate(zip(nets, models)):
            kn = jax.random.fold_in(k, n)
            per_source = []
            for s in range(len(Ws) - 1):

                def pre(nz, s=s, net=net, params=params):
                    sites = [None] * len(Ws)
                    sites[s] = nz
                    ys = layers.apply_batch(net, params, x, key=kn, noise=sites, return_layers=True)[1]
                    return ys[s] @ params[s + 1][0]["W"] + params[s + 1][0]["b"]

                per_source.append(jax.vmap(pre)(nz2))  # (2, B, width)
            out.append(tuple(per_source))
        return tuple(out)

    res = simulate.monte_carlo(one, key, cfg.realizations)
    return [[np.asarray(v).mean(axis=1) for v in per_net] for per_net in res.var]


def _fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Slope of ``y = k x`` through the origin, Pearson r (linear and log-log), median |y/x − 1|."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = float(np.sum(x * y) / np.sum(x * x))
    r = float(np.corrcoef(x, y)[0, 1]) if x.size > 2 else float("nan")
    pos = (x > 0) & (y > 0)
    rlog = float(np.corrcoef(np.log(x[pos]), np.log(y[pos]))[0, 1]) if pos.sum() > 2 else float("nan")
    rel = np.abs(y[x > 0] / x[x > 0] - 1)
    return {"slope": k, "r": r, "r_log": rlog, "median_abs_rel": float(np.median(rel)), "max_abs_rel": float(np.max(rel)),
            "n": int(x.size)}


def analyse(models: list, infos: list[dict], var: list, cfg) -> dict:
    d = cfg.noise_variance
    layer_rows, neuron_u, neuron_c = [], {"x": [], "y": [], "net": []}, {"x": [], "y": [], "net": []}
    for n, ((Ws, _), info) in enumerate(zip(models, infos)):
        for s, v in enumerate(var[n]):
            W = np.asarray(Ws[s + 1], np.float64)  # (fan_in, fan_out): column i feeds neuron i
            N = W.shape[0]
            yu, yc = v[0] / (d * N), v[1] / (d * N * N)
            row_m2, row_m1 = np.mean(W * W, axis=0), np.mean(W, axis=0)
            neuron_u["x"] += row_m2.tolist()
            neuron_u["y"] += yu.tolist()
            neuron_u["net"] += [n] * len(yu)
            neuron_c["x"] += np.square(row_m1).tolist()
            neuron_c["y"] += yc.tolist()
            neuron_c["net"] += [n] * len(yc)
            layer_rows.append({
                "net": n, "width": info["width"], "seed": info["seed"], "layer": s + 1, "fan_in": N, "fan_out": W.shape[1],
                "mean_W": float(W.mean()), "mean_W2": float(np.mean(W * W)),
                "mean_W_squared": float(W.mean() ** 2), "var_of_neuron_means": float(np.var(row_m1)),
                "uncorrelated_normalized": float(yu.mean()), "correlated_normalized": float(yc.mean()),
                "uncorrelated_var": float(v[0].mean()), "correlated_var": float(v[1].mean()),
            })
    lx_u = np.array([r["mean_W2"] for r in layer_rows])
    ly_u = np.array([r["uncorrelated_normalized"] for r in layer_rows])
    lx_c = np.array([r["mean_W_squared"] for r in layer_rows])
    lx_c_full = np.array([r["mean_W_squared"] + r["var_of_neuron_means"] for r in layer_rows])
    ly_c = np.array([r["correlated_normalized"] for r in layer_rows])
    return {
        "layers": layer_rows,
        "neurons": {"uncorrelated": neuron_u, "correlated": neuron_c},
        "fits": {
            "layer_uncorrelated_vs_mean_W2": _fit(lx_u, ly_u),
            "layer_correlated_vs_mean_W_sq": _fit(lx_c, ly_c),
            "layer_correlated_vs_mean_W_sq_plus_spread": _fit(lx_c_full, ly_c),
            "neuron_uncorrelated": _fit(np.array(neuron_u["x"]), np.array(neuron_u["y"])),
            "neuron_correlated": _fit(np.array(neuron_c["x"]), np.array(neuron_c["y"])),
        },
    }


def evaluate(an: dict, cfg) -> tuple[list[Claim], dict]:
    f = an["fits"]
    tol = 5 * math.sqrt(2.0 / (cfg.realizations - 1))  # relative, one neuron (correlated: all neurons share the draw)
    claims = []
    lu = f["layer_uncorrelated_vs_mean_W2"]
    claims.append(claim(
        "The mean square of the connection matrix governs uncorrelated noise: a layer receives D·N·mean(W²)",
        PAPER + " (uncorrelated)",
        f"{lu['n']} trained layers: fitted slope {lu['slope']:.4f} (prediction 1), r = {lu['r']:.4f}, "
        f"median |measured/predicted − 1| = {lu['median_abs_rel']:.4f}",
        abs(lu["slope"] - 1) < tol and lu["median_abs_rel"] < tol,
    ))
    lc = f["layer_correlated_vs_mean_W_sq"]
    lcf = f["layer_correlated_vs_mean_W_sq_plus_spread"]
    rows = [r for r in an["layers"] if r["mean_W_squared"] > 0]
    ratio = np.array([r["correlated_normalized"] / r["mean_W_squared"] for r in rows])
    dominated = np.array([r["mean_W_squared"] > r["var_of_neuron_means"] for r in rows])

    def rng_(sel):
        return f"{ratio[sel].min():.3g}–{ratio[sel].max():.3g} ({int(sel.sum())} layers)" if sel.any() else "none"

    claims.append(claim(
        "The mean of the connection matrix governs correlated noise: a layer receives D·N²·mean(W)²",
        PAPER + " (correlated)",
        f"{lc['n']} trained layers: measured / (N²·D·mean(W)²) has median {np.median(ratio):.3g}; "
        f"{rng_(dominated)} where mean(W)² exceeds the spread of the neurons' mean weights, {rng_(~dominated)} where it "
        f"does not; with the spread added (exact layer average) slope {lcf['slope']:.4f}, r = {lcf['r']:.4f}",
        abs(lc["slope"] - 1) < tol and lc["median_abs_rel"] < tol,
        "a neuron receives D·(Σ_j W_ij)², set by the mean of ITS incoming weights; the layer average is "
        "N²(mean(W)² + Var_i mean_j W_ij). It follows mean(W)² only where that term dominates (here the output layers, "
        "whose weights have a clear negative mean); trained hidden layers have mean(W) ≈ 0 and the spread dominates. "
        "Per neuron the relation is exact (next row).",
    ))
    nu, nc = f["neuron_uncorrelated"], f["neuron_correlated"]
    claims.append(claim(
        "Per neuron: uncorrelated noise ∝ Σ_j W_ij², correlated noise ∝ (Σ_j W_ij)² (linear relation, slope 1)",
        PAPER + " (per neuron)",
        f"{nu['n']} neurons: uncorrelated slope {nu['slope']:.4f}, r = {nu['r']:.4f}; "
        f"correlated slope {nc['slope']:.4f}, r = {nc['r']:.4f} (log-log r = {nc['r_log']:.4f})",
        abs(nu["slope"] - 1) < tol and abs(nc["slope"] - 1) < tol and nu["r"] > 0.99 and nc["r"] > 0.99,
    ))
    return claims, {"relative_tolerance_5sigma": tol, "fits": f}


def _identity(ax, xs) -> None:
    """The prediction ``y = x`` over the positive range of ``xs``."""
    xs = np.asarray([v for v in xs if v > 0])
    if xs.size:
        lo, hi = xs.min() / 2, xs.max() * 2
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="prediction y = x")


def figure(an: dict, infos: list[dict], cfg):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 9), dpi=100)
    widths = sorted({i["width"] for i in infos})
    color = {w: f"C{k}" for k, w in enumerate(widths)}
    marker = "osD^v<>"
    rows = an["layers"]

    panels = [
        ("mean_W2", "uncorrelated_normalized", "per layer: mean(W²)", "⟨Var x⟩ / (D·N)", "uncorrelated noise (ξ_AU)"),
        ("mean_W_squared", "correlated_normalized", "per layer: mean(W)²", "⟨Var x⟩ / (D·N²)", "correlated noise (ξ_AC)"),
    ]
    for k, (xk, yk, xl, yl, title) in enumerate(panels):
        ax = fig.add_subplot(2, 2, k + 1)
        for r in rows:
            info = infos[r["net"]]
            ax.plot(r[xk], r[yk], marker[cfg.seeds.index(info["seed"]) % len(marker)] if info["seed"] in cfg.seeds else "o",
                    color=color[info["width"]], ms=7, mfc="none")
        if xk == "mean_W_squared":  # the exact layer average: mean(W)² + spread of the neurons' mean weights
            ex = [r["mean_W_squared"] + r["var_of_neuron_means"] for r in rows]
            ax.plot(ex, [r[yk] for r in rows], "k.", ms=5, label="x = mean(W)² + Var_i mean_j W_ji (exact)")
        _identity(ax, [r[xk] for r in rows] + [r[yk] for r in rows])
        for w in widths:  # colour: the hidden width; marker shape: the training seed
            ax.plot([], [], "o", color=color[w], mfc="none", label=f"layer of a network with hidden width {w}")
        for i, seed in enumerate(cfg.seeds):
            ax.plot([], [], marker[i % len(marker)], color="0.4", mfc="none", label=f"training seed {seed}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for k, (kind, xl, yl) in enumerate([("uncorrelated", "per neuron: mean_j W_ji²", "Var x_i / (D·N)"),
                                         ("correlated", "per neuron: (mean_j W_ji)²", "Var x_i / (D·N²)")]):
        ax = fig.add_subplot(2, 2, 3 + k)
        pts = an["neurons"][kind]
        x, y, net = np.asarray(pts["x"]), np.asarray(pts["y"]), np.asarray(pts["net"])
        for n, info in enumerate(infos):
            sel = net == n
            ax.plot(x[sel], y[sel], ".", color=color[info["width"]], ms=3, alpha=0.6)
        _identity(ax, np.concatenate([x, y]))
        for w in widths:
            ax.plot([], [], ".", color=color[w], ms=6, label=f"neuron of a network with hidden width {w}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(f"{kind} noise, every neuron of every trained layer", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"Noise reaching a layer vs its connection matrix ({len(infos)} trained sigmoid MLPs, "
                 f"D = {cfg.noise_variance:g} at one layer, {cfg.realizations} realizations)", fontsize=11)
    fig.tight_layout()
    return fig


def main(config, out_dir, *, data_dir: Optional[str] = None, progress: bool = True) -> Result:
    """Run the experiment in ``out_dir`` (trained models, finished points, figure); real MNIST from ``data_dir`` if there."""
    cfg = config
    combos = [(w, s) for w in cfg.widths for s in cfg.seeds]
    with _common.Run(NAME, out_dir, steps=len(combos) + 2, progress=progress) as run:
        ds = _common.dataset(data_dir, seed=0, max_train=cfg.max_train, max_test=cfg.max_test)
        models, infos = [], []
        for w, s in combos:
            Ws, bs, info = run.stage("train", trained_weights, cfg, ds, w, s, run)
            models.append((Ws, bs))
            infos.append(info)
        x = jnp.asarray(ds.x_test[: cfg.n_inputs])
        ident = {"config": cfg, "models": infos, "dataset": ds.name}
        var = run.stage("monte_carlo", run.point, "monte_carlo", lambda: measure(models, x, cfg, rng.key(cfg.seed)), key=ident)
        var = [[np.asarray(v) for v in per_net] for per_net in var]
        an = analyse(models, infos, var, cfg)
        claims, summary = evaluate(an, cfg)
        fig = run.stage("figure", run.figure, f"{NAME}.png", figure(an, infos, cfg))
        return run.result(claims, [fig], config=cfg, dataset=ds.name, models=infos, summary=summary,
                          layers=an["layers"], neurons=an["neurons"])


if __name__ == "__main__":  # pragma: no cover
    from .config import CONFIGS

    _common.cli(main, CONFIGS, __doc__)
