"""Paired comparisons of two edited models on the same records (method.md §10).

Both methods of a comparison edit the same records, so the question "is A ahead of B?" is asked of
the per-record difference A − B, not of whether two unpaired intervals overlap. The interval is a
percentile bootstrap over records: each resample draws records (with replacement) once and uses the
same draw for both sides, so what the two sides share (hard records, easy records) cancels.

The verdict follows one rule, :data:`PAIRED_RULE` (or :func:`paired_rule` for other settings); any
reading that states a verdict prints the rule with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "PairedDifference",
    "paired_difference",
    "paired_table",
    "paired_rule",
    "PAIRED_RULE",
    "SCORE_PARTS",
    "MIN_VERDICT_RECORDS",
]

_SCALE = 100.0
#: The parts whose harmonic mean is the Score, per dataset (method.md §6), tried in this order.
SCORE_PARTS: dict[str, tuple[str, str, str]] = {
    "counterfact": ("efficacy_score", "paraphrase_score", "neighborhood_score"),
    "zsre": ("efficacy_token_acc", "paraphrase_token_acc", "neighborhood_token_acc"),
}
_VERDICTS = ("A ahead", "B ahead", "inconclusive")
_MIN_RECORDS = 2
#: Fewest records for a verdict other than "inconclusive": with 5 records even a difference of the
#: same sign on every one is not significant at 5% by an exact sign test (2 · 0.5^5 = 0.0625), while
#: a percentile bootstrap over so few records can still give an interval that excludes 0.
MIN_VERDICT_RECORDS = 6


def paired_rule(*, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> str:
    """The verdict rule of :func:`paired_difference` for these settings, as a reading prints it."""
    return (
        f"A is ahead of B when the {100 * level:g}% bootstrap interval of the per-record difference "
        f"(A − B, {n_boot} resamples over records, seed {seed}) excludes 0 and at least "
        f"{MIN_VERDICT_RECORDS} records are paired; otherwise inconclusive"
    )


#: The rule with the default settings of :func:`paired_difference`.
PAIRED_RULE = paired_rule()


@dataclass(frozen=True)
class PairedDifference:
    """A − B on the records both frames hold, ×100 like :func:`pmetlab.evaluation.summarize`.

    ``diff`` is the mean per-record difference (for the Score: Score(A) − Score(B), each the harmonic
    mean of its part means); ``ci_low``/``ci_high`` its bootstrap interval; ``verdict`` one of
    "A ahead", "B ahead", "inconclusive" by ``rule``.
    """

    metric: str
    n: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    verdict: str
    rule: str

    def __str__(self) -> str:
        return f"{self.diff:+.1f} [{self.ci_low:+.1f}, {self.ci_high:+.1f}] ({self.verdict})"

    def named(self, name_a: str, name_b: str) -> str:
        """The verdict with the arms' names ("PMET ahead", "MEMIT ahead" or "inconclusive")."""
        return {"A ahead": f"{name_a} ahead", "B ahead": f"{name_b} ahead"}.get(self.verdict, self.verdict)


def _harmonic_rows(means: np.ndarray) -> np.ndarray:
    """Row-wise harmonic mean of (m, k) non-negative values; 0 where any value is 0."""
    with np.errstate(divide="ignore"):
        inv = np.where(means > 0, 1.0 / np.where(means > 0, means, 1.0), np.inf)
    return np.where(np.isinf(inv).any(axis=1), 0.0, means.shape[1] / inv.sum(axis=1))


def _score_parts(a: pd.DataFrame, b: pd.DataFrame) -> tuple[str, ...]:
    for parts in SCORE_PARTS.values():
        if all(c in a.columns and c in b.columns for c in parts):
            return parts
    raise KeyError(
        "metric='score' needs the Score's three parts in both frames: "
        + " or ".join(str(list(p)) for p in SCORE_PARTS.values())
        + f"; got {list(a.columns)} and {list(b.columns)}"
    )


