"""Checking what finished phases saved before a run reuses it.

A resumed run (complete or not) re-reads the files its finished phases wrote: the deltas through
:meth:`pmetlab.Deltas.load` (format and checksum) and the records file. A damaged or missing file
is never reused: it is moved aside to ``<name>.damaged`` (kept for inspection), the phase that
wrote it and the phases that depend on it are marked pending, so that this invocation redoes them,
and ``run.json["repairs"]`` says what was found and what was redone. To start the whole run over
instead, pass ``resume=False`` (``--no-resume``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..editing.deltas import Deltas
from .context import RunContext
from .rundir import now, parquet_ok, read_records
from .spec import RunSpec

logger = logging.getLogger(__name__)

__all__ = ["verify_saved"]

#: The phases redone when a file is damaged: the one that wrote it and those that read it.
_REDO = {"deltas": ("edit", "eval_post"), "records": ("eval_pre", "eval_post")}


def _redo(ctx: RunContext, kind: str, path: Path, problem: str) -> None:
    """Set ``path`` aside, mark the phases of ``kind`` pending and record the repair; saves."""
    aside = ctx.store.set_aside(path) if path.is_file() else None
    phases = _REDO[kind]
    for p in phases:
        ctx.state.data.setdefault("phases", {})[p] = {"status": "pending", "redo": f"{path.name}: {problem}"}
    if kind == "deltas":
        ctx.store.remove_batches()  # checkpoints of an older edit must not be mixed in
    ctx.state.data.setdefault("repairs", []).append(
        {"at": now(), "file": path.name, "problem": problem, "kept_as": aside and aside.name, "redone": list(phases)}
    )
    ctx.state.save()
    logger.warning(
        "run %s: %s %s; %sthe %s phases are redone now (to start the whole run over instead: "
        "resume=False, or --no-resume)",
        ctx.store.path,
        path.name,
        problem,
        f"it was moved to {aside.name} and " if aside else "",
        " and ".join(phases),
    )


def _check_deltas(ctx: RunContext) -> Deltas | None:
    path = ctx.store.deltas
    if not path.is_file():
        _redo(ctx, "deltas", path, "is missing although the edit phase is done")
        return None
    try:
        return Deltas.load(path)
    except ValueError as exc:
        _redo(ctx, "deltas", path, f"is damaged ({exc})")
        return None


def _check_records(ctx: RunContext) -> None:
    path = ctx.store.records
    if path is None:
        name = "records.parquet" if parquet_ok() else "records.csv"
        _redo(ctx, "records", ctx.store.path / name, "is missing although an evaluation is done")
        return
    try:
        read_records(ctx.store.path)
    # parquet and CSV readers raise several types on damaged files (ArrowInvalid, ParserError, ...)
    except (OSError, ValueError, TypeError, KeyError, NotImplementedError) as exc:
        _redo(ctx, "records", path, f"is unreadable ({type(exc).__name__}: {exc})")


def verify_saved(spec: RunSpec, ctx: RunContext) -> Deltas | None:
    """Check the files of the finished phases (see the module docstring); returns the verified
    deltas when the edit phase is done and its file intact, else None."""
    deltas = None
    if spec.method != "none" and ctx.state.done("edit"):
        deltas = _check_deltas(ctx)
    if ctx.state.done("eval_pre") or ctx.state.done("eval_post"):
        _check_records(ctx)
    return deltas
