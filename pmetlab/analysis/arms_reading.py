"""The reading of the paired sweep (issue #21), generated from its tables: which switches move PMET,
which arms still trail MEMIT, what the update delivers, and what stays unexplained."""

from __future__ import annotations

import math

import pandas as pd

from ..evaluation.paired import PAIRED_RULE

__all__ = ["arms_reading"]

_SHOWN = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score")


def _est(row: pd.Series, metric: str) -> str:
    lo, hi = row.get(f"{metric}_ci_low", math.nan), row.get(f"{metric}_ci_high", math.nan)
    return f"{row[metric]:.1f} [{lo:.1f}, {hi:.1f}]" if not (pd.isna(lo) or pd.isna(hi)) else f"{row[metric]:.1f}"


def _diff(paired: pd.DataFrame, arm: str, baseline: str, metric: str = "score") -> pd.Series | None:
    hit = paired[(paired["arm"] == arm) & (paired["baseline"] == baseline) & (paired["metric"] == metric)]
    return hit.iloc[0] if len(hit) else None


def _diff_text(d: pd.Series | None) -> str:
    if d is None:
        return "–"
    return f"{d['diff']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"


def _num(row: pd.Series, col: str, fmt: str = "{:.2f}") -> str:
    v = row.get(col, math.nan)
    return fmt.format(v) if not pd.isna(v) else "–"


def _table(arms: pd.DataFrame, paired: pd.DataFrame) -> list[str]:
    cols = ["arm", "λ", "v_lr", "ES", "PS", "NS", "Score", "Δ Score vs MEMIT", "Δ Score vs PMET"]
    cols += ["p(o*) opt.", "p(o*) written", "δ on bound"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in arms.iterrows():
        a = str(r["arm"])
        cells = [a, _num(r, "hp_mom2_update_weight", "{:g}"), _num(r, "hp_v_lr", "{:g}")]
        cells += [_est(r, m) for m in _SHOWN]
        cells += [_diff_text(_diff(paired, a, "memit")), _diff_text(_diff(paired, a, "pmet"))]
        cells += [_num(r, "target_p_target_final_mean"), _num(r, "target_p_written_mean")]
        cells.append(_num(r, "target_share_delta_at_clamp", "{:.0%}"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _against(paired: pd.DataFrame, baseline: str) -> dict[str, list[str]]:
    # the unedited model and the other baseline are references, not arms
    rows = paired[(paired["baseline"] == baseline) & (paired["metric"] == "score")]
    rows = rows[~rows["arm"].isin(["unedited", "memit"] if baseline == "pmet" else ["unedited"])]
    out: dict[str, list[str]] = {"ahead": [], "behind": [], "inconclusive": []}
    for _, d in rows.iterrows():
        key = "ahead" if d["ci_low"] > 0 else "behind" if d["ci_high"] < 0 else "inconclusive"
        out[key].append(f"{d['arm']} ({_diff_text(d)})")
    return out


def _names(items: list[str]) -> str:
    return "; ".join(items) if items else "none"


def _explains_most(arms: pd.DataFrame, paired: pd.DataFrame) -> list[str]:
    """The PMET arm with the largest Score gain over PMET as released whose interval excludes 0, and
    the share of the PMET-MEMIT gap it closes; and the gap that remains against MEMIT."""
    gains = paired[(paired["baseline"] == "pmet") & (paired["metric"] == "score") & (paired["arm"] != "memit")]
    gains = gains[(gains["ci_low"] > 0) & (gains["arm"] != "unedited")].sort_values("diff", ascending=False)
    gap = _diff(paired, "pmet", "memit")
    if gains.empty:
        return [
            "- **No switch raises PMET's Score by the rule**: the port questions tested here do not explain the gap."
        ]
    best = gains.iloc[0]
    lines = [f"- **The arm that explains most**: {best['arm']}, Score {_diff_text(best)} over PMET as released"]
    if gap is not None and gap["diff"] < 0:
        lines[-1] += f", {best['diff'] / -gap['diff']:.0%} of PMET's Score gap to MEMIT ({gap['diff']:+.1f})."
    rest = _diff(paired, str(best["arm"]), "memit")
    if rest is not None:
        state = (
            "still trails MEMIT"
            if rest["ci_high"] < 0
            else "is ahead of MEMIT"
            if rest["ci_low"] > 0
            else "is not distinguishable from MEMIT"
        )
        lines.append(f"- What stays unexplained: {best['arm']} {state} by the rule (Score {_diff_text(rest)}).")
    return lines


def arms_reading(arms: pd.DataFrame, paired: pd.DataFrame, *, model_name: str, n_edits: int) -> str:
    """Markdown: the table (each arm's metrics with Wilson intervals, its tuned point, the paired Score
    differences against MEMIT and PMET as released, p(o*) optimised and written, δ on its bound) and
    the findings, each from the numbers by :data:`PAIRED_RULE`."""
    vs_memit, vs_pmet = _against(paired, "memit"), _against(paired, "pmet")
    flat = vs_pmet["inconclusive"]
    pmet = arms[arms["arm"] == "pmet"]
    lines = [
        f"## Why PMET trails MEMIT: the paired sweep ({model_name}, {n_edits} records, one batch per arm)",
        "",
        "Every arm was tuned on the tuning split with the same λ × v_lr grid and then edited the same "
        f"evaluation records. Rule: {PAIRED_RULE}. Metric intervals: Wilson (rates) and bootstrap (Score).",
        "",
        *_table(arms, paired),
        "",
        f"- Against MEMIT (Score): ahead {_names(vs_memit['ahead'])}; behind {_names(vs_memit['behind'])}; "
        f"inconclusive {_names(vs_memit['inconclusive'])}.",
        f"- Against PMET as released (Score): raise it {_names(vs_pmet['ahead'])}; lower it "
        f"{_names(vs_pmet['behind'])}; no measurable effect {_names(flat)}.",
    ]
    if len(pmet):
        r = pmet.iloc[0]
        lines.append(
            f"- Delivery: PMET as released reaches p(o*) {_num(r, 'target_p_target_final_mean')} in its optimised "
            f"state, its update writes a state with {_num(r, 'target_p_written_mean')}; "
            f"{_num(r, 'target_share_delta_at_clamp', '{:.0%}')} of its δ end on their norm bound."
        )
    lines += _explains_most(arms, paired)
    return "\n".join(lines)
