"""The ``pmetlab`` command line: run experiments, precompute statistics, summarise runs, run the
notebooks, and a one-edit demo.

    pmetlab run --method pmet --dataset counterfact --n-edits 10 --hparams v_num_grad_steps=20
    pmetlab stats --model smollm2-135m --layers 3-8 --tokens 100000
    torchrun --nproc-per-node 2 -m pmetlab stats --model smollm2-135m   # sharded over 2 workers
    pmetlab summarize runs/*            # or a sweep directory
    pmetlab notebooks --out figures --smoke
    pmetlab demo

User errors (bad arguments, unknown hyperparameters, missing files) print one line
``pmetlab: error: ...`` and exit with status 2; ``-v`` logs more (with the error's traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("pmetlab.cli")

PROG = "pmetlab"
_USER_ERRORS = (ValueError, KeyError, LookupError, FileNotFoundError)
_SUMMARY_COLUMNS = ("label", "method", "dataset", "n_edits", "mode", "phase", "n_records", "score",
                    "efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_token_acc",
                    "paraphrase_token_acc", "neighborhood_token_acc", "relative_specificity", "fluency",
                    "consistency")


# ---------------------------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------------------------
def parse_layers(text: str) -> list[int]:
    """'3-8' -> [3, 4, 5, 6, 7, 8]; '3,4,5' -> [3, 4, 5]; '2,5-7' -> [2, 5, 6, 7]."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out += list(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}; expected e.g. '3-8' or '3,4,5'") from None
    if not out:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}; expected e.g. '3-8' or '3,4,5'")
    return out


def parse_key_value(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' with VALUE parsed as JSON when it parses ('0.5', '[3,4]', 'true'), else a string."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    if key == "layers" and isinstance(value, str):
        value = parse_layers(value)
    return key, value


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _pairs_to_dict(pairs: Sequence[tuple[str, Any]] | None) -> dict[str, Any]:
    return dict(pairs or [])


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _verbosity(p: argparse.ArgumentParser, top: bool) -> None:
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="count", help="more logging (-v: debug and tracebacks; -vv: every library)",
                   **({"default": 0} if top else d))
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors",
                   **({"default": False} if top else d))


