"""Editing over time: efficacy, retention and specificity against the total number of edits."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from .data import require_columns
from .tradeoff import plot_tradeoff

__all__ = ["plot_rounds", "rounds_long", "plot_round_diagnostics", "DIAGNOSTIC_PANELS"]

#: (panel name, record group, summary column) of the rounds figure.
ROUND_PANELS = (
    ("efficacy, this round", "current", "efficacy_score"),
    ("retention, earlier rounds", "earlier", "efficacy_score"),
    ("neighbourhood, all rounds", "all", "neighborhood_score"),
    ("relative specificity, all rounds", "all", "relative_specificity"),
    ("update norm, this round", "current", "round_update_norm"),
)


#: (panel name, summary column) of the collapse-diagnostics figure (:mod:`pmetlab.runs.round_diagnostics`).
DIAGNOSTIC_PANELS = (
    ("held-out perplexity / original's", "perplexity_ratio"),
    ("neighbourhood KL (nats)", "neighbourhood_kl"),
    ("‖W − W₀‖_F, all edited layers", "weight_change"),
    ("largest condition number", "max_condition"),
    ("largest s₁ / s₂", "max_top_sv_ratio"),
)


def rounds_long(summary: pd.DataFrame, panels: tuple = ROUND_PANELS) -> pd.DataFrame:
    """Tidy rows (``method``, ``edits_total``, ``metric``, ``mean``, ``ci_low``, ``ci_high``) of
    :func:`pmetlab.runs.rounds.run_rounds` summaries with a ``method`` column (one per run)."""
    require_columns(summary, ["method", "after_round", "group", "edits_total"], "rounds_long")
    rows = []
    for name, group, col in panels:
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


def plot_round_diagnostics(summary: pd.DataFrame, *, title: str | None = None) -> Figure:
    """The collapse diagnostics (:data:`DIAGNOSTIC_PANELS`, measured after every round on the
    model as it is) against the total number of edits, one line per method."""
    panels = tuple((name, "all", col) for name, col in DIAGNOSTIC_PANELS if col in summary.columns)
    if not panels:
        raise ValueError(
            "the summary has none of the diagnostics columns "
            f"{[c for _, c in DIAGNOSTIC_PANELS]}: runs from before issue #25 do not record them; rerun the rounds"
        )
    long = rounds_long(summary, panels)
    return plot_tradeoff(long, x="edits_total", metrics=list(dict.fromkeys(long["metric"])), log_x=False, title=title)
