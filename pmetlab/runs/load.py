"""Reading runs back: :func:`load_run` (one directory, finished or not), :func:`summarize_runs`
(many, or a sweep directory) and :func:`with_run_columns`, which gives summary rows the run's
resolved settings and hyperparameters."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..editing.deltas import Deltas
from ..hparams import hparams_from_dict
from .edits import target_summary
from .result import ExperimentResult
from .rundir import RunDir, summary_table
from .spec import summary_columns

logger = logging.getLogger(__name__)

__all__ = ["load_run", "summarize_runs", "with_run_columns", "SETTING_COLUMNS"]

#: Settings of a run added to summary rows that do not hold them already (from ``run.json``).
SETTING_COLUMNS = ("subset", "generation", "n_gen_tokens", "eval_batch_size")


def load_run(run_dir: str | Path) -> ExperimentResult:
    """Read a run directory written by :func:`pmetlab.runs.run_experiment` (finished or not).

    Raises:
        FileNotFoundError: ``run_dir`` has no ``run.json``.
    """
    store = RunDir(Path(run_dir))
    if not store.has_run():
        raise FileNotFoundError(f"{str(store.path)!r} is not a pmetlab run directory (no run.json there)")
    run = store.read_run()
    records = store.read_records()
    summary = store.read_summary()
    if summary is None:
        p = run.get("params", {})
        summary = summary_table(
            records,
            summary_columns(
                label=run.get("label"),
                model=p.get("model"),
                method=p.get("method"),
                dataset=p.get("dataset"),
                n_edits=p.get("n_edits"),
                mode=p.get("mode"),
                batch_size=p.get("batch_size"),
                seed=p.get("seed"),
            ),
        )
    if run.get("status") != "complete":
        logger.warning(
            "run %s is not complete (phases done: %s)",
            store.path,
            [k for k, v in run.get("phases", {}).items() if v.get("status") == "done"],
        )
    return ExperimentResult(store.path, summary, records, run)


def _expand_run_dirs(run_dirs: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    out: list[Path] = []
    for d in run_dirs:
        d = Path(d)
        if RunDir(d).has_run():
            out.append(d)
        elif d.is_dir() and (subs := sorted(p.parent for p in d.glob("*/run.json"))):
            out.extend(subs)  # a sweep directory
        elif d.is_dir():
            raise FileNotFoundError(
                f"{str(d)!r} is not a pmetlab run directory (no run.json in it or in its sub-directories)"
            )
        else:
            raise FileNotFoundError(f"run directory {str(d)!r} does not exist")
    if not out:
        raise ValueError("no run directories given")
    return out


def summarize_runs(run_dirs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """The summaries of several runs in one table, with the run's settings and resolved
    hyperparameters (:func:`with_run_columns`) and a ``run_dir`` column. A directory without
    ``run.json`` whose sub-directories hold runs (a sweep) stands for all of them."""
    frames = []
    for d in _expand_run_dirs(run_dirs):
        res = load_run(d)
        s = with_run_columns(res.summary.copy(), res.run, d)
        s["run_dir"] = str(d)
        frames.append(s)
    return pd.concat(frames, ignore_index=True)


def layers_text(layers: Sequence[int]) -> str:
    """[3, 4, 5] -> "3-5"; [3, 5] -> "3,5"."""
    ls = list(layers)
    if ls and ls == list(range(ls[0], ls[-1] + 1)) and len(ls) > 1:
        return f"{ls[0]}-{ls[-1]}"
    return ",".join(map(str, ls))


def _settings(run: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings (``run.json["spec"]``; runs written before it existed: their params)."""
    spec = run.get("spec") or run.get("params") or {}
    return {k: spec[k] for k in SETTING_COLUMNS if k in spec}


def with_run_columns(summary: pd.DataFrame, run: Mapping, run_dir: Path) -> pd.DataFrame:
    """The summary (modified in place and returned) with the run's settings that it lacks
    (:data:`SETTING_COLUMNS`), its resolved hyperparameters (``hp_<field>``; layers as "3-8" or
    "3,5") and, on post-edit rows, how far its target optimisation got (``target_*``)."""
    if summary.empty:
        return summary
    for k, v in _settings(run).items():
        if k not in summary.columns:
            summary[k] = [v] * len(summary)
    hp = dict((run.get("params") or {}).get("hparams") or {})
    hp.pop("method", None)
    for k, v in hp.items():
        if isinstance(v, list):
            v = layers_text(v) if k == "layers" else ",".join(map(str, v))
        summary[f"hp_{k}"] = [v] * len(summary)
    targets = run.get("targets")
    deltas_path = RunDir(Path(run_dir)).deltas
    if targets is None and deltas_path.is_file() and hp:
        method = (run.get("params") or {}).get("method")
        targets = target_summary(Deltas.load(deltas_path), hparams_from_dict({"method": method, **hp}))
    post = summary["phase"] == "post" if "phase" in summary else pd.Series(True, index=summary.index)
    for k, v in (targets or {}).items():
        if k != "n_requests":
            summary[f"target_{k}"] = np.where(post, v, np.nan)
    return summary
