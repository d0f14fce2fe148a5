"""A short text, generated from the numbers, saying how far the paper's reading holds (method.md §5).

The paper reads its Figure 2 as: MHSA states keep changing across layers, FFN states settle after
some depth. Three criteria test it per metric, each reported on its own:

1. *higher*: FFN's late-third mean lies above MHSA's. With per-prompt values the test is paired over
   prompts: per prompt, the mean over the late-third layers of FFN − MHSA, bootstrapped over prompts
   (layers included in the per-prompt mean, so the layer-to-layer spread counts); FFN is higher when
   the interval lies above 0. Without per-prompt values the late-third interval is the mean of the
   per-layer bounds (conservative over prompts, blind to the spread between layers), and the text says so;
2. *flatter*: FFN's mean absolute layer-to-layer change over the late third (the step into it
   included) is smaller than MHSA's;
3. *rises*: FFN's late-third mean exceeds its early-third mean.

A metric is *not measurable at this floor* when both components' late-third means are below
:data:`FLOOR_MULTIPLE` times its chance level (for the top-k Jaccard: :func:`jaccard_chance`).
Verdict over the measurable metrics: "holds" when every criterion passes for every one, "does not
hold" when none passes for any, "holds in part" otherwise, and "not measurable at this floor" when
no metric is measurable. The rule is printed with every reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .depth import check_summary, depth_thirds
from .labels import METRICS, label_keys

__all__ = ["similarity_reading", "jaccard_chance", "FLOOR_MULTIPLE", "SIMILARITY_RULE"]

#: A metric whose late-third means are all below this multiple of its chance level is not read.
FLOOR_MULTIPLE = 10.0
SIMILARITY_RULE = (
    "Criteria per metric: (1) higher: FFN's late-third mean above MHSA's — with per-prompt values, the "
    "95% bootstrap interval over prompts of the per-prompt late-third mean of FFN − MHSA lies above 0 "
    "(else the mean of the per-layer interval bounds, conservative and blind to the layer-to-layer "
    "spread); (2) flatter: FFN's mean absolute layer-to-layer change over the late third is smaller than "
    "MHSA's; (3) rises: FFN's late-third mean exceeds its early-third mean. A metric is not measurable "
    f"when both late-third means are below {FLOOR_MULTIPLE:g}× its chance level. Verdict over the "
    "measurable metrics: holds (every criterion passes for each), does not hold (none passes for any), "
    "holds in part (otherwise), not measurable at this floor (no metric measurable)."
)


def jaccard_chance(k: int, vocab_size: int) -> float:
    """The expected Jaccard similarity of two independent uniformly random ``k``-token sets of a
    ``vocab_size``-token vocabulary: E[i / (2k − i)] with i hypergeometric (shared tokens)."""
    if not (0 < k <= vocab_size):
        raise ValueError(f"need 0 < k <= vocab_size, got k={k}, vocab_size={vocab_size}")
    log_all = math.lgamma(vocab_size + 1) - math.lgamma(k + 1) - math.lgamma(vocab_size - k + 1)
    total = 0.0
    for i in range(1, k + 1):
        if k - i > vocab_size - k:
            continue
        log_p = (
            math.lgamma(k + 1)
            - math.lgamma(i + 1)
            - math.lgamma(k - i + 1)
            + math.lgamma(vocab_size - k + 1)
            - math.lgamma(k - i + 1)
            - math.lgamma(vocab_size - 2 * k + i + 1)
            - log_all
        )
        total += math.exp(log_p) * i / (2 * k - i)
    return total


@dataclass(frozen=True)
class _Criteria:
    """The numbers behind one metric's three criteria."""

    metric: str
    ffn_late: float
    mhsa_late: float
    diff: tuple[float, float, float] | None  # paired FFN − MHSA late-third mean, bootstrap interval
    late_ci: tuple[tuple[float, float], tuple[float, float]]  # FFN's and MHSA's (per-layer bounds)
    ffn_step: float
    mhsa_step: float
    ffn_early: float
    chance: float | None

    @property
    def higher(self) -> bool:
        if self.diff is not None:
            return self.diff[1] > 0
        return self.late_ci[0][0] > self.late_ci[1][1]

    @property
    def flatter(self) -> bool:
        return self.ffn_step < self.mhsa_step

    @property
    def rises(self) -> bool:
        return self.ffn_late > self.ffn_early

    @property
    def measurable(self) -> bool:
        return self.chance is None or max(self.ffn_late, self.mhsa_late) >= FLOOR_MULTIPLE * self.chance

    @property
    def passed(self) -> list[bool]:
        return [self.higher, self.flatter, self.rises]

    def sentence(self) -> str:
        floor = f" (chance level {self.chance:.1e})" if self.chance is not None else ""
        if not self.measurable:
            return (
                f"{self.metric.capitalize()}{floor}: late-third means FFN {self.ffn_late:.4f}, MHSA "
                f"{self.mhsa_late:.4f}, both below {FLOOR_MULTIPLE:g}× chance: not measurable at this floor."
            )
        if self.diff is not None:
            d = self.diff
            how = f"FFN − MHSA {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] (paired over prompts)"
        else:
            (fl, fh), (ml, mh) = self.late_ci
            how = f"FFN [{fl:.3f}, {fh:.3f}] vs MHSA [{ml:.3f}, {mh:.3f}] (per-layer bounds; no per-prompt values)"
        mark = lambda ok: "passes" if ok else "fails"
        return (
            f"{self.metric.capitalize()}{floor}: late third FFN {self.ffn_late:.3f}, MHSA {self.mhsa_late:.3f}, "
            f"{how} — (1) higher {mark(self.higher)}; FFN moves {self.ffn_step:.3f} per layer against MHSA's "
            f"{self.mhsa_step:.3f} — (2) flatter {mark(self.flatter)}; FFN from {self.ffn_early:.3f} (early "
            f"third) to {self.ffn_late:.3f} — (3) rises {mark(self.rises)}."
        )


