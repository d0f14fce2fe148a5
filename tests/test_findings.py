"""Findings generated from notebook 03/04 tables: every verdict follows the intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pmetlab.analysis import ablation_reading, tradeoff_reading
from pmetlab.analysis.verdicts import UNPAIRED_RULE
from pmetlab.evaluation import PAIRED_RULE

_METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score")


def _row(method: str, n: int, es: float, ps: float, ns: float, half: float = 2.0, **extra) -> dict:
    row = {"method": method, "n_edits": n, **extra}
    for metric, v in zip(_METRICS, (es, ps, ns, (es + ps + ns) / 3)):
        row.update({metric: v, f"{metric}_ci_low": v - half, f"{metric}_ci_high": v + half})
    return row


def _tradeoff(pmet_es_at_64: float) -> pd.DataFrame:
    return pd.DataFrame(
        [
            _row("PMET", 1, 100, 90, 80),
            _row("MEMIT", 1, 100, 90, 80),
            _row("unedited", 1, 10, 10, 80),
            _row("PMET", 64, pmet_es_at_64, 80, 78),
            _row("MEMIT", 64, 90, 80, 60),
            _row("unedited", 64, 10, 10, 80),
        ]
    )


def test_the_claim_is_reproduced_only_when_pmet_is_ahead_with_separate_intervals_and_ns_on_par():
    text = tradeoff_reading(_tradeoff(97.0), model_name="m")
    assert "**reproduced** at n = 64" in text and "PMET is ahead by the rule at 64" in text
    assert "ES 97.0 [95.0, 99.0] vs 90.0 [88.0, 92.0] (PMET ahead, intervals separate)" in text
    assert "MEMIT's NS first falls below the unedited model's at n = 64" in text
    assert "PMET's NS is not below the unedited model's by the rule up to n = 64" in text
    assert f"{UNPAIRED_RULE}." in text and "unpaired" in text.splitlines()[0]


def test_a_single_record_is_left_out_never_compared():
    table = _tradeoff(97.0)
    for col in [c for c in table.columns if c.endswith(("_ci_low", "_ci_high"))]:
        table.loc[table["n_edits"] == 1, col] = float("nan")
    text = tradeoff_reading(table, model_name="m")
    assert "- n = 1 left out: a single record has no interval" in text
    assert "- n = 1:" not in text and "nan" not in text
    with_counts = _tradeoff(97.0).assign(n_records=lambda d: d["n_edits"])  # by the record count too
    assert "- n = 1 left out" in tradeoff_reading(with_counts, model_name="m")


def test_the_claim_is_inconclusive_when_the_intervals_overlap_and_not_reproduced_when_memit_leads():
    text = tradeoff_reading(_tradeoff(92.0), model_name="m")
    assert "**inconclusive** at n = 64 (neither method ahead on ES or PS by the rule" in text
    assert "PMET is ahead by the rule at no n" in text and "intervals overlap: inconclusive" in text
    text = tradeoff_reading(_tradeoff(70.0), model_name="m")
    assert "**not reproduced**" in text and "MEMIT ahead, intervals separate" in text
    assert "MEMIT at 64" in text


def _records(table: pd.DataFrame, arm: str, seed: int = 0, n: int = 64) -> pd.DataFrame:
    """Per-record frames whose means are the table's (rates as fractions; the same case_ids per n)."""
    rng = np.random.default_rng(seed)
    out = []
    for _, r in table.iterrows():
        recs = pd.DataFrame({arm: r[arm], "n_edits": r["n_edits"], "case_id": range(n)})
        for metric in _METRICS[:3]:
            k = int(round(r[metric] / 100 * n))
            recs[metric] = rng.permutation([1.0] * k + [0.0] * (n - k))
        out.append(recs)
    return pd.concat(out, ignore_index=True)


def test_with_per_record_metrics_the_comparison_is_paired_and_prints_the_rule():
    table = _tradeoff(92.0)[lambda d: d["n_edits"] == 64]
    recs = _records(table, "method")
    recs.loc[recs["method"] == "PMET", "efficacy_score"] = 1.0  # ahead of MEMIT on every record that differs
    text = tradeoff_reading(table, model_name="m", records=recs)
    assert "paired" in text.splitlines()[0] and f"Rule (paired, from the per-record metrics): {PAIRED_RULE}." in text
    assert "(paired PMET − MEMIT: +" in text and ", PMET ahead)" in text
    assert UNPAIRED_RULE not in text


def test_ablation_reading_compares_each_variant_with_pmet_metric_by_metric():
    table = pd.DataFrame(
        [
            {**_row("PMET", 8, 90, 80, 70), "variant": "PMET"},
            {**_row("PMET", 8, 60, 50, 71), "variant": "w/o δ^a"},
            {**_row("PMET", 8, 91, 79, 69), "variant": "even spread (p=1)"},
        ]
    )
    text = ablation_reading(table, model_name="m", n_edits=8)
    assert "- without δ^a (w/o δ^a against PMET): ES 60.0 [58.0, 62.0] vs 90.0 [88.0, 92.0] (PMET ahead" in text
    assert "(even spread (p=1) against PMET): ES 91.0 [89.0, 93.0] vs 90.0 [88.0, 92.0] (intervals overlap" in text
    assert "no spread" not in text  # a variant that was not run is not reported
    assert f"{UNPAIRED_RULE}." in text
    paired = ablation_reading(table, model_name="m", n_edits=8, records=_records(table, "variant"))
    assert "(paired w/o δ^a − PMET: -" in paired and PAIRED_RULE in paired
