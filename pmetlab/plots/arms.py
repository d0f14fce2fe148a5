"""The paired sweep at a glance (issue #21): each arm's paired difference against a baseline, and what
its update delivers of its optimised target."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .data import require_columns
from .style import color_for, finish_figure, label_for, new_figure, plot_style

__all__ = ["plot_arms"]

_METRICS = ("score", "efficacy_score", "paraphrase_score", "neighborhood_score")


def plot_arms(
    paired: pd.DataFrame,
    arms: pd.DataFrame,
    *,
    baseline: str = "memit",
    metrics: Sequence[str] = _METRICS,
    title: str | None = None,
) -> Figure:
    """Left: per arm (rows) and metric (markers), the paired difference arm − ``baseline`` with its
    interval (:func:`pmetlab.evaluation.paired_table` rows: ``arm``, ``baseline``, ``metric``,
    ``diff``, ``ci_low``, ``ci_high``); a dashed line at 0. Right: per arm, mean p(o*) in the optimised
    state and with only what the update writes (``arms`` rows: ``arm``, ``target_p_target_final_mean``,
    ``target_p_written_mean``)."""
    require_columns(paired, ["arm", "baseline", "metric", "diff", "ci_low", "ci_high"], "plot_arms")
    require_columns(arms, ["arm", "target_p_target_final_mean", "target_p_written_mean"], "plot_arms")
    rows = paired[(paired["baseline"] == baseline) & paired["metric"].isin(metrics)]
    order = list(dict.fromkeys(rows["arm"]))
    with plot_style():
        fig, (ax, bx) = new_figure(2, panel_size=(5.2, 0.45 * max(4, len(order)) + 1.2))
        _differences(ax, rows, order, list(metrics))
        ax.set_title(f"paired difference vs {baseline}")
        _delivery(bx, arms, order + [baseline])
        if title:
            fig.suptitle(title)
        return finish_figure(fig)


def _differences(ax, rows: pd.DataFrame, order: list[str], metrics: list[str]) -> None:
    step = 0.8 / max(1, len(metrics))
    for j, metric in enumerate(metrics):
        g = rows[rows["metric"] == metric].set_index("arm").reindex(order)
        y = np.arange(len(order)) + (j - (len(metrics) - 1) / 2) * step
        d = g["diff"].to_numpy(dtype=float)
        err = np.vstack([d - g["ci_low"].to_numpy(dtype=float), g["ci_high"].to_numpy(dtype=float) - d])
        ax.errorbar(d, y, xerr=err, fmt="o", markersize=4, capsize=2, color=color_for(metric, metrics))
        ax.plot([], [], "o", color=color_for(metric, metrics), label=label_for(metric))
    ax.axvline(0.0, color="0.4", linestyle="--", linewidth=1)
    ax.set_yticks(np.arange(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel("difference (points, 95% paired bootstrap)")
    ax.legend(loc="lower right", fontsize="small")


def _delivery(ax, arms: pd.DataFrame, order: list[str]) -> None:
    g = arms.drop_duplicates("arm").set_index("arm").reindex([a for a in order if a in set(arms["arm"])])
    y = np.arange(len(g))
    ax.barh(y - 0.2, g["target_p_target_final_mean"].to_numpy(dtype=float), height=0.4, label="optimised", color="0.6")
    ax.barh(y + 0.2, g["target_p_written_mean"].to_numpy(dtype=float), height=0.4, label="written", color="C0")
    ax.set_yticks(y, list(g.index))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("mean p(o*) at the optimisation's prompts")
    ax.set_title("what the update delivers")
    ax.legend(loc="lower right", fontsize="small")
