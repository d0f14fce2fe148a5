"""Student-t confidence intervals of a mean (no dependency beyond the standard library)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["mean_ci"]


def _t_quantile(p: float, dof: int) -> float:
    """Quantile of Student's t (exact for 1 and 2 degrees of freedom, else the Cornish-Fisher
    expansion of Abramowitz & Stegun 26.7.5, accurate to ~1e-3 for dof >= 3)."""
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and a two-sided Student-t confidence interval of the mean: ``(mean, low, high)``.

    With fewer than two values the interval is undefined and returned as NaN.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = math.fsum(x) / n
    if n < 2:
        return mean, math.nan, math.nan
    sem = statistics.stdev(x) / math.sqrt(n)
    half = _t_quantile(0.5 + confidence / 2, n - 1) * sem
    return mean, mean - half, mean + half
