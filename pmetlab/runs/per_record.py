"""The per-record metrics behind a sweep's summaries, in one compact table that can be committed
next to them (method.md §10: every number of a reading can be re-derived from committed files).

:func:`sweep_records` gathers the records of every run of a sweep (one row per run, phase and
record), :func:`save_records` writes them as a gzipped CSV (atomically, floats rounded) and
:func:`read_records_table` reads such a file back.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..cache import atomic_path
from .rundir import read_records

__all__ = ["sweep_records", "save_records", "read_records_table", "RECORD_KEYS"]

#: The columns that name a row of :func:`sweep_records`, in this order (those the sweep has).
RECORD_KEYS = ("label", "method", "n_edits", "phase", "case_id")
_DIGITS = 6


def sweep_records(sweep: pd.DataFrame) -> pd.DataFrame:
    """The per-record metrics of every run of a sweep, with the run's label, method and n_edits.

    Args:
        sweep: the output of :func:`pmetlab.run_sweep` (a ``run_dir`` column; ``label``, ``method``,
            ``n_edits`` where present).

    Returns:
        One row per (run, phase, record): the :data:`RECORD_KEYS` the sweep has, then every numeric
        per-record column (metrics and target diagnostics) that is not empty in every run. Columns
        holding lists (e.g. ``neighborhood_prefers_true``) are left out.
    """
    if "run_dir" not in sweep.columns:
        raise KeyError(f"sweep_records needs the sweep's 'run_dir' column (from run_sweep); got {list(sweep.columns)}")
    keys = [k for k in ("label", "method", "n_edits") if k in sweep.columns]
    frames = []
    for run in sweep.drop_duplicates("run_dir").to_dict("records"):
        rec = read_records(Path(run["run_dir"]))
        numeric = [c for c in rec.columns if c not in RECORD_KEYS and pd.api.types.is_numeric_dtype(rec[c])]
        frames.append(rec[["phase", "case_id", *numeric]].assign(**{k: run[k] for k in keys}))
    if not frames:
        return pd.DataFrame(columns=[*keys, "phase", "case_id"])
    out = pd.concat(frames, ignore_index=True).dropna(axis=1, how="all")
    front = [k for k in RECORD_KEYS if k in out.columns]
    return out[front + [c for c in out.columns if c not in front]]


def save_records(records: pd.DataFrame, path: str | os.PathLike, *, digits: int = _DIGITS) -> Path:
    """Write ``records`` to ``path`` (a ``.csv.gz``), floats rounded to ``digits`` decimals, atomically
    (a temporary sibling renamed into place; the folder is created). Returns the path."""
    path = Path(path)
    if not path.name.endswith(".csv.gz"):
        raise ValueError(f"save_records writes a gzipped CSV; name the file '*.csv.gz', got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    floats = records.select_dtypes(include=[np.floating]).columns
    out = records.copy()
    out[floats] = out[floats].round(digits)
    # no name and mtime 0 in the gzip header: the same records give the same bytes, so a committed
    # file changes only with its numbers
    data = gzip.compress(out.to_csv(index=False).encode(), mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
    return path


def read_records_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a file written by :func:`save_records`."""
    return pd.read_csv(path)
