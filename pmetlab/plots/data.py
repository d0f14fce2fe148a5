"""Reading the tidy (or wide) DataFrames the ``plot_*`` functions accept into means and intervals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..analysis import mean_ci

__all__ = ["require_columns", "summarize_means", "ordered", "HEADLINE", "long_metrics", "default_metrics"]


def require_columns(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} needs a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise KeyError(f"{what}: DataFrame lacks column(s) {missing}; it has {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{what}: the DataFrame is empty")


def summarize_means(df: pd.DataFrame, keys: Sequence[str], what: str, value: str = "value") -> pd.DataFrame:
    """Return ``keys + [mean, ci_low, ci_high]``: as given when ``mean`` is present (intervals
    NaN when absent), else averaged from ``value`` per group with a Student-t 95% interval."""
    if "mean" in df.columns:
        out = df.copy()
        for c in ("ci_low", "ci_high"):
            if c not in out.columns:
                out[c] = np.nan
        dup = out.duplicated(list(keys))
        if dup.any():
            raise ValueError(
                f"{what}: several rows share the same {list(keys)} "
                f"(e.g. {out.loc[dup, list(keys)].iloc[0].to_dict()}); pass one summary "
                f"row per group, or raw values in a 'value' column"
            )
        return out
    if value not in df.columns:
        raise KeyError(
            f"{what}: expected a 'mean' column (a summary) or a {value!r} column (raw values); got {list(df.columns)}"
        )
    rows = []
    for k, grp in df.groupby(list(keys), sort=False, observed=True, dropna=False):
        k = k if isinstance(k, tuple) else (k,)
        m, lo, hi = mean_ci(grp[value].to_numpy())
        rows.append(dict(zip(keys, k), mean=m, ci_low=lo, ci_high=hi, n=len(grp)))
    return pd.DataFrame(rows)


def ordered(values: Sequence[object], preferred: Sequence[object] = ()) -> list:
    seen = list(dict.fromkeys(values))
    return [p for p in preferred if p in seen] + [v for v in seen if v not in preferred]


#: Metrics drawn by default by plot_tradeoff / plot_ablation when present (others on request).
HEADLINE = ("efficacy", "paraphrase", "neighborhood", "efficacy_score", "paraphrase_score", "neighborhood_score")


def long_metrics(df: pd.DataFrame, id_cols: Sequence[str], what: str) -> pd.DataFrame:
    """Accept a wide summary (``<metric>``, ``<metric>_ci_low``, ``<metric>_ci_high`` columns, as
    :func:`pmetlab.evaluation.summary.summarize` writes it) and return the tidy long form with
    ``metric``, ``mean``, ``ci_low``, ``ci_high``; a frame that has a ``metric`` column is returned as is."""
    if "metric" in df.columns:
        return df
    metrics = [c[: -len("_ci_low")] for c in df.columns if c.endswith("_ci_low") and c[: -len("_ci_low")] in df.columns]
    if not metrics:
        raise KeyError(
            f"{what}: expected a tidy frame with a 'metric' column, or a wide summary with "
            f"'<metric>' and '<metric>_ci_low'/'<metric>_ci_high' columns; got {list(df.columns)}"
        )
    parts = []
    for m in metrics:
        cols = {m: "mean", f"{m}_ci_low": "ci_low", f"{m}_ci_high": "ci_high"}
        part = df[list(id_cols) + [c for c in cols if c in df.columns]].rename(columns=cols)
        parts.append(part.assign(metric=m))
    return pd.concat(parts, ignore_index=True)


def default_metrics(present: Sequence[str], preferred: Sequence[str]) -> list:
    headline = [m for m in HEADLINE if m in set(present)]
    return ordered(present, preferred) if not headline else [m for m in ordered(present, preferred) if m in headline]
