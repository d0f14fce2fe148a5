"""What a run produced: :class:`ExperimentResult` (returned by ``run_experiment``, read back by
``load_run``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..editing.deltas import Deltas
from .rundir import RunDir

__all__ = ["ExperimentResult"]


@dataclass
class ExperimentResult:
    """What a run produced (also what :func:`pmetlab.runs.load_run` reads back).

    Attributes:
        run_dir: the run directory.
        summary: one row per phase ("pre", "post"): metric columns (0–100) with ``_ci_low`` /
            ``_ci_high``, ``n_records``, and ``model``, ``method``, ``dataset``, ``n_edits``,
            ``mode``, ``batch_size``, ``seed`` and ``label`` (when given).
        records: per-record metrics with a ``phase`` column.
        run: the contents of ``run.json`` (``run["spec"]``: every resolved setting).
    """

    run_dir: Path
    summary: pd.DataFrame
    records: pd.DataFrame
    run: dict

    @property
    def complete(self) -> bool:
        return self.run.get("status") == "complete"

    def deltas(self) -> Deltas | None:
        """The saved weight updates (None for method "none" or an unfinished edit phase)."""
        return RunDir(Path(self.run_dir)).load_deltas()
