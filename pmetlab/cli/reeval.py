"""``pmetlab reeval``: re-evaluate finished run directories from their saved deltas (issue #23), with
the evaluation families beyond teacher forcing; no target is optimised again."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .args import positive, run_dir

__all__ = ["add_reeval", "cmd_reeval", "beyond_arg"]


def beyond_arg(text: str) -> tuple[str, ...]:
    """``--beyond`` value: "all" or comma-separated family names (a bad name: one-line error)."""
    from ..evaluation.beyond import beyond_families

    try:
        return beyond_families(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_reeval(sub: argparse._SubParsersAction, fmt: type, verbosity: Callable) -> None:
    p = sub.add_parser(
        "reeval",
        help="re-evaluate finished runs from their saved deltas (evaluation beyond teacher forcing)",
        description="For each finished run directory: load its model and deltas.safetensors, evaluate "
        "the same records with the families beyond teacher forcing (generation accuracy, neighbourhood "
        "KL, CounterFact+, long prefixes, held-out perplexity) and write beyond_records.parquet, "
        "beyond_summary.csv, beyond_perplexity.csv and beyond.json beside the run's files.",
        formatter_class=fmt,
    )
    verbosity(p, False)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=run_dir, help="a finished run directory")
    p.add_argument(
        "--beyond",
        nargs="?",
        const="all",
        default="all",
        type=beyond_arg,
        metavar="FAMILIES",
        help="'all' (default) or comma-separated: generation,nkl,cfplus,prefix,perplexity",
    )
    p.add_argument("--max-new-tokens", type=positive, default=12, help="greedy decoding cap (tokens)")
    p.add_argument("--prefix-tokens", type=positive, default=50, help="held-out tokens before the rewrite prompt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reeval)


def cmd_reeval(args: argparse.Namespace) -> int:
    from ..evaluation.beyond_summary import summarize_beyond
    from ..runs.beyond_eval import evaluate_beyond_run

    families = args.beyond
    if not families:
        raise ValueError("--beyond names no family; pass 'all' or some of generation,nkl,cfplus,prefix,perplexity")
    for d in args.run_dirs:
        res = evaluate_beyond_run(
            d,
            families=families,
            max_new_tokens=args.max_new_tokens,
            prefix_tokens=args.prefix_tokens,
            progress=not args.no_progress,
        )
        s = summarize_beyond(res.records, res.perplexity)
        keep = [c for c in s.columns if not c.endswith(("_ci_low", "_ci_high"))]
        sys.stdout.write(f"{d}\n{s[keep].set_index('phase').T.to_string(float_format=lambda x: f'{x:.4g}')}\n")
    return 0
