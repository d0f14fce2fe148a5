"""Generated sections of docs/performance.md, built from ``benchmarks/results/``: the CPU table
with its reading, and the GPU timings (``gpu.json``). Every number in them comes from those files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pmetlab.reporting import markdown_table

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
KEYS = ("name", "unit", "pmetlab", "reference", "ratio", "limit")
_HIDDEN = (*KEYS, "note", "limit_note", "trace")


def _table(rows: list[dict]) -> str:
    table = pd.DataFrame([{k: ("–" if r.get(k) is None else r[k]) for k in KEYS} for r in rows])
    table["notes"] = ["; ".join(f"{k} {v}" for k, v in r.items() if k not in _HIDDEN) for r in rows]
    return markdown_table(table.astype(str))


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.1f}%"


def _reading(r: dict) -> str | None:
    """One generated sentence for a CPU row, or None for rows without one."""
    name = r["name"]
    if name == "z_opt_seconds_per_edit":
        return (
            f"Target optimisation: {r['ratio']}× the one-request-at-a-time reference at the same final "
            f"p(target) ({r['final_p_target_pmetlab']} vs {r['final_p_target_reference']}; targets agree to "
            f"a relative {r['max_rel_diff_v']}); {_pct(r.get('fraction_of_limit'))} of its FLOP limit "
            f"({r.get('limit')} s/edit at the {r.get('peak_matmul_gflops')} GFLOP/s measured in the same run)."
        )
    if name == "covariance_tokens_per_s":
        return (
            f"Covariance: one pass for all layers is {r['ratio']}× the layer-by-layer reference and reaches "
            f"{_pct(r.get('fraction_of_limit'))} of its limit (forward to the deepest layer plus the "
            f"triangle accumulation at the measured peak)."
        )
    if name == "target_workers_edits_per_s":
        same = "bit-identical" if r.get("caches_bit_identical") else "**not** bit-identical"
        return (
            f"Workers: {r['n_requests']} requests ({r['n_chunks']} chunks) with 2 worker processes are "
            f"{r['ratio']}× one worker ({r['seconds_2_workers']} s vs {r['seconds_1_worker']} s, one thread "
            f"each); the two caches are {same}."
        )
    if name.startswith("eval_prompts_per_s"):
        what = "with seeded batched generation" if "generation" in name else "scoring only"
        return f"Evaluation ({what}): {r['ratio']}× record at a time."
    if name == "peak_rss_mb":
        return f"Memory: a {r['n_edits']}-edit PMET batch peaks at {r['pmetlab']} MB (budget {r['limit']} MB)."
    return None


def benchmarks_section() -> str:
    """``latest.json`` as a table, each row's run date, and one generated sentence per row."""
    rows = json.loads((BENCH / "latest.json").read_text())
    lines = [f"- {s}" for s in (_reading(r) for r in rows) if s]
    return _table(rows) + "\n\n" + "\n".join(lines)


def gpu_section() -> str:
    """``gpu.json``: random-init SmolLM2 and GPT-J on the GPU, each row with its in-run reference."""
    path = BENCH / "gpu.json"
    if not path.is_file():
        return "No GPU run committed yet (`python -m benchmarks.gpu` on a machine with CUDA)."
    data = json.loads(path.read_text())
    info = data["info"]
    rows = [r for r in data["rows"] if "error" not in r and r.get("unit")]
    head = (
        f"{info['name']} ({info['memory_gib']} GiB), torch {info['torch']}, CUDA {info['cuda']}, float32 "
        f"(TF32 {'on' if info['allow_tf32'] else 'off'}), {data['date']}; random weights built from each "
        f"model's published config (`benchmarks/results/gpu.json`)."
    )
    return head + "\n\n" + _table(rows) + "\n\n" + "\n".join(f"- {s}" for s in _gpu_reading(rows))


def _gpu_reading(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        model, name = r["name"].split(":", 1)
        if name == "z_opt_seconds_per_edit":
            out.append(
                f"{model}: target optimisation {r['pmetlab']} s/edit, {r['ratio']}× the reference, "
                f"{_pct(r.get('fraction_of_limit'))} of the FLOP limit ({r['limit']} s/edit at "
                f"{r['peak_matmul_gflops']} GFLOP/s), peak {r.get('peak_gpu_gib')} GiB."
            )
        elif name == "covariance_tokens_per_s":
            out.append(
                f"{model}: covariance {r['pmetlab']} tok/s, {r['ratio']}× the reference, "
                f"{_pct(r.get('fraction_of_limit'))} of the limit."
            )
        elif name == "eval_prompts_per_s_with_generation":
            out.append(f"{model}: scoring with generation {r['ratio']}× record at a time ({r['records']} records).")
    return out


BUILDERS = {"benchmarks": benchmarks_section, "gpu-benchmarks": gpu_section}
