"""Checking what finished phases saved before a run reuses it.

A resumed run (complete or not) re-reads the files its finished phases wrote: the deltas through
:meth:`pmetlab.Deltas.load` (format and checksum) and then against the run's spec (method,
resolved hyperparameters, requests, mode and batches, model class and size: a file copied in
from another run is foreign), the records file and then its rows against the run's selection
(each evaluated phase holds exactly the selected records). A damaged, foreign or missing file
is never reused: it is moved aside to ``<name>.damaged`` (kept for inspection), the phase that
wrote it and the phases that depend on it are marked pending, so that this invocation redoes them,
and ``run.json["repairs"]`` says what was found and what was redone. To start the whole run over
instead, pass ``resume=False`` (``--no-resume``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ..editing.deltas import Deltas
from ..hparams import EditHyperParams, hparams_from_dict
from .context import RunContext
from .rundir import diff, now, parquet_ok, read_records
from .spec import RunSpec

logger = logging.getLogger(__name__)

__all__ = ["verify_saved", "hparams_mismatch"]

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


def _canonical(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def hparams_mismatch(saved: Any, hp: EditHyperParams) -> str | None:
    """How the hyperparameters a saved edit records (fields added since filled in with their
    defaults) differ from ``hp``: "other hyperparameters (key: saved -> hp; ...)", or None."""
    try:
        full = _canonical(hparams_from_dict(saved if isinstance(saved, dict) else {}).to_dict())
    except (KeyError, TypeError, ValueError) as exc:
        return f"unreadable hyperparameters ({type(exc).__name__}: {exc})"
    changes = diff(full, _canonical(hp.to_dict()))
    if changes:
        return f"other hyperparameters ({'; '.join(changes[:4])}{'; ...' if len(changes) > 4 else ''})"
    return None


def _deltas_mismatch(spec: RunSpec, ctx: RunContext, d: Deltas) -> str | None:
    """What in ``d``'s metadata disagrees with the run (None when nothing does)."""
    meta = d.meta
    if meta.get("method") != spec.method:
        return f"method {meta.get('method')!r}, not the run's {spec.method!r}"
    other = hparams_mismatch(meta.get("hparams"), spec.hp)
    if other is not None:
        return other
    want = _canonical([r.to_dict() for r in ctx.requests])
    if ctx.requests and _canonical(meta.get("requests")) != want:
        got = meta.get("requests") or []
        return f"an edit of other requests ({len(got)} requests, the run edits {len(want)})"
    if "mode" in meta and (meta["mode"], meta.get("n_batches")) != (
        spec.mode,
        len(ctx.batches) or meta.get("n_batches"),
    ):
        return (
            f"an edit in {meta['mode']!r} mode of {meta.get('n_batches')} batches, "
            f"the run's is {spec.mode!r} of {len(ctx.batches)}"
        )
    recorded = (ctx.state.data.get("deltas") or {}).get("base_fingerprint")
    if recorded and meta.get("base_fingerprint") != recorded:
        return "an edit computed on other weights than the run's model (base fingerprint differs)"
    ident, run_model = meta.get("model") or {}, ctx.state.data.get("model") or {}
    for key in ("class", "n_params"):
        if run_model.get(key) is not None and ident.get(key) != run_model[key]:
            return f"an edit of another model ({key} {ident.get(key)!r}, the run's is {run_model[key]!r})"
    return None


def _check_deltas(spec: RunSpec, ctx: RunContext) -> Deltas | None:
    path = ctx.store.deltas
    if not path.is_file():
        _redo(ctx, "deltas", path, "is missing although the edit phase is done")
        return None
    try:
        d = Deltas.load(path)
    except ValueError as exc:
        _redo(ctx, "deltas", path, f"is damaged ({exc})")
        return None
    problem = _deltas_mismatch(spec, ctx, d)
    if problem is not None:
        _redo(ctx, "deltas", path, f"is foreign: it holds {problem}")
        return None
    return d


def _records_mismatch(ctx: RunContext, df: pd.DataFrame) -> str | None:
    """What in the records disagrees with the run's selection and finished phases (None: nothing)."""
    if ctx.selection is None:
        return None
    if "phase" not in df.columns or "case_id" not in df.columns:
        return "not a records file of a run (no 'phase' or 'case_id' column)"
    want = sorted(str(r.get("case_id")) for r in ctx.records)
    for phase in ("pre", "post"):
        if not ctx.state.done(f"eval_{phase}"):
            continue
        got = sorted(str(c) for c in df.loc[df["phase"] == phase, "case_id"])
        if got != want:
            return f"{len(got)} {phase!r} rows whose records are not the run's {len(want)} selected records"
    return None


def _check_records(ctx: RunContext) -> None:
    path = ctx.store.records
    if path is None:
        name = "records.parquet" if parquet_ok() else "records.csv"
        _redo(ctx, "records", ctx.store.path / name, "is missing although an evaluation is done")
        return
    try:
        df = read_records(ctx.store.path)
    # parquet and CSV readers raise several types on damaged files (ArrowInvalid, ParserError, ...)
    except (OSError, ValueError, TypeError, KeyError, NotImplementedError) as exc:
        _redo(ctx, "records", path, f"is unreadable ({type(exc).__name__}: {exc})")
        return
    problem = _records_mismatch(ctx, df)
    if problem is not None:
        _redo(ctx, "records", path, f"is foreign: it holds {problem}")


def verify_saved(spec: RunSpec, ctx: RunContext) -> Deltas | None:
    """Check the files of the finished phases (see the module docstring); returns the verified
    deltas when the edit phase is done and its file intact, else None."""
    deltas = None
    if spec.method != "none" and ctx.state.done("edit"):
        deltas = _check_deltas(spec, ctx)
    if ctx.state.done("eval_pre") or ctx.state.done("eval_post"):
        _check_records(ctx)
    return deltas
