"""GPU timings on random-initialised models built from the SmolLM2-135M and GPT-J-6B configs.

    python -m benchmarks.gpu --tokenizer DIR --out benchmarks/results/gpu.json

Timing needs no trained weights: each model is built from its published config with random
weights, directly on the GPU, in float32. Rows (the same functions as :mod:`benchmarks.run`,
each with its in-run reference): target optimisation (batched fast path vs one request at a time
with full recompute, and its FLOP limit at the peak float32 matmul rate measured on the same
device), covariance (one pass for all critical layers vs one pass per layer, and its limit) and
CounterFact scoring (batched vs record at a time, with and without generation). On random
weights no target reaches its stopping probability, so every request runs all its steps: the
worst case of the fast path's early exits. ``--tokenizer`` is a saved tokenizer (SmolLM2's is
used for both models; GPT-J's 50,400-row vocabulary covers its 49,152 ids). The JSON is
rewritten after each row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.flops import peak_matmul_flops

logger = logging.getLogger("benchmarks.gpu")

#: Published configs (Hugging Face config.json values) of the two models timed.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": (
        "LlamaConfig",
        {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "vocab_size": 49152,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "tie_word_embeddings": True,
            "hidden_act": "silu",
        },
    ),
    "gpt-j-6b": (
        "GPTJConfig",
        {
            "n_embd": 4096,
            "n_layer": 28,
            "n_head": 16,
            "n_inner": None,
            "rotary_dim": 64,
            "n_positions": 2048,
            "vocab_size": 50400,
            "activation_function": "gelu_new",
            "tie_word_embeddings": False,
        },
    ),
}


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    """A random-initialised causal LM of ``name``'s config, built on ``device`` in float32."""
    import transformers as tf

    config_cls, values = CONFIGS[name]
    config = getattr(tf, config_cls)(**values)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def load_tokenizer(path: str):
    """The saved tokenizer at ``path``, prepared as pmetlab's loader prepares every tokenizer."""
    from pmetlab.models.loading import _load_tokenizer

    return _load_tokenizer(path, path, local_files_only=True)


def _device_info(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {
        "device": str(device),
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def _timed_rows(fn: Callable[[], list[dict]], device: torch.device) -> list[dict]:
    """``fn``'s rows with the wall seconds and the peak GPU memory of the call added."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    rows = fn()
    if cuda:
        torch.cuda.synchronize(device)
    extra: dict[str, Any] = {"wall_s": round(time.perf_counter() - t0, 2)}
    if cuda:
        extra["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return [{**r, **extra} for r in rows]


def bench_model(name: str, tok, device: torch.device, args, write: Callable[[dict], None]) -> None:
    """Build ``name`` and run its rows, handing each (or its error) to ``write``."""
    from benchmarks.run import _records, bench_covariance, bench_eval, bench_targets
    from pmetlab import PMETHyperParams

    t0 = time.perf_counter()
    model = build_model(name, device)
    hp = PMETHyperParams.preset(name)
    write({"name": f"{name}:build", "seconds": round(time.perf_counter() - t0, 2), "params": _n_params(model)})
    peak = peak_matmul_flops(sizes=args.peak_sizes, repeats=5, device=device)
    records = _records(max(args.n_requests, args.eval_records), quick=False)
    jobs = {
        "targets": lambda m: bench_targets(m, tok, records[: args.n_requests], hp, peak),
        "covariance": lambda m: bench_covariance(m, tok, hp, args.cov_tokens, peak),
        "eval": lambda m: bench_eval(m, tok, records[: args.eval_records], 50),
    }
    for job, fn in jobs.items():
        if job not in args.only:
            continue
        try:
            for row in _timed_rows(lambda: fn(model), device):  # noqa: B023 (called at once)
                write({**row, "name": f"{name}:{row['name']}"})
        except Exception as exc:  # one failing row must not lose the others
            write({"name": f"{name}:{job}", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="folder of a saved tokenizer (tokenizer.json)")
    ap.add_argument("--models", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--n-requests", type=int, default=8)
    ap.add_argument("--cov-tokens", type=int, default=30000)
    ap.add_argument("--eval-records", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--only", default="targets,covariance,eval", help="comma-separated rows: targets,covariance,eval")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, for a dry run of the script")
    args = ap.parse_args(argv)
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    args.peak_sizes = (4096, 8192) if args.device.startswith("cuda") else (256,)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device here: benchmarks.gpu times the GPU paths (--device cpu for a dry run)")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(CONFIGS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    run_args = {**vars(args), "only": sorted(args.only)}
    result: dict[str, Any] = {"info": _device_info(device), "args": run_args, "rows": []}
    out = Path(args.out)

    def write(row: dict) -> None:
        result["rows"].append(row)
        logger.info("%s", {k: v for k, v in row.items() if k not in ("trace", "limit_note", "hparams")})
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)

    tok = load_tokenizer(args.tokenizer)
    for name in names:
        bench_model(name, tok, device, args, write)  # the model is freed on return
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
