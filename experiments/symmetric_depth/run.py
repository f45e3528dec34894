"""Figure 1 — noise vs depth in symmetric deep networks (paper A).

Networks of ``depth`` layers ``y_n = f(y_{n-1} W + b)·(1 + ξ_MU + ξ_MC) + ξ_AU + ξ_AC``
with every ``W_ij = c/N``; activations: linear ``f(x) = αx`` for each slope in
``config.slopes`` and the sigmoid.  For each activation and each of the four noise
types (one switched on at a time, variance ``D``) we plot the noise variance of a
neuron against the layer index:

* Monte Carlo points — :func:`noisejax.simulate.monte_carlo` of the noisy forward
  pass (one layer applied ``depth`` times in a :func:`jax.lax.scan`; layer ``n``
  draws its noise from ``fold_in(key, n)``, exactly as layer ``n`` of
  ``meanfield.symmetric_network(..., depth)`` does);
* analytic curves — the layers' moment rules (:mod:`noisejax.moments`, full
  covariance, Gaussian moment matching for the sigmoid) scanned over depth;
* the mean-field depth limit (:func:`noisejax.meanfield.symmetric_limit`) as a
  dashed line when it is finite.

The bias of each network is chosen so that the noise-free signal is identical in
every layer (``linear_level`` for the linear networks, ``sigmoid_level`` for the
sigmoid): all changes with depth are then noise, and ``SNR = level²/variance``.

Run alone (from the repository root)::

    python -m experiments.symmetric_depth.run --config tiny --out /tmp/symmetric_depth
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from noisejax import layers, meanfield, moments, rng, simulate
from noisejax.study.claims import Claim, Result, claim

from .. import _common
from .._common import LABELS as FULL_LABELS
from .._common import NOISE_TYPES, noise_stack

NAME = "symmetric_depth"
PAPER = "A, symmetric deep networks: noise variance vs layer"


# ----------------------------------------------------------------------------------
# The networks
# ----------------------------------------------------------------------------------


def cases(cfg) -> list[dict]:
    """One dict per activation: name, activation, coupling ``c``, bias ``b``, input level.

    Linear ``f = αx``: ``b = L/α − c·L`` keeps the noise-free output at
    ``L = linear_level`` (``α(c·L + b) = L``); per-layer noise gain ``A = c²α²``.  Sigmoid: ``b = logit(m) − c·m``
    keeps it at ``m = sigmoid_level``; gain ``c·σ'(·) ≤ c/4``.

    ``kind``/``scale``: the linear networks are simulated as ``f = identity`` with
    ``W`` and ``b`` multiplied by ``α`` — the same function ``α(xW + b) = x(αW) + αb``
    — so all slopes share one compiled program (``vmap`` over the parameters).
    """
    out = []
    L = cfg.linear_level
    for a in cfg.slopes:
        out.append({"name": f"linear_{a:g}", "kind": "linear", "activation": f"linear:{a!r}", "coupling": cfg.coupling,
                    "bias": L / a - cfg.coupling * L, "level": L, "method": "linearized", "slope": a, "scale": a,
                    "label": f"linear, slope α = {a:g} (gain c·α = {cfg.coupling * a:g})"})
    m, c = cfg.sigmoid_level, cfg.sigmoid_coupling
    gain = c * m * (1 - m)
    out.append({"name": "sigmoid", "kind": "sigmoid", "activation": "sigmoid", "coupling": c,
                "bias": math.log(m / (1 - m)) - c * m, "level": m, "method": "gaussian", "slope": gain, "scale": 1.0,
                "label": f"sigmoid, c = {c:g} (gain c·σ' = {gain:.3g})"})
    return out


def groups(cfg) -> list[list[dict]]:
    """Cases sharing a compiled program: the linear ones, the sigmoid."""
    cs = cases(cfg)
    return [[c for c in cs if c["kind"] == k] for k in ("linear", "sigmoid") if any(c["kind"] == k for c in cs)]


def block(kind: str):
    """One paper layer ``serial(Dense, f, NeuronNoise)``; ``f`` is the identity for the linear group."""
    return layers.serial(layers.Dense(1), layers.activation(kind), layers.NoiseSite())


def block_params(group: list[dict], width: int):
    """Stacked params ``(G, ...)``: ``W = s·c/N``, ``b = s·bias`` with ``s`` the case's scale."""
    W = jnp.stack([jnp.full((width, width), c["scale"] * c["coupling"] / width, jnp.float32) for c in group])
    b = jnp.stack([jnp.full((width,), c["scale"] * c["bias"], jnp.float32) for c in group])
    return ({"W": W, "b": b}, (), ())


