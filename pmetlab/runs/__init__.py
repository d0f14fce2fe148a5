"""Runs: edit a model on a dataset, evaluate before and after, keep everything on disk.

:func:`run_experiment` is the one entry point notebooks and the CLI use; :func:`run_sweep` runs a
grid of them, :func:`load_run` and :func:`summarize_runs` read them back. A run directory holds

``run.json``
    resolved parameters (``params``, including the full hyperparameter dict, which identify the
    run; ``spec``, every resolved setting of the :class:`RunSpec` including the evaluation batch
    size and the covariance spec), package versions, the model identity, the dataset (file, sha256,
    how it was found) and the selection (ids and their hash), the seed, and per phase its status
    and wall time (``phases`` / ``wall_s``).
``records.parquet`` (``records.csv`` when pyarrow is missing)
    per-record metrics of every finished evaluation phase, with a ``phase`` column
    ("pre" = unedited model, "post" = edited model) and, on post rows, ``relative_specificity``.
``summary.csv``
    one row per phase: means ×100 with 95% intervals (:func:`pmetlab.evaluation.summarize`) plus
    ``model``, ``method``, ``dataset``, ``n_edits``, ``mode``, ``seed`` and ``label`` (when given).
``deltas.safetensors``
    the weight updates (:meth:`pmetlab.Deltas.save`); absent for method "none". For several
    batches it holds the **sum** of all batches' updates; ``meta["batches"]`` describes each batch
    (size, base fingerprint, timings, diagnostics), ``meta["mode"]`` says how they were computed.
    In "sequential" mode batch i was computed on the model edited by batches < i, so the sum is
    the final edited model (up to float32 rounding of the order of additions); it is applied to
    the *unedited* model. While the edit phase runs, each finished batch is kept in
    ``deltas_batches/`` so an interrupted run resumes at the next batch; the folder is removed
    once ``deltas.safetensors`` is written.

``run.json["status"]`` is "running" while an invocation works on the run, "complete" when every
phase is done, "failed" (with ``error``) when an invocation stopped on an exception, Ctrl-C or
SIGTERM (:mod:`~pmetlab.runs.signals`), including a dataset error before the first phase; a run
still "running" whose process is gone reads back as "interrupted" (:func:`run_status`). On
CounterFact data each edit batch keeps only the first record for each (subject, relation_id)
(``dataset.skipped_conflicting`` counts the others, which are neither edited nor evaluated).

Phases, in order: ``load`` (dataset, then the model when a phase needs it), ``covariance``
(E[k kᵀ] of the unedited model, from the statistics cache when present), ``edit``, ``eval_pre``,
``eval_post``. Each phase writes its output atomically and then marks itself done in
``run.json``; re-running with the same parameters and directory reuses finished phases (and
finished edit batches) and never loads the model when nothing is left to do. Their files are
verified before reuse (:mod:`~pmetlab.runs.verify`): a damaged one is moved to ``<name>.damaged``
and the phases that wrote or read it are redone, recorded in ``run.json["repairs"]``. A different
parameter set in a directory that already holds a run raises :class:`RunMismatchError`;
``resume=False`` deletes the run's files and starts over. While an invocation works in a directory,
``run.lock`` names its pid, host and start time (:mod:`~pmetlab.runs.lock`): a second invocation in
the same directory is refused (:class:`RunDirInUseError`), a lock left by a dead process is taken
over with a warning. The unedited model's metrics are also
shared across runs through a keyed cache (:mod:`pmetlab.runs.pre_eval`).

Modules: :mod:`~pmetlab.runs.spec` (``RunSpec``, ``resolve_hparams``), :mod:`~pmetlab.runs.rundir`
(the run directory store and ``run.json`` state), :mod:`~pmetlab.runs.phases` (the phases and
``run_experiment``), :mod:`~pmetlab.runs.context` (what the phases share),
:mod:`~pmetlab.runs.edits` (combining batches, target reach), :mod:`~pmetlab.runs.pre_eval`,
:mod:`~pmetlab.runs.verify`, :mod:`~pmetlab.runs.signals`, :mod:`~pmetlab.runs.lock`, :mod:`~pmetlab.runs.sweep` and
:mod:`~pmetlab.runs.load` (``summarize_runs`` summarises what is readable and lists what is not).
"""

from __future__ import annotations

from .edits import target_summary
from .experiment import run_experiment
from .load import RunSummaries, collect_summaries, load_run, phase_times, run_status, summarize_runs, with_run_columns
from .lock import RunDirInUseError
from .per_record import read_records_table, save_records, sweep_records
from .result import ExperimentResult
from .rundir import PHASES, RunDir, RunMismatchError, RunState
from .signals import RunTerminated
from .spec import DATASETS, DEFAULT_MODEL, METHODS, MODES, SUBSETS, RunSpec, resolve_hparams
from .sweep import run_sweep

__all__ = [
    "ExperimentResult",
    "RunMismatchError",
    "RunDirInUseError",
    "RunSpec",
    "RunDir",
    "RunState",
    "run_experiment",
    "run_sweep",
    "load_run",
    "phase_times",
    "summarize_runs",
    "collect_summaries",
    "RunSummaries",
    "run_status",
    "RunTerminated",
    "with_run_columns",
    "sweep_records",
    "save_records",
    "read_records_table",
    "resolve_hparams",
    "target_summary",
    "METHODS",
    "DATASETS",
    "MODES",
    "SUBSETS",
    "PHASES",
    "DEFAULT_MODEL",
]
