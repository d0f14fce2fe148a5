"""Causal traces (ROME §2.1): per-fact heatmaps and the averaged indirect effect by layer."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .data import require_columns
from .style import band, color_for, finish_figure, new_figure, plot_style

__all__ = ["plot_trace_heatmaps", "plot_trace_curves"]

_KIND_LABELS = {"hidden": "whole layer state h^l", "mlp": "MLP output (window)", "attn": "attention output (window)"}
_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_COLORS = {"hidden": "#6a3d9a", "mlp": "#238b45", "attn": "#cb181d"}  # ROME's colours per kind


def plot_trace_heatmaps(trace, *, title: str | None = None) -> Figure:
    """One heatmap per restored kind: IE of restoring (layer, token) on one fact, tokens as rows
    (the subject's tokens marked with *), as in ROME's Figure 1.

    Args:
        trace: a :class:`pmetlab.locate.CausalTrace` traced with ``positions="all"``.
    """
    kinds = list(trace.ie)
    s0, s1 = trace.subject_range
    labels = [f"{t.strip() or repr(t)}{'*' if s0 <= i < s1 else ''}" for i, t in enumerate(trace.tokens)]
    with plot_style():
        fig, axes = new_figure(len(kinds), sharex=False)
        for ax, kind in zip(np.atleast_1d(axes), kinds):
            ie = trace.ie[kind].float().numpy().T  # (n_tokens, n_layers)
            im = ax.imshow(ie, aspect="auto", cmap=_CMAPS.get(kind, "Blues"), vmin=0, interpolation="nearest")
            ax.set_yticks(range(len(labels)), labels)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
            ax.grid(False)
            ax.set_title(_KIND_LABELS.get(kind, kind))
            fig.colorbar(im, ax=ax, label="indirect effect")
        fig.suptitle(
            title
            or f"{trace.prompt!r} → {trace.target!r} (p {trace.p_clean:.2f} clean, {trace.p_corrupted:.2f} corrupted)"
        )
        return finish_figure(fig)


def plot_trace_curves(summary: pd.DataFrame, *, token_role: str = "last_subject", title: str | None = None) -> Figure:
    """Mean indirect effect (95% interval) against layer at one token role, one line per kind.

    Args:
        summary: :func:`pmetlab.locate.summarize_traces` output (kind, token_role, layer, mean,
            ci_low, ci_high).
    """
    require_columns(summary, ["kind", "token_role", "layer", "mean", "ci_low", "ci_high"], "plot_trace_curves")
    sel = summary[summary["token_role"].astype(str) == token_role]
    if sel.empty:
        raise ValueError(f"plot_trace_curves: no rows for token_role={token_role!r}")
    kinds = [k for k in ("hidden", "mlp", "attn") if k in set(sel["kind"].astype(str))]
    with plot_style():
        fig, axes = new_figure(1)
        ax = np.atleast_1d(axes)[0]
        for kind in kinds:
            g = sel[sel["kind"].astype(str) == kind].sort_values("layer")
            color = _COLORS.get(kind) or color_for(kind, kinds)
            band(ax, g["layer"], g["mean"], g["ci_low"], g["ci_high"], color, _KIND_LABELS[kind])
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("layer (window centre for MLP / attention)")
        ax.set_ylabel(f"indirect effect at {token_role.replace('_', ' ')}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(frameon=False)
        n = int(sel["n"].max()) if "n" in sel else None
        ax.set_title(title or (f"average over {n} facts" if n else ""))
        return finish_figure(fig)
