"""The run directory store: where a run's files live, ``run.json`` as a small state machine
(phases, status, atomic saves), per-record metrics (parquet, or CSV without pyarrow) and
``summary.csv``. See :mod:`pmetlab.runs` for what each file holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ..cache import atomic_write_json
from ..editing.deltas import Deltas
from ..hparams import hparams_from_dict
from ..versions import versions
from .records_io import (
    LIST_COLUMNS,
    parquet_ok,
    read_records,
    records_file,
    summary_table,
    write_records,
    write_summary_csv,
)
from .spec import RunSpec

logger = logging.getLogger(__name__)

__all__ = [
    "RunDir",
    "RunState",
    "RunMismatchError",
    "RUN_FORMAT",
    "PHASES",
    "DEFAULT_RUNS_DIR",
    "LIST_COLUMNS",
    "read_records",
    "write_records",
    "summary_table",
    "parquet_ok",
    "check_out_dir",
]

RUN_FORMAT = 1
PHASES = ("load", "covariance", "edit", "eval_pre", "eval_post")
DEFAULT_RUNS_DIR = Path("runs")


def _with_hparam_defaults(params: Any) -> Any:
    """Saved run params with the hyperparameter fields added since the run started filled in with
    their defaults (a new field that keeps today's behaviour must not orphan older runs)."""
    hp = params.get("hparams") if isinstance(params, dict) else None
    if not isinstance(hp, dict) or "method" not in hp:
        return params
    try:
        full = hparams_from_dict(hp).to_dict()
    except (KeyError, TypeError, ValueError):
        return params
    return json.loads(json.dumps({**params, "hparams": full}))


class RunMismatchError(ValueError):
    """The run directory holds a run with other parameters (or another model/dataset)."""


def now() -> str:
    """The current UTC time, as run.json records it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every differing (nested) key."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------------------------------------
# the directory
# ---------------------------------------------------------------------------------------------
def check_out_dir(out_dir: Any, what: str = "out_dir") -> Path | None:
    """``out_dir`` as a Path (None stays None); an empty or blank path is refused, since it would
    put the run's files into the current directory."""
    if out_dir is None:
        return None
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ValueError(f"{what} must be a directory path or None, got {out_dir!r} ({type(out_dir).__name__})")
    if not str(out_dir).strip():
        raise ValueError(
            f"{what} must be a directory path, got {str(out_dir)!r} (an empty path would write into the current "
            f"directory); pass a directory, or None for the default runs/<model>_<method>_..._seed<seed>"
        )
    return Path(out_dir).expanduser()


#: run.json's containers and the JSON type each must have when present.
_RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "status": str,
    "params": dict,
    "spec": dict,
    "phases": dict,
    "wall_s": dict,
    "outputs": dict,
    "repairs": list,
    "resumes": list,
    "versions": dict,
    "model": (dict, type(None)),
    "dataset": (dict, type(None)),
}


def _record_problem(data: Mapping[str, Any]) -> str | None:
    """What in a run record has the wrong shape (a field of another JSON type, a phase entry that
    is not an object with a string status), or None."""
    for key, kind in _RECORD_FIELDS.items():
        if key in data and not isinstance(data[key], kind):
            return f"field {key!r} is a JSON {type(data[key]).__name__}"
    for name, entry in (data.get("phases") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("status", ""), str):
            return f"phase {name!r} is {entry!r:.80}, not an object with a status"
    return None


