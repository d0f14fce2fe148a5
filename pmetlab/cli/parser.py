"""The ``pmetlab`` argument parser: the global options and one small function per sub-command."""

from __future__ import annotations

import argparse

from .._version import __version__
from ..covspec import MIN_SEQ_LEN
from .args import chunk_length, output_dir, output_file, parse_key_value, parse_layers, positive, run_dir
from .arms import add_arms
from .commands import cmd_demo, cmd_notebooks, cmd_run, cmd_stats, cmd_summarize
from .evidence import add_targets, add_tune
from .reeval import add_reeval, beyond_arg

__all__ = ["PROG", "build_parser"]

PROG = "pmetlab"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where it says something: not when the help text already speaks of
    the default, and not for a default of None, a flag (False) or a counter."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        quiet = action.default is None or action.default is False or isinstance(action, argparse._CountAction)
        if quiet or "default" in text.lower():
            return action.help
        return super()._get_help_string(action)


_FMT = _HelpFormatter


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump; control characters in values escaped
        line = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)
        self.exit(2, f"{self.prog}: error: {line} (see {self.prog} --help)\n")


def _verbosity(p: argparse.ArgumentParser, top: bool) -> None:
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        help="more logging (-v: debug and tracebacks; -vv: every library)",
        **({"default": 0} if top else d),
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and errors", **({"default": False} if top else d)
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pmetlab`` parser: ``-v``/``-q``/``--version`` and the sub-commands run, stats,
    summarize, notebooks and demo (each sub-command's parser is built by its own function)."""
    parser = _Parser(
        prog=PROG, description="pmetlab: precise model editing (PMET, MEMIT) workbench.", formatter_class=_FMT
    )
    _verbosity(parser, top=True)
    parser.add_argument("--version", action="version", version=f"pmetlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_run, _add_stats, _add_summarize, _add_notebooks, _add_demo):
        add(sub)
    add_tune(sub, _FMT, _verbosity)
    add_arms(sub, _FMT, _verbosity)
    add_targets(sub, _FMT, _verbosity)
    add_reeval(sub, _FMT, _verbosity)
    return parser


def _add_run(sub: argparse._SubParsersAction) -> None:
    from ..runs.spec import DATASETS, METHODS, MODES, SPLITS, SUBSETS  # light: no model is loaded

    p = sub.add_parser(
        "run",
        help="edit a model on a dataset and evaluate it before/after",
        description="Edit N facts of a dataset into a model and evaluate before and after; "
        "writes run.json, records.parquet, summary.csv and deltas.safetensors "
        "to the run directory (re-running resumes finished phases).",
        formatter_class=_FMT,
    )
    _verbosity(p, top=False)
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local path")
    p.add_argument("--method", default="pmet", choices=METHODS, help="editing method ('none': evaluation only)")
    p.add_argument("--dataset", default="counterfact", choices=DATASETS, help="the facts edited and evaluated")
    p.add_argument("--n-edits", type=positive, default=10, help="number of records edited and evaluated")
    p.add_argument("--batch-size", type=positive, default=None, help="requests per batch (default: all at once)")
    p.add_argument(
        "--mode",
        default="batch",
        choices=MODES,
        help="batch: all batches computed on the unedited model; sequential: one after another",
    )
    p.add_argument(
        "--hparams",
        metavar="KEY=VALUE",
        type=parse_key_value,
        action="append",
        default=None,
        help="override a hyperparameter of the preset (repeatable; VALUE parsed as JSON, layers also as 3-8)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the run (recorded in run.json)")
    p.add_argument("--subset", default="first", choices=SUBSETS, help="first N records or a seeded sample")
    p.add_argument(
        "--split", default="eval", choices=SPLITS, help="records from the evaluation split, the tuning split or all"
    )
    p.add_argument(
        "--out", type=output_dir, default=None, help="run directory (default: runs/<model>_<method>_..._seed<seed>)"
    )
    p.add_argument("--no-generation", action="store_true", help="skip fluency/consistency generation")
    p.add_argument("--n-gen-tokens", type=positive, default=100, help="tokens generated per prompt")
    p.add_argument("--eval-batch-size", type=positive, default=32, help="prompt pairs per forward pass")
    p.add_argument("--label", default=None, help="a name carried into the summary")
    p.add_argument("--no-resume", action="store_true", help="delete a previous run in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=positive, default=1, help="processes for the target optimisation")
    p.add_argument(
        "--beyond",
        nargs="?",
        const="all",
        default=(),
        type=beyond_arg,
        metavar="FAMILIES",
        help="also evaluate beyond teacher forcing (issue #23; ~15 s/record + ~55 s/run on SmolLM2, CPU): 'all' when "
        "given alone, or comma-separated generation,nkl,cfplus,prefix,perplexity; off by default",
    )
    p.set_defaults(func=cmd_run)


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="precompute covariance statistics (cached)",
        description="Compute E[k kᵀ] of the FFN keys (or MHSA projection inputs) of some "
        "layers over a corpus and cache it, so later edits reuse it.",
        formatter_class=_FMT,
    )
    _verbosity(p, top=False)
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local path")
    p.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        help="e.g. 3-8 or 3,4,5 (default: the PMET preset's layers for the model)",
    )
    p.add_argument(
        "--corpus",
        default=None,
        help="'default', a text/JSONL file or folder, hf:<id>, model:<n> (default: the preset's)",
    )
    p.add_argument(
        "--tokens",
        type=positive,
        default=None,
        help="token budget; at least the key dimension (d_ff, e.g. 1536 for smollm2-135m), since fewer "
        "tokens make the covariance singular (default: the preset's)",
    )
    p.add_argument(
        "--seq-len",
        type=chunk_length,
        default=None,
        help=f"chunk length in tokens, at least {MIN_SEQ_LEN} (default: the preset's)",
    )
    p.add_argument(
        "--kind", default="ffn", choices=("ffn", "attn"), help="ffn: the FFN keys; attn: the MHSA projection inputs"
    )
    p.add_argument("--dtype", default=None, choices=("float32", "float64"), help="accumulation dtype")
    p.add_argument(
        "--device",
        default="auto",
        help="'auto' (resolved by pmetlab.devices: an accelerator when present, else the CPU) or a torch device string",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_stats)


def _add_summarize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "summarize",
        help="one table of the summaries of run directories",
        description="Print the pre/post summaries of run directories (a sweep directory stands for all runs in it).",
        formatter_class=_FMT,
    )
    _verbosity(p, top=False)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=run_dir, help="a run directory or a sweep directory")
    p.add_argument("--out", type=output_file, default=None, help="also write the full table to this CSV file")
    p.set_defaults(func=cmd_summarize)


