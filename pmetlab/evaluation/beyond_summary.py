"""Summary of the beyond-teacher-forcing metrics (:mod:`.beyond`): one row per phase with the mean
of each per-record metric and a 95% interval (method.md §10), and the held-out perplexity.

As :func:`pmetlab.evaluation.summarize` does for ES/PS/NS: rates (per-record fractions in [0, 1],
:data:`BEYOND_RATES`) get the Wilson interval of their mean with n = records
(:func:`pmetlab.evaluation.summary.wilson_interval`) and are reported ×100; magnitudes get a seeded
percentile bootstrap over records, ×100; ``neighborhood_kl`` a seeded bootstrap, in nats (not
scaled). ``perplexity`` = exp(Σ NLL / Σ tokens) over the held-out chunks; ``perplexity_rel_change``
= post / pre − 1 (0 on the pre row), with a seeded bootstrap over chunks on the post row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .summary import wilson_interval

__all__ = ["summarize_beyond", "BEYOND_METRICS", "BEYOND_RATES"]

_GEN = [
    f"gen_{s}_{w}_{m}" for s in ("efficacy", "paraphrase") for w in ("new", "true") for m in ("begins", "contains")
] + ["gen_neighborhood_true_begins", "gen_neighborhood_true_contains"]
BEYOND_RATES = tuple(
    _GEN
    + [
        "cfplus_neighborhood_score",
        "cfplus_neighborhood_token_acc",
        "prefix_efficacy_score",
        "prefix_efficacy_token_acc",
    ]
)
_MAGNITUDES = ("cfplus_neighborhood_magnitude", "prefix_efficacy_magnitude")
BEYOND_METRICS = BEYOND_RATES + _MAGNITUDES + ("neighborhood_kl",)


def _bootstrap(x: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    if x.size < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    q = (1 - level) / 2
    return float(np.quantile(means, q)), float(np.quantile(means, 1 - q))


def _ppl_columns(ppl: pd.DataFrame, phase: str, n_boot: int, seed: int, level: float) -> dict[str, float]:
    if ppl is None or ppl.empty:
        return {}
    n = ppl["n_tokens"].to_numpy(dtype=np.float64)
    pre, post = ppl["nll_pre"].to_numpy(dtype=np.float64), ppl["nll_post"].to_numpy(dtype=np.float64)
    nll = pre if phase == "pre" else post
    out = {"perplexity": float(np.exp(nll.sum() / n.sum())), "perplexity_tokens": int(n.sum())}
    if phase == "pre":
        return {**out, "perplexity_rel_change": 0.0}
    rel = float(np.exp((post.sum() - pre.sum()) / n.sum()) - 1)
    idx = np.random.default_rng(seed).integers(0, len(n), size=(n_boot, len(n)))
    boots = np.exp((post[idx].sum(1) - pre[idx].sum(1)) / n[idx].sum(1)) - 1
    q = (1 - level) / 2
    lo, hi = (np.quantile(boots, q), np.quantile(boots, 1 - q)) if len(n) > 1 else (np.nan, np.nan)
    return {
        **out,
        "perplexity_rel_change": rel,
        "perplexity_rel_change_ci_low": lo,
        "perplexity_rel_change_ci_high": hi,
    }


def summarize_beyond(
    records: pd.DataFrame,
    perplexity: pd.DataFrame | None = None,
    *,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per ``phase`` of ``records`` (:attr:`BeyondResult.records`): ``n_records`` and, for
    each metric of :data:`BEYOND_METRICS` present, ``<m>``, ``<m>_ci_low``, ``<m>_ci_high`` (see the
    module docstring for scales and intervals), then the perplexity columns when ``perplexity``
    (:attr:`BeyondResult.perplexity`) is given and not empty."""
    if "phase" not in records.columns:
        raise KeyError(f"summarize_beyond needs a 'phase' column; got columns {list(records.columns)}")
    out = []
    for phase, g in records.groupby("phase", sort=False):
        row: dict = {"phase": phase, "n_records": len(g)}
        for c in (m for m in BEYOND_METRICS if m in g.columns):
            x = pd.to_numeric(g[c], errors="coerce").to_numpy(dtype=np.float64)
            x = x[~np.isnan(x)]
            scale = 1.0 if c == "neighborhood_kl" else 100.0
            if x.size == 0:
                row.update({c: np.nan, f"{c}_ci_low": np.nan, f"{c}_ci_high": np.nan})
                continue
            m = float(x.mean())
            if c in BEYOND_RATES:
                lo, hi = (float(v) for v in wilson_interval(m, x.size, level))
            else:
                lo, hi = _bootstrap(x, n_boot, seed, level)
            row.update({c: m * scale, f"{c}_ci_low": lo * scale, f"{c}_ci_high": hi * scale})
        row.update(_ppl_columns(perplexity, str(phase), n_boot, seed, level))
        out.append(row)
    return pd.DataFrame(out)
