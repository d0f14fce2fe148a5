"""``pmetlab arms``: the paired sweep of issue #21 (arms tuned with equal budgets on the tuning split,
then edited on the same evaluation records and compared paired)."""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--stage", default="all", choices=("plan", "tune", "all"), help="stop after this stage")
    p.add_argument("--seed", type=int, default=0, help="random seed of the runs")
    p.add_argument("--out", type=output_dir, default=None, help="run directories (default: runs/arms/<model>)")
    p.add_argument("--results", type=output_dir, default=None, help="where the tables go (default: --out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_arms)


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_arms(args: argparse.Namespace) -> int:
    from ..runs.arms import arm_tables, arms_by_name, evaluate_arms, plan_optimisations, tune_arms, write_arm_tables
    from ..runs.tune import TuningGrid

    arms = arms_by_name([a.strip() for a in args.arms.split(",")] if args.arms else None)
    grid = TuningGrid(tuple(args.lambdas), tuple(args.v_lrs))
    out = Path(args.out) if args.out else Path("runs") / "arms" / Path(args.model).name
    results = Path(args.results) if args.results else out
    common = dict(model=args.model, dataset=args.dataset)
    plan = plan_optimisations(arms, grid.points(), **common)
    _line(f"tuning: {plan['runs']} runs need {plan['optimisations']} optimisations ({plan['saved']} saved)")
    if args.stage == "plan":
        return 0
    opts = dict(seed=args.seed, progress=not args.no_progress)
    table, chosen = tune_arms(arms, grid, n_edits=args.tune_n, out_dir=out, **common, **opts)
    stem = f"arms_{args.dataset}"
    results.mkdir(parents=True, exist_ok=True)
    table.to_csv(results / f"{stem}_tuning.csv", index=False, float_format="%.6g")
    (results / f"{stem}_chosen.json").write_text(json.dumps(chosen, indent=1) + "\n")
    _line(table[["arm", "mom2_update_weight", "v_lr", "tuning_score", "selected"]].to_string(index=False))
    if args.stage == "tune":
        return 0
    chosen_points = [chosen[a.name] for a in arms]
    eval_plan = (
        plan_optimisations(arms, chosen_points[:1], **common) if len(set(map(str, chosen_points))) == 1 else None
    )
    summary, frames = evaluate_arms(arms, chosen, n_edits=args.n_edits, out_dir=out, **common, **opts)
    record = {"model": args.model, "dataset": args.dataset, "n_edits": args.n_edits, "tune_n": args.tune_n}
    record.update(grid={"lambdas": list(args.lambdas), "v_lrs": list(args.v_lrs)}, chosen=chosen, tuning_plan=plan)
    record["arms"] = [{"name": a.name, "method": a.method, "hparams": dict(a.hparams), "why": a.why} for a in arms]
    record["eval_plan"] = eval_plan
    paths = write_arm_tables(arm_tables(summary, frames), results, f"{stem}_{args.n_edits}", **record)
    _line("written: " + ", ".join(str(p) for p in paths))
    return 0
