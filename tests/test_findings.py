"""Findings generated from notebook 03/04 tables: every verdict follows the intervals."""

from __future__ import annotations

import pandas as pd

from pmetlab.analysis import ablation_reading, tradeoff_reading

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
    assert "**reproduced** at n = 64" in text and "PMET is ahead with separate intervals at 64" in text
    assert "ES 97.0 [95.0, 99.0] vs 90.0 [88.0, 92.0] (PMET higher, intervals separate)" in text
    assert "MEMIT's NS first falls below the unedited model's at n = 64" in text
    assert "PMET's NS stays within the unedited model's interval up to n = 64" in text


def test_a_single_record_is_reported_without_an_interval():
    table = _tradeoff(97.0)
    for col in [c for c in table.columns if c.endswith(("_ci_low", "_ci_high"))]:
        table.loc[table["n_edits"] == 1, col] = float("nan")
    text = tradeoff_reading(table, model_name="m")
    assert "- n = 1: ES 100.0 (no interval) vs 100.0 (no interval) (one record: no interval to compare)" in text
    assert "nan" not in text


def test_the_claim_is_not_reproduced_when_the_intervals_overlap_or_memit_leads():
    text = tradeoff_reading(_tradeoff(92.0), model_name="m")
    assert "**not reproduced** at n = 64" in text and "PMET is ahead with separate intervals at no n" in text
    text = tradeoff_reading(_tradeoff(70.0), model_name="m")
    assert "**not reproduced**" in text and "MEMIT higher, intervals separate" in text
    assert "MEMIT at 64" in text


def test_ablation_reading_compares_each_variant_with_pmet_metric_by_metric():
    table = pd.DataFrame(
        [
            {**_row("PMET", 8, 90, 80, 70), "variant": "PMET"},
            {**_row("PMET", 8, 60, 50, 71), "variant": "w/o δ^a"},
            {**_row("PMET", 8, 91, 79, 69), "variant": "even spread (p=1)"},
        ]
    )
    text = ablation_reading(table, model_name="m", n_edits=8)
    assert "- without δ^a (PMET → w/o δ^a): ES 90.0 [88.0, 92.0] → 60.0 [58.0, 62.0] (PMET higher" in text
    assert "even spread (p=1)): ES 90.0 [88.0, 92.0] → 91.0 [89.0, 93.0] (intervals overlap)" in text
    assert "no spread" not in text  # a variant that was not run is not reported
