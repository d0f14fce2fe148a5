"""The committed results' intervals are Wilson intervals re-derived from means and record counts
(docs/rederive_intervals.py), and no committed reading or README table shows a zero-width interval
at 0 or 100."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pandas as pd

from pmetlab.evaluation import summarize

REPO = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("rederive_intervals", REPO / "docs" / "rederive_intervals.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_results_are_re_derived():
    assert _script().main(["--check"]) == 0, "run `python docs/rederive_intervals.py` and commit docs/results"


def test_no_committed_reading_or_readme_shows_a_zero_width_interval_at_a_bound():
    pages = [REPO / "README.md", *(REPO / "docs" / f"{p}.md" for p in ("results", "performance", "index"))]
    files = [*pages, *sorted((REPO / "docs" / "results").rglob("*_reading.md"))]
    for path in files:
        text = path.read_text()
        for bound in ("0.0", "100.0"):
            assert f"[{bound}, {bound}]" not in text, f"{path.relative_to(REPO)} shows [{bound}, {bound}]"


def _wald_tree(root: Path) -> Path:
    """A results folder as notebook 03 wrote it before Wilson intervals: Wald summaries with an
    n = 1 row and the reading generated from them."""
    d = root / "m" / "quick"
    d.mkdir(parents=True)
    rows = []
    for n in (1, 8):
        for method, es in (("PMET", 1.0), ("MEMIT", 1.0), ("unedited", 0.0)):
            recs = pd.DataFrame(
                {
                    "case_id": range(n),
                    "efficacy_score": es,
                    "paraphrase_score": [0.5, 1.0] * (n // 2) if n > 1 else [0.5],
                    "neighborhood_score": 0.8,
                }
            )
            s = summarize(recs, by=(), ci="normal").drop(columns="ci_method")
            rows.append(s.assign(model="m", method=method, dataset="counterfact", n_edits=n))
    table = pd.concat(rows, ignore_index=True)
    table.to_csv(d / "03_tradeoff.csv", index=False)
    (d / "03_reading.md").write_text("old\n")
    return d


def test_the_re_derivation_rewrites_wald_summaries_and_their_reading(tmp_path):
    mod = _script()
    d = _wald_tree(tmp_path)
    assert [p.name for p in mod.summary_csvs(tmp_path)] == ["03_tradeoff.csv"]
    assert mod.single_record_tradeoffs(tmp_path) == [d / "03_tradeoff.csv"]
    mod.redraw_tradeoff(d / "03_tradeoff.csv")  # no PNG beside it: the data only
    table = pd.read_csv(d / "03_tradeoff.csv")
    assert set(table["n_edits"]) == {8} and not mod.single_record_tradeoffs(tmp_path)
    assert (table["efficacy_score_ci_low"] < table["efficacy_score_ci_high"]).all()
    assert set(table["ci_method"]) == {"wilson (re-derived from mean and n_records)"}
    assert mod.rederived_csv(d / "03_tradeoff.csv") == (d / "03_tradeoff.csv").read_text()  # idempotent
    (reading,) = mod.readings(tmp_path).values()
    assert "Wilson" in reading and "unpaired" in reading and "**inconclusive** at n = 8" in reading
    assert not re.search(r"\[(100\.0|0\.0), \1\]", reading)
