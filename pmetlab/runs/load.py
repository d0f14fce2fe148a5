"""Reading runs back: :func:`load_run` (one directory, finished or not), :func:`summarize_runs` and
:func:`collect_summaries` (many, or a sweep directory: what is readable is summarised, what is not
is listed) and :func:`with_run_columns`, which gives summary rows the run's resolved settings and
hyperparameters."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..editing.deltas import Deltas
from ..hparams import hparams_from_dict
from .edits import target_summary
from .lock import pid_alive
from .result import ExperimentResult
from .rundir import RunDir, summary_table
from .spec import summary_columns

logger = logging.getLogger(__name__)

__all__ = [
    "load_run",
    "summarize_runs",
    "collect_summaries",
    "RunSummaries",
    "run_status",
    "with_run_columns",
    "SETTING_COLUMNS",
]

#: Settings of a run added to summary rows that do not hold them already (from ``run.json``).
SETTING_COLUMNS = ("subset", "split", "generation", "n_gen_tokens", "eval_batch_size")


def _columns_of(run: Mapping[str, Any]) -> dict[str, Any]:
    p = run.get("params", {})
    return summary_columns(
        label=run.get("label"),
        model=p.get("model"),
        method=p.get("method"),
        dataset=p.get("dataset"),
        n_edits=p.get("n_edits"),
        mode=p.get("mode"),
        batch_size=p.get("batch_size"),
        seed=p.get("seed"),
    )


def _summary_disagrees(summary: pd.DataFrame | None, records: pd.DataFrame) -> str | None:
    """Why ``summary.csv`` does not describe ``records`` (None when it does): missing, without a
    row for every evaluated phase, or with other record counts."""
    if summary is None:
        return "is missing"
    if records.empty or "phase" not in records.columns:
        return None
    counts = records["phase"].value_counts()
    if "phase" not in summary.columns:
        return "has no 'phase' column"
    if set(summary["phase"].astype(str)) != set(counts.index.astype(str)):
        return (
            f"has rows for phases {sorted(set(summary['phase'].astype(str)))}, the records for {sorted(counts.index)}"
        )
    if "n_records" in summary.columns:
        got = dict(zip(summary["phase"].astype(str), summary["n_records"]))
        if any(got.get(str(ph)) != n for ph, n in counts.items()):
            return f"counts {got} records per phase, the records file {dict(counts)}"
    return None


def _read(run_dir: str | Path) -> ExperimentResult:
    """The run in ``run_dir``; its summary rebuilt from the records when ``summary.csv`` is missing,
    unreadable or disagrees with them (a warning says so; the file itself is left as it is)."""
    store = RunDir(Path(run_dir))
    if not store.has_run():
        raise FileNotFoundError(f"{str(store.path)!r} is not a pmetlab run directory (no run.json there)")
    run = store.read_run()
    records = store.read_records()
    try:
        summary = store.read_summary()
    except (OSError, ValueError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
        summary, why = None, f"is unreadable ({type(exc).__name__}: {exc})"
    else:
        why = _summary_disagrees(summary, records)
    if why is not None:
        if why != "is missing":
            logger.warning("%s %s; summarised from the records instead", store.summary_csv, why)
        summary = summary_table(records, _columns_of(run))
    return ExperimentResult(store.path, summary, records, run)


def _error_text(run: Mapping[str, Any], limit: int = 200) -> str:
    """The run's recorded error on one line, shortened to ``limit`` characters ("" when none)."""
    error = " ".join(str(run.get("error") or "").split())
    return error[:limit] + ("..." if len(error) > limit else "")


def load_run(run_dir: str | Path) -> ExperimentResult:
    """Read a run directory written by :func:`pmetlab.runs.run_experiment` (finished or not; an
    unfinished one is logged with its status and error).

    Raises:
        FileNotFoundError: ``run_dir`` has no ``run.json``. ValueError: ``run.json`` is unreadable.
    """
    res = _read(run_dir)
    status = run_status(res.run)
    if status != "complete":
        logger.warning(
            "run %s did not complete (status %s; phases done: %s)%s",
            res.run_dir,
            status,
            [k for k, v in res.run.get("phases", {}).items() if v.get("status") == "done"],
            f": {_error_text(res.run)}" if res.run.get("error") else "",
        )
    return res


