"""pmetlab benchmark suite: each hot path next to its reference, measured in the same run.

    make bench                      # real SmolLM2-135M (default)
    python -m benchmarks.run --quick   # a tiny random LLaMA, seconds

Prints a table and writes ``benchmarks/results/latest.json``: rows
``{"name", "unit", "pmetlab", "reference", "ratio", "limit"}`` where ratio = how many times
better pmetlab is than the reference, and limit is the best achievable figure where one is
defined: the matmul FLOPs of the work that is needed at the peak matmul rate measured in the
same run (:mod:`benchmarks.flops`; target optimisation, covariance), or a plain forward pass of
the same work (causal tracing). ``--only NAME`` (repeatable) selects rows, e.g.
``make bench BENCH_ARGS="--only workers"``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.flops import DecoderShape, covariance_flops, peak_matmul_flops, target_optimisation_flops

logger = logging.getLogger("benchmarks")
RESULTS = Path(__file__).resolve().parent / "results"


def _row(name, unit, pmetlab, reference, higher_is_better, limit=None, **extra) -> dict:
    ratio = None
    if pmetlab and reference:
        ratio = (pmetlab / reference) if higher_is_better else (reference / pmetlab)
    return {
        "name": name,
        "unit": unit,
        "pmetlab": pmetlab,
        "reference": reference,
        "ratio": None if ratio is None else round(ratio, 3),
        "limit": limit,
        **extra,
    }


def _model(quick: bool):
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

        return make_tiny_model("LlamaForCausalLM", initializer_range=0.2), make_tiny_tokenizer()
    import pmetlab

    return pmetlab.load_model("smollm2-135m")


def _records(n: int, quick: bool) -> list[dict]:
    from pmetlab.datasets import load_counterfact

    return list(load_counterfact())[:n]


def bench_targets(model, tok, records, hp, peak: float) -> list[dict]:
    """Target optimisation: batched fast path vs one request at a time with full recompute; the
    limit is the matmul work of the steps the fast path took at the ``peak`` FLOP/s."""
    from pmetlab import EditRequest
    from pmetlab.editing.prefixes import context_templates
    from pmetlab.editing.targets import optimize_targets

    reqs = [EditRequest.from_counterfact(r) for r in records]
    templates = context_templates(model, tok, hp)
    t0 = time.perf_counter()
    fast = optimize_targets(model, tok, reqs, hp, templates, progress=False)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [optimize_targets(model, tok, [r], hp, templates, reference=True, progress=False) for r in reqs]
    t_ref = time.perf_counter() - t0
    p_fast = sum(fast.trace[i]["p_target"] for i in _last(fast.trace, len(reqs))) / len(reqs)
    p_ref = sum(r.trace[-1]["p_target"] for r in ref) / len(reqs)
    dv = max(
        float((fast.values["ffn"][i] - r.values["ffn"][0]).norm() / r.values["ffn"][0].norm())
        for i, r in enumerate(ref)
    )
    row = _row(
        "z_opt_seconds_per_edit",
        "s/edit",
        round(t_fast / len(reqs), 3),
        round(t_ref / len(reqs), 3),
        False,
        None,
        n_requests=len(reqs),
        steps=hp.v_num_grad_steps,
        final_p_target_pmetlab=round(p_fast, 4),
        final_p_target_reference=round(p_ref, 4),
        max_rel_diff_v=round(dv, 6),
    )
    row.update(_z_opt_limit(model, tok, reqs, hp, templates, fast.n_steps, peak, t_fast))
    return [row]


Z_OPT_LIMIT_NOTE = (
    "matmul FLOPs at the peak float32 matmul rate measured in this run: per step, layers >= L at "
    "the positions from each row's subject token on (causal attention over their contexts) and the "
    "vocabulary projection at the target and KL positions; a forward every step taken and a "
    "backward (w.r.t. activations only, counted as 1x the forward) on every step but each "
    "request's last; the initial pass (layers < L, run once) is left out"
)


def _z_opt_limit(model, tok, reqs, hp, templates, n_steps: list[int], peak: float, seconds: float) -> dict[str, Any]:
    """The limit fields of the z_opt row: seconds per edit of the needed matmul work at ``peak``
    FLOP/s, and the fraction of it that the fast path's ``seconds`` (all requests) reached."""
    from pmetlab.editing.rows import KIND_KL, build_rows, recomputed_positions

    rows = build_rows(tok, reqs, templates)
    flops = target_optimisation_flops(DecoderShape.from_config(model.config), rows, hp.layers[-1], n_steps)
    return {
        "limit": _sig(flops / peak / len(reqs)),
        "fraction_of_limit": round(flops / peak / seconds, 3),
        "limit_gflop_per_edit": round(flops / len(reqs) / 1e9, 3),
        "recomputed_positions": recomputed_positions(rows),
        "loss_positions": len(rows.t_tok) + int((rows.kind == KIND_KL).sum()),
        "steps_taken": sum(n_steps),
        "peak_matmul_gflops": round(peak / 1e9, 2),
        "limit_note": Z_OPT_LIMIT_NOTE,
    }