#: What evaluation beyond teacher forcing writes into a run (:mod:`pmetlab.runs.beyond_eval`): derived
#: from the run's deltas, so deleted with the run's own files when it starts over.
BEYOND_FILES = (
    "beyond_summary.csv",
    "beyond_perplexity.csv",
    "beyond_records.parquet",
    "beyond_records.csv",
    "beyond.json",
)


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory; ask it for paths instead of building file names."""

    path: Path

    RUN_FILES = ("run.json", "records.parquet", "records.csv", "summary.csv", "deltas.safetensors") + BEYOND_FILES

    @classmethod
    def for_spec(cls, spec: RunSpec, out_dir: str | Path | None) -> RunDir:
        """``out_dir``, or ``runs/<spec.default_dir_name()>`` when None (an empty path is refused)."""
        given = check_out_dir(out_dir)
        path = given if given is not None else DEFAULT_RUNS_DIR / spec.default_dir_name()
        if path.exists() and not path.is_dir():
            raise ValueError(f"out_dir {str(path)!r} exists and is not a directory")
        return cls(path)

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def summary_csv(self) -> Path:
        return self.path / "summary.csv"

    @property
    def deltas(self) -> Path:
        return self.path / "deltas.safetensors"

    @property
    def batches_dir(self) -> Path:
        """Finished edit batches of an unfinished multi-batch edit phase."""
        return self.path / "deltas_batches"

    def batch_deltas(self, i: int) -> Path:
        return self.batches_dir / f"batch_{i:04d}.safetensors"

    @property
    def records(self) -> Path | None:
        """The records file (parquet or CSV), or None before the first evaluation."""
        return records_file(self.path)

    def has_run(self) -> bool:
        return self.run_json.is_file()

    def read_run(self) -> dict:
        try:
            data = json.loads(self.run_json.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{self.run_json} is unreadable ({type(exc).__name__}: {exc}); pass resume=False to start the run over"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{self.run_json} holds a JSON {type(data).__name__}, not a run record (an object); "
                f"pass resume=False to start the run over"
            )
        problem = _record_problem(data)
        if problem is not None:
            raise ValueError(f"{self.run_json} is damaged: {problem}; pass resume=False to start the run over")
        return data

    def read_records(self) -> pd.DataFrame:
        return read_records(self.path)

    def write_records(self, df: pd.DataFrame) -> Path:
        return write_records(self.path, df)

    def read_summary(self) -> pd.DataFrame | None:
        return pd.read_csv(self.summary_csv) if self.summary_csv.is_file() else None

    def write_summary(self, df: pd.DataFrame) -> Path:
        write_summary_csv(self.summary_csv, df)
        return self.summary_csv

    def load_deltas(self) -> Deltas | None:
        return Deltas.load(self.deltas) if self.deltas.is_file() else None

    def set_aside(self, path: Path) -> Path:
        """Move a damaged file to ``<name>.damaged`` (kept for inspection; replaces an older one)."""
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        return aside

    def remove_batches(self) -> None:
        if self.batches_dir.is_dir():
            shutil.rmtree(self.batches_dir)

    def clear(self) -> None:
        """Delete the files a run writes (and nothing else: the directory may hold the user's files)."""
        for name in self.RUN_FILES:
            for p in (self.path / name, self.path / f"{name}.damaged"):
                if p.is_file():
                    p.unlink()
        self.remove_batches()


# ---------------------------------------------------------------------------------------------
# run.json
# ---------------------------------------------------------------------------------------------
class RunState:
    """``run.json`` in memory: status, phases, outputs; every :meth:`save` is atomic."""

    def __init__(self, store: RunDir, data: dict, *, begun: bool = False) -> None:
        self.store = store
        self.data = data
        self.begun = begun  # whether this invocation has marked the run running (see begin)

    @classmethod
    def open(cls, store: RunDir, spec: RunSpec, *, resume: bool) -> RunState:
        """The state of the run in ``store``: resumed when it holds a run with the same params
        (else :class:`RunMismatchError`), or a new one (``resume=False`` deletes the old run)."""
        if store.has_run() and resume:
            return cls._resume(store, spec)
        if store.has_run():
            logger.info("resume=False: deleting the previous run in %s", store.path)
        store.clear()
        store.path.mkdir(parents=True, exist_ok=True)
        data = {
            "format": RUN_FORMAT,
            "status": "running",
            "created_at": now(),
            "params": spec.params,
            "spec": spec.to_dict(),
            "label": spec.label,
            "hparams_overrides": spec.overrides,
            "hparams_preset": spec.preset,
            "seed": spec.seed,
            "versions": versions(),
            "model": None,
            "dataset": None,
            "phases": {p: {"status": "pending"} for p in PHASES},
            "wall_s": {},
            "outputs": {},
        }
        state = cls(store, data)
        state.begin()
        return state

    @classmethod
    def _resume(cls, store: RunDir, spec: RunSpec) -> RunState:
        data = store.read_run()
        where = store.path
        if data.get("format") != RUN_FORMAT:
            raise RunMismatchError(
                f"{where} holds a run of format {data.get('format')!r}, not {RUN_FORMAT}; "
                f"use another out_dir or resume=False to start over"
            )
        params = spec.params
        if _with_hparam_defaults(data.get("params")) != params:
            changes = diff(data.get("params") or {}, params)
            raise RunMismatchError(
                f"{where} already holds a run with other parameters ({'; '.join(changes[:8])}"
                f"{'; ...' if len(changes) > 8 else ''}); use another out_dir, or resume=False to start over"
            )
        cur = versions()
        if data.get("versions") != cur:
            logger.warning(
                "resuming %s with other package versions than it started with: %s",
                where,
                "; ".join(diff(data.get("versions") or {}, cur)),
            )
            data.setdefault("resumes", []).append({"at": now(), "versions": cur})
        data["label"] = spec.label
        data["spec"] = spec.to_dict()  # the label and the evaluation batch size may differ between invocations
        logger.info(
            "resuming %s (done: %s)",
            where,
            [p for p, v in data.get("phases", {}).items() if v.get("status") == "done"] or "nothing",
        )
        return cls(store, data)

    def save(self) -> None:
        self.data["updated_at"] = now()
        atomic_write_json(self.store.run_json, self.data)

    def phase(self, name: str) -> dict:
        return self.data.setdefault("phases", {}).setdefault(name, {"status": "pending"})

    def done(self, name: str) -> bool:
        return self.phase(name).get("status") == "done"

    def finish(self, name: str, wall_s: float, **extra: Any) -> None:
        """Mark phase ``name`` done after ``wall_s`` seconds (``extra`` goes into its entry); saves."""
        self.phase(name).update(status="done", wall_s=round(wall_s, 3), finished_at=now(), **extra)
        self.data.setdefault("wall_s", {})[name] = round(wall_s, 3)
        self.save()
        logger.info("phase %s done in %.1fs", name, wall_s)

    def set_output(self, kind: str, path: Path) -> None:
        """Record that output ``kind`` ("records", "deltas", "summary") is the file ``path``."""
        self.data.setdefault("outputs", {})[kind] = path.name

    def begin(self) -> None:
        """Mark the run running in this process (pid and host, so that a run killed without a chance
        to record it can be told from a live one); saves."""
        self.data.update(status="running", started_at=now(), pid=os.getpid(), host=socket.gethostname())
        self.begun = True
        self.save()

    def fail(self, exc: BaseException) -> None:
        """Mark the run failed with ``exc`` (not saved: the caller saves once it is done)."""
        self.data["status"] = "failed"
        self.data["error"] = (f"{type(exc).__name__}: {exc}"[:2000]).rstrip(": ")
        self.data["failed_at"] = now()

    def complete(self, last_invocation_s: float) -> None:
        """Mark the run complete; saves."""
        self.data["status"] = "complete"
        self.data.pop("error", None)
        self.data.pop("failed_at", None)
        self.data.setdefault("wall_s", {})["last_invocation"] = round(last_invocation_s, 3)
        self.save()
