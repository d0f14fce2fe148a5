"""Reliability and specificity against the number of edits, and ablation bars."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .data import HEADLINE, default_metrics, long_metrics, ordered, require_columns, summarize_means
from .style import band, color_for, finish_figure, label_for, new_figure, plot_style

__all__ = ["plot_tradeoff", "plot_ablation"]

_RELIABILITY = {
    "efficacy",
    "paraphrase",
    "es",
    "ps",
    "efficacy_score",
    "paraphrase_score",
    "generalization",
    "generalisation",
    "reliability",
}
_SPECIFICITY = {"neighborhood", "ns", "neighborhood_score", "specificity", "locality"}


def plot_tradeoff(
    summary_df: pd.DataFrame,
    x: str = "n_edits",
    methods: Sequence[str] | None = None,
    *,
    metrics: Sequence[str] | None = None,
    baseline: str = "unedited",
    log_x: bool | None = None,
    title: str | None = None,
) -> Figure:
    """Reliability and specificity against the number of edits, one line per method.

    Args:
        summary_df: tidy rows with columns ``method``, ``x`` (e.g. ``n_edits``), ``metric``
            (e.g. "efficacy", "paraphrase", "neighborhood") and ``mean`` (optional ``ci_low``,
            ``ci_high``), or raw ``value`` per record; or the wide output of
            ``pmetlab.evaluation.summary.summarize(df, by=("method", "n_edits"))`` (columns
            ``efficacy_score``, ``efficacy_score_ci_low``, ...). Rows whose method is ``baseline``
            are the unedited model: drawn as a dashed grey line (horizontal when it has one x).
        methods: methods to draw, in legend order (default: all but the baseline).
        metrics: panels, in order (default: the efficacy/paraphrase/neighborhood metrics
            present, else all).
        log_x: logarithmic x axis (default: when x spans a factor of 10 or more).

    Returns:
        One panel per metric (titled as reliability or specificity), one line per method.
    """
    s = _tradeoff_summary(summary_df, x)
    metrics = list(metrics) if metrics is not None else default_metrics(s["metric"], HEADLINE)
    methods = _tradeoff_methods(ordered(s["method"]), methods, baseline)
    if log_x is None:  # the baseline is often recorded at x = 0; it does not decide the scale
        log_x = _spans_a_decade(s.loc[s["method"].isin(methods), x])
    with plot_style():
        fig, axes = new_figure(len(metrics), sharex=True)
        for ax, metric in zip(axes, metrics):
            _tradeoff_panel(ax, s[s["metric"] == metric], metric, x=x, methods=methods, baseline=baseline, log_x=log_x)
        axes[-1].legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            fig.suptitle(title)
        return finish_figure(fig)


def _tradeoff_summary(summary_df: pd.DataFrame, x: str) -> pd.DataFrame:
    """``method``, ``x``, ``metric``, ``mean``, ``ci_low``, ``ci_high`` rows, names as strings."""
    require_columns(summary_df, ["method", x], "plot_tradeoff")
    s = summarize_means(
        long_metrics(summary_df, ["method", x], "plot_tradeoff"), ["method", x, "metric"], "plot_tradeoff"
    )
    return s.assign(method=s["method"].astype(str), metric=s["metric"].astype(str))


def _tradeoff_methods(present: list, methods: Sequence[str] | None, baseline: str) -> Sequence[str]:
    """The methods drawn as lines: all present but the baseline, or the ones asked for (checked)."""
    if methods is None:
        return [m for m in present if m != baseline]
    unknown = [m for m in methods if m not in present]
    if unknown:
        raise ValueError(f"plot_tradeoff: method(s) {unknown} not in the data; present: {present}")
    return methods


def _spans_a_decade(xs: pd.Series) -> bool:
    """Whether the x values are all positive and span a factor of 10 or more (then a log axis)."""
    xs = pd.to_numeric(xs, errors="coerce")
    return bool(len(xs)) and bool((xs > 0).all()) and bool(xs.max() / xs.min() >= 10)


def _tradeoff_panel(
    ax, sm: pd.DataFrame, metric: str, *, x: str, methods: Sequence[str], baseline: str, log_x: bool
) -> None:
    """One metric's panel: a line with its interval band per method, then the baseline."""
    for m in methods:
        g = sm[sm["method"] == m].sort_values(x)
        if not g.empty:
            band(
                ax,
                g[x].to_numpy(),
                g["mean"],
                g["ci_low"],
                g["ci_high"],
                color_for(m, methods),
                m,
                marker="o",
                markersize=4,
            )
    _baseline_line(ax, sm[sm["method"] == baseline].sort_values(x), x, baseline)
    ax.set_title(_tradeoff_title(metric))
    ax.set_xlabel(label_for(x))
    ax.set_ylabel(label_for(metric))
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _baseline_line(ax, b: pd.DataFrame, x: str, baseline: str) -> None:
    """The unedited model as a dashed line: horizontal when it was measured at one x only."""
    if len(b) == 1:
        ax.axhline(float(b["mean"].iloc[0]), color=color_for(baseline), linestyle="--", linewidth=1.2, label=baseline)
    elif len(b) > 1:
        ax.plot(b[x].to_numpy(), b["mean"], color=color_for(baseline), linestyle="--", linewidth=1.2, label=baseline)


