"""Wilson intervals: summarize's default, never of zero width at 0% or 100%, and the re-derivation
of committed summaries from their means and record counts."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from pmetlab.evaluation import summarize
from pmetlab.evaluation.summary import RATE_METRICS, wilson_from_summary, wilson_interval

Z = NormalDist().inv_cdf(0.975)


def _records(es, ps, ns, phase="post"):
    n = len(es)
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "case_id": range(n),
            "phase": phase,
            "efficacy_score": es,
            "paraphrase_score": ps,
            "neighborhood_score": ns,
            "efficacy_magnitude": rng.normal(0.2, 0.1, n),
        }
    )


def test_wilson_interval_matches_the_formula_and_never_collapses():
    lo, hi = wilson_interval(1.0, 8)
    assert hi == 1.0 and lo == pytest.approx(8 / (8 + Z * Z))  # the closed form at p = 1
    lo0, hi0 = wilson_interval(0.0, 8)
    assert lo0 == 0.0 and hi0 == pytest.approx(Z * Z / (8 + Z * Z))
    p, n = 0.3, 50
    c = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    h = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    assert wilson_interval(p, n) == (pytest.approx(c - h), pytest.approx(c + h))
    lo, hi = wilson_interval(np.array([0.0, 0.5, 1.0, np.nan]), np.array([2, 100, 3, 10]))
    assert (hi[:3] > lo[:3]).all() and np.isnan(lo[3])
    assert np.isnan(wilson_interval(1.0, 1)[0])  # one record: no interval
    with pytest.raises(ValueError, match="not ×100"):
        wilson_interval(75.0, 10)


def test_summarize_defaults_to_wilson_for_rates_and_bootstrap_for_magnitudes():
    df = _records([1.0] * 8, [1.0, 0.5] * 4, [0.0] * 8)
    s = summarize(df)
    assert s.loc[0, "ci_method"] == "wilson"
    lo, hi = wilson_interval(1.0, 8)
    assert s.loc[0, "efficacy_score_ci_low"] == pytest.approx(100 * lo) and s.loc[0, "efficacy_score_ci_high"] == 100
    assert s.loc[0, "neighborhood_score_ci_low"] == 0 and s.loc[0, "neighborhood_score_ci_high"] > 0
    p_lo, p_hi = wilson_interval(0.75, 8)
    assert s.loc[0, "paraphrase_score_ci_low"] == pytest.approx(100 * p_lo)
    assert s.loc[0, "paraphrase_score_ci_high"] == pytest.approx(100 * p_hi)
    # magnitudes (may be negative): a seeded bootstrap, not the normal interval
    normal = summarize(df, ci="normal")
    assert (
        s.loc[0, "efficacy_magnitude_ci_low"] < s.loc[0, "efficacy_magnitude"] < s.loc[0, "efficacy_magnitude_ci_high"]
    )
    assert s.loc[0, "efficacy_magnitude_ci_low"] != pytest.approx(normal.loc[0, "efficacy_magnitude_ci_low"])
    pd.testing.assert_frame_equal(summarize(df), s)  # seeded
    # the Score is 0 (NS is 0 everywhere): the bootstrap collapses, widened to NS's Wilson interval
    assert s.loc[0, "score"] == 0 and s.loc[0, "score_ci_low"] == 0
    assert s.loc[0, "score_ci_high"] == pytest.approx(100 * wilson_interval(0.0, 8)[1])


def test_no_zero_width_interval_at_a_bound_and_none_for_one_record():
    perfect = summarize(_records([1.0] * 16, [1.0] * 16, [1.0] * 16))
    for m in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score"):
        assert perfect.loc[0, f"{m}_ci_low"] < perfect.loc[0, f"{m}_ci_high"] == 100.0
    normal = summarize(_records([1.0] * 16, [1.0] * 16, [1.0] * 16), ci="normal")
    assert normal.loc[0, "efficacy_score_ci_low"] == 100.0  # what the Wald interval did
    one = summarize(_records([1.0], [0.5], [1.0]))
    assert one.loc[0, "efficacy_score"] == 100 and np.isnan(one.loc[0, "efficacy_score_ci_low"])
    assert np.isnan(one.loc[0, "score_ci_low"])


def test_score_interval_of_positive_width_is_the_bootstrap():
    df = _records([1.0, 0.0] * 10, [0.5, 1.0] * 10, [1.0, 0.9] * 10)
    assert summarize(df)[["score", "score_ci_low", "score_ci_high"]].equals(
        summarize(df, ci="bootstrap")[["score", "score_ci_low", "score_ci_high"]]
    )


def test_wilson_from_summary_reproduces_summarize_and_is_idempotent():
    df = pd.concat(
        [_records([1.0] * 12, [1.0, 0.5] * 6, [0.8] * 12, "post"), _records([0.0] * 12, [0.0] * 12, [0.9] * 12, "pre")]
    )
    fresh = summarize(df)
    wald = summarize(df, ci="normal")
    assert wald.loc[0, "efficacy_score_ci_low"] == wald.loc[0, "efficacy_score_ci_high"] == 100.0
    again = wilson_from_summary(wald.drop(columns="ci_method"))
    for m in ("efficacy_score", "paraphrase_score", "neighborhood_score"):
        for k in (f"{m}_ci_low", f"{m}_ci_high"):
            np.testing.assert_allclose(again[k], fresh[k])
    # the unedited Score is 0 with a collapsed bootstrap: widened as summarize widens it
    assert again.loc[1, "score_ci_low"] == 0 and again.loc[1, "score_ci_high"] == pytest.approx(
        fresh.loc[1, "score_ci_high"]
    )
    assert again.loc[0, "score_ci_low"] == wald.loc[0, "score_ci_low"]  # positive width: kept
    assert again["efficacy_magnitude_ci_low"].equals(wald["efficacy_magnitude_ci_low"])  # not a rate: kept
    assert set(again["ci_method"]) == {"wilson (re-derived from mean and n_records)"}
    pd.testing.assert_frame_equal(wilson_from_summary(again), again)
    pd.testing.assert_frame_equal(wilson_from_summary(fresh), fresh)  # already Wilson: unchanged
    with pytest.raises(KeyError, match="n_records"):
        wilson_from_summary(wald.drop(columns="n_records"))


def test_rate_metrics_are_the_bounded_ones():
    assert "efficacy_magnitude" not in RATE_METRICS and "fluency" not in RATE_METRICS
    assert {"efficacy_score", "neighborhood_token_acc", "relative_specificity"} <= set(RATE_METRICS)
