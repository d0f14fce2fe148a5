"""Compatibility module: the orchestration layer lives in :mod:`pmetlab.runs` (see its docstring
for the run directory). Existing imports from ``pmetlab.experiments`` keep working; new code
imports from ``pmetlab.runs``."""

from __future__ import annotations

from .runs import (
    DATASETS,
    METHODS,
    MODES,
    PHASES,
    SUBSETS,
    ExperimentResult,
    RunMismatchError,
    load_run,
    resolve_hparams,
    run_experiment,
    run_sweep,
    summarize_runs,
    target_summary,
)

__all__ = [
    "ExperimentResult",
    "RunMismatchError",
    "run_experiment",
    "run_sweep",
    "load_run",
    "summarize_runs",
    "resolve_hparams",
    "METHODS",
    "DATASETS",
    "MODES",
    "PHASES",
    "SUBSETS",
    "target_summary",
]