def _thirds(layers: list[int]) -> tuple[list[int], list[int], list[int]]:
    depth = dict(zip(layers, depth_thirds(pd.Series(layers))))
    late = [l for l in layers if depth[l] == "late"]
    early = [l for l in layers if depth[l] == "early"]
    window = layers[max(layers.index(late[0]) - 1, 0) :]  # the step into the late third counts too
    return early, late, window


def _paired_late(values: pd.DataFrame, metric: str, late: list[int], n_boot: int, seed: int):
    v = values[(values["metric"].astype(str) == metric) & values["layer"].isin(late)]
    per = v.pivot_table(index="prompt_id", columns="component", values="value", aggfunc="mean", observed=True)
    d = (per["FFN"] - per["MHSA"]).dropna().to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def _criteria(summary, metric, values, chance, n_boot, seed) -> _Criteria:
    s = summary[summary["metric"].astype(str) == metric]
    layers = sorted(int(l) for l in s["layer"].unique())
    early, late, window = _thirds(layers)

    def curve(comp: str) -> pd.DataFrame:
        c = s[s["component"].astype(str) == comp].set_index("layer").sort_index()
        if c.index.has_duplicates or len(c) != len(layers):
            raise ValueError(
                f"similarity_reading: expected one {comp} row per layer for metric {metric!r}; "
                f"pass a single summary (one protocol, one model)"
            )
        return c

    ffn, mhsa = curve("FFN"), curve("MHSA")
    step = lambda c: float(c.loc[window, "mean"].diff().abs().mean())
    bounds = lambda c: (float(c.loc[late, "ci_low"].mean()), float(c.loc[late, "ci_high"].mean()))
    diff = _paired_late(values, metric, late, n_boot, seed) if values is not None else None
    return _Criteria(
        metric,
        float(ffn.loc[late, "mean"].mean()),
        float(mhsa.loc[late, "mean"].mean()),
        diff,
        (bounds(ffn), bounds(mhsa)),
        step(ffn),
        step(mhsa),
        float(ffn.loc[early, "mean"].mean()),
        chance if metric == "jaccard" else None,
    )


def _verdict(criteria: list[_Criteria]) -> str:
    read = [c for c in criteria if c.measurable]
    if not read:
        return "not measurable at this floor"
    passes = [ok for c in read for ok in c.passed]
    return "holds" if all(passes) else "does not hold" if not any(passes) else "holds in part"


def _header(summary: pd.DataFrame, model_name: str | None, values: pd.DataFrame | None) -> str:
    layers = sorted(summary["layer"].unique())
    late = [l for l, d in zip(layers, depth_thirds(pd.Series(layers))) if d == "late"]
    what = [f"{col} {summary[col].iloc[0]}" for col in ("protocol", "projection") if col in summary.columns]
    where = f"On {model_name}" if model_name else "On this model"
    n = int(summary["n"].min()) if "n" in summary.columns else None
    size = f"{n:,} prompts, " if n is not None else ""
    paired = "per-prompt values" if values is not None else "summary only"
    return (
        f"{where} ({', '.join(what) + '; ' if what else ''}{size}{len(layers)} layers, late third = "
        f"layers {late[0]}–{late[-1]}; {paired})"
    )


def similarity_reading(
    summary: pd.DataFrame,
    *,
    model_name: str | None = None,
    values: pd.DataFrame | None = None,
    chance: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> str:
    """A short paragraph, generated from the numbers, saying how far the paper's reading holds: the
    verdict, each metric's three criteria (module docstring) and the rule :data:`SIMILARITY_RULE`.

    Args:
        summary: the output of :func:`component_similarity` for one model and one protocol
            (columns ``layer``, ``component``, ``metric``, ``mean``, ``ci_low``, ``ci_high``).
        values: the per-prompt values behind it (:func:`component_similarity_values`); they make the
            late-third comparison a paired bootstrap over prompts (``n_boot`` resamples, ``seed``).
        chance: the Jaccard's chance level (:func:`jaccard_chance` of the top-k and the vocabulary);
            stated in the text, and the floor below which the Jaccard is not read.
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
    criteria = [_criteria(summary, m, values, chance, n_boot, seed) for m in metrics]
    return (
        f"{_header(summary, model_name, values)}, the paper's reading — MHSA states keep changing across "
        f"layers while FFN states settle after some depth — **{_verdict(criteria)}**. "
        + " ".join(c.sentence() for c in criteria)
        + f" {SIMILARITY_RULE}"
    )
