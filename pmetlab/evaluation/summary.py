"""Summaries of per-record metrics: means with 95% confidence intervals, the CounterFact Score,
and specificity relative to the unedited model.

Every known metric column is reported ×100 (fractions become percentages; the fluency entropy in
bits becomes ROME's "GE" scale, e.g. 622 for 6.22 bits; the consistency cosine becomes "RS").
Score S = harmonic mean of the mean efficacy, paraphrase and neighborhood scores, ×100
(method.md §6).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np
import pandas as pd

__all__ = ["summarize", "harmonic_mean", "relative_specificity", "SUMMARY_METRICS"]

SUMMARY_METRICS = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "efficacy_magnitude",
    "paraphrase_magnitude",
    "neighborhood_magnitude",
    "efficacy_token_acc",
    "paraphrase_token_acc",
    "neighborhood_token_acc",
    "relative_specificity",
    "fluency",
    "consistency",
)
_SCALE = 100.0
_SCORE_PARTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0 if any is 0, NaN if any is NaN or the input is empty."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.isnan(v).any():
        return float("nan")
    if (v < 0).any():
        raise ValueError(f"the harmonic mean needs non-negative values, got {v.tolist()}")
    if (v == 0).any():
        return 0.0
    return float(v.size / np.sum(1.0 / v))


def _boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, d) column means of ``n_boot`` resamples (with replacement) of the rows of ``x`` (n, d),
    drawn in chunks so memory stays about 2**22 indices."""
    n = x.shape[0]
    chunk = max(1, (1 << 22) // n)
    out = []
    for a in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - a), n))
        out.append(x[idx].mean(axis=1))
    return np.concatenate(out, axis=0)


def _mean_ci(x: np.ndarray, ci: str, level: float, n_boot: int, rng: np.random.Generator) -> tuple[float, float, float]:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if x.size < 2:
        return m, float("nan"), float("nan")
    if ci == "normal":
        half = NormalDist().inv_cdf(0.5 + level / 2) * float(x.std(ddof=1)) / np.sqrt(x.size)
        lo, hi = m - half, m + half
        if x.min() >= 0 and x.max() <= 1:  # a rate: its mean cannot leave [0, 1]
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        return m, lo, hi
    means = _boot_means(x[:, None], n_boot, rng)[:, 0]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return m, float(lo), float(hi)


def _score_ci(parts: np.ndarray, level: float, n_boot: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """parts: (n_records, 3) ES, PS, NS per record. Bootstrap over records of the Score."""
    parts = parts[~np.isnan(parts).any(axis=1)]
    if parts.shape[0] == 0:
        return float("nan"), float("nan"), float("nan")
    s = harmonic_mean(parts.mean(axis=0))
    if parts.shape[0] < 2:
        return s, float("nan"), float("nan")
    boot = np.array([harmonic_mean(m) for m in _boot_means(parts, n_boot, rng)])
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return s, float(lo), float(hi)


def summarize(
    df: pd.DataFrame,
    by: Sequence[str] = ("phase",),
    *,
    ci: Literal["normal", "bootstrap"] = "normal",
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Means over records with confidence intervals, one row per group of ``by``.

    Args:
        df: per-record metrics (from :func:`evaluate_counterfact` / :func:`evaluate_zsre`, possibly
            concatenated over phases and merged with :func:`relative_specificity`).
        by: grouping columns; pass ``()`` to summarise all rows together.
        ci: "normal" (mean ± z·s/√n) or "bootstrap" (percentile, ``n_boot`` resamples of the records
            with ``numpy.random.default_rng(seed)``). The Score's interval is always a seeded bootstrap.
        level: confidence level.

    Returns:
        DataFrame with the ``by`` columns, ``n_records``, ``score`` (when ES, PS and NS are present)
        and for each metric present ``<metric>``, ``<metric>_ci_low``, ``<metric>_ci_high``, all ×100.
        A metric that is NaN for every record (e.g. consistency without reference files) stays NaN.
    """
    by = list(by)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise KeyError(
            f"summarize: grouping column(s) {missing} not in the DataFrame (columns: "
            f"{list(df.columns)}); add them (e.g. df['phase'] = 'post') or pass by=()"
        )
    if ci not in ("normal", "bootstrap"):
        raise ValueError(f"ci must be 'normal' or 'bootstrap', got {ci!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    metrics = [c for c in SUMMARY_METRICS if c in df.columns]
    has_score = all(c in df.columns for c in _SCORE_PARTS)
    groups = df.groupby(by, sort=False, dropna=False) if by else [((), df)]
    out = []
    for key, g in groups:
        rng = np.random.default_rng(seed)
        row: dict = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row["n_records"] = len(g)
        if has_score:
            s, lo, hi = _score_ci(g[list(_SCORE_PARTS)].to_numpy(dtype=np.float64), level, n_boot, rng)
            row.update(score=s * _SCALE, score_ci_low=lo * _SCALE, score_ci_high=hi * _SCALE)
        for c in metrics:
            m, lo, hi = _mean_ci(
                pd.to_numeric(g[c], errors="coerce").to_numpy(dtype=np.float64), ci, level, n_boot, rng
            )
            row.update({c: m * _SCALE, f"{c}_ci_low": lo * _SCALE, f"{c}_ci_high": hi * _SCALE})
        out.append(row)
    return pd.DataFrame(out)


def relative_specificity(pre_df: pd.DataFrame, post_df: pd.DataFrame) -> pd.DataFrame:
    """Per record, the fraction of neighborhood prompts (CounterFact) or NQ answer tokens (zsRE)
    on which the edited model behaves as the unedited one did.

    CounterFact compares ``neighborhood_prefers_true`` (which of o^c, o* has the lower NLL) and
    zsRE ``neighborhood_pred`` (the top-1 tokens), record by record, matched on ``case_id``.

    Returns:
        DataFrame with ``case_id`` and ``relative_specificity`` in [0, 1], in ``post_df``'s order.
    """
    col = next(
        (c for c in ("neighborhood_prefers_true", "neighborhood_pred") if c in pre_df.columns and c in post_df.columns),
        None,
    )
    if col is None:
        raise KeyError(
            "relative_specificity needs 'neighborhood_prefers_true' (CounterFact) or "
            "'neighborhood_pred' (zsRE) in both DataFrames, as evaluate_counterfact / "
            f"evaluate_zsre return them; got {list(pre_df.columns)} and {list(post_df.columns)}"
        )
    for name, d in (("pre_df", pre_df), ("post_df", post_df)):
        if d["case_id"].duplicated().any():
            raise ValueError(f"{name} has duplicate case_ids; pass one phase per DataFrame")
    pre = dict(zip(pre_df["case_id"], pre_df[col]))
    missing = [c for c in post_df["case_id"] if c not in pre]
    if missing:
        raise KeyError(f"case_ids {missing[:10]} of post_df are not in pre_df")
    vals = []
    for cid, post in zip(post_df["case_id"], post_df[col]):
        a, b = tuple(pre[cid]), tuple(post)
        if len(a) != len(b):
            raise ValueError(f"case_id {cid}: {len(a)} neighborhood entries before the edit, {len(b)} after")
        vals.append(float(np.mean([x == y for x, y in zip(a, b)])) if a else float("nan"))
    return pd.DataFrame({"case_id": list(post_df["case_id"]), "relative_specificity": vals})
