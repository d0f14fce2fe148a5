"""Editing over time: efficacy, retention and specificity against the total number of edits."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from .data import require_columns
from .tradeoff import plot_tradeoff

__all__ = ["plot_rounds", "rounds_long"]

#: (panel name, record group, summary column) of the rounds figure.
ROUND_PANELS = (
    ("efficacy, this round", "current", "efficacy_score"),
    ("retention, earlier rounds", "earlier", "efficacy_score"),
    ("neighbourhood, all rounds", "all", "neighborhood_score"),
    ("relative specificity, all rounds", "all", "relative_specificity"),
    ("update norm, this round", "current", "round_update_norm"),
)


def rounds_long(summary: pd.DataFrame) -> pd.DataFrame:
    """Tidy rows (``method``, ``edits_total``, ``metric``, ``mean``, ``ci_low``, ``ci_high``) of
    :func:`pmetlab.runs.rounds.run_rounds` summaries with a ``method`` column (one per run)."""
    require_columns(summary, ["method", "after_round", "group", "edits_total"], "rounds_long")
    rows = []
    for name, group, col in ROUND_PANELS:
        if col not in summary.columns:
            continue
        g = summary[summary["group"] == group]
        rows.append(
            pd.DataFrame(
                {
                    "method": g["method"],
                    "edits_total": g["edits_total"],
                    "metric": name,
                    "mean": g[col],
                    "ci_low": g[f"{col}_ci_low"] if f"{col}_ci_low" in g else float("nan"),
                    "ci_high": g[f"{col}_ci_high"] if f"{col}_ci_high" in g else float("nan"),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def plot_rounds(summary: pd.DataFrame, *, title: str | None = None) -> Figure:
    """One panel per :data:`ROUND_PANELS` entry against the total number of edits, one line per
    method (e.g. "PMET", "PMET + null space"), with 95% intervals."""
    long = rounds_long(summary)
    return plot_tradeoff(long, x="edits_total", metrics=list(dict.fromkeys(long["metric"])), log_x=False, title=title)
