"""Verdicts of the readings: is A ahead of B on a metric?

Paired where the per-record metrics of both arms are at hand (:func:`pmetlab.evaluation.paired_difference`,
rule :data:`~pmetlab.evaluation.PAIRED_RULE`); otherwise unpaired, from the two summary rows'
intervals (:data:`UNPAIRED_RULE`). Every reading prints the rule it applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..evaluation import PAIRED_RULE, PairedDifference, paired_difference

__all__ = ["Estimate", "Verdict", "compare", "rules_text", "interval_words", "UNPAIRED_RULE", "PAIRED_RULE"]

#: The rule of a comparison made from two summaries' intervals (no per-record data).
UNPAIRED_RULE = "A is ahead of B when their 95% intervals (Wilson for ES, PS, NS) are separate; otherwise inconclusive"


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


@dataclass(frozen=True)
class Verdict:
    """A against B on one metric: the two estimates, the paired difference where computed, and
    ``ahead`` ("A", "B" or None)."""

    a: Estimate
    b: Estimate
    ahead: str | None
    paired: PairedDifference | None = None

    def text(self, name_a: str, name_b: str) -> str:
        """``"<a> vs <b> (<verdict>)"``; paired: the difference A − B with its interval in the brackets."""
        if self.paired is not None:
            d = self.paired
            what = {"A": f"{name_a} ahead", "B": f"{name_b} ahead"}.get(self.ahead, "inconclusive")
            return (
                f"{self.a} vs {self.b} (paired {name_a} − {name_b}: {d.diff:+.1f} "
                f"[{d.ci_low:+.1f}, {d.ci_high:+.1f}], {what})"
            )
        if not (self.a.has_interval and self.b.has_interval):
            return f"{self.a} vs {self.b} (one record: no interval to compare)"
        what = {"A": f"{name_a} ahead", "B": f"{name_b} ahead"}.get(self.ahead, "intervals overlap: inconclusive")
        if self.ahead:
            what += ", intervals separate"
        return f"{self.a} vs {self.b} ({what})"


def compare(
    row_a: pd.Series,
    row_b: pd.Series,
    metric: str,
    records_a: pd.DataFrame | None = None,
    records_b: pd.DataFrame | None = None,
) -> Verdict:
    """A against B on ``metric``: paired when both per-record frames are given (and share at least
    2 records), else from the summary rows' intervals."""
    a, b = Estimate.of(row_a, metric), Estimate.of(row_b, metric)
    if records_a is not None and records_b is not None:
        d = paired_difference(records_a, records_b, metric)
        return Verdict(a, b, {"A ahead": "A", "B ahead": "B"}.get(d.verdict), d)
    if not (a.has_interval and b.has_interval):
        return Verdict(a, b, None)
    return Verdict(a, b, "A" if a.above(b) else "B" if b.above(a) else None)


def interval_words(table: pd.DataFrame) -> str:
    """How the table's intervals were made, from its ``ci_method`` column ("95% Wilson intervals"
    where every row's is Wilson)."""
    methods = set(table["ci_method"].dropna().astype(str)) if "ci_method" in table.columns else set()
    if methods and all(m.startswith("wilson") for m in methods):
        derived = " re-derived from the means and record counts" if any("re-derived" in m for m in methods) else ""
        return f"95% Wilson intervals{derived}; Score: bootstrap over records"
    return "95% intervals" + (f" ({', '.join(sorted(methods))})" if methods else "")


def rules_text(paired: bool) -> str:
    """The rule a reading applied, as one sentence it prints."""
    if paired:
        return f"Rule (paired, from the per-record metrics): {PAIRED_RULE}."
    return (
        "Rule (unpaired, from the summaries' intervals: the per-record metrics of these runs were not kept): "
        f"{UNPAIRED_RULE}."
    )
