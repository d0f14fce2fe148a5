"""Summaries of per-record metrics: means with 95% confidence intervals, the CounterFact Score,
and specificity relative to the unedited model.

Every known metric column is reported ×100 (fractions become percentages; the fluency entropy in
bits becomes ROME's "GE" scale, e.g. 622 for 6.22 bits; the consistency cosine becomes "RS").
Score S = harmonic mean of the mean efficacy, paraphrase and neighborhood scores, ×100
(method.md §6).

Intervals (method.md §10). The default, ``ci="wilson"``, gives every *rate* (a per-record metric in
[0, 1]: ES, PS, NS, the zsRE token accuracies, relative specificity; :data:`RATE_METRICS`) the
Wilson score interval of its per-record mean p with n = the number of records. A per-record value in
[0, 1] with mean p has variance at most p(1 − p), reached by a Bernoulli, so the Wilson interval is
exact in form for the binary ES and conservative for per-record fractions such as PS and NS; unlike
a normal (Wald) interval or a percentile bootstrap it never has zero width at 0% or 100%. The other
metrics (magnitudes EM/PM/NM, which can be negative; fluency; consistency) get a seeded percentile
bootstrap over records. The Score keeps its seeded bootstrap over records; where every resample
gives the same Score (always so at 0 and 100), its interval is widened to the Wilson interval of
its weakest part (the part with the lowest mean), so it never has zero width at a bound either.
The summary's ``ci_method`` column names the method used.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np
import pandas as pd

__all__ = [
    "summarize",
    "harmonic_mean",
    "relative_specificity",
    "wilson_interval",
    "wilson_from_summary",
    "SUMMARY_METRICS",
    "RATE_METRICS",
    "WILSON_RULE",
]

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
#: Per-record metrics in [0, 1]: their intervals are Wilson intervals under ``ci="wilson"``.
RATE_METRICS = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "efficacy_token_acc",
    "paraphrase_token_acc",
    "neighborhood_token_acc",
    "relative_specificity",
)
#: How a reading describes the intervals of a ``ci="wilson"`` summary.
WILSON_RULE = (
    "95% Wilson intervals of each rate's per-record mean (n = records; exact in form for ES, "
    "conservative for per-record fractions such as PS and NS)"
)
_SCALE = 100.0
_SCORE_PARTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")
_ZSRE_PARTS = ("efficacy_token_acc", "paraphrase_token_acc", "neighborhood_token_acc")


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


def wilson_interval(p, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion (or of the mean of per-record values in [0, 1]).

    ``center = (p + z²/2n) / (1 + z²/n)``, ``half = z / (1 + z²/n) · sqrt(p(1 − p)/n + z²/4n²)`` with
    z the normal quantile of ``(1 + level) / 2``. ``p`` and ``n`` broadcast (scalars or arrays); p in
    [0, 1] (not ×100). Where n < 2 or p is NaN the bounds are NaN (a single record has no interval).

    Returns:
        ``(low, high)`` arrays of p's shape, in [0, 1], of positive width for every n ≥ 2.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    p = np.asarray(p, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"wilson_interval needs p in [0, 1] (a rate, not ×100), got {p}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    ok = (n >= 2) & ~np.isnan(p)
    m = np.where(ok, n, 2.0)
    denom = 1 + z * z / m
    center = (p + z * z / (2 * m)) / denom
    half = z / denom * np.sqrt(np.clip(p * (1 - p), 0, None) / m + z * z / (4 * m * m))
    lo = np.where(ok, np.clip(center - half, 0.0, 1.0), np.nan)
    hi = np.where(ok, np.clip(center + half, 0.0, 1.0), np.nan)
    return lo, hi


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


def _mean_ci(
    x: np.ndarray, ci: str, level: float, n_boot: int, rng: np.random.Generator, rate: bool
) -> tuple[float, float, float]:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if x.size < 2:
        return m, float("nan"), float("nan")
    if ci == "wilson" and rate and x.min() >= 0 and x.max() <= 1:
        lo, hi = wilson_interval(m, x.size, level)
        return m, float(lo), float(hi)
    if ci == "normal":
        half = NormalDist().inv_cdf(0.5 + level / 2) * float(x.std(ddof=1)) / np.sqrt(x.size)
        lo, hi = m - half, m + half
        if x.min() >= 0 and x.max() <= 1:  # a rate: its mean cannot leave [0, 1]
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        return m, lo, hi
    means = _boot_means(x[:, None], n_boot, rng)[:, 0]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return m, float(lo), float(hi)


def _widen_score(s: float, lo: float, hi: float, part_means: np.ndarray, n: int, level: float) -> tuple[float, float]:
    """A Score interval of zero width (every resample gave the same Score, always so at 0 and 100)
    becomes the Wilson interval of the weakest part (lowest mean, n records), stretched to hold s."""
    if not (lo == hi and n >= 2):
        return lo, hi
    w_lo, w_hi = wilson_interval(float(np.min(part_means)), n, level)
    return min(float(w_lo), s), max(float(w_hi), s)


def _score_ci(
    parts: np.ndarray, level: float, n_boot: int, rng: np.random.Generator, widen: bool
) -> tuple[float, float, float]:
    """parts: (n_records, 3) ES, PS, NS per record. Bootstrap over records of the Score (widened at
    a collapse when ``widen``, see :func:`_widen_score`)."""
    parts = parts[~np.isnan(parts).any(axis=1)]
    if parts.shape[0] == 0:
        return float("nan"), float("nan"), float("nan")
    s = harmonic_mean(parts.mean(axis=0))
    if parts.shape[0] < 2:
        return s, float("nan"), float("nan")
    boot = np.array([harmonic_mean(m) for m in _boot_means(parts, n_boot, rng)])
    lo, hi = (float(q) for q in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]))
    if widen:
        lo, hi = _widen_score(s, lo, hi, parts.mean(axis=0), parts.shape[0], level)
    return s, lo, hi


def summarize(
    df: pd.DataFrame,
    by: Sequence[str] = ("phase",),
    *,
    ci: Literal["wilson", "normal", "bootstrap"] = "wilson",
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Means over records with confidence intervals, one row per group of ``by``.

    Args:
        df: per-record metrics (from :func:`evaluate_counterfact` / :func:`evaluate_zsre`, possibly
            concatenated over phases and merged with :func:`relative_specificity`).
        by: grouping columns; pass ``()`` to summarise all rows together.
        ci: "wilson" (default: Wilson intervals for the rates, :data:`RATE_METRICS`, a seeded
            bootstrap for the other metrics, the Score's bootstrap widened at a collapse; see the
            module docstring), "normal" (mean ± z·s/√n; zero width at 0% and 100%) or "bootstrap"
            (percentile, ``n_boot`` resamples of the records with ``numpy.random.default_rng(seed)``).
            The Score's interval is always a seeded bootstrap.
        level: confidence level.

    Returns:
        DataFrame with the ``by`` columns, ``n_records``, ``ci_method`` (``ci``), ``score`` (when ES,
        PS and NS are present) and for each metric present ``<metric>``, ``<metric>_ci_low``,
        ``<metric>_ci_high``, all ×100. One record: the intervals are NaN.
        A metric that is NaN for every record (e.g. consistency without reference files) stays NaN.
    """
    by = list(by)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise KeyError(
            f"summarize: grouping column(s) {missing} not in the DataFrame (columns: "
            f"{list(df.columns)}); add them (e.g. df['phase'] = 'post') or pass by=()"
        )
    if ci not in ("wilson", "normal", "bootstrap"):
        raise ValueError(f"ci must be 'wilson', 'normal' or 'bootstrap', got {ci!r}")
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
        row["ci_method"] = ci
        if has_score:
            parts = g[list(_SCORE_PARTS)].to_numpy(dtype=np.float64)
            s, lo, hi = _score_ci(parts, level, n_boot, rng, widen=ci == "wilson")
            row.update(score=s * _SCALE, score_ci_low=lo * _SCALE, score_ci_high=hi * _SCALE)
        for c in metrics:
            x = pd.to_numeric(g[c], errors="coerce").to_numpy(dtype=np.float64)
            m, lo, hi = _mean_ci(x, ci, level, n_boot, rng, rate=c in RATE_METRICS)
            row.update({c: m * _SCALE, f"{c}_ci_low": lo * _SCALE, f"{c}_ci_high": hi * _SCALE})
        out.append(row)
    return pd.DataFrame(out)


