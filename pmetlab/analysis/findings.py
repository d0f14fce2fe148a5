"""Findings written from the numbers of notebooks 03 and 04: each sentence states a comparison and
whether the 95% intervals separate it, so a reader never has to trust a typed claim.

Input tables are the notebooks' figure data: one row per (method or variant, n_edits) with the
summary columns of :func:`pmetlab.evaluation.summarize` (``efficacy_score``, ``*_ci_low``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

__all__ = ["Estimate", "tradeoff_reading", "ablation_reading", "rounds_reading", "RELIABILITY", "SPECIFICITY"]

RELIABILITY = ("efficacy_score", "paraphrase_score")
SPECIFICITY = "neighborhood_score"
_SHORT = {"efficacy_score": "ES", "paraphrase_score": "PS", "neighborhood_score": "NS", "score": "Score"}


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, row: pd.Series, metric: str) -> Estimate:
        return cls(float(row[metric]), float(row[f"{metric}_ci_low"]), float(row[f"{metric}_ci_high"]))

    @property
    def has_interval(self) -> bool:
        """False where no interval exists (one record: no spread to estimate)."""
        return not (math.isnan(self.low) or math.isnan(self.high))

    def above(self, other: Estimate) -> bool:
        """Higher with separate intervals."""
        return self.low > other.high

    def __str__(self) -> str:
        if not self.has_interval:
            return f"{self.mean:.1f} (no interval)"
        return f"{self.mean:.1f} [{self.low:.1f}, {self.high:.1f}]"


def _compare(a: Estimate, b: Estimate, name_a: str, name_b: str) -> str:
    if not (a.has_interval and b.has_interval):
        return "one record: no interval to compare"
    if a.above(b):
        return f"{name_a} higher, intervals separate"
    if b.above(a):
        return f"{name_b} higher, intervals separate"
    return "intervals overlap"


def _row(table: pd.DataFrame, method: str, n: int) -> pd.Series | None:
    rows = table[(table["method"] == method) & (table["n_edits"] == n)]
    return rows.iloc[0] if len(rows) else None


def _reliability_line(p: pd.Series, m: pd.Series, n: int) -> tuple[str, bool, bool]:
    """One n's comparison; returns the text and whether PMET / MEMIT is ahead on a reliability metric."""
    parts, pmet_ahead, memit_ahead = [], False, False
    for metric in RELIABILITY:
        a, b = Estimate.of(p, metric), Estimate.of(m, metric)
        pmet_ahead |= a.above(b)
        memit_ahead |= b.above(a)
        parts.append(f"{_SHORT[metric]} {a} vs {b} ({_compare(a, b, 'PMET', 'MEMIT')})")
    return f"- n = {n}: " + "; ".join(parts), pmet_ahead, memit_ahead


def _specificity_fall(table: pd.DataFrame, method: str, ns: list[int], label: str) -> str:
    for n in ns:
        edited, base = _row(table, method, n), _row(table, "unedited", n)
        if edited is None or base is None:
            continue
        e, u = Estimate.of(edited, SPECIFICITY), Estimate.of(base, SPECIFICITY)
        if u.above(e):
            return f"{label}'s NS first falls below the unedited model's at n = {n} ({e} vs {u})"
    return f"{label}'s NS stays within the unedited model's interval up to n = {ns[-1]}"


def tradeoff_reading(table: pd.DataFrame, *, model_name: str) -> str:
    """Markdown: PMET vs MEMIT reliability at each n, where each method's specificity falls below
    the unedited model's, and whether the paper's claim (PMET more reliable, specificity on par)
    holds at the largest n. ``table`` holds methods "PMET", "MEMIT" and "unedited"."""
    ns = sorted(int(n) for n in table["n_edits"].unique())
    lines, ahead = [], {"PMET": [], "MEMIT": []}
    for n in ns:
        p, m = _row(table, "PMET", n), _row(table, "MEMIT", n)
        if p is None or m is None:
            continue
        text, pa, ma = _reliability_line(p, m, n)
        lines.append(text)
        ahead["PMET"] += [n] if pa else []
        ahead["MEMIT"] += [n] if ma else []
    head = f"**{model_name}, PMET vs MEMIT, reliability (ES, PS; 95% intervals) by number of edits in one batch:**"
    verdict = _claim_verdict(table, ns[-1], ahead)
    falls = [_specificity_fall(table, k, ns, k) for k in ("PMET", "MEMIT")]
    return "\n".join([head, "", *lines, "", f"Specificity: {falls[0]}; {falls[1]}.", "", verdict])


