"""``pmetlab arms``: the paired sweep of issue #21 (arms tuned with equal budgets on the tuning split,
then edited on the same evaluation records and compared paired)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .args import output_dir, positive
from .evidence import parse_numbers

__all__ = ["add_arms", "cmd_arms"]


def add_arms(sub: argparse._SubParsersAction, fmt: type, verbosity: Callable) -> None:
    from ..runs.arms import WHY_PMET_TRAILS
    from ..runs.spec import DATASETS

    p = sub.add_parser(
        "arms",
        help="the paired sweep: arms tuned with equal budgets, compared paired on the same records",
        description="Tune every arm (a method and its switches) on the tuning split with the same "
        "lambda x v_lr grid, edit the first N evaluation records with each arm's chosen point, and "
        "write the arms table, the paired differences and the per-record metrics. Resumable: finished "
        "runs and cached targets are reused; arms that share an optimisation share its targets. "
        f"Arms: {', '.join(a.name for a in WHY_PMET_TRAILS)}.",
        formatter_class=fmt,
    )
    verbosity(p, False)
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local path")
    p.add_argument("--dataset", default="counterfact", choices=DATASETS, help="the facts edited")
    p.add_argument("--n-edits", type=positive, default=256, help="evaluation records, edited in one batch")
    p.add_argument("--tune-n", type=positive, default=32, help="tuning records per grid point")
    p.add_argument("--lambdas", type=parse_numbers, default="300,1000,3000", help="mom2_update_weight grid")
    p.add_argument("--v-lrs", type=parse_numbers, default="0.25,0.5,1", help="v_lr grid")
    p.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    p.add_argument("--stage", default="all", choices=("plan", "all"), help="'plan': only count the optimisations")
    p.add_argument("--seed", type=int, default=0, help="random seed of the runs")
    p.add_argument("--out", type=output_dir, default=None, help="run directories (default: runs/arms/<model>)")
    p.add_argument("--results", type=output_dir, default=None, help="where the tables go (default: --out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_arms)


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_arms(args: argparse.Namespace) -> int:
    from ..runs.arms import arms_by_name, plan_optimisations, run_arm_sweep
    from ..runs.tune import TuningGrid

    names = [a.strip() for a in args.arms.split(",")] if args.arms else None
    grid = TuningGrid(tuple(args.lambdas), tuple(args.v_lrs))
    plan = plan_optimisations(arms_by_name(names), grid.points(), model=args.model, dataset=args.dataset)
    _line(f"tuning: {plan['runs']} runs need {plan['optimisations']} optimisations ({plan['saved']} saved)")
    if args.stage == "plan":
        return 0
    out = Path(args.out) if args.out else Path("runs") / "arms" / Path(args.model).name
    sweep = run_arm_sweep(
        model=args.model,
        dataset=args.dataset,
        n_edits=args.n_edits,
        tune_n=args.tune_n,
        grid=grid,
        out_dir=out,
        arms=names,
        seed=args.seed,
        progress=not args.no_progress,
    )
    ev = sweep.plans["evaluation"]
    _line(f"evaluation: {ev['runs']} runs needed {ev['optimisations']} optimisations ({ev['saved']} saved)")
    paths = sweep.save(Path(args.results) if args.results else out, f"arms_{args.dataset}_{args.n_edits}")
    _line(sweep.tables["arms"][["arm", "score", "score_ci_low", "score_ci_high"]].to_string(index=False))
    _line("written: " + ", ".join(str(p) for p in paths))
    return 0
