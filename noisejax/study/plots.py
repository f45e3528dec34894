"""Figures of the experiments: accuracy-vs-WNR curves, and PNG bytes for atomic writes.

* :func:`plot_accuracy_curves` — mean ± 1 std bands vs WNR, in panels, to a PNG.
* :func:`png_bytes` — a Matplotlib figure as PNG bytes without a timestamp (write them
  with :func:`noisejax.study.files.atomic_write_bytes`: same figure, same bytes).

Example::

    >>> from noisejax.study import plots
    >>> plots.plot_accuracy_curves([0, 5, 10], {"ML": acc_ml, "MMSE": acc_mmse}, "curves.png", reference="ML")
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["plot_accuracy_curves", "png_bytes"]


def png_bytes(fig: Any, **savefig_kwargs: Any) -> bytes:
    """PNG bytes of a Matplotlib figure (no ``Software`` metadata: the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, **savefig_kwargs)
    return buf.getvalue()


def plot_accuracy_curves(
    wnr_db: Sequence[float],
    curves: Mapping[str, Any],
    path: Optional[str] = None,
    *,
    title: str = "",
    targets: Sequence[float] = (),
    xlabel: str = "WNR (dB)",
    ylabel: str = "test accuracy",
    styles: Optional[Mapping[str, dict]] = None,
    panels: Optional[Sequence[tuple[str, Sequence[str]]]] = None,
    reference: Optional[str] = None,
    band_label: str = "±1 std over realizations",
    target_label: str = "accuracy target of the dB gains",
) -> Any:
    """Mean ± 1 std vs WNR for each curve (``(W, R)`` arrays or ``(W,)`` means): the figure, or a PNG at ``path``.

    Args:
      styles: maps a curve name to extra matplotlib line keywords (e.g. ``{"ls": "--"}``).
      panels: ``[(panel title, [curve names]), ...]`` — one panel each, side by side
        with a shared y axis (a crowded figure split up); curves of no panel are not
        drawn.  ``None``: one panel with every curve.
      reference: a curve drawn in every panel (e.g. ``"ML"``), in black.
      band_label, target_label: legend text of the shaded bands and of the dotted
        horizontal lines at ``targets``.

    A curve keeps its colour in every panel; within a panel curves differ by marker and
    dash too, and the reference is a wide translucent line underneath, so curves that
    coincide stay visible.  Bands (±1 std) are drawn for the reference and, when a panel
    has at most two other curves, for those too (more would hide each other).  The
    legend of each panel is under it; ``styles[name]["label"]`` renames a curve there.

    Returns the :class:`matplotlib.figure.Figure` (no pyplot state; write it with
    :func:`png_bytes`), or, with ``path``, saves it there and returns ``path``.
    """
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    w = np.asarray(wnr_db, dtype=float)
    names = list(curves)
    if panels is None:
        panels = [("", names)]
    panels = [(t, [n for n in ns if n in curves]) for t, ns in panels]
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] + ["#8c564b", "#7f7f7f", "#bcbd22", "#17becf"]
    others = [n for n in names if n != reference]
    color = {n: palette[i % len(palette)] for i, n in enumerate(others)}
    if reference is not None:
        color[reference] = "#000000"
    n_panels = len(panels)
    fig = Figure(figsize=(5.2 * n_panels if n_panels > 1 else 6.4, 5.0), dpi=120)
    axes = fig.subplots(1, n_panels, sharey=True, squeeze=False)
    markers, dashes = ("o", "s", "^", "D", "v", "x"), ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)), ":", "-")
    for ax, (panel_title, members) in zip(axes[0], panels):
        shown = ([reference] if reference is not None and reference in curves and reference not in members else []) + members
        banded = [n for n in shown if n == reference or len([m for m in shown if m != reference]) <= 2]
        for i, name in enumerate(shown):
            a = np.asarray(curves[name], dtype=float)
            mean = a.mean(axis=1) if a.ndim == 2 else a
            if name == reference:
                kw = {"marker": "o", "ms": 4, "lw": 4.5, "alpha": 0.45, "zorder": 1}
            else:
                j = i - (reference in shown)
                kw = {"marker": markers[j % len(markers)], "ms": 3.5, "ls": dashes[j % len(dashes)], "lw": 1.4,
                      "mfc": "none", "zorder": 3}
            kw = {"color": color[name], "label": name, **kw, **((styles or {}).get(name, {}))}
            (line,) = ax.plot(w, mean, **kw)
            if name in banded and a.ndim == 2 and a.shape[1] > 1:
                std = a.std(axis=1)
                ax.fill_between(w, mean - std, mean + std, color=line.get_color(), alpha=0.13, lw=0, zorder=0)
        for t in targets:
            ax.axhline(t, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        if panel_title:
            ax.set_title(panel_title, fontsize=9.5)
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if targets:
            handles.append(Line2D([], [], color="gray", lw=0.8, ls=":",
                                  label=f"{target_label} ({', '.join(f'{100 * t:g} %' for t in targets)})"))
        if any(np.ndim(curves[n]) == 2 and np.shape(curves[n])[1] > 1 for n in banded):
            only = "" if len(banded) == len(shown) else f" ({', '.join(banded)} only)"
            handles.append(Patch(color="gray", alpha=0.3, lw=0, label=band_label + only))
        ax.legend(handles=handles, fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    axes[0][0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=10.5)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, bbox_inches="tight")
    return path