def build_parser() -> argparse.ArgumentParser:
    from .runs.spec import DATASETS, METHODS, MODES, SUBSETS  # light: no model is loaded

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog=PROG, description="pmetlab: precise model editing (PMET, MEMIT) workbench.",
                     formatter_class=fmt)
    _verbosity(parser, top=True)
    from ._version import __version__
    parser.add_argument("--version", action="version", version=f"pmetlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # run ----------------------------------------------------------------------------------
    p = sub.add_parser("run", help="edit a model on a dataset and evaluate it before/after",
                       description="Edit N facts of a dataset into a model and evaluate before and after; "
                                   "writes run.json, records.parquet, summary.csv and deltas.safetensors "
                                   "to the run directory (re-running resumes finished phases).",
                       formatter_class=fmt)
    _verbosity(p, top=False)
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local path")
    p.add_argument("--method", default="pmet", choices=METHODS)
    p.add_argument("--dataset", default="counterfact", choices=DATASETS)
    p.add_argument("--n-edits", type=_positive, default=10, help="number of records edited and evaluated")
    p.add_argument("--batch-size", type=_positive, default=None, help="requests per batch (default: all at once)")
    p.add_argument("--mode", default="batch", choices=MODES,
                   help="batch: all batches computed on the unedited model; sequential: one after another")
    p.add_argument("--hparams", metavar="KEY=VALUE", type=parse_key_value, action="append", default=None,
                   help="override a hyperparameter of the preset (repeatable; VALUE parsed as JSON, "
                        "layers also as 3-8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", default="first", choices=SUBSETS, help="first N records or a seeded sample")
    p.add_argument("--out", default=None, help="run directory (default runs/<model>_<method>_..._seed<seed>)")
    p.add_argument("--no-generation", action="store_true", help="skip fluency/consistency generation")
    p.add_argument("--n-gen-tokens", type=_positive, default=100, help="tokens generated per prompt")
    p.add_argument("--eval-batch-size", type=_positive, default=32, help="prompt pairs per forward pass")
    p.add_argument("--label", default=None, help="a name carried into the summary")
    p.add_argument("--no-resume", action="store_true", help="delete a previous run in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)

    # stats --------------------------------------------------------------------------------
    p = sub.add_parser("stats", help="precompute covariance statistics (cached)",
                       description="Compute E[k kᵀ] of the FFN keys (or MHSA projection inputs) of some "
                                   "layers over a corpus and cache it, so later edits reuse it.",
                       formatter_class=fmt)
    _verbosity(p, top=False)
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local path")
    p.add_argument("--layers", type=parse_layers, default=None,
                   help="e.g. 3-8 or 3,4,5 (default: the PMET preset's layers for the model)")
    p.add_argument("--corpus", default=None, help="'default', a text/JSONL file or folder, hf:<id>, model:<n> "
                                                  "(default: the preset's)")
    p.add_argument("--tokens", type=_positive, default=None, help="token budget (default: the preset's)")
    p.add_argument("--seq-len", type=_positive, default=None, help="chunk length (default: the preset's)")
    p.add_argument("--kind", default="ffn", choices=("ffn", "attn"))
    p.add_argument("--dtype", default=None, choices=("float32", "float64"), help="accumulation dtype")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_stats)

    # summarize ----------------------------------------------------------------------------
    p = sub.add_parser("summarize", help="one table of the summaries of run directories",
                       description="Print the pre/post summaries of run directories (a sweep directory "
                                   "stands for all runs in it).", formatter_class=fmt)
    _verbosity(p, top=False)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="also write the full table to this CSV file")
    p.set_defaults(func=_cmd_summarize)

    # notebooks ----------------------------------------------------------------------------
    p = sub.add_parser("notebooks", help="execute the notebooks, figures and tables into --out",
                       description="Execute the numbered notebooks (papermill) with their default or given "
                                   "parameters; exit status 1 if any failed.", formatter_class=fmt)
    _verbosity(p, top=False)
    p.add_argument("--out", default="figures", help="output directory for figures, tables and executed notebooks")
    p.add_argument("--only", metavar="NAME", action="append", default=None, help="run only this notebook (repeatable)")
    p.add_argument("-p", "--parameter", metavar="KEY=VALUE", type=parse_key_value, action="append", default=None,
                   help="notebook parameter (repeatable; VALUE parsed as JSON)")
    p.add_argument("--smoke", action="store_true", help="smoke parameters: tiny and fast")
    p.set_defaults(func=_cmd_notebooks)

    # demo ---------------------------------------------------------------------------------
    p = sub.add_parser("demo", help="one PMET edit of one fact, prediction before/after",
                       description="A quick sanity check: write one counterfactual fact into the model with "
                                   "PMET and print its predictions before and after.", formatter_class=fmt)
    _verbosity(p, top=False)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default="{} is located in the country of", help="template with one {}")
    p.add_argument("--subject", default="The Eiffel Tower")
    p.add_argument("--target", default="Italy", help="the new object")
    p.add_argument("--true", dest="target_true", default="France", help="the current object")
    p.add_argument("--hparams", metavar="KEY=VALUE", type=parse_key_value, action="append", default=None,
                   help="override a PMET hyperparameter (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def _echo(text: str = "") -> None:
    """The command's output (stdout); logging goes to stderr."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def _table(df, columns: Sequence[str] = _SUMMARY_COLUMNS) -> str:
    import pandas as pd

    cols = [c for c in columns if c in df.columns and not df[c].isna().all()]
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.1f}".format):
        return df[cols].to_string(index=False) if cols else df.to_string(index=False)


def _cmd_run(args: argparse.Namespace) -> int:
    from .runs import RunDir, run_experiment

    res = run_experiment(model=args.model, method=args.method, dataset=args.dataset, n_edits=args.n_edits,
                         batch_size=args.batch_size, mode=args.mode, hparams=_pairs_to_dict(args.hparams),
                         seed=args.seed, subset=args.subset, out_dir=args.out, generation=not args.no_generation,
                         n_gen_tokens=args.n_gen_tokens, eval_batch_size=args.eval_batch_size, label=args.label,
                         resume=not args.no_resume, progress=not args.no_progress)
    _echo(_table(res.summary))
    _echo(f"run directory: {res.run_dir}")
    store = RunDir(res.run_dir)
    _echo(f"summary: {store.summary_csv}; records: {store.records}; run record: {store.run_json}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from .experiments import resolve_hparams
    from .models.loading import load_model
    from .stats import covariance_cache_paths, layer_covariances

    from .devices import worker_device
    from .distributed import init_from_env

    hp = resolve_hparams(args.model, "pmet")
    layers = args.layers if args.layers is not None else list(hp.layers)
    device = worker_device(args.device)  # under a launcher: one accelerator per worker
    shard = init_from_env(device)  # torchrun / accelerate launch: shard the corpus across workers
    model, tok = load_model(args.model, device=device)
    # the preset's settings; the options that were given override them
    spec = hp.covariance.replace(corpus=args.corpus, n_tokens=args.tokens, seq_len=args.seq_len, dtype=args.dtype)
    covs = layer_covariances(model, tok, layers, kind=args.kind, spec=spec, progress=not args.no_progress,
                             shard=shard)
    if not shard.is_main:
        return 0
    if shard.world > 1:
        _echo(f"merged the statistics of {shard.world} workers")
    paths = covariance_cache_paths(model, covs, kind=args.kind)
    for l, sm in covs.items():
        where = str(paths[l]) if paths[l].is_file() else f"{paths[l]} (not written: non-finite values, see the log)"
        _echo(f"layer {l:3d} {args.kind}: {tuple(sm.sum.shape)} from {sm.count} tokens -> {where}")
    return 0


def _cmd_summarize(args: argparse.Namespace) -> int:
    from .runs import summarize_runs

    df = summarize_runs(args.run_dirs)
    shown = df.copy()
    shown["run"] = [Path(d).name for d in shown["run_dir"]]
    _echo(_table(shown, ("run",) + _SUMMARY_COLUMNS))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
        _echo(f"wrote {out}")
    return 0


_OK_STATUSES = {"ok", "passed", "pass", "success", "succeeded", "done", "skipped", "completed"}


def _notebook_failed(r: dict) -> bool:
    if r.get("ok") is False or r.get("success") is False:
        return True
    status = r.get("status")
    if status is not None:
        return str(status).lower() not in _OK_STATUSES
    return bool(r.get("error"))


def _notebook_table(results: list[dict]) -> str:
    """One line per notebook: name, status, seconds, then what went wrong (error, missing files)."""
    import pandas as pd

    rows = []
    for r in results:
        row = {"name": r.get("name"), "status": r.get("status", "failed" if _notebook_failed(r) else "ok")}
        if "seconds" in r:
            row["seconds"] = round(float(r["seconds"]), 1) if r["seconds"] is not None else None
        problem = []
        if r.get("error"):
            problem.append((f"cell {r['cell']}: " if r.get("cell") is not None else "") + str(r["error"]))
        if r.get("missing"):
            problem.append("missing " + ", ".join(map(str, r["missing"])))
        row["detail"] = " ".join("; ".join(problem).split())[:120]
        rows.append(row)
    with pd.option_context("display.width", 200, "display.max_colwidth", 120):
        return pd.DataFrame(rows).to_string(index=False)


def _cmd_notebooks(args: argparse.Namespace) -> int:
    import pandas as pd

    try:
        from .notebooks import run_notebooks
    except ImportError as exc:
        raise ValueError(f"notebook support is unavailable ({exc}); install the 'notebooks' extra "
                         f"(pip install 'pmetlab[notebooks]')") from None
    results = run_notebooks(args.out, names=args.only, parameters=_pairs_to_dict(args.parameter) or None,
                            smoke=args.smoke)
    results = list(results or [])
    if results:
        _echo(_notebook_table(results))
    failed = [r for r in results if _notebook_failed(r)]
    _echo(f"{len(results) - len(failed)}/{len(results)} notebooks ok" + (
        f"; failed: {', '.join(str(r.get('name', '?')) for r in failed)}" if failed else ""))
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .editing.compute import compute_deltas
    from .editing.deltas import edited
    from .evaluation import score_pairs
    from .models.loading import load_model
    from .requests import EditRequest
    from .runs import resolve_hparams

    req = EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target, target_true=args.target_true)
    hp = resolve_hparams(args.model, "pmet", _pairs_to_dict(args.hparams))
    model, tok = load_model(args.model)
    prompts = [req.text, f"{args.subject}, which is in the country of"]

    def report(tag: str) -> None:
        _echo(f"--- {tag}")
        for pr in prompts:
            sc = score_pairs(model, tok, [pr, pr], [req.target_new, req.target_true], progress=False)
            p_new, p_true = (float(torch.exp(torch.tensor(-x))) for x in sc.nll)
            ids = tok(pr, return_tensors="pt").to(model.device)
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            cont = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            _echo(f"{pr!r} -> {cont.strip()!r}   P({req.target_new})={p_new:.3f}  P({req.target_true})={p_true:.3f}")

    report("before the edit")
    torch.manual_seed(hp.seed)
    deltas = compute_deltas(model, tok, [req], hp, progress=not args.no_progress)
    with edited(model, deltas):
        report(f"after the PMET edit {req.subject!r}: {req.target_true!r} -> {req.target_new!r}")
    _echo("update norms: " + ", ".join(f"{n} {v:.2f}" for n, v in deltas.norms().items()))
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(verbose: int, quiet: bool) -> None:
    """pmetlab logs at INFO (-v: DEBUG with error tracebacks; -vv: every library at DEBUG; -q: warnings)."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    logging.getLogger("pmetlab").setLevel(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))


def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(msg).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pmetlab`` command line; returns the exit status (0 ok, 1 a notebook failed,
    2 a user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or an argparse error (2, message printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    _configure_logging(getattr(args, "verbose", 0) or 0, getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as exc:
        logger.debug("error details", exc_info=True)
        sys.stderr.write(f"{PROG}: error: {_one_line(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
