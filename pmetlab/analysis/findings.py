"""Findings written from the numbers of notebooks 03 and 04: each sentence states a comparison and
the verdict of a stated rule, so a reader never has to trust a typed claim.

Input tables are the notebooks' figure data: one row per (method or variant, n_edits) with the
summary columns of :func:`pmetlab.evaluation.summarize` (``efficacy_score``, ``*_ci_low``, ...).
Where the per-record metrics behind them are passed too (``records``), methods are compared
**paired** (:data:`pmetlab.evaluation.PAIRED_RULE`); otherwise the reading says that the comparison
is unpaired, from the summaries' intervals (:data:`UNPAIRED_RULE`). A single record has no interval
and is left out of every comparison (MEMIT's "n = 1" averages many records each edited alone).
"""

from __future__ import annotations

import pandas as pd

from .verdicts import UNPAIRED_RULE, Estimate, Verdict, compare, interval_words, rules_text

__all__ = [
    "Estimate",
    "tradeoff_reading",
    "ablation_reading",
    "rounds_reading",
    "RELIABILITY",
    "SPECIFICITY",
    "UNPAIRED_RULE",
]

RELIABILITY = ("efficacy_score", "paraphrase_score")
SPECIFICITY = "neighborhood_score"
_SHORT = {"efficacy_score": "ES", "paraphrase_score": "PS", "neighborhood_score": "NS", "score": "Score"}


def _compare(a: Estimate, b: Estimate, name_a: str, name_b: str) -> str:
    """Unpaired verdict text of two estimates (the rounds reading)."""
    if not (a.has_interval and b.has_interval):
        return "one record: no interval to compare"
    if a.above(b):
        return f"{name_a} higher, intervals separate"
    if b.above(a):
        return f"{name_b} higher, intervals separate"
    return "intervals overlap"


class _Arms:
    """Summary rows and (optionally) per-record frames of the arms of a table, by (arm, n_edits)."""

    def __init__(self, table: pd.DataFrame, records: pd.DataFrame | None, arm: str) -> None:
        self.table, self.records, self.arm = table, records, arm

    def row(self, name: str, n: int | None = None) -> pd.Series | None:
        t = self.table[self.table[self.arm] == name]
        if n is not None:
            t = t[t["n_edits"] == n]
        return t.iloc[0] if len(t) else None

    def recs(self, name: str, n: int | None = None) -> pd.DataFrame | None:
        if self.records is None:
            return None
        r = self.records[self.records[self.arm] == name]
        if n is not None:
            r = r[r["n_edits"] == n]
        return r if len(r) >= 2 else None

    def compare(self, a: str, b: str, metric: str, n: int | None = None) -> Verdict | None:
        ra, rb = self.row(a, n), self.row(b, n)
        if ra is None or rb is None:
            return None
        xa, xb = self.recs(a, n), self.recs(b, n)
        paired = xa is not None and xb is not None
        return compare(ra, rb, metric, xa if paired else None, xb if paired else None)

    def paired(self) -> bool:
        return self.records is not None


def _single_record(table: pd.DataFrame, n: int) -> bool:
    rows = table[table["n_edits"] == n]
    if "n_records" in rows.columns:
        return bool((pd.to_numeric(rows["n_records"], errors="coerce") < 2).any())
    return bool(rows[[c for c in rows.columns if c.endswith("_ci_low")]].isna().all(axis=1).any())


def _reliability_line(arms: _Arms, n: int) -> tuple[str, bool, bool]:
    """One n's comparison; returns the text and whether PMET / MEMIT is ahead on a reliability metric."""
    parts, pmet_ahead, memit_ahead = [], False, False
    for metric in RELIABILITY:
        v = arms.compare("PMET", "MEMIT", metric, n)
        pmet_ahead |= v.ahead == "A"
        memit_ahead |= v.ahead == "B"
        parts.append(f"{_SHORT[metric]} {v.text('PMET', 'MEMIT')}")
    return f"- n = {n}: " + "; ".join(parts), pmet_ahead, memit_ahead


def _specificity_fall(arms: _Arms, ns: list[int], label: str) -> str:
    for n in ns:
        v = arms.compare(label, "unedited", SPECIFICITY, n)
        if v is not None and v.ahead == "B":
            return f"{label}'s NS first falls below the unedited model's at n = {n} ({v.text(label, 'unedited')})"
    return f"{label}'s NS is not below the unedited model's by the rule up to n = {ns[-1]}"


