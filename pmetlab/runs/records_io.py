"""Per-record metrics on disk (parquet, or CSV without pyarrow; list cells stored as lists or JSON
text) and the one-row-per-phase summary built from them; every write atomic. Used by the run
directory store (:mod:`pmetlab.runs.rundir`) and the rounds runs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..cache import atomic_path
from ..evaluation import summarize

__all__ = [
    "LIST_COLUMNS",
    "parquet_ok",
    "read_records",
    "records_file",
    "summary_table",
    "write_records",
    "write_summary_csv",
]

#: Record columns holding a tuple per record; stored as lists (parquet) or JSON text (CSV).
LIST_COLUMNS = ("neighborhood_prefers_true", "neighborhood_pred", "gen_texts")


def parquet_ok() -> bool:
    """Whether records are written as parquet (pyarrow importable) rather than CSV."""
    try:
        import pyarrow  # noqa: F401

        return True
    except ImportError:
        return False


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def write_records(folder: Path, df: pd.DataFrame) -> Path:
    """Write per-record metrics to ``folder/records.parquet`` (``records.csv`` without pyarrow),
    atomically; returns the path."""
    out = df.copy()
    if parquet_ok():
        path = folder / "records.parquet"
        for c in LIST_COLUMNS:
            if c in out.columns:
                out[c] = [None if _is_missing(v) else list(v) for v in out[c]]
        with atomic_path(path) as tmp:
            out.to_parquet(tmp, index=False)
    else:
        path = folder / "records.csv"
        for c in LIST_COLUMNS:
            if c in out.columns:
                out[c] = [
                    json.dumps([x.item() if hasattr(x, "item") else x for x in v])
                    if isinstance(v, (list, tuple, np.ndarray))
                    else None
                    for v in out[c]
                ]
        with atomic_path(path) as tmp:
            out.to_csv(tmp, index=False)
    return path


def records_file(folder: Path) -> Path | None:
    """The records file in ``folder`` (parquet preferred), or None."""
    for name in ("records.parquet", "records.csv"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_records(folder: Path) -> pd.DataFrame:
    """The per-record metrics in ``folder`` (empty when there are none); list cells are tuples of
    Python values however they were stored."""
    path = records_file(folder)
    if path is None:
        return pd.DataFrame()
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path)
        for c in LIST_COLUMNS:
            if c in df.columns:
                df[c] = [tuple(json.loads(v)) if isinstance(v, str) else None for v in df[c]]
    for c in LIST_COLUMNS:
        if c in df.columns:
            df[c] = [None if _is_missing(v) else tuple(v.tolist() if hasattr(v, "tolist") else v) for v in df[c]]
    return df


def summary_table(records: pd.DataFrame, columns: Mapping[str, Any]) -> pd.DataFrame:
    """One row per phase (:func:`pmetlab.evaluation.summarize`) with ``columns`` in front."""
    if records.empty:
        return pd.DataFrame()
    s = summarize(records, by=("phase",))
    for i, (k, v) in enumerate(columns.items()):
        s.insert(i, k, [v] * len(s))
    return s


def write_summary_csv(path: Path, df: pd.DataFrame) -> None:
    """Write ``df`` as CSV to ``path``, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