def _claim_verdict(table: pd.DataFrame, n: int, ahead: dict[str, list[int]]) -> str:
    p, m = _row(table, "PMET", n), _row(table, "MEMIT", n)
    if p is None or m is None:
        return "The paper's claim cannot be judged: PMET or MEMIT is missing at the largest n."
    gain = sum(float(p[k]) - float(m[k]) for k in RELIABILITY) / len(RELIABILITY)
    ns_p, ns_m = Estimate.of(p, SPECIFICITY), Estimate.of(m, SPECIFICITY)
    where = ", ".join(map(str, ahead["PMET"])) or "no n"
    against = ", ".join(map(str, ahead["MEMIT"])) or "no n"
    holds = n in ahead["PMET"] and not ns_m.above(ns_p)
    word = "**reproduced**" if holds else "**not reproduced**"
    return (
        f"The paper's claim (PMET more reliable than MEMIT, specificity on par) is {word} at n = {n}: "
        f"PMET's mean reliability (ES, PS) is {gain:+.1f} points against MEMIT's, NS {ns_p} vs {ns_m}. "
        f"PMET is ahead with separate intervals at {where}; MEMIT at {against}."
    )


def _variant_line(table: pd.DataFrame, base: str, other: str, what: str) -> str | None:
    rows = {v: table[table["variant"] == v] for v in (base, other)}
    if any(r.empty for r in rows.values()):
        return None
    b, o = rows[base].iloc[0], rows[other].iloc[0]
    parts = []
    for metric in (*RELIABILITY, SPECIFICITY, "score"):
        eb, eo = Estimate.of(b, metric), Estimate.of(o, metric)
        parts.append(f"{_SHORT[metric]} {eb} → {eo} ({_compare(eo, eb, other, base)})")
    return f"- {what} ({base} → {other}): " + "; ".join(parts)


def ablation_reading(table: pd.DataFrame, *, model_name: str, n_edits: int) -> str:
    """Markdown: what each ablation of notebook 04 changes against PMET's preset, metric by metric,
    with the intervals. ``table`` has a ``variant`` column ("PMET", "no spread (p=0)", ...)."""
    checks = [
        ("PMET", "even spread (p=1)", "MEMIT's even spread instead of the square root"),
        ("PMET", "no spread (p=0)", "no spread (all of the residual at every layer)"),
        ("PMET", "w/o δ^a", "without δ^a"),
        ("PMET", "+ MHSA update", "also updating the MHSA output weights"),
    ]
    lines = [line for b, o, what in checks if (line := _variant_line(table, b, o, what)) is not None]
    head = f"**{model_name}, PMET ablations at {n_edits} edits in one batch (95% intervals):**"
    return "\n".join([head, "", *lines])


_ROUND_METRICS = (
    ("current", "efficacy_score", "efficacy on the last round's records"),
    ("earlier", "efficacy_score", "retention of earlier rounds (ES)"),
    ("all", "neighborhood_score", "NS over all rounds' records"),
    ("all", "relative_specificity", "neighbourhood prompts behaving as in the original model"),
)


def _last_round(summary: pd.DataFrame, method: str, group: str) -> pd.Series | None:
    rows = summary[(summary["method"] == method) & (summary["group"] == group)]
    return rows.sort_values("after_round").iloc[-1] if len(rows) else None


def rounds_reading(summary: pd.DataFrame, *, model_name: str, switch: str = " + null space") -> str:
    """Markdown: for each method run with and without the null-space switch (methods named
    ``X`` and ``X + null space``), what the switch changes after the last round, metric by
    metric, with the 95% intervals."""
    lines = []
    for base in [m for m in summary["method"].unique() if not str(m).endswith(switch)]:
        other = f"{base}{switch}"
        if other not in set(summary["method"]):
            continue
        parts = []
        for group, metric, what in _ROUND_METRICS:
            a, b = _last_round(summary, base, group), _last_round(summary, other, group)
            if a is None or b is None or metric not in a:
                continue
            ea, eb = Estimate.of(a, metric), Estimate.of(b, metric)
            parts.append(f"{what}: {ea} → {eb} ({_compare(eb, ea, 'with the switch', 'without')})")
        total = int(summary.loc[summary["method"] == base, "edits_total"].max())
        lines.append(f"- **{base}** after {total} edits, without → with the null-space switch: " + "; ".join(parts))
    head = f"**{model_name}, editing over time (95% intervals):**"
    return "\n".join([head, "", *lines])