def _last(trace, n):
    last = {}
    for i, row in enumerate(trace):
        last[row["request"]] = i
    return [last[i] for i in range(n)]


def bench_keys_solve(model, tok, records, hp) -> list[dict]:
    """Keys + float64 solve for all critical layers, batch of requests (targets cached)."""
    from pmetlab import EditRequest, compute_deltas

    reqs = [EditRequest.from_counterfact(r) for r in records]
    d = compute_deltas(model, tok, reqs, hp, progress=False)  # fills the target cache
    t0 = time.perf_counter()
    d = compute_deltas(model, tok, reqs, hp, progress=False)
    total = time.perf_counter() - t0
    return [
        _row(
            "keys_solve_seconds_per_batch",
            "s",
            round(d.meta["timings"]["keys_solve"], 3),
            None,
            False,
            None,
            n_requests=len(reqs),
            n_layers=len(hp.layers),
            compute_deltas_cached_targets_s=round(total, 3),
        )
    ]


@torch.no_grad()
def bench_covariance(model, tok, hp, n_tokens: int, peak: float) -> list[dict]:
    """One pass for all critical layers vs one pass per layer (reference); the limit is the
    matmul work of a pass at the ``peak`` FLOP/s (:func:`benchmarks.flops.covariance_flops`)."""
    from pmetlab.corpus import resolve_corpus, tokenize_corpus
    from pmetlab.models import get_adapter
    from pmetlab.moments import collect_second_moments

    adapter = get_adapter(model)
    chunks = tokenize_corpus(tok, resolve_corpus(hp.cov_corpus), n_tokens, hp.cov_seq_len)
    ntok = sum(len(c) for c in chunks)
    names = [adapter.ffn_out_name(l) for l in hp.layers]
    one_pass = lambda: collect_second_moments(model, tok, names, chunks, progress=False)
    t_one = min(_seconds(one_pass) for _ in range(2))
    t_each = _seconds(lambda: [collect_second_moments(model, tok, [n], chunks, progress=False) for n in names])
    row = _row(
        "covariance_tokens_per_s",
        "tok/s",
        round(ntok / t_one, 1),
        round(ntok / t_each, 1),
        True,
        None,
        tokens=ntok,
        layers=list(hp.layers),
    )
    row.update(_covariance_limit(model, hp, [len(c) for c in chunks], peak, ntok / t_one))
    return [row]


COVARIANCE_LIMIT_NOTE = (
    "peak float32 matmul rate measured in this run / matmul FLOPs per token: the forward through "
    "layers 0..max(layers) (the deepest without its FFN output projection, whose input is the key; "
    "causal attention over each chunk; embedding lookup free) plus the accumulation of k kᵀ per "
    "token and layer, upper triangle only (d_ff·(d_ff+1) FLOPs: the sum is symmetric); "
    "limit_full_accumulation counts the full 2·d_ff²"
)


