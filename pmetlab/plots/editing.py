"""Figures of one editing run: the optimisation trace of Step 1 and the update norms per layer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .data import ordered, require_columns, summarize_means
from .style import FALLBACK_COLORS, color_for, finish_figure, label_for, new_figure, plot_style

__all__ = ["plot_optimization_trace", "plot_update_norms"]


def plot_optimization_trace(
    trace_df: pd.DataFrame, *, quantities: Sequence[str] | None = None, log_loss: bool = True, title: str | None = None
) -> Figure:
    """Per-step optimisation of the hidden-state deltas (Step 1): loss and p(target).

    Args:
        trace_df: one row per optimisation step with columns ``step`` and the quantities
            (default ``loss`` and ``p_target``; any of ``nll``, ``kl``, ``weight_decay`` may be
            added and asked for with ``quantities``), optionally ``method`` (colour) and
            ``request`` (one line per request). A long form with ``quantity`` and ``value``
            columns is accepted too.
        log_loss: logarithmic y axis for loss-like quantities (all except ``p_target``).

    Returns:
        One panel per quantity, one line per (method, request).
    """
    require_columns(trace_df, ["step"], "plot_optimization_trace")
    df = _wide_trace(trace_df)
    if quantities is None:
        quantities = [q for q in ("loss", "p_target") if q in df.columns]
        if not quantities:
            raise KeyError(
                f"plot_optimization_trace: no 'loss' or 'p_target' column; pass quantities= "
                f"(columns: {list(df.columns)})"
            )
    require_columns(df, list(quantities), "plot_optimization_trace")
    df = df.assign(
        method=df["method"].astype(str) if "method" in df.columns else "",
        request=df["request"].astype(str) if "request" in df.columns else "",
    )
    methods = ordered(df["method"])
    with plot_style():
        fig, axes = new_figure(len(quantities), sharex=True)
        for ax, q in zip(axes, quantities):
            _trace_panel(ax, df, q, methods, log_loss)
        if any(methods):
            axes[-1].legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            fig.suptitle(title)
        return finish_figure(fig)


def _wide_trace(df: pd.DataFrame) -> pd.DataFrame:
    """A long trace (``quantity`` and ``value`` columns) as one column per quantity; a wide one as is."""
    if "quantity" not in df.columns or "value" not in df.columns:
        return df
    idx = [c for c in ("method", "request", "step") if c in df.columns]
    df = df.pivot_table(index=idx, columns="quantity", values="value", aggfunc="mean", observed=True).reset_index()
    df.columns.name = None
    return df


def _trace_panel(ax, df: pd.DataFrame, q: str, methods: list, log_loss: bool) -> None:
    """Quantity ``q`` against the step: one line per (method, request), fainter when there are many."""
    for m in methods:
        dm = df[df["method"] == m]
        requests = ordered(dm["request"])
        alpha = 1.0 if len(requests) == 1 else max(0.25, 1.0 / len(requests) ** 0.5)
        for j, r in enumerate(requests):
            g = dm[dm["request"] == r].sort_values("step")
            ax.plot(
                g["step"].to_numpy(),
                g[q].to_numpy(dtype=float),
                color=color_for(m, methods) if m else FALLBACK_COLORS[j % len(FALLBACK_COLORS)],
                alpha=alpha,
                linewidth=1.2,
                label=(m or None) if j == 0 else None,
            )
    ax.set_xlabel("optimisation step")
    ax.set_ylabel(label_for(q))
    if q == "p_target":
        ax.set_ylim(-0.02, 1.02)
    elif log_loss and (df[q] > 0).all():
        ax.set_yscale("log")


def plot_update_norms(
    df: pd.DataFrame, *, value: str = "norm", methods: Sequence[str] | None = None, title: str | None = None
) -> Figure:
    """Norm of the weight update at each edited layer, per method (grouped bars).

    Args:
        df: tidy rows with columns ``layer``, ``method`` and ``value`` (default ``norm``, e.g.
            ‖ΔW_l‖_F), optionally ``module`` ("FFN"/"MHSA": one panel each). Several rows per
            (module, layer, method) — e.g. one per run — are averaged with a 95% interval.
        methods: methods in legend order (default: order of appearance).

    Returns:
        One panel per module; each holds one bar container per method.
    """
    require_columns(df, ["layer", "method", value], "plot_update_norms")
    d = df.assign(method=df["method"].astype(str), module=df["module"].astype(str) if "module" in df.columns else "")
    s = summarize_means(
        d.drop(columns=[c for c in ("mean",) if c in d.columns]),
        ["module", "layer", "method"],
        "plot_update_norms",
        value=value,
    )
    modules = ordered(s["module"], ("FFN", "MHSA"))
    methods = list(methods) if methods is not None else ordered(s["method"])
    layers = sorted(s["layer"].unique())
    width = 0.8 / max(1, len(methods))
    with plot_style():
        fig, axes = new_figure(len(modules), panel_size=(max(4.2, 0.5 * len(layers) * len(methods) ** 0.5), 3.2))
        for ax, mod in zip(axes, modules):
            sm = s[s["module"] == mod]
            pos = np.arange(len(layers))
            for i, m in enumerate(methods):
                g = sm[sm["method"] == m].set_index("layer").reindex(layers)
                mean = g["mean"].to_numpy(dtype=float)
                err = np.vstack([mean - g["ci_low"].to_numpy(dtype=float), g["ci_high"].to_numpy(dtype=float) - mean])
                err = None if not np.isfinite(err).any() else np.nan_to_num(err, nan=0.0)
                ax.bar(
                    pos + (i - (len(methods) - 1) / 2) * width,
                    mean,
                    width=width * 0.95,
                    yerr=err,
                    capsize=2,
                    color=color_for(m, methods),
                    label=m,
                    error_kw={"linewidth": 1},
                )
            ax.set_xticks(pos, [str(int(l)) for l in layers])
            ax.set_xlabel("layer")
            ax.set_ylabel(label_for(value))
            if mod:
                ax.set_title(f"{mod} update")
        axes[-1].legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            fig.suptitle(title)
        return finish_figure(fig)
