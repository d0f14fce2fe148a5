"""Readings of editing over time at scale (issue #25): where each run collapses and which switch
delays it, generated from the rounds' summaries."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from ..runs.round_diagnostics import COLLAPSE_METRICS, collapse_point
from .findings import rounds_reading

__all__ = ["collapse_table", "collapse_reading", "SWITCHES"]

#: Method-name suffixes of the switched arms (notebook 07: "PMET", "PMET + null space", ...).
SWITCHES = (" + null space", " + norm anchor")


def collapse_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per method (``summary``'s ``method`` column, one rounds run each): its collapse point
    (:func:`~pmetlab.runs.round_diagnostics.collapse_point`; NaN: none within ``within_edits``)."""
    rows = []
    for method, part in summary.groupby("method", sort=False):
        c = collapse_point(part)
        rows.append({"method": method, **c})
    return pd.DataFrame(rows)


def _when(row: pd.Series) -> str:
    if pd.isna(row["round"]):
        return f"none within {int(row['within_edits'])} edits"
    return f"after {int(row['edits_total'])} edits (round {int(row['round'])}, {row['metric']})"


def collapse_reading(summary: pd.DataFrame, *, model_name: str, switches: Sequence[str] = SWITCHES) -> str:
    """Markdown: each method's collapse point, whether each switch delays it (a later point, or
    none where the plain method collapses), and the per-metric comparisons after the last round
    (:func:`~pmetlab.analysis.findings.rounds_reading`, one block per switch)."""
    table = collapse_table(summary).set_index("method")
    rule = (
        f"Collapse point: the first round whose {' or '.join(COLLAPSE_METRICS)} over every edit so far "
        f"falls below the lower end of the first round's 95% interval."
    )
    lines = [f"**{model_name}, editing over time: collapse points.** {rule}", ""]
    lines += [f"- {m}: {_when(r)}" for m, r in table.iterrows()]
    for sw in switches:
        for base in [m for m in table.index if f"{m}{sw}" in table.index]:
            a, b = table.loc[base], table.loc[f"{base}{sw}"]
            if pd.isna(a["round"]) and pd.isna(b["round"]):
                verdict = "neither collapses within the run, so the run cannot say"
            elif pd.isna(b["round"]):
                verdict = "delays it past the run"
            elif pd.isna(a["round"]):
                verdict = "brings it forward (the plain method does not collapse within the run)"
            else:
                d = int(b["edits_total"]) - int(a["edits_total"])
                verdict = f"{'delays' if d > 0 else 'brings forward' if d < 0 else 'does not move'} it ({d:+d} edits)"
            lines.append(f"- `{sw.strip(' +')}` on {base}: {verdict}.")
    after = []  # rounds_reading's comparisons per switch, without its heading, named by the switch
    for sw in switches:
        block = rounds_reading(summary, model_name=model_name, switch=sw).split("\n")[2:]
        after += [ln.replace("the null-space switch", f"the `{sw.strip(' +')}` switch") for ln in block if ln]
    if after:
        lines += ["", "After the last round (95% intervals):", "", *after]
    return "\n".join(lines)