def _covariance_limit(model, hp, chunk_lengths: list[int], peak: float, tokens_per_s: float) -> dict[str, Any]:
    """The limit fields of the covariance row: tokens/s of the needed matmul work at ``peak``."""
    shape, ntok = DecoderShape.from_config(model.config), sum(chunk_lengths)
    flops = covariance_flops(shape, hp.layers, chunk_lengths)
    full = covariance_flops(shape, hp.layers, chunk_lengths, symmetric=False)
    return {
        "limit": round(peak * ntok / flops, 1),
        "fraction_of_limit": round(tokens_per_s * flops / ntok / peak, 3),
        "limit_full_accumulation": round(peak * ntok / full, 1),
        "limit_mflop_per_token": round(flops / ntok / 1e6, 2),
        "peak_matmul_gflops": round(peak / 1e9, 2),
        "limit_note": COVARIANCE_LIMIT_NOTE,
    }


def _seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant figures."""
    return float(f"{x:.{digits}g}")


def bench_eval(model, tok, records, n_gen_tokens: int) -> list[dict]:
    """CounterFact scoring: batched vs record-at-a-time, without and with generation."""
    from pmetlab.evaluation import evaluate_counterfact
    from pmetlab.evaluation.counterfact import counterfact_prompt_sets

    n_prompts = sum(len(v) for r in records for v in counterfact_prompt_sets(r).values()) * 2  # both candidates
    rows = []
    for gen in (False, True):
        t0 = time.perf_counter()
        evaluate_counterfact(model, tok, records, generation=gen, n_gen_tokens=n_gen_tokens, progress=False)
        t_b = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate_counterfact(
            model, tok, records, generation=gen, n_gen_tokens=n_gen_tokens, batched=False, progress=False
        )
        t_r = time.perf_counter() - t0
        suffix = "_with_generation" if gen else ""
        rows.append(
            _row(
                f"eval_prompts_per_s{suffix}",
                "prompts/s",
                round(n_prompts / t_b, 2),
                round(n_prompts / t_r, 2),
                True,
                None,
                records=len(records),
                records_per_s_pmetlab=round(len(records) / t_b, 3),
                records_per_s_reference=round(len(records) / t_r, 3),
            )
        )
    rows[0]["name"] = "eval_prompts_per_s"
    return rows


def bench_causal_trace(model, tok, quick: bool) -> list[dict]:
    """Causal tracing of one known fact: batched restorations vs one restoration per forward.

    The figure is restorations per second (one restoration = n_samples corrupted rows); the
    limit is the same rows run as plain forwards in the batched shapes (no hooks).
    """
    from pmetlab.locate import trace_fact
    from pmetlab.locate.restore import restorations_for

    if quick:
        prompt, subject = "danny miles davis plays the music of", "miles davis"
    else:
        from pmetlab import load_known_facts

        rec = load_known_facts()[0]
        prompt, subject = rec["prompt"], rec["subject"]
    kw = dict(kinds=("hidden", "mlp"), window=10, noise=0.1, n_samples=10, seed=0, progress=False)
    t0 = time.perf_counter()
    fast = trace_fact(model, tok, prompt, subject, batch_size=256, **kw)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = trace_fact(model, tok, prompt, subject, reference=True, **kw)
    t_ref = time.perf_counter() - t0
    from pmetlab.models.adapters import get_adapter

    n = 1 + sum(len(restorations_for(get_adapter(model), k, 10, len(fast.tokens))) for k in kw["kinds"])
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(model.get_input_embeddings().weight.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in range(0, n, 25):
            model(input_ids=ids.expand(10 * min(25, n - c), -1))
    t_plain = time.perf_counter() - t0
    diff = max(float((fast.ie[k] - ref.ie[k]).abs().max()) for k in fast.ie)
    return [
        _row(
            "causal_trace_restorations_per_s",
            "restorations/s",
            round(n / t_fast, 2),
            round(n / t_ref, 2),
            True,
            round(n / t_plain, 2),
            n_restorations=n,
            n_tokens=len(fast.tokens),
            n_samples=10,
            kinds=list(kw["kinds"]),
            seconds_per_fact_batched=round(t_fast, 2),
            max_abs_diff_ie=diff,
        )
    ]


WORKERS_NOTE = (
    "cold runs into an empty target cache (converted model, prefixes and statistics from the normal "
    "cache); each time includes starting the worker processes, loading the model and reading the "
    "prefixes; one torch thread per worker; requests are sharded by chunk (n_chunks), so at most "
    "n_chunks workers have work"
)


def bench_workers(model, tok, n_requests: int, overrides: dict[str, Any]) -> list[dict]:
    """Filling the target cache of the first ``n_requests`` CounterFact eval records with 2
    worker processes vs 1 (:func:`pmetlab.runs.workers.launch_target_workers`), each cold, and
    whether the two caches hold bit-identical tensors. ``model``/``tok`` (SmolLM2) only count
    the chunks the workers share out."""
    from pmetlab.editing.prefixes import context_templates
    from pmetlab.editing.target_cache import plan_chunks
    from pmetlab.runs import RunSpec
    from pmetlab.runs.workers import edited_first

    spec = RunSpec.build(
        model="smollm2-135m",
        method="pmet",
        dataset="counterfact",
        n_edits=n_requests,
        generation=False,
        hparams=overrides,
    )
    n_chunks = len(plan_chunks(tok, edited_first(spec), context_templates(model, tok, spec.hp)))
    if n_chunks < 2:
        logger.warning(
            "target workers: %d request(s) make %d chunk(s); the 2nd worker has nothing to do", n_requests, n_chunks
        )
    seconds, entries = {}, {}
    with tempfile.TemporaryDirectory(prefix="pmetlab-bench-workers-") as tmp:
        for workers in (1, 2):
            root = _cache_without_targets(Path(tmp) / f"workers{workers}")
            seconds[workers] = _time_workers(spec, workers, root)
            entries[workers] = _target_entries(root)
            logger.info("target workers: %d worker(s) took %.1fs", workers, seconds[workers])
    return [
        _row(
            "target_workers_edits_per_s",
            "edits/s",
            round(n_requests / seconds[2], 3),
            round(n_requests / seconds[1], 3),
            True,
            None,
            n_requests=n_requests,
            workers=2,
            reference_workers=1,
            threads_per_worker=1,
            seconds_2_workers=round(seconds[2], 2),
            seconds_1_worker=round(seconds[1], 2),
            n_chunks=n_chunks,
            steps=spec.hp.v_num_grad_steps,
            n_entries=len(entries[2]),
            caches_bit_identical=_same_entries(entries[1], entries[2]),
            note=WORKERS_NOTE,
        )
    ]


def _cache_without_targets(root: Path) -> Path:
    """A cache folder at ``root`` whose entries (models, statistics, prefixes, ...) are symlinks
    to the current cache's, except the targets, which start empty."""
    from pmetlab.cache import cache_dir

    real = cache_dir()
    root.mkdir(parents=True)
    for child in real.iterdir():
        if child.name != "targets" and not child.name.startswith("."):
            (root / child.name).symlink_to(child, target_is_directory=child.is_dir())
    return root


