"""Input/output similarity of MHSA and FFN against layer depth (method.md §5)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..analysis import COMPONENTS
from .data import ordered, require_columns, summarize_means
from .style import band, color_for, finish_figure, label_for, new_figure, plot_style

__all__ = ["plot_similarity"]


def _similarity_title(metric: str, projection: str | None) -> str:
    head = label_for(metric).split(" (")[0]
    if metric == "jaccard" and projection:
        return f"{head} ({projection.replace('_', ' ')})"
    return head


def plot_similarity(
    df: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    components: Sequence[str] | None = None,
    title: str | None = None,
    chance: float | None = None,
) -> Figure:
    """Input/output similarity of each component against layer depth (method.md §5).

    Args:
        df: the output of :func:`pmetlab.analysis.component_similarity`: columns ``layer``,
            ``component``, ``metric``, ``mean``, and optionally ``ci_low``/``ci_high`` (drawn as
            a band); or per-prompt values (``value`` instead of ``mean``). When it has
            ``protocol``/``projection`` columns they must hold one value each; the Jaccard panel's
            title names the projection.
        metrics / components: which to draw and in which order (default: all present).
        chance: the Jaccard's chance level (:func:`pmetlab.analysis.jaccard_chance`), drawn as a
            dotted line on the Jaccard panel.

    Returns:
        One panel per metric, one line (with its CI band) per component.
    """
    require_columns(df, ["layer", "component", "metric"], "plot_similarity")
    how = {}
    for col in ("protocol", "projection"):
        if col in df.columns:
            if df[col].nunique() > 1:
                raise ValueError(
                    f"plot_similarity: the data mixes {col}s {sorted(df[col].unique())}; "
                    f"plot one at a time, e.g. df[df[{col!r}] == {df[col].iloc[0]!r}]"
                )
            how[col] = str(df[col].iloc[0])
    s = summarize_means(df, ["layer", "component", "metric"], "plot_similarity")
    s = s.assign(component=s["component"].astype(str), metric=s["metric"].astype(str))
    metrics = list(metrics) if metrics is not None else ordered(s["metric"], ("cosine", "jaccard"))
    comps = list(components) if components is not None else ordered(s["component"], COMPONENTS)
    with plot_style():
        fig, axes = new_figure(len(metrics), sharex=True)
        for ax, metric in zip(axes, metrics):
            for comp in comps:
                g = s[(s["metric"] == metric) & (s["component"] == comp)].sort_values("layer")
                if g.empty:
                    continue
                band(
                    ax,
                    g["layer"].to_numpy(),
                    g["mean"],
                    g["ci_low"],
                    g["ci_high"],
                    color_for(comp, comps),
                    comp,
                    marker="o",
                    markersize=3,
                )
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "2.5" layers
            ax.set_ylabel(label_for(metric))
            ax.set_title(_similarity_title(metric, how.get("projection")))
            if metric == "jaccard" and chance is not None:
                ax.axhline(chance, color="0.3", linestyle=":", linewidth=1.2, label=f"chance ({chance:.1e})")
                ax.legend(loc="best", fontsize="small")
        axes[0].legend(title="component")
        if title:
            fig.suptitle(title)
        return finish_figure(fig)
