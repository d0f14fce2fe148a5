"""Per-record metrics of a sweep, gathered and written compactly (pmetlab.runs.per_record)."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from pmetlab import save_records, sweep_records
from pmetlab.analysis import tradeoff_reading
from pmetlab.evaluation import PAIRED_RULE, summarize
from pmetlab.runs import read_records_table
from pmetlab.runs.rundir import write_records


def _run(folder, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for phase in ("pre", "post"):
        for cid in range(6):
            rows.append(
                {
                    "phase": phase,
                    "case_id": cid,
                    "efficacy_score": float(rng.integers(0, 2)),
                    "paraphrase_score": rng.integers(0, 3) / 2,
                    "neighborhood_score": rng.integers(0, 11) / 10,
                    "efficacy_magnitude": rng.normal() / 3,
                    "fluency": np.nan,  # not measured: dropped
                    "neighborhood_prefers_true": [True, False],  # a list: dropped
                }
            )
    df = pd.DataFrame(rows)
    write_records(folder, df)
    return df


def _sweep(tmp_path) -> pd.DataFrame:
    rows = []
    for i, (method, n) in enumerate([("pmet", 6), ("memit", 6)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        _run(d, i)
        for phase in ("pre", "post"):
            rows.append({"method": method, "n_edits": n, "phase": phase, "label": None, "run_dir": str(d)})
    return pd.DataFrame(rows)


def test_sweep_records_keeps_keys_and_numeric_metrics_once_per_run(tmp_path):
    rec = sweep_records(_sweep(tmp_path))
    assert list(rec.columns[:4]) == ["method", "n_edits", "phase", "case_id"]  # label is None everywhere: dropped
    assert "fluency" not in rec.columns and "neighborhood_prefers_true" not in rec.columns
    assert len(rec) == 2 * 2 * 6 and set(rec["method"]) == {"pmet", "memit"}
    with pytest.raises(KeyError, match="run_dir"):
        sweep_records(pd.DataFrame({"method": ["pmet"]}))


def test_save_records_rounds_writes_gzip_and_reads_back(tmp_path):
    rec = sweep_records(_sweep(tmp_path))
    path = save_records(rec, tmp_path / "out" / "03_records.csv.gz")
    with gzip.open(path, "rt") as f:
        assert f.readline().startswith("method,n_edits,phase,case_id")
    back = read_records_table(path)
    assert back.shape == rec.shape
    np.testing.assert_allclose(back["efficacy_magnitude"], rec["efficacy_magnitude"].round(6))
    first = path.read_bytes()
    save_records(rec, path)
    assert path.read_bytes() == first  # the same records, the same bytes
    with pytest.raises(ValueError, match="csv.gz"):
        save_records(rec, tmp_path / "x.csv")


def test_a_reading_is_re_derived_from_the_committed_records(tmp_path):
    """From the per-record file alone: the summaries (Wilson) and the paired reading."""
    path = save_records(sweep_records(_sweep(tmp_path)), tmp_path / "03_records.csv.gz")
    rec = read_records_table(path)
    names = {"pmet": "PMET", "memit": "MEMIT"}
    arms = pd.concat(
        [
            rec[rec["phase"] == "post"].replace({"method": names}),
            rec[(rec["phase"] == "pre") & (rec["method"] == "pmet")].assign(method="unedited"),
        ]
    )
    table = summarize(arms, by=("method", "n_edits"))
    text = tradeoff_reading(table, model_name="m", records=arms)
    assert "Wilson" in text and PAIRED_RULE in text and "paired PMET − MEMIT" in text