def _time_workers(spec, workers: int, cache_root: Path) -> float:
    """Wall seconds of filling ``spec``'s targets with ``workers`` processes of one torch thread
    each, with ``cache_root`` as their cache directory."""
    from pmetlab.cache import CACHE_ENV
    from pmetlab.runs.workers import launch_target_workers

    with _environ({CACHE_ENV: str(cache_root), "OMP_NUM_THREADS": "1"}):
        return _seconds(lambda: launch_target_workers([spec], workers))


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (inherited by the processes started meanwhile), then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _target_entries(cache_root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of every target cache entry under ``cache_root``, by file path (relative),
    each file's key-independent checks (format, checksum) passed."""
    from pmetlab.store import KeyedStore

    folder = cache_root / "targets"
    paths = sorted(folder.rglob("*.safetensors")) if folder.is_dir() else []
    return {str(p.relative_to(folder)): KeyedStore.read_tensors(p).tensors for p in paths}


def _same_entries(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Whether two caches hold the same files with bit-identical tensors."""
    if a.keys() != b.keys():
        return False
    return all(a[f].keys() == b[f].keys() and all(_bit_equal(a[f][n], b[f][n]) for n in a[f]) for f in a)


def _bit_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaN equals itself and 0.0 differs from -0.0)."""
    as_bytes = lambda t: t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(as_bytes(x), as_bytes(y))


def bench_rss(n_edits: int, quick: bool) -> list[dict]:
    """Peak RSS of a fresh process computing and applying an n-edit PMET batch (no caches)."""
    cmd = [sys.executable, "-m", "benchmarks.rss_probe", "--n", str(n_edits)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"rss probe failed: {out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return [
        _row(
            "peak_rss_mb",
            "MB",
            res["peak_rss_mb"],
            None,
            False,
            2000.0,
            n_edits=n_edits,
            seconds=res["seconds"],
            efficacy_p_gt_true=res.get("efficacy"),
        )
    ]


#: The benchmarks ``--only`` selects from, in the order they run.
ROWS = ("targets", "keys", "covariance", "workers", "eval", "causal_trace", "rss")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random LLaMA instead of SmolLM2 (seconds)")
    ap.add_argument("--n-requests", type=int, default=None, help="requests for the target benchmark (default 8)")
    ap.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the preset's)")
    ap.add_argument("--cov-tokens", type=int, default=None, help="tokens for the covariance benchmark")
    ap.add_argument("--eval-records", type=int, default=None, help="CounterFact records for the eval benchmark")
    ap.add_argument("--rss-edits", type=int, default=None, help="edits in the peak-RSS probe (default 100)")
    ap.add_argument(
        "--worker-requests",
        type=int,
        default=16,
        help="requests for the workers benchmark (at least two chunks of 8, so both workers have work)",
    )
    ap.add_argument("--only", action="append", help=f"run only these benchmarks ({', '.join(ROWS)})")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    q = args.quick
    n_req = args.n_requests or (3 if q else 8)
    cov_tokens = args.cov_tokens or (3000 if q else 30000)
    n_eval = args.eval_records or (4 if q else 20)
    rss_edits = args.rss_edits or (4 if q else 100)
    only = set(args.only or ROWS)
    unknown = sorted(only - set(ROWS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(ROWS)}")
    torch.manual_seed(0)
    model, tok = _model(q)
    from pmetlab import PMETHyperParams

    hp = PMETHyperParams.preset("smollm2-135m")
    if q:
        hp = hp.replace(layers=(0, 1), cov_tokens=cov_tokens, v_num_grad_steps=5)
    if args.steps:
        hp = hp.replace(v_num_grad_steps=args.steps)
    records = _records(max(n_req, n_eval), q)
    peak = peak_matmul_flops() if only & {"targets", "covariance"} else None
    info = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "model": type(model).__name__,
        "quick": q,
        "hparams": hp.to_dict(),
        "peak_matmul_gflops": None if peak is None else round(peak / 1e9, 2),
    }
    rows: list[dict] = []
    t0 = time.perf_counter()
    if "targets" in only:
        rows += bench_targets(model, tok, records[:n_req], hp, peak)
    if "keys" in only:
        rows += bench_keys_solve(model, tok, records[:n_req], hp)
    if "covariance" in only:
        rows += bench_covariance(model, tok, hp, cov_tokens, peak)
    if "workers" in only and q:
        logger.info("skipping the workers benchmark: its workers load SmolLM2, not the --quick model")
    elif "workers" in only:
        steps = {"v_num_grad_steps": args.steps} if args.steps else {}
        rows += bench_workers(model, tok, args.worker_requests, steps)
    if "eval" in only:
        rows += bench_eval(model, tok, records[:n_eval], 20 if q else 50)
    if "causal_trace" in only:
        rows += bench_causal_trace(model, tok, q)
    if "rss" in only:
        del model
        gc.collect()
        rows += bench_rss(rss_edits, q)
    from pmetlab.versions import versions

    out = {
        "rows": rows,
        "info": info,
        "versions": versions(),
        "seconds": round(time.perf_counter() - t0, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    Path(args.out).with_suffix(".full.json").write_text(json.dumps(out, indent=2))
    _print_table(rows)
    return 0


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = ["name", "unit", "pmetlab", "reference", "ratio", "limit"]
    w = [max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols]
    line = "  ".join(c.ljust(x) for c, x in zip(cols, w))
    sys.stdout.write(line + "\n" + "-" * len(line) + "\n")
    for r in rows:
        sys.stdout.write("  ".join(str(r.get(c)).ljust(x) for c, x in zip(cols, w)) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