def _tradeoff_title(metric: str) -> str:
    """The metric's label, with "(reliability)" or "(specificity)" when it is one of those."""
    kind = (
        "reliability" if metric.lower() in _RELIABILITY else "specificity" if metric.lower() in _SPECIFICITY else None
    )
    return f"{label_for(metric)} ({kind})" if kind else label_for(metric)


def plot_ablation(
    df: pd.DataFrame,
    *,
    variants: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Grouped bars with confidence intervals: one group per metric, one bar per ablation variant.

    Args:
        df: tidy rows with columns ``variant`` (e.g. "PMET", "w/o δ^a", "even spread",
            "update MHSA"), ``metric`` and ``mean`` (optional ``ci_low``/``ci_high``), or raw
            ``value`` per record; or the wide output of ``summarize(df, by=("variant",))``.
        variants / metrics: which to draw and in which order (default: variants in order of
            appearance; the efficacy/paraphrase/neighborhood metrics present, else all).

    Returns:
        One panel; ``ax.containers`` holds one bar container per variant.
    """
    require_columns(df, ["variant"], "plot_ablation")
    s = summarize_means(long_metrics(df, ["variant"], "plot_ablation"), ["variant", "metric"], "plot_ablation")
    s = s.assign(variant=s["variant"].astype(str), metric=s["metric"].astype(str))
    variants = list(variants) if variants is not None else ordered(s["variant"])
    metrics = list(metrics) if metrics is not None else default_metrics(s["metric"], HEADLINE)
    width = 0.8 / max(1, len(variants))
    with plot_style():
        fig, (ax,) = new_figure(1, panel_size=(max(4.5, 1.2 * len(metrics) * max(1, len(variants)) ** 0.5), 3.4))
        pos = np.arange(len(metrics))
        for i, v in enumerate(variants):
            g = s[s["variant"] == v].set_index("metric").reindex(metrics)
            mean = g["mean"].to_numpy(dtype=float)
            lo, hi = g["ci_low"].to_numpy(dtype=float), g["ci_high"].to_numpy(dtype=float)
            err = np.vstack([mean - lo, hi - mean])
            err = None if not np.isfinite(err).any() else np.nan_to_num(err, nan=0.0)
            ax.bar(
                pos + (i - (len(variants) - 1) / 2) * width,
                mean,
                width=width * 0.95,
                yerr=err,
                capsize=3,
                color=color_for(v, variants),
                label=v,
                error_kw={"linewidth": 1},
            )
        ax.set_xticks(pos, [label_for(m) for m in metrics])
        ax.set_ylabel("score")
        ax.legend(title="variant", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            ax.set_title(title)
        return finish_figure(fig)