def tradeoff_reading(table: pd.DataFrame, *, model_name: str, records: pd.DataFrame | None = None) -> str:
    """Markdown: PMET vs MEMIT reliability at each n, where each method's specificity falls below
    the unedited model's, and whether the paper's claim (PMET more reliable, specificity on par)
    holds at the largest n, with the rule applied.

    Args:
        table: summary rows of methods "PMET", "MEMIT" and "unedited" per ``n_edits``.
        model_name: named in the text.
        records: the per-record metrics behind ``table`` (columns ``method``, ``n_edits``,
            ``case_id`` and the metrics); with them every comparison is paired.
    """
    arms = _Arms(table, records, "method")
    all_ns = sorted(int(n) for n in table["n_edits"].unique())
    ns = [n for n in all_ns if not _single_record(table, n)]
    lines, ahead = [], {"PMET": [], "MEMIT": []}
    for n in ns:
        if arms.row("PMET", n) is None or arms.row("MEMIT", n) is None:
            continue
        text, pa, ma = _reliability_line(arms, n)
        lines.append(text)
        ahead["PMET"] += [n] if pa else []
        ahead["MEMIT"] += [n] if ma else []
    left_out = sorted(set(all_ns) - set(ns))
    if left_out:
        lines.append(
            f"- n = {', '.join(map(str, left_out))} left out: a single record has no interval (MEMIT's n = 1 "
            "averages many records each edited alone; that condition was not run)"
        )
    how = "paired" if arms.paired() else "unpaired"
    head = (
        f"**{model_name}, PMET vs MEMIT, reliability (ES, PS; {interval_words(table)}; {how}) by number of "
        "edits in one batch:**"
    )
    if not ns:
        return "\n".join([head, "", *lines, "", "The paper's claim cannot be judged: no n with two records or more."])
    verdict = _claim_verdict(arms, ns[-1], ahead)
    falls = [_specificity_fall(arms, ns, k) for k in ("PMET", "MEMIT")]
    spec = f"Specificity: {falls[0]}; {falls[1]}."
    return "\n".join([head, "", *lines, "", spec, "", verdict, "", rules_text(arms.paired())])


def _claim_verdict(arms: _Arms, n: int, ahead: dict[str, list[int]]) -> str:
    p, m = arms.row("PMET", n), arms.row("MEMIT", n)
    if p is None or m is None:
        return "The paper's claim cannot be judged: PMET or MEMIT is missing at the largest n."
    gain = sum(float(p[k]) - float(m[k]) for k in RELIABILITY) / len(RELIABILITY)
    ns_v = arms.compare("PMET", "MEMIT", SPECIFICITY, n)
    where = ", ".join(map(str, ahead["PMET"])) or "no n"
    against = ", ".join(map(str, ahead["MEMIT"])) or "no n"
    if n in ahead["PMET"] and n not in ahead["MEMIT"] and ns_v.ahead != "B":
        word, why = "**reproduced**", ""
    elif n in ahead["MEMIT"] or ns_v.ahead == "B":
        word, why = "**not reproduced**", ""
    else:
        n_rec = int(p["n_records"]) if "n_records" in p.index and pd.notna(p["n_records"]) else n
        word, why = "**inconclusive**", f" (neither method ahead on ES or PS by the rule with {n_rec} records)"
    return (
        f"The paper's claim (PMET more reliable than MEMIT, specificity on par) is {word} at n = {n}{why}: "
        f"PMET's mean reliability (ES, PS) is {gain:+.1f} points against MEMIT's, NS {ns_v.text('PMET', 'MEMIT')}. "
        f"PMET is ahead by the rule at {where}; MEMIT at {against}."
    )


def _variant_line(arms: _Arms, base: str, other: str, what: str) -> str | None:
    if arms.row(base) is None or arms.row(other) is None:
        return None
    parts = []
    for metric in (*RELIABILITY, SPECIFICITY, "score"):
        v = arms.compare(other, base, metric)
        parts.append(f"{_SHORT[metric]} {v.text(other, base)}")
    return f"- {what} ({other} against {base}): " + "; ".join(parts)


def ablation_reading(table: pd.DataFrame, *, model_name: str, n_edits: int, records: pd.DataFrame | None = None) -> str:
    """Markdown: what each ablation of notebook 04 changes against PMET's preset, metric by metric,
    with the intervals and the rule applied. ``table`` has a ``variant`` column ("PMET",
    "no spread (p=0)", ...); ``records`` (columns ``variant``, ``case_id`` and the metrics), when
    given, makes every comparison paired."""
    checks = [
        ("PMET", "even spread (p=1)", "MEMIT's even spread instead of the square root"),
        ("PMET", "no spread (p=0)", "no spread (all of the residual at every layer)"),
        ("PMET", "w/o δ^a", "without δ^a"),
        ("PMET", "+ MHSA update", "also updating the MHSA output weights"),
    ]
    arms = _Arms(table, records, "variant")
    lines = [line for b, o, what in checks if (line := _variant_line(arms, b, o, what)) is not None]
    how = "paired" if arms.paired() else "unpaired"
    head = f"**{model_name}, PMET ablations at {n_edits} edits in one batch ({interval_words(table)}; {how}):**"
    return "\n".join([head, "", *lines, "", rules_text(arms.paired())])


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
