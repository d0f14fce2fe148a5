"""The early / middle / late thirds of the layers and the by-depth table."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .labels import COMPONENTS, label_keys

__all__ = ["DEPTHS", "depth_thirds", "similarity_by_depth"]

#: Labels of the three equal-width layer bins used by :func:`similarity_by_depth` and the reading.
DEPTHS: tuple[str, ...] = ("early", "middle", "late")


def depth_thirds(layers: pd.Series) -> pd.Series:
    """ "early" / "middle" / "late" per row: three equal-width bins of the layer index
    (``pd.cut(layers, 3)``; 30 layers: 0–9, 10–19, 20–29; 18 layers: 0–5, 6–11, 12–17)."""
    return pd.cut(layers, 3, labels=list(DEPTHS)).astype(str)


def check_summary(summary: pd.DataFrame, what: str, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in summary.columns]
    if missing:
        raise KeyError(
            f"{what}: summary lacks column(s) {missing}; expected the output of "
            f"component_similarity / summarize_similarity (got {list(summary.columns)})"
        )
    if summary["layer"].nunique() < 3:
        raise ValueError(f"{what}: needs at least 3 layers to split into thirds, got {summary['layer'].nunique()}")


def similarity_by_depth(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean of the per-layer means over the early, middle and late thirds of the layers.

    Args:
        summary: one or more outputs of :func:`component_similarity` (concatenated; the
            ``protocol``/``projection`` columns keep them apart).

    Returns:
        Tidy DataFrame with columns ``protocol``, ``projection`` (when present), ``metric``,
        ``component``, ``early``, ``middle``, ``late``.
    """
    check_summary(summary, "similarity_by_depth", ["layer", "component", "metric", "mean"])
    keys = label_keys(summary) + ["metric", "component"]
    s = summary.assign(depth=depth_thirds(summary["layer"]), component=summary["component"].astype(str))
    wide = s.pivot_table(index=keys, columns="depth", values="mean", observed=True).reset_index()
    wide.columns.name = None
    wide["component"] = pd.Categorical(wide["component"], categories=list(COMPONENTS))
    return wide[keys + [d for d in DEPTHS if d in wide.columns]].sort_values(keys, ignore_index=True)
