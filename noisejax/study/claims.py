"""What an experiment returns: typed claims, figures and numbers (the protocol's :class:`Result`).

* :class:`Claim` — one row of the report's claims table: the paper's claim and figure,
  our measured value, whether it holds (``None``: reported without a threshold).
* :class:`Result` — what ``experiments/NAME/run.py``'s ``main`` returns: its claims,
  its figures (PNG files in the experiment's folder, in order) and every other number.
* :func:`gain_claims` — claims of dB gains over ML read off accuracy-vs-WNR curves
  (:func:`noisejax.sweeps.gains_table`).

Example::

    >>> from noisejax.study.claims import Result, claim
    >>> r = Result(claims=(claim("noise adds up", "Fig. 1", 0.93, True),), figures=("fig.png",),
    ...            values={"slope": 0.93})
    >>> r.to_json()["claims"][0]["holds"]
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from noisejax.errors import InvalidArgumentError
from noisejax.study.files import to_jsonable

__all__ = ["Claim", "claim", "Result", "claims_summary", "claims_summary_line", "gain_claims"]


@dataclasses.dataclass(frozen=True)
class Claim:
    """One row of the claims table.

    Attributes:
      claim: the paper's claim, in words.
      figure: the paper's figure (or section) it comes from.
      measured: our measured value (JSON-able: a number, a string, a list).
      holds: ``True``/``False`` against the claim's threshold; ``None`` when the paper
        gives none (the value is reported, not judged).
      note: what a reader needs to know beside the value.
    """

    claim: str
    figure: str
    measured: Any
    holds: Optional[bool]
    note: str = ""

    def __post_init__(self):
        object.__setattr__(self, "claim", str(self.claim))
        object.__setattr__(self, "figure", str(self.figure))
        object.__setattr__(self, "note", str(self.note))
        object.__setattr__(self, "measured", to_jsonable(self.measured))
        if self.holds is not None:
            object.__setattr__(self, "holds", bool(self.holds))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def claim(text: str, figure: str, measured: Any, holds: Optional[bool], note: str = "") -> Claim:
    """A :class:`Claim`: the paper's ``text`` and ``figure``, our ``measured`` value, ``holds``."""
    return Claim(text, figure, measured, holds, note)


@dataclasses.dataclass(frozen=True)
class Result:
    """What an experiment's ``main(config, out_dir, *, data_dir=None, progress=True)`` returns.

    Attributes:
      claims: the report's rows (:class:`Claim`).
      figures: PNG paths relative to the experiment's ``out_dir`` (the first one is the
        experiment's figure in the report, the others follow it).
      values: every other number (JSON-able), stored whole in the report's ``results.json``.
      points_reused: stored points and models a restarted run loaded instead of computing.
    """

    claims: tuple
    figures: tuple
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    points_reused: int = 0

    def __post_init__(self):
        object.__setattr__(self, "claims", tuple(self.claims))
        object.__setattr__(self, "figures", tuple(str(f) for f in self.figures))
        for c in self.claims:
            if not isinstance(c, Claim):
                raise InvalidArgumentError(f"Result.claims must hold Claim objects (noisejax.study.claims.claim), got {type(c).__name__}")
        reserved = {"claims", "figures", "points_reused"} & set(self.values)
        if reserved:
            raise InvalidArgumentError(f"Result.values must not use the keys {sorted(reserved)}")

    def to_json(self) -> dict:
        """The result as plain JSON: ``values`` with ``claims``, ``figures`` and ``points_reused`` added."""
        return {**to_jsonable(dict(self.values)), "claims": [c.to_json() for c in self.claims],
                "figures": list(self.figures), "points_reused": int(self.points_reused)}


def claims_summary(experiments: Mapping[str, dict]) -> dict:
    """Counts over every claim of a report's records: ``{"hold", "do_not_hold", "no_threshold"}``."""
    claims = [c for rec in experiments.values() for c in (rec.get("claims") or [])]
    return {"hold": sum(c["holds"] is True for c in claims),
            "do_not_hold": sum(c["holds"] is False for c in claims),
            "no_threshold": sum(c["holds"] is None for c in claims)}


def claims_summary_line(experiments: Mapping[str, dict]) -> str:
    """``"N hold, M do not, K reported without a threshold"`` (the report's summary line)."""
    c = claims_summary(experiments)
    return f"{c['hold']} hold, {c['do_not_hold']} do not, {c['no_threshold']} reported without a threshold"


def gain_claims(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], thresholds: Mapping[str, Optional[float]], *,
                figure: str, target: str = "60", notes: Optional[Mapping[tuple, str]] = None) -> list[Claim]:
    """Claims from ``summary[model][estimator][target] = gain_db`` (dB over ML at a target accuracy).

    ``thresholds`` maps a lower-case substring of an estimator name to the gain in dB it must
    reach (e.g. ``{"compensated": 1.0, "learned": 4.1}``; the first match counts, ``None``
    reports without judging); estimators matching none are listed with ``holds=None``.
    ``notes[(model, estimator)]`` is the claim's note.
    """
    claims = []
    for model, per_est in summary.items():
        for est, gains in per_est.items():
            key = next((k for k in gains if str(k).rstrip("%") == str(target).rstrip("%")), None)
            if key is None:
                key = next(iter(gains), None)
            gain = None if key is None else gains[key]
            need = next((v for k, v in thresholds.items() if k in est.lower()), None)
            claims.append(Claim(
                f"{model}: {est} gains >= {need} dB over ML at {key} accuracy" if need is not None
                else f"{model}: {est} gain over ML at {key} accuracy",
                figure,
                "not reached" if gain is None else f"{gain:.2f} dB",
                None if need is None else (gain is not None and gain >= need),
                (notes or {}).get((model, est), ""),
            ))
    return claims