def wilson_from_summary(summary: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Re-derive a summary's rate intervals as Wilson intervals from its means and ``n_records``.

    For summaries written before Wilson intervals were the default (normal intervals, zero width at
    0% and 100%) and whose per-record metrics were not kept: each rate of :data:`RATE_METRICS`
    present gets ``wilson_interval(mean / 100, n_records)`` ×100, exactly what ``summarize(ci="wilson")``
    gives for a rate without missing records. A Score interval of zero width at 0 or 100 is widened
    to the Wilson interval of its weakest part, as in :func:`summarize`; a Score interval of positive
    width, and the other metrics (magnitudes, fluency, consistency), are kept as they were (they need
    the records). ``ci_method`` becomes "wilson (re-derived from mean and n_records)" where anything
    was re-derived; rows already marked "wilson" are returned unchanged, so applying it twice is
    applying it once. Rows with fewer than 2 records get NaN intervals.

    Args:
        summary: rows with ``n_records`` and, per rate, ``<rate>``, ``<rate>_ci_low``, ``<rate>_ci_high``.

    Returns:
        A copy of ``summary`` with the intervals replaced and ``ci_method`` set.
    """
    if "n_records" not in summary.columns:
        raise KeyError(f"wilson_from_summary needs an 'n_records' column; got {list(summary.columns)}")
    out = summary.copy()
    method = out["ci_method"].astype(str) if "ci_method" in out.columns else pd.Series("", index=out.index)
    todo = ~method.str.startswith("wilson") | method.str.contains("re-derived")
    n = pd.to_numeric(out["n_records"], errors="coerce").to_numpy(dtype=np.float64)
    rates = [c for c in RATE_METRICS if c in out.columns and f"{c}_ci_low" in out.columns]
    for c in rates:
        p = pd.to_numeric(out[c], errors="coerce").to_numpy(dtype=np.float64) / _SCALE
        lo, hi = wilson_interval(np.clip(p, 0.0, 1.0), n, level)
        out.loc[todo, f"{c}_ci_low"] = (lo * _SCALE)[todo.to_numpy()]
        out.loc[todo, f"{c}_ci_high"] = (hi * _SCALE)[todo.to_numpy()]
    parts = next((p for p in (_SCORE_PARTS, _ZSRE_PARTS) if all(c in out.columns for c in p)), None)
    if parts is not None and {"score", "score_ci_low", "score_ci_high"} <= set(out.columns):
        for i in out.index[todo]:
            s, lo, hi = (float(out.at[i, k]) / _SCALE for k in ("score", "score_ci_low", "score_ci_high"))
            n_i = n[out.index.get_loc(i)]
            if s in (0.0, 1.0) and lo == hi and n_i >= 2:
                means = np.array([float(out.at[i, c]) for c in parts]) / _SCALE
                lo, hi = _widen_score(s, lo, hi, means, int(n_i), level)
                out.at[i, "score_ci_low"], out.at[i, "score_ci_high"] = lo * _SCALE, hi * _SCALE
    if rates:
        out["ci_method"] = method.where(~todo, "wilson (re-derived from mean and n_records)")
    return out


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