def _aligned(a: pd.DataFrame, b: pd.DataFrame, cols: Sequence[str], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, len(cols)) float arrays of A and B on the records both hold (by ``key``), rows with a NaN
    on either side dropped, in A's order."""
    for name, d in (("a", a), ("b", b)):
        if key not in d.columns:
            raise ValueError(
                f"paired_difference: frame {name} has no key column {key!r} (columns: {list(d.columns)}); "
                "pass per-record frames (one row per record) and the column that names a record as key="
            )
        missing = [c for c in cols if c not in d.columns]
        if missing:
            raise KeyError(f"paired_difference: frame {name} has no column(s) {missing} (columns: {list(d.columns)})")
        dup = d[key].duplicated()
        if dup.any():
            raise ValueError(
                f"paired_difference: frame {name} holds {key} {d.loc[dup, key].iloc[0]!r} more than once; "
                "pass one row per record (e.g. one phase: df[df['phase'] == 'post'])"
            )
    both = a[[key, *cols]].merge(b[[key, *cols]], on=key, how="inner", suffixes=("_a", "_b"), sort=False)
    xa = both[[f"{c}_a" for c in cols]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    xb = both[[f"{c}_b" for c in cols]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    keep = ~(np.isnan(xa).any(axis=1) | np.isnan(xb).any(axis=1))
    if keep.sum() < _MIN_RECORDS:
        raise ValueError(
            f"paired_difference: the frames share {int(keep.sum())} record(s) with values (by {key!r}; "
            f"a has {len(a)} rows, b {len(b)}, {len(both)} keys in common); a paired comparison needs at "
            f"least {_MIN_RECORDS}: were both frames evaluated on the same records?"
        )
    return xa[keep], xb[keep]


def _statistic(xa: np.ndarray, xb: np.ndarray, score: bool) -> float:
    if score:
        return float(_harmonic_rows(xa.mean(axis=0)[None])[0] - _harmonic_rows(xb.mean(axis=0)[None])[0])
    return float((xa[:, 0] - xb[:, 0]).mean())


def _bootstrap(xa: np.ndarray, xb: np.ndarray, score: bool, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) statistic on resamples of the records, the same draw for both sides; drawn in chunks
    of about 2**22 indices."""
    rng = np.random.default_rng(seed)
    n = xa.shape[0]
    chunk = max(1, (1 << 22) // n)
    d = xa[:, 0] - xb[:, 0]
    out = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        if score:
            out.append(_harmonic_rows(xa[idx].mean(axis=1)) - _harmonic_rows(xb[idx].mean(axis=1)))
        else:
            out.append(d[idx].mean(axis=1))
    return np.concatenate(out)


def paired_difference(
    a: pd.DataFrame,
    b: pd.DataFrame,
    metric: str,
    *,
    key: str = "case_id",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """A − B on the records both per-record frames hold, with a paired bootstrap interval.

    The frames are aligned on ``key`` (inner join; a record with a NaN on either side is dropped).
    For a metric column the statistic is the mean per-record difference ``mean_i(a_i − b_i)``; for
    ``metric="score"`` it is Score(A) − Score(B), each the harmonic mean of its part means (ES, PS, NS
    for CounterFact; the three token accuracies for zsRE; method.md §6), recomputed on every resample.
    The interval is the percentile interval of ``n_boot`` resamples of the records drawn with
    ``numpy.random.default_rng(seed)``, the same draw for both sides. Everything is ×100.

    Args:
        a, b: per-record metrics (one row per record, e.g. a run's ``records`` of one phase).
        metric: a column of both frames, or ``"score"``.
        key: the column naming a record.
        n_boot, seed, level: the bootstrap's resamples, seed and confidence level.

    Returns:
        :class:`PairedDifference`; ``verdict`` by :func:`paired_rule` (``rule`` holds its text):
        "inconclusive" with fewer than :data:`MIN_VERDICT_RECORDS` records, whatever the interval.

    Raises:
        ValueError: ``key`` is missing from a frame, repeats within one, or the frames share fewer
            than 2 records with values. KeyError: ``metric`` (or a Score part) is missing.
    """
    if not 0 < level < 1:
        raise ValueError(f"paired_difference: level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"paired_difference: n_boot must be at least 1, got {n_boot}")
    score = metric == "score"
    cols = _score_parts(a, b) if score else (metric,)
    xa, xb = _aligned(a, b, cols, key)
    diff = _statistic(xa, xb, score)
    boot = _bootstrap(xa, xb, score, n_boot, seed)
    lo, hi = (float(q) for q in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]))
    enough = xa.shape[0] >= MIN_VERDICT_RECORDS
    verdict = _VERDICTS[0] if enough and lo > 0 else _VERDICTS[1] if enough and hi < 0 else _VERDICTS[2]
    if score:
        mean_a, mean_b = (float(_harmonic_rows(x.mean(axis=0)[None])[0]) for x in (xa, xb))
    else:
        mean_a, mean_b = float(xa.mean()), float(xb.mean())
    return PairedDifference(
        metric=metric,
        n=int(xa.shape[0]),
        mean_a=mean_a * _SCALE,
        mean_b=mean_b * _SCALE,
        diff=diff * _SCALE,
        ci_low=lo * _SCALE,
        ci_high=hi * _SCALE,
        verdict=verdict,
        rule=paired_rule(level=level, n_boot=n_boot, seed=seed),
    )


def _default_metrics(frames: Mapping[str, pd.DataFrame]) -> tuple[str, ...]:
    for parts in SCORE_PARTS.values():
        if all(c in f.columns for f in frames.values() for c in parts):
            return (*parts, "score")
    raise KeyError(
        "paired_table: no metrics given and the frames lack the Score's parts "
        + " or ".join(str(list(p)) for p in SCORE_PARTS.values())
        + "; pass metrics=[...]"
    )


def paired_table(
    frames: Mapping[str, pd.DataFrame],
    baseline: str,
    metrics: Sequence[str] | None = None,
    *,
    key: str = "case_id",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Every arm against ``baseline``, metric by metric: :func:`paired_difference` (arm = A,
    baseline = B) for each (arm, metric).

    Args:
        frames: arm name → per-record frame (one row per record); must hold ``baseline``.
        baseline: the arm every other arm is compared with.
        metrics: metric columns and/or ``"score"``; None: ES, PS, NS and the Score of the dataset
            whose parts all frames hold (CounterFact first, then zsRE).

    Returns:
        One row per (arm, metric), arms in ``frames``' order without the baseline: ``arm``,
        ``baseline``, ``metric``, ``n``, ``mean_arm``, ``mean_baseline``, ``diff``, ``ci_low``,
        ``ci_high`` (×100), ``verdict`` ("<arm> ahead", "<baseline> ahead" or "inconclusive") and ``rule``.
    """
    if baseline not in frames:
        raise KeyError(f"paired_table: baseline {baseline!r} is not among the frames {list(frames)}")
    metrics = tuple(metrics) if metrics is not None else _default_metrics(frames)
    rows = []
    for arm, frame in frames.items():
        if arm == baseline:
            continue
        for metric in metrics:
            d = paired_difference(frame, frames[baseline], metric, key=key, n_boot=n_boot, seed=seed, level=level)
            rows.append(
                {
                    "arm": arm,
                    "baseline": baseline,
                    "metric": metric,
                    "n": d.n,
                    "mean_arm": d.mean_a,
                    "mean_baseline": d.mean_b,
                    "diff": d.diff,
                    "ci_low": d.ci_low,
                    "ci_high": d.ci_high,
                    "verdict": d.named(str(arm), str(baseline)),
                    "rule": d.rule,
                }
            )
    cols = ["arm", "baseline", "metric", "n", "mean_arm", "mean_baseline", "diff", "ci_low", "ci_high", "verdict"]
    return pd.DataFrame(rows, columns=[*cols, "rule"])
