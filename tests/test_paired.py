"""Paired comparisons (pmetlab.evaluation.paired) on hand-made per-record frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pmetlab.evaluation import PAIRED_RULE, PairedDifference, harmonic_mean, paired_difference, paired_table

PARTS = ["efficacy_score", "paraphrase_score", "neighborhood_score"]


def _frame(n: int = 40, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"case_id": np.arange(100, 100 + n)})
    df["efficacy_score"] = (rng.random(n) < 0.6).astype(float)
    df["paraphrase_score"] = rng.integers(0, 3, n) / 2
    df["neighborhood_score"] = rng.integers(0, 11, n) / 10
    df["efficacy_magnitude"] = rng.normal(0.1, 0.3, n) + shift
    return df


def test_identical_frames_give_zero_and_inconclusive():
    a = _frame()
    for metric in (*PARTS, "efficacy_magnitude", "score"):
        d = paired_difference(a, a.copy(), metric)
        assert d.diff == 0 and d.ci_low == 0 and d.ci_high == 0
        assert d.verdict == "inconclusive" and d.n == len(a)
        assert d.rule == PAIRED_RULE


def test_better_on_every_record_is_ahead_and_excludes_zero():
    b = _frame()
    a = b.assign(
        efficacy_score=1.0,  # ahead or equal on every record, strictly on 40% of them
        efficacy_magnitude=b["efficacy_magnitude"] + 0.05,
    )
    d = paired_difference(a, b, "efficacy_magnitude")
    assert d.verdict == "A ahead" and d.ci_low > 0
    assert d.diff == pytest.approx(5.0) and d.ci_low == pytest.approx(5.0) and d.ci_high == pytest.approx(5.0)
    e = paired_difference(a, b, "efficacy_score")
    assert e.verdict == "A ahead" and e.ci_low > 0
    assert e.diff == pytest.approx(100 * (1 - b["efficacy_score"].mean()))
    assert e.mean_a == pytest.approx(100.0) and e.mean_b == pytest.approx(100 * b["efficacy_score"].mean())
    back = paired_difference(b, a, "efficacy_score")
    assert back.verdict == "B ahead" and back.ci_high < 0 and back.diff == pytest.approx(-e.diff)
    assert back.named("PMET", "MEMIT") == "MEMIT ahead"
    s = paired_difference(a, b, "score")
    assert s.verdict == "A ahead" and s.ci_low > 0
    want = 100 * (harmonic_mean(a[PARTS].mean()) - harmonic_mean(b[PARTS].mean()))
    assert s.diff == pytest.approx(want)
    assert s.mean_a == pytest.approx(100 * harmonic_mean(a[PARTS].mean()))


def test_alignment_is_by_key_not_by_row():
    b = _frame()
    a = b.assign(efficacy_magnitude=b["efficacy_magnitude"] + 0.01)
    shuffled = a.sample(frac=1.0, random_state=3).iloc[:-5]  # other order, 5 records fewer
    d = paired_difference(shuffled, b, "efficacy_magnitude")
    assert d.n == len(b) - 5 and d.diff == pytest.approx(1.0) and d.ci_low == pytest.approx(1.0)


def test_too_few_records_are_inconclusive_even_when_every_one_agrees():
    b = _frame(n=5)
    a = b.assign(efficacy_magnitude=b["efficacy_magnitude"] + 0.1)
    d = paired_difference(a, b, "efficacy_magnitude")
    assert d.ci_low > 0 and d.verdict == "inconclusive"  # 5 records: a sign test gives p = 0.0625
    b6 = _frame(n=6)
    assert (
        paired_difference(
            b6.assign(efficacy_magnitude=b6["efficacy_magnitude"] + 0.1), b6, "efficacy_magnitude"
        ).verdict
        == "A ahead"
    )
    assert "at least 6 records" in PAIRED_RULE


def test_nan_records_are_dropped_pairwise():
    b = _frame(n=10)
    a = b.copy()
    a.loc[0, "efficacy_score"] = np.nan
    assert paired_difference(a, b, "efficacy_score").n == 9
    assert paired_difference(a, b, "score").n == 9
    assert paired_difference(a, b, "neighborhood_score").n == 10


def test_misaligned_or_missing_keys_are_refused():
    a = _frame(n=10)
    b = a.assign(case_id=a["case_id"] + 1000)
    with pytest.raises(ValueError, match="share 0 record"):
        paired_difference(a, b, "efficacy_score")
    one = a.assign(case_id=list(b["case_id"].iloc[:9]) + [a["case_id"].iloc[9]])
    with pytest.raises(ValueError, match="share 1 record"):
        paired_difference(one, a, "efficacy_score")
    with pytest.raises(ValueError, match="no key column 'case_id'"):
        paired_difference(a.drop(columns="case_id"), a, "efficacy_score")
    with pytest.raises(ValueError, match="more than once"):
        paired_difference(pd.concat([a, a]), a, "efficacy_score")
    with pytest.raises(KeyError, match="no column"):
        paired_difference(a, a, "fluency")
    with pytest.raises(KeyError, match="Score's three parts"):
        paired_difference(a.drop(columns="paraphrase_score"), a, "score")
    with pytest.raises(ValueError, match="level"):
        paired_difference(a, a, "efficacy_score", level=95)


def test_seeded_result_is_reproducible_and_the_seed_matters():
    a, b = _frame(seed=1), _frame(seed=2)
    d1 = paired_difference(a, b, "score", seed=7)
    d2 = paired_difference(a, b, "score", seed=7)
    assert d1 == d2 and isinstance(d1, PairedDifference)
    d3 = paired_difference(a, b, "score", seed=8)
    assert (d3.ci_low, d3.ci_high) != (d1.ci_low, d1.ci_high) and d3.diff == d1.diff
    assert "seed 8" in d3.rule and "2000 resamples" in d3.rule and "95%" in d3.rule


def test_interval_of_unrelated_frames_covers_the_difference():
    a, b = _frame(n=200, seed=1), _frame(n=200, seed=2)
    d = paired_difference(a, b, "efficacy_magnitude")
    assert d.ci_low < d.diff < d.ci_high
    assert d.diff == pytest.approx(100 * (a["efficacy_magnitude"] - b["efficacy_magnitude"]).mean())


def test_zsre_score_uses_token_accuracies():
    rng = np.random.default_rng(0)
    cols = ["efficacy_token_acc", "paraphrase_token_acc", "neighborhood_token_acc"]
    b = pd.DataFrame({"case_id": range(30), **{c: rng.random(30) for c in cols}})
    a = b.assign(efficacy_token_acc=b["efficacy_token_acc"] / 2)
    s = paired_difference(a, b, "score")
    assert s.diff == pytest.approx(100 * (harmonic_mean(a[cols].mean()) - harmonic_mean(b[cols].mean())))
    assert s.verdict == "B ahead"


def test_paired_table_rows_per_arm_and_metric():
    base = _frame()
    frames = {"MEMIT": base, "PMET": base.assign(efficacy_score=1.0), "same": base.copy()}
    t = paired_table(frames, "MEMIT")
    assert list(t["arm"].unique()) == ["PMET", "same"]
    assert list(t["metric"].unique()) == [*PARTS, "score"]
    row = t[(t["arm"] == "PMET") & (t["metric"] == "efficacy_score")].iloc[0]
    assert row["verdict"] == "PMET ahead" and row["ci_low"] > 0 and row["baseline"] == "MEMIT"
    assert set(t.loc[t["arm"] == "same", "verdict"]) == {"inconclusive"}
    assert set(t["rule"]) == {PAIRED_RULE}
    t2 = paired_table(frames, "MEMIT", metrics=["efficacy_magnitude"], n_boot=200, seed=1)
    assert len(t2) == 2 and "200 resamples" in t2["rule"].iloc[0]
    with pytest.raises(KeyError, match="baseline"):
        paired_table(frames, "ROME")