def _process_gone(pid: object, host: object) -> bool:
    """Whether ``pid`` on ``host`` (this machine only; POSIX only) no longer exists."""
    if os.name != "posix" or host != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    return not pid_alive(pid)


def run_status(run: Mapping[str, Any]) -> str:
    """``run.json``'s status ("complete", "failed", "running"), or "interrupted" for a run recorded
    as running on this machine whose process is gone (killed without a chance to record it)."""
    status = str(run.get("status", "unknown"))
    if status == "running" and _process_gone(run.get("pid"), run.get("host")):
        return "interrupted"
    return status


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
    unique: dict[Path, Path] = {}  # one entry per run however it was named (twice, or through a link)
    for d in out:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


@dataclass
class RunSummaries:
    """What :func:`collect_summaries` found.

    Attributes:
        table: the summaries of the runs that have any (see :func:`summarize_runs`).
        skipped: run directory -> why it is not in ``table`` (unreadable, or no results yet).
    """

    table: pd.DataFrame
    skipped: dict[str, str] = field(default_factory=dict)


def _summary_rows(d: Path) -> pd.DataFrame:
    res = _read(d)  # not load_run: the status column and the skipped list say what it would log
    if res.summary.empty:
        error = f": {_error_text(res.run)}" if res.run.get("error") else ""
        raise LookupError(f"no results yet (status {run_status(res.run)}{error})")
    s = with_run_columns(res.summary.copy(), res.run, d)
    s["status"] = run_status(res.run)
    s["run_dir"] = str(d)
    return s


def collect_summaries(run_dirs: str | Path | Iterable[str | Path]) -> RunSummaries:
    """The summaries of the runs that have any, and the run directories that could not be
    summarised with the reason (each also logged as a warning). See :func:`summarize_runs`."""
    frames, skipped = [], {}
    for d in _expand_run_dirs(run_dirs):
        try:
            frames.append(_summary_rows(d))
        # one damaged run must not hide the others: run.json, records or summary.csv unreadable
        except (OSError, ValueError, LookupError, TypeError) as exc:
            why = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            skipped[str(d)] = " ".join(why.split())
            logger.warning("run %s not summarised: %s", d, skipped[str(d)])
    return RunSummaries(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), skipped)


def summarize_runs(run_dirs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """The summaries of several runs in one table, with the run's settings and resolved
    hyperparameters (:func:`with_run_columns`), its ``status`` (:func:`run_status`) and a
    ``run_dir`` column. A directory without ``run.json`` whose sub-directories hold runs (a sweep)
    stands for all of them. Runs that cannot be read, or have no results yet, are left out with a
    warning naming each (:func:`collect_summaries` also returns them); the table is empty when no
    run has results.

    Raises:
        FileNotFoundError: a directory does not exist or holds no run. ValueError: none given.
    """
    return collect_summaries(run_dirs).table


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
    if deltas_path.is_file() and hp:  # read from the update itself: also what a newer summary adds
        method = (run.get("params") or {}).get("method")
        targets = target_summary(Deltas.load(deltas_path), hparams_from_dict({"method": method, **hp}))
    post = summary["phase"] == "post" if "phase" in summary else pd.Series(True, index=summary.index)
    for k, v in (targets or {}).items():
        if k != "n_requests":
            summary[f"target_{k}"] = np.where(post, v, np.nan)
    return summary


def phase_times(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Wall seconds of every phase of each run (from run.json): columns ``run_dir``, ``label``,
    ``method``, ``n_edits``, ``phase``, ``status``, ``wall_s``; one row per run and phase."""
    rows = []
    unique: dict[Path, str] = {}  # one run named twice (or through another spelling) counts once
    for x in run_dirs:
        unique.setdefault(Path(x).resolve(), str(x))
    for d in unique.values():
        run = RunDir(Path(d)).read_run()
        params, spec = run.get("params", {}), run.get("spec", {})
        for phase, info in run.get("phases", {}).items():
            rows.append(
                {
                    "run_dir": d,
                    "label": spec.get("label"),
                    "method": params.get("method"),
                    "n_edits": params.get("n_edits"),
                    "phase": phase,
                    "status": info.get("status"),
                    "wall_s": info.get("wall_s"),
                }
            )
    return pd.DataFrame(rows, columns=["run_dir", "label", "method", "n_edits", "phase", "status", "wall_s"])