def _add_notebooks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "notebooks",
        help="execute the notebooks, figures and tables into --out (or --copy them to edit, --list them)",
        description="Execute the numbered notebooks (papermill) with their default or given "
        "parameters; exit status 1 if any failed. --copy DIR writes editable copies of them "
        "instead (open DIR in JupyterLab) and --list lists them; neither runs anything.",
        formatter_class=_FMT,
    )
    _verbosity(p, top=False)
    p.add_argument(
        "--out",
        type=output_dir,
        default=None,
        help="output directory for figures, tables and executed notebooks (default: figures)",
    )
    p.add_argument(
        "--only", metavar="NAME", action="append", default=None, help="only this notebook (repeatable; e.g. 02)"
    )
    p.add_argument(
        "-p",
        "--parameter",
        metavar="KEY=VALUE",
        type=parse_key_value,
        action="append",
        default=None,
        help="notebook parameter (repeatable; VALUE parsed as JSON)",
    )
    p.add_argument("--smoke", action="store_true", help="smoke parameters: tiny and fast")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--copy",
        metavar="DIR",
        type=output_dir,
        default=None,
        help="write editable copies of the notebooks (both files of each jupytext pair) into DIR and exit",
    )
    what.add_argument("--list", action="store_true", help="list the notebooks with their titles and exit")
    p.add_argument("--force", action="store_true", help="with --copy: replace notebook files that exist in DIR")
    p.set_defaults(func=cmd_notebooks)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="one PMET edit of one fact, prediction before/after",
        description="A quick sanity check: write one counterfactual fact into the model with "
        "PMET and print its predictions before and after.",
        formatter_class=_FMT,
    )
    _verbosity(p, top=False)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default="{} is located in the country of", help="template with one {}")
    p.add_argument("--subject", default="The Eiffel Tower")
    p.add_argument("--target", default="Italy", help="the new object")
    p.add_argument("--true", dest="target_true", default="France", help="the current object")
    p.add_argument(
        "--hparams",
        metavar="KEY=VALUE",
        type=parse_key_value,
        action="append",
        default=None,
        help="override a PMET hyperparameter (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