def monte_carlo(cfg, key) -> dict:
    """Per-layer mean and variance ``(G, 4, depth, N)`` of every group, one Monte Carlo run.

    One realization runs every group's networks for the four noise types
    (``vmap`` over the stacked params and noises); layer ``n`` draws from
    ``fold_in(key_r, n)``.
    """
    gs = groups(cfg)
    nets = [block(g[0]["kind"]) for g in gs]
    ps = [block_params(g, cfg.width) for g in gs]
    x0s = [jnp.full((cfg.width,), g[0]["level"], jnp.float32) for g in gs]
    nz4 = noise_stack(cfg.noise_variance)
    depth = cfg.depth

    def one(k):
        outs = []
        for net, p_g, x0 in zip(nets, ps, x0s):

            def curve(p, nz, net=net, x0=x0):
                def step(y, n):
                    y = net.apply(p, y, key=jax.random.fold_in(k, n), noise=nz)
                    return y, y

                return lax.scan(step, x0, jnp.arange(depth))[1]

            outs.append(jax.vmap(lambda p: jax.vmap(lambda nz: curve(p, nz))(nz4))(p_g))
        return tuple(outs)

    res = simulate.monte_carlo(one, key, cfg.realizations)
    return {g[0]["kind"]: {"mean": np.asarray(m).mean(-1), "var": np.asarray(v).mean(-1)}
            for g, m, v in zip(gs, res.mean, res.var)}


def _analytic_group(group: list[dict], cfg):
    """The layer's moment rules scanned over depth (mean, var ``(G, 4, depth)``) and the depth limits."""
    kind, method, level = group[0]["kind"], group[0]["method"], group[0]["level"]
    net = block(kind)
    ps = block_params(group, cfg.width)
    n = cfg.width
    nz4 = noise_stack(cfg.noise_variance)
    state0 = moments.LayerMoments(jnp.full((n,), level, jnp.float32), None, None, jnp.zeros((n, n), jnp.float32), "full")

    def curve(p, nz):
        def step(st, _):
            st = moments.propagate(net, p, st, noise=nz, method=method, covariance="full")[-1]
            return st, (st.mean, st.var)

        return lax.scan(step, state0, None, length=cfg.depth)[1]

    mean, var = jax.vmap(lambda p: jax.vmap(lambda nz: curve(p, nz))(nz4))(ps)
    # mean field: f = identity with coupling s·c and bias s·b is the same network
    cs = jnp.asarray([c["scale"] * c["coupling"] for c in group], jnp.float32)
    bs = jnp.asarray([c["scale"] * c["bias"] for c in group], jnp.float32)
    kw = dict(width=cfg.width, activation=kind, x_mean=level, method=method)

    def mf(c, b, nz):
        lim = meanfield.symmetric_limit(coupling=c, bias=b, noise=nz, **kw)
        return lim.var, lim.mean, lim.slope, lim.bounded

    lim = jax.vmap(lambda c, b: jax.vmap(lambda nz: mf(c, b, nz))(nz4))(cs, bs)
    return mean.mean(-1), var.mean(-1), lim


