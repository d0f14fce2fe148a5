"""The tuning grid: each method's score over λ × v_lr, the chosen point marked."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .data import ordered, require_columns
from .style import finish_figure, label_for, new_figure, plot_style

__all__ = ["plot_tuning_grid"]


def plot_tuning_grid(table: pd.DataFrame, *, value: str = "tuning_score", title: str | None = None) -> Figure:
    """One heat map per method of ``value`` over ``mom2_update_weight`` (rows) × ``v_lr``
    (columns), each cell annotated, the method's chosen point (``selected``) outlined.

    Args:
        table: :attr:`pmetlab.runs.tune.TuningResult.table` (rows of method "unedited" are left out).
    """
    require_columns(table, ["method", "mom2_update_weight", "v_lr", value, "selected"], "plot_tuning_grid")
    t = table[table["method"] != "unedited"]
    methods = ordered(t["method"].astype(str).unique(), ("pmet", "memit"))
    lo, hi = float(np.nanmin(t[value])), float(np.nanmax(t[value]))
    with plot_style():
        fig, axes = new_figure(len(methods), panel_size=(3.8, 3.2))
        for ax, m in zip(axes, methods):
            g = t[t["method"] == m].pivot_table(index="mom2_update_weight", columns="v_lr", values=value)
            im = ax.imshow(g.to_numpy(), cmap="viridis", vmin=lo, vmax=hi, origin="lower", aspect="auto")
            _annotate(ax, g)
            _mark_chosen(ax, t[(t["method"] == m) & t["selected"].astype(bool)], g)
            ax.set_xticks(range(len(g.columns)), [f"{v:g}" for v in g.columns])
            ax.set_yticks(range(len(g.index)), [f"{v:g}" for v in g.index])
            ax.set_xlabel("v_lr")
            ax.set_ylabel("λ (mom2_update_weight)")
            ax.set_title(label_for(m))
            ax.grid(False)
        fig.colorbar(im, ax=axes, label=label_for(value) if value != "tuning_score" else "Score (tuning records)")
        if title:
            fig.suptitle(title)
        return finish_figure(fig)


def _annotate(ax, grid: pd.DataFrame) -> None:
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white", fontsize=9)


def _mark_chosen(ax, chosen: pd.DataFrame, grid: pd.DataFrame) -> None:
    from matplotlib.patches import Rectangle

    for r in chosen.to_dict("records"):
        i = list(grid.index).index(r["mom2_update_weight"])
        j = list(grid.columns).index(r["v_lr"])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
