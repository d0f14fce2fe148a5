"""``pmetlab tune`` (choose presets on the tuning split) and ``pmetlab targets`` (a target worker,
started by ``torchrun`` or by ``--workers N``): their parsers and commands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from .args import output_dir, pairs_to_dict, parse_key_value, positive

__all__ = ["add_tune", "add_targets", "cmd_tune", "cmd_targets", "parse_numbers"]

AddVerbosity = Callable[[argparse.ArgumentParser, bool], None]


def parse_numbers(text: str) -> tuple[float, ...]:
    """'300,1000,3000' -> (300.0, 1000.0, 3000.0); every value positive."""
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 300,1000,3000, got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers such as 300,1000,3000, got {text!r}")
    return values


def _run_selection(p: argparse.ArgumentParser) -> None:
    from ..runs.spec import DATASETS, METHODS, MODES, SPLITS, SUBSETS

    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local path")
    p.add_argument("--method", default="pmet", choices=METHODS, help="editing method")
    p.add_argument("--dataset", default="counterfact", choices=DATASETS, help="the facts edited")
    p.add_argument("--n-edits", type=positive, default=10, help="number of records edited")
    p.add_argument("--batch-size", type=positive, default=None, help="requests per batch (default: all at once)")
    p.add_argument("--mode", default="batch", choices=MODES, help="as for pmetlab run")
    p.add_argument("--hparams", metavar="KEY=VALUE", type=parse_key_value, action="append", default=None)
    p.add_argument("--seed", type=int, default=0, help="random seed of the run")
    p.add_argument("--subset", default="first", choices=SUBSETS, help="first N records or a seeded sample")
    p.add_argument("--split", default="eval", choices=SPLITS, help="the dataset split")


def add_targets(sub: argparse._SubParsersAction, fmt: type, verbosity: AddVerbosity) -> None:
    p = sub.add_parser(
        "targets",
        help="optimise a run's targets into the cache (a worker; use with torchrun)",
        description="Optimise the targets of a run (the same arguments as pmetlab run) into the "
        "per-request cache. Under torchrun (or --workers N of run/tune) each worker takes its "
        "share of the requests; a later pmetlab run with the same arguments reads them.",
        formatter_class=fmt,
    )
    verbosity(p, False)
    _run_selection(p)
    p.add_argument("--specs", default=None, help="a JSON list of run arguments (written by --workers N)")
    p.add_argument("--device", default="auto", help="'auto' or a torch device string")
    p.add_argument(
        "--chunk-size",
        type=positive,
        default=None,
        help="requests optimised together (default: the device's budget, 8 on a CPU)",
    )
    p.set_defaults(func=cmd_targets)


def add_tune(sub: argparse._SubParsersAction, fmt: type, verbosity: AddVerbosity) -> None:
    from ..runs.spec import DATASETS

    p = sub.add_parser(
        "tune",
        help="choose presets on the tuning split (lambda x v_lr grid, equal budget per method)",
        description="Edit the first N records of the dataset's tuning split in one batch at every "
        "point of the lambda x v_lr grid, for every method; write the full table (CSV), the chosen "
        "point per method (JSON) and, with --write-preset, the presets.",
        formatter_class=fmt,
    )
    verbosity(p, False)
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local path")
    p.add_argument("--dataset", default="counterfact", choices=DATASETS, help="the dataset tuned for")
    p.add_argument("--n-edits", type=positive, default=32, help="tuning records edited in one batch")
    p.add_argument("--lambdas", type=parse_numbers, default="300,1000,3000", help="mom2_update_weight grid")
    p.add_argument("--v-lrs", type=parse_numbers, default="0.25,0.5,1", help="v_lr grid")
    p.add_argument("--methods", default="pmet,memit", help="comma-separated methods, each gets the whole grid")
    p.add_argument("--hparams", metavar="KEY=VALUE", type=parse_key_value, action="append", default=None)
    p.add_argument("--seed", type=int, default=0, help="random seed of the runs")
    p.add_argument("--out", type=output_dir, default=None, help="runs and tables (default: runs/tune/<model>)")
    p.add_argument("--results", type=output_dir, default=None, help="where the table and choice go (default: --out)")
    p.add_argument("--write-preset", action="store_true", help="write the chosen points into pmetlab/presets")
    p.add_argument("--workers", type=positive, default=1, help="processes for the target optimisation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_tune)


def cmd_targets(args: argparse.Namespace) -> int:
    from ..devices import worker_device
    from ..distributed import barrier, init_from_env
    from ..models.loading import load_model
    from ..runs.context import ModelPool
    from ..runs.spec import RunSpec
    from ..runs.workers import fill_spec_targets, specs_from_arguments

    if args.specs is not None:
        specs = specs_from_arguments(json.loads(Path(args.specs).read_text()))
    else:
        keys = ("model", "method", "dataset", "n_edits", "batch_size", "mode", "seed", "subset", "split")
        specs = [RunSpec.build(**{k: getattr(args, k) for k in keys}, hparams=pairs_to_dict(args.hparams))]
    device = worker_device(args.device)
    shard = init_from_env(device)
    pool = ModelPool(lambda name: load_model(name, device=device))
    chunk = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    n = fill_spec_targets(specs, pool, rank=shard.rank, world=shard.world, barrier=barrier, **chunk)
    _line(f"worker {shard.rank} of {shard.world}: optimised the targets of {n} request(s)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ..runs.tune import TuningGrid, tune, write_presets

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    out = Path(args.out) if args.out else Path("runs") / "tune" / Path(args.model).name
    res = tune(
        model=args.model,
        dataset=args.dataset,
        grid=TuningGrid(tuple(args.lambdas), tuple(args.v_lrs)),
        n_edits=args.n_edits,
        out_dir=out,
        methods=methods,
        seed=args.seed,
        hparams=pairs_to_dict(args.hparams),
        workers=args.workers,
        progress=not args.no_progress,
    )
    csv, js = res.save(Path(args.results) if args.results else out, f"tune_{args.dataset}")
    _show(res, csv, js)
    if args.write_preset:
        from importlib import resources

        presets = Path(str(resources.files("pmetlab.presets")))
        for path in write_presets(res, model=args.model, dataset=args.dataset, source=str(csv), presets_dir=presets):
            _line(f"preset written: {path}")
    return 0


def _line(text: str) -> None:
    import sys

    sys.stdout.write(text + "\n")


def _show(res, csv: Path, js: Path) -> None:
    cols = ["method", "mom2_update_weight", "v_lr", "tuning_score", "selected"]
    _line(res.table[[c for c in cols if c in res.table.columns]].to_string(index=False))
    _line(f"table: {csv}; chosen: {js}")
