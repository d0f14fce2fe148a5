"""A short text, generated from a summary's numbers, saying whether the paper's reading holds."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .depth import check_summary, depth_thirds
from .labels import METRICS, label_keys

__all__ = ["similarity_reading"]


@dataclass(frozen=True)
class _MetricReading:
    """The numbers behind one metric's verdict (see :func:`similarity_reading`)."""

    metric: str
    ffn_late: tuple[float, float, float]  # mean, ci_low, ci_high over the late third
    mhsa_late: tuple[float, float, float]
    ffn_step: float  # mean |change| between consecutive layers, late third
    mhsa_step: float
    ffn_early: float

    @property
    def higher(self) -> bool:
        return self.ffn_late[1] > self.mhsa_late[2]

    @property
    def flatter(self) -> bool:
        return self.ffn_step < self.mhsa_step

    @property
    def rises(self) -> bool:
        return self.ffn_late[0] > self.ffn_early

    @property
    def holds(self) -> bool:
        return self.higher and self.flatter and self.rises

    def sentence(self) -> str:
        f, m = self.ffn_late, self.mhsa_late
        if self.higher:
            order = "FFN is higher (the intervals do not overlap)"
        elif m[1] > f[2]:
            order = "MHSA is higher (the intervals do not overlap)"
        else:
            order = "the intervals overlap, so neither is clearly higher"
        return (
            f"{self.metric.capitalize()}: over the late third FFN averages {f[0]:.3f} "
            f"[{f[1]:.3f}, {f[2]:.3f}] and MHSA {m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}], so {order}; "
            f"there FFN's curve moves {self.ffn_step:.3f} per layer against MHSA's {self.mhsa_step:.3f} "
            f"({'flatter' if self.flatter else 'not flatter'}), and FFN goes from {self.ffn_early:.3f} "
            f"in the early third to {f[0]:.3f} ({'rises' if self.rises else 'does not rise'})."
        )


def _metric_reading(summary: pd.DataFrame, metric: str) -> _MetricReading:
    s = summary[summary["metric"].astype(str) == metric]
    layers = sorted(int(l) for l in s["layer"].unique())
    depth = dict(zip(layers, depth_thirds(pd.Series(layers))))
    late = [l for l in layers if depth[l] == "late"]
    window = layers[max(layers.index(late[0]) - 1, 0) :]  # the step into the late third counts too

    def curve(comp: str) -> pd.DataFrame:
        c = s[s["component"].astype(str) == comp].set_index("layer").sort_index()
        if c.index.has_duplicates or len(c) != len(layers):
            raise ValueError(
                f"similarity_reading: expected one {comp} row per layer for metric {metric!r}; "
                f"pass a single summary (one protocol, one model)"
            )
        return c

    def late_ci(c: pd.DataFrame) -> tuple[float, float, float]:
        # The mean of per-layer interval bounds is a conservative interval for the late-third
        # mean: the standard deviation of an average is at most the average of the deviations.
        return tuple(float(c.loc[late, k].mean()) for k in ("mean", "ci_low", "ci_high"))  # type: ignore

    def step(c: pd.DataFrame) -> float:
        return float(c.loc[window, "mean"].diff().abs().mean())

    ffn, mhsa = curve("FFN"), curve("MHSA")
    early = [l for l in layers if depth[l] == "early"]
    return _MetricReading(
        metric, late_ci(ffn), late_ci(mhsa), step(ffn), step(mhsa), float(ffn.loc[early, "mean"].mean())
    )


def _reading_header(summary: pd.DataFrame, model_name: str | None) -> str:
    layers = sorted(summary["layer"].unique())
    late = [l for l, d in zip(layers, depth_thirds(pd.Series(layers))) if d == "late"]
    what = []
    for col in ("protocol", "projection"):
        if col in summary.columns:
            what.append(f"{col} {summary[col].iloc[0]}")
    where = f"On {model_name}" if model_name else "On this model"
    n = int(summary["n"].min()) if "n" in summary.columns else None
    size = f"{n:,} prompts, " if n is not None else ""
    return (
        f"{where} ({', '.join(what) + '; ' if what else ''}{size}{len(layers)} layers, late third = "
        f"layers {late[0]}–{late[-1]})"
    )


def similarity_reading(summary: pd.DataFrame, *, model_name: str | None = None) -> str:
    """A short paragraph, generated from the numbers, saying whether the paper's reading holds.

    The paper's reading (method.md §5): MHSA states keep changing across layers (lower, varying
    input/output similarity), FFN states settle after some depth (FFN similarity rises and stays
    high in later layers). The test, per metric, on the per-layer means of one summary, with
    the late third as in :func:`depth_thirds`:

    1. *higher*: FFN's late-third interval lies entirely above MHSA's. A late-third interval is
       the mean of the per-layer ``ci_low`` / ``ci_high`` over those layers (conservative);
    2. *flatter*: FFN's mean absolute change between consecutive layers, from the last layer
       before the late third to the last layer, is smaller than MHSA's;
    3. *rises*: FFN's late-third mean exceeds its early-third mean.

    The reading *holds* when all three pass for every metric, *does not hold* when (1) fails
    for every metric, and *holds only in part* otherwise.

    Args:
        summary: the output of :func:`component_similarity` for one model and one protocol
            (columns ``layer``, ``component``, ``metric``, ``mean``, ``ci_low``, ``ci_high``).
        model_name: named in the text.

    Returns:
        Markdown text: a verdict sentence, one sentence of numbers per metric, the test applied.
    """
    check_summary(summary, "similarity_reading", ["layer", "component", "metric", "mean", "ci_low", "ci_high"])
    for col in label_keys(summary):
        if summary[col].nunique() > 1:
            raise ValueError(
                f"similarity_reading: the summary mixes {col}s {sorted(summary[col].unique())}; "
                f"pass one, e.g. summary[summary[{col!r}] == {summary[col].iloc[0]!r}]"
            )
    metrics = [m for m in METRICS if m in set(summary["metric"].astype(str))]
    if not metrics:
        raise ValueError(f"similarity_reading: no metric among {list(METRICS)} in the summary")
    readings = [_metric_reading(summary, m) for m in metrics]
    if all(r.holds for r in readings):
        verdict = "holds"
    elif not any(r.higher for r in readings):
        verdict = "does not hold"
    else:
        verdict = "holds only in part"
    return (
        f"{_reading_header(summary, model_name)}, the paper's reading — MHSA states keep changing across "
        f"layers while FFN states settle after some depth — **{verdict}**. "
        + " ".join(r.sentence() for r in readings)
        + " Test applied per metric: FFN's late-third 95% interval (mean of the per-layer bounds) lies "
        "above MHSA's; FFN's mean absolute layer-to-layer change over the late third is smaller than "
        "MHSA's; FFN's late-third mean exceeds its early-third mean. The reading holds when all three "
        "pass for every metric and does not hold when FFN is not above MHSA for any metric."
    )