def analytic(cfg) -> dict:
    """Analytic curves (moment rules) and mean-field depth limits of every group (one jit)."""
    gs = groups(cfg)
    res = jax.jit(lambda: tuple(_analytic_group(g, cfg) for g in gs))()
    out = {}
    for g, (mean, var, (lv, lm, ls, lb)) in zip(gs, res):
        out[g[0]["kind"]] = {
            "mean": np.asarray(mean), "var": np.asarray(var),
            "limits": [[{"var": float(lv[i, j]), "mean": float(lm[i, j]), "gain": float(ls[i, j]),
                         "bounded": bool(lb[i, j])} for j in range(4)] for i in range(len(g))],
        }
    return out


def assemble(cfg, mc: dict, an: dict) -> list[dict]:
    """One point per activation: layer-averaged curves ``(4, depth)`` and limits."""
    points = []
    for g in groups(cfg):
        k = g[0]["kind"]
        for i, case in enumerate(g):
            points.append({
                "case": case,
                "mc_var": mc[k]["var"][i], "mc_mean": mc[k]["mean"][i],
                "analytic_var": an[k]["var"][i], "analytic_mean": an[k]["mean"][i],
                "limits": an[k]["limits"][i],
            })
    return points


# ----------------------------------------------------------------------------------
# Claims and figure
# ----------------------------------------------------------------------------------


def _z(mc: np.ndarray, an: np.ndarray, n: int) -> np.ndarray:
    """Deviation of MC variances from the analytic ones in units of the Gaussian sampling std."""
    return (mc / an - 1.0) / math.sqrt(2.0 / (n - 1))


def _final_vs_limit(p: dict, half: int):
    """Last layer's MC variance over the mean-field limit − 1, and its growth over the second half."""
    mc = np.asarray(p["mc_var"])
    lim = np.array([l["var"] if isinstance(l["var"], float) else np.inf for l in p["limits"]])
    return mc[:, -1] / lim - 1.0, mc[:, -1] / mc[:, half - 1]


