"""The benchmark entry point in --quick mode (tiny model): it runs every hot path next to its
reference and writes the documented JSON rows. No timing is asserted, only the schema and
that the fast paths agree with their references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIRED = {"z_opt_seconds_per_edit", "covariance_tokens_per_s", "eval_prompts_per_s", "peak_rss_mb"}


def _shared_data() -> Path | None:
    for cand in (os.environ.get("PMETLAB_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "counterfact").is_dir() and (Path(cand) / "corpus").is_dir():
            return Path(cand)
    return None


@pytest.mark.skipif(_shared_data() is None, reason="the benchmarks read CounterFact and the corpus (../shared/data)")
def test_quick_benchmark_writes_the_documented_rows(tmp_path):
    out = tmp_path / "latest.json"
    env = {**os.environ, "PMETLAB_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    names = {r["name"] for r in rows}
    assert REQUIRED <= names, names
    for r in rows:
        assert {"name", "unit", "pmetlab", "reference", "ratio", "limit"} <= set(r)
        assert r["pmetlab"] is not None and r["pmetlab"] > 0
        if r["reference"] is not None:
            assert r["ratio"] is not None and r["ratio"] > 0
    z = next(r for r in rows if r["name"] == "z_opt_seconds_per_edit")
    assert z["max_rel_diff_v"] < 1e-3  # the fast targets equal the reference's
    rss = next(r for r in rows if r["name"] == "peak_rss_mb")
    assert rss["limit"] == 2000.0
    full = json.loads(out.with_suffix(".full.json").read_text())
    assert full["info"]["quick"] is True and "versions" in full
    assert "z_opt_seconds_per_edit" in res.stdout  # the printed table
