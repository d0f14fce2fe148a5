"""The MHSA-vs-FFN summary: means over prompts with Student-t intervals, per layer, component
and metric."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from .intervals import mean_ci
from .labels import COMPONENTS, label_keys
from .values import component_similarity_values

__all__ = ["summarize_similarity", "component_similarity"]


def summarize_similarity(values: pd.DataFrame, *, confidence: float = 0.95) -> pd.DataFrame:
    """Mean over prompts with a Student-t confidence interval, per layer, component and metric.

    Args:
        values: the output of :func:`component_similarity_values` (columns ``layer``,
            ``component``, ``metric``, ``value``; ``protocol``/``projection`` are kept).

    Returns:
        Tidy DataFrame with columns ``protocol``, ``projection`` (when ``values`` has them),
        ``layer``, ``component``, ``metric``, ``mean``, ``ci_low``, ``ci_high``, ``n`` (prompts).
    """
    missing = {"layer", "component", "metric", "value"} - set(values.columns)
    if missing:
        raise KeyError(
            f"values lacks column(s) {sorted(missing)}; expected the output of "
            f"component_similarity_values (got columns {list(values.columns)})"
        )
    labels = label_keys(values)
    keys = labels + ["layer", "component", "metric"]
    rows = []
    for key, grp in values.groupby(keys, observed=True, sort=True):
        mean, lo, hi = mean_ci(grp["value"].to_numpy(), confidence)
        row = dict(zip(keys, key))
        rows.append({**row, "layer": int(row["layer"]), "mean": mean, "ci_low": lo, "ci_high": hi, "n": len(grp)})
    out = pd.DataFrame(rows, columns=keys + ["mean", "ci_low", "ci_high", "n"])
    comps = [c for c in COMPONENTS if c in set(out["component"])] + sorted(set(out["component"]) - set(COMPONENTS))
    out["component"] = pd.Categorical(out["component"].astype(str), categories=comps)
    out["metric"] = out["metric"].astype(str)
    return out.sort_values(labels + ["metric", "component", "layer"], ignore_index=True)


def component_similarity(
    model: torch.nn.Module,
    tok,
    prompts: Sequence[str],
    *,
    protocol: str = "paper",
    projection: str | None = None,
    top_k: int = 50,
    batch_size: int = 16,
    confidence: float = 0.95,
    progress: bool = True,
) -> pd.DataFrame:
    """The MHSA-vs-FFN study (method.md §5): similarity of each component's input and output
    per layer, averaged over prompts.

    Equivalent to ``summarize_similarity(component_similarity_values(...))``; use those two for
    the per-prompt values. ``protocol``/``projection`` as in :func:`component_similarity_values`
    (default: the paper's protocol, Jaccard over the input embeddings).

    Returns:
        Tidy DataFrame with columns ``protocol``, ``projection``, ``layer`` (0-based),
        ``component`` ("MHSA", "FFN"), ``metric`` ("cosine", "jaccard"), ``mean``, ``ci_low``,
        ``ci_high`` (Student-t interval at ``confidence``), ``n`` (prompts); ``2 · 2 · n_layers`` rows.
    """
    values = component_similarity_values(
        model,
        tok,
        prompts,
        protocol=protocol,
        projection=projection,
        top_k=top_k,
        batch_size=batch_size,
        progress=progress,
    )
    return summarize_similarity(values, confidence=confidence)