def _suppressed_claims(points: list[dict], cfg, tol: float, summary: dict) -> list[Claim]:
    """Slopes below 1 and the sigmoid: the variance saturates at the mean-field limit."""
    L, half = cfg.depth, max(cfg.depth // 2, 1)
    by = {p["case"]["name"]: p for p in points}
    suppressed = [p for p in points if p["case"]["name"] != "sigmoid" and p["case"]["slope"] * p["case"]["coupling"] < 1]
    claims = []
    for p in suppressed + ([by["sigmoid"]] if "sigmoid" in by else []):
        name = p["case"]["name"]
        dev, growth = _final_vs_limit(p, half)
        bounded = all(l["bounded"] for l in p["limits"])
        ok = bounded and bool(np.all(np.abs(dev) < tol))
        summary[f"{name}_final_over_limit_minus_1"] = dict(zip(NOISE_TYPES, dev.tolist()))
        summary[f"{name}_growth_second_half"] = dict(zip(NOISE_TYPES, growth.tolist()))
        what = "slope < 1" if name != "sigmoid" else "sigmoid (slope ≤ 1/4)"
        claims.append(claim(
            f"Noise accumulation is suppressed for {what}: the variance saturates at a finite depth limit ({p['case']['label']}; all four noise types)",
            PAPER + (" (linear f, α < 1)" if name != "sigmoid" else " (sigmoid)"),
            f"layer {L} MC variance / mean-field limit − 1 = {_fmt_list(dev)} (tolerance ±{tol:.3f}); "
            f"variance ratio layer {L}/layer {half} = {_fmt_list(growth)}",
            ok,
            "" if ok else "the Monte Carlo variance at the last layer is not at the mean-field limit",
        ))
    return claims


def _growth_claims(points: list[dict], cfg, tol: float, summary: dict) -> list[Claim]:
    """Slopes above 1 grow without bound; slope 1 is the boundary."""
    L, half = cfg.depth, max(cfg.depth // 2, 1)
    claims = []
    for p in points:
        c = p["case"]
        if c["name"] == "sigmoid" or c["slope"] * c["coupling"] <= 1:
            continue
        mc = np.asarray(p["mc_var"])
        k = min(10, L - 1)
        rate = (mc[:, -1] / mc[:, -1 - k]) ** (1.0 / k)
        expect = (c["slope"] * c["coupling"]) ** 2
        ok = bool(np.all(rate > 1.0)) and not any(l["bounded"] for l in p["limits"])
        summary[f"{c['name']}_growth_per_layer"] = dict(zip(NOISE_TYPES, rate.tolist()))
        claims.append(claim(
            f"Noise accumulates without bound when the slope is > 1 ({c['label']})",
            PAPER + " (linear f, α > 1)",
            f"MC variance grows ×{_fmt_list(rate)} per layer over the last {k} layers (analytic c²α² = {expect:.3g}); "
            f"mean-field limit infinite for all four types",
            ok,
        ))
    for p in points:
        c = p["case"]
        if c["name"] == "sigmoid" or abs(c["slope"] * c["coupling"] - 1) > 1e-9:
            continue
        dev, growth = _final_vs_limit(p, half)
        bounded = any(l["bounded"] for l in p["limits"])
        summary[f"{c['name']}_growth_second_half"] = dict(zip(NOISE_TYPES, growth.tolist()))
        claims.append(claim(
            f"Noise accumulation is bounded at the marginal slope α = 1 ({c['label']})",
            PAPER + " (linear f, α = 1)",
            f"variance ratio layer {L}/layer {half} = {_fmt_list(growth)}; mean-field limit "
            + ("finite for some types" if bounded else "infinite for all four types"),
            bool(np.all(growth < 1.0 + tol)),
            "at slope 1 every layer adds its noise and passes the earlier noise on unattenuated (gain c²α² = 1): "
            "the variance grows linearly with depth. The paper's 'generally bound' holds for slopes below 1 "
            "(and the sigmoid); slope 1 is the boundary.",
        ))
    return claims


def _prediction_claim(points: list[dict], cfg, summary: dict) -> Claim:
    """Monte Carlo against the analytic curves, in sampling standard deviations."""
    n = cfg.realizations
    z = np.concatenate([_z(np.asarray(p["mc_var"]), np.asarray(p["analytic_var"]), n).ravel() for p in points])
    rel = np.concatenate([(np.asarray(p["mc_var"]) / np.asarray(p["analytic_var"]) - 1).ravel() for p in points])
    summary.update({"mc_vs_analytic_max_abs_z": float(np.max(np.abs(z))), "mc_vs_analytic_median_abs_rel": float(np.median(np.abs(rel))),
                    "mc_vs_analytic_max_abs_rel": float(np.max(np.abs(rel))),
                    "n_points": int(z.size)})
    return claim(
        "The analytic prediction gives the noise level in any layer of a symmetric deep network",
        PAPER + " (analytic curves over simulation)",
        f"{z.size} (activation, noise type, layer) points: max |MC/analytic − 1| = {np.max(np.abs(rel)):.3f}, "
        f"median {np.median(np.abs(rel)):.3f}; max |z| = {np.max(np.abs(z)):.2f} sampling std "
        f"(Gaussian var-of-var, {n} realizations)",
        bool(np.max(np.abs(z)) < 6.0),
        "z uses the Gaussian sampling std of a variance, sqrt(2/(n-1)); multiplicative noise is not Gaussian (heavier tails), "
        "so its z-scores are inflated",
    )


def evaluate(points: list[dict], cfg) -> tuple[list[Claim], dict]:
    tol = 5.0 * math.sqrt(2.0 / (cfg.realizations - 1))
    summary: dict[str, Any] = {"relative_tolerance_5sigma": tol}
    claims = _suppressed_claims(points, cfg, tol, summary) + _growth_claims(points, cfg, tol, summary)
    claims.append(_prediction_claim(points, cfg, summary))
    return claims, summary


def _fmt_list(xs) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in np.asarray(xs).ravel()) + "] (AU, AC, MU, MC)"


def figure(points: list[dict], cfg):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = len(points)
    cols = 2
    rows = -(-n // cols)
    fig = Figure(figsize=(11, 4.0 * rows + 1.1), dpi=100)
    colors = {"add_uncorrelated": "C0", "add_correlated": "C1", "mul_uncorrelated": "C2", "mul_correlated": "C3"}
    styles = {"add_uncorrelated": ("-", "o"), "add_correlated": ("-", "s"), "mul_uncorrelated": ("--", "^"),
              "mul_correlated": ("--", "D")}
    layers_ = np.arange(1, cfg.depth + 1)
    step = max(1, cfg.depth // 25)
    for i, p in enumerate(points):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, t in enumerate(NOISE_TYPES):
            an = np.asarray(p["analytic_var"])[j]
            mc = np.asarray(p["mc_var"])[j]
            ls, mk = styles[t]
            ax.plot(layers_, an, ls, color=colors[t], lw=1.5)
            ax.plot(layers_[::step], mc[::step], mk, color=colors[t], ms=4, mfc="none")
            lim = p["limits"][j]["var"]
            if isinstance(lim, float) and math.isfinite(lim) and p["limits"][j]["bounded"]:
                ax.axhline(lim, color=colors[t], ls=":", lw=0.9)
        ax.set_yscale("log")
        ax.set_title(p["case"]["label"], fontsize=10)
        ax.set_xlabel("layer n")
        ax.set_ylabel(f"noise variance of a neuron (D = {cfg.noise_variance:g})")
        ax.grid(alpha=0.3, which="both")
    # one legend for all panels, below them: a noise type is a colour (line + marker shape);
    # lines are the analytic prediction, markers Monte Carlo, dotted lines the depth limit
    handles = [Line2D([], [], color=colors[t], ls=styles[t][0], marker=styles[t][1], mfc="none", ms=5, label=FULL_LABELS[t])
               for t in NOISE_TYPES]
    handles += [Line2D([], [], color="k", lw=1.5, label="line: analytic prediction"),
                Line2D([], [], color="k", ls="none", marker="o", mfc="none", ms=5,
                       label=f"markers: Monte Carlo ({cfg.realizations} realizations)"),
                Line2D([], [], color="k", ls=":", lw=0.9, label="dotted: mean-field limit as depth → ∞ (where finite)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Noise variance vs depth in symmetric deep networks (N = {cfg.width} neurons per layer, W_ij = c/N)\n"
                 f"one noise type at a time, variance D = {cfg.noise_variance:g} added at every layer", fontsize=10.5)
    fig.tight_layout(rect=(0, 0.6 / (4.0 * rows + 1.1), 1, 1))
    return fig


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------


def main(config, out_dir, *, data_dir: Optional[str] = None, progress: bool = True) -> Result:
    """Run the experiment in ``out_dir`` (figure, finished points); ``data_dir`` is unused."""
    cfg = config
    with _common.Run(NAME, out_dir, steps=3, progress=progress) as run:
        key = rng.key(cfg.seed)
        ident = {"config": cfg, "cases": cases(cfg)}
        mc = run.stage("monte_carlo", run.point, "monte_carlo", lambda: monte_carlo(cfg, key), key=ident)
        an = run.stage("analytic", run.point, "analytic", lambda: analytic(cfg), key=ident)
        points = assemble(cfg, mc, an)
        claims, summary = evaluate(points, cfg)
        fig = run.stage("figure", run.figure, f"{NAME}.png", figure(points, cfg))
        return run.result(claims, [fig], config=cfg, summary=summary, points=points)


if __name__ == "__main__":  # pragma: no cover
    from .config import CONFIGS

    _common.cli(main, CONFIGS, __doc__)
