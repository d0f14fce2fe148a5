"""Cost per record of each evaluation family beyond teacher forcing (issue #23) on SmolLM2-135M.

    OMP_NUM_THREADS=1 python benchmarks/beyond_cost.py RUN_DIR [N]

Loads SmolLM2-135M and ``RUN_DIR/deltas.safetensors`` (any finished SmolLM2 run), evaluates the first
N (default 8) records of the CounterFact evaluation split with every family (unedited and edited
model, default :class:`pmetlab.evaluation.beyond.BeyondSettings`) and prints one JSON line: the
seconds per family in total and per record. The records need not be the run's: only the cost is
measured. Nothing is written.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pmetlab import load_model
from pmetlab.datasets import load_dataset, split_records
from pmetlab.editing.deltas import Deltas
from pmetlab.evaluation.beyond import BeyondSettings, evaluate_beyond


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write(__doc__)
        return 2
    n = int(argv[1]) if len(argv) > 1 else 8
    model, tok = load_model("smollm2-135m")
    model.eval()
    records, _ = split_records(load_dataset("counterfact"), "eval")
    deltas = Deltas.load(Path(argv[0]) / "deltas.safetensors")
    t = time.perf_counter()
    res = evaluate_beyond(model, tok, list(records)[:n], deltas=deltas, settings=BeyondSettings(), progress=False)
    total = time.perf_counter() - t
    per = {k: round(v / n, 3) for k, v in res.wall_s.items() if k not in ("perplexity", "heldout_text")}
    run = {k: res.wall_s[k] for k in ("perplexity", "heldout_text") if k in res.wall_s}
    print(json.dumps({"n_records": n, "total_s": round(total, 1), "per_record_s": per, "per_run_s": run}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
