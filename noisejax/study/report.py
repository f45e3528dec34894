"""``report.md``: the claims table and the figures of a ``noisejax reproduce`` run.

:func:`write_report` renders the summary that :func:`noisejax.study.reproduce.run`
writes to ``results.json``: a header (configuration, versions, devices), the summary
line "N hold, M do not, K reported without a threshold", one row per experiment
(status, wall and CPU time, claims holding), the claims table, the experiments not
included, and the figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from noisejax.study.claims import claims_summary_line
from noisejax.study.files import atomic_write_bytes, to_jsonable

__all__ = ["write_report", "PAPERS"]

#: The papers the claims come from, as the report names them.
PAPERS = (
    "Papers: **A** = Semenova, Larger & Brunner, *Understanding and mitigating noise in trained deep neural networks*,"
    " Neural Networks 146 (2022); **B** = Shao, Liew & Gündüz, *Denoising noisy neural networks: a Bayesian approach"
    " with compensation*, IEEE TSP 71 (2023)."
)


def _cell(x: Any) -> str:
    if isinstance(x, float):
        x = f"{x:.4g}"
    elif not isinstance(x, str):
        x = json.dumps(to_jsonable(x), allow_nan=False)
    return x.replace("|", "\\|").replace("\n", " ")


def _holds_text(h: Optional[bool]) -> str:
    return "reported (no threshold)" if h is None else ("**holds**" if h else "**does not hold**")


def _header(summary: dict) -> list[str]:
    return [
        "# noisejax reproduce — report",
        "",
        f"Configuration `{summary['config']}` · generated {summary['generated']} · noisejax {summary['noisejax_version']}"
        f" · JAX {summary['jax_version']} on {summary['devices']} · Python {summary['python']}",
        "",
        f"Claims: {claims_summary_line(summary['experiments'])}.",
        "",
        PAPERS,
        "",
    ]


def _experiment_row(name: str, rec: dict) -> str:
    status, ch = rec["status"], "—"
    if status == "ok":
        status = "reused" if rec.get("reused") else "ok"
        resumed = (rec.get("result") or {}).get("points_reused") if isinstance(rec.get("result"), dict) else None
        if isinstance(resumed, int) and resumed > 0:
            status += f" (resumed {resumed} stored point{'s' if resumed > 1 else ''})"
        claims = rec.get("claims") or []
        held = sum(1 for c in claims if c["holds"] is True)
        ch = f"{held} / {len(claims)}" if claims else "no claims reported"
    wall, cpu = rec.get("wall_seconds"), rec.get("cpu_seconds")
    return f"| `{name}` | {status} | {'' if wall is None else f'{wall:.1f}'} | {'' if cpu is None else f'{cpu:.1f}'} | {ch} |"


def _experiments_table(exps: dict) -> list[str]:
    lines = ["## Experiments", "", "| experiment | status | wall time (s) | CPU time (s) | claims holding |",
             "|---|---|---:|---:|---|"]
    lines += [_experiment_row(name, rec) for name, rec in exps.items()]
    return lines + ["", "Times are those of the run that computed the result (a reused result keeps its original time; "
                    "a resumed one only counts the points computed in that run — `--force` recomputes everything).", ""]


def _claims_table(exps: dict) -> list[str]:
    lines = ["## Claims", "", f"**{claims_summary_line(exps)}.** A claim without a threshold in the paper is "
             "reported with our measured value, not judged.", "",
             "| # | claim | paper's figure | our measured value | holds |", "|---:|---|---|---|---|"]
    k = 0
    for name, rec in exps.items():
        for c in rec.get("claims") or []:
            k += 1
            measured = _cell(c["measured"])
            if c.get("note"):
                measured += f" — {_cell(c['note'])}"
            lines.append(f"| {k} | {_cell(c['claim'])} (`{name}`) | {_cell(c['figure'])} | {measured} | {_holds_text(c['holds'])} |")
    if k == 0:
        lines.append("| | no claims were produced | | | |")
    return lines


def _not_included(exps: dict) -> list[str]:
    not_ok = [(n, r) for n, r in exps.items() if r["status"] != "ok"]
    if not not_ok:
        return []
    lines = ["", "## Not included", ""]
    for n, r in not_ok:
        extra = f" (traceback: `{r['log']}`)" if r.get("log") else ""
        lines.append(f"- `{n}`: **{r['status']}** — {r.get('error', '')}{extra}")
    return lines


def _figures(exps: dict) -> list[str]:
    lines = ["", "## Figures", ""]
    for name, rec in exps.items():
        figs = rec.get("figures") or []
        if figs:
            lines += [f"### {name}", "",
                      f"What the figure shows, the paper's claim and our result: `experiments/{name}/README.md`.", ""]
        for f in figs:
            lines += [f"![{name}]({f['file']})", ""]
    return lines + ["Every number is in `results.json`; each experiment's README explains its figure.", ""]


def write_report(out: Path, summary: dict) -> Path:
    """Write ``out/report.md`` (atomically) from a reproduce summary; returns its path."""
    exps = summary["experiments"]
    lines = _header(summary) + _experiments_table(exps) + _claims_table(exps) + _not_included(exps) + _figures(exps)
    return atomic_write_bytes(Path(out) / "report.md", "\n".join(lines).encode())
