"""Evaluation beyond teacher forcing in runs (issue #23; :mod:`pmetlab.evaluation.beyond`).

In a run: ``RunSpec.beyond`` (``run_experiment(beyond=...)``, ``pmetlab run --beyond``) makes
eval_post add the families' per-record columns to the pre and post rows of ``records.parquet``, and
write ``beyond_summary.csv`` and ``beyond_perplexity.csv``; ``run.json["beyond"]`` records the
settings, the times and the perplexity.

After a run: :func:`evaluate_beyond_run` re-evaluates a finished run directory from its saved
``deltas.safetensors`` (no new target optimisation): the same records (checked against the run's
selection hash), the same model, the edit put on and taken off; it writes ``beyond_records.parquet``
(``.csv`` without pyarrow), ``beyond_summary.csv``, ``beyond_perplexity.csv`` and ``beyond.json``
next to the run's files and leaves ``run.json`` and ``records.parquet`` alone.
CLI: ``pmetlab reeval RUN_DIR... --beyond [FAMILIES]``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .._version import __version__
from ..cache import atomic_path
from ..editing.deltas import Deltas
from ..evaluation.beyond import BeyondResult, BeyondSettings, evaluate_beyond
from ..evaluation.beyond_summary import summarize_beyond
from ..store import KeyedStore
from .batches import plan_records
from .records_io import parquet_ok, write_summary_csv
from .rundir import now
from .spec import RunSpec

logger = logging.getLogger(__name__)

__all__ = ["beyond_settings", "with_beyond", "evaluate_beyond_run", "write_beyond_files"]


def beyond_settings(spec: RunSpec, cov: dict | None, **overrides: Any) -> BeyondSettings:
    """The settings a run uses: the spec's families and seed, the evaluation batch size, and the
    covariance's corpus and chunk length (``cov``: run.json's ``spec.covariance``; None: "default",
    256), so the held-out text follows the covariance text of the same corpus."""
    kw: dict[str, Any] = {
        "families": spec.beyond,
        "seed": spec.seed,
        "batch_size": spec.eval_batch_size,
        "corpus": (cov or {}).get("corpus", "default"),
        "seq_len": int((cov or {}).get("seq_len", 256)),
    }
    return BeyondSettings(**{**kw, **overrides})


def pre_store(model) -> KeyedStore:
    """The cross-run cache of the unedited model's beyond values (:mod:`pmetlab.evaluation.beyond_cache`)."""
    return KeyedStore("beyond_pre", type(model).__name__)


def _cov_tokens(cov: dict | None) -> int | None:
    return int(cov["n_tokens"]) if cov else None


def write_beyond_files(folder: Path, result: BeyondResult, stem: str = "beyond") -> dict[str, str]:
    """Write ``<stem>_summary.csv`` (:func:`~pmetlab.evaluation.beyond_summary.summarize_beyond`) and
    ``<stem>_perplexity.csv`` (when measured) into ``folder``, atomically. Returns the file names."""
    files = {}
    summary = summarize_beyond(result.records, result.perplexity)
    write_summary_csv(folder / f"{stem}_summary.csv", summary)
    files["summary"] = f"{stem}_summary.csv"
    if not result.perplexity.empty:
        write_summary_csv(folder / f"{stem}_perplexity.csv", result.perplexity)
        files["perplexity"] = f"{stem}_perplexity.csv"
    return files


def _perplexity_note(result: BeyondResult) -> dict[str, Any]:
    s = summarize_beyond(result.records, result.perplexity).set_index("phase")
    if "perplexity" not in s.columns:
        return {}
    return {
        "perplexity_pre": float(s.loc["pre", "perplexity"]),
        "perplexity_post": float(s.loc["post", "perplexity"]),
        "perplexity_rel_change": float(s.loc["post", "perplexity_rel_change"]),
    }


def with_beyond(
    spec: RunSpec, ctx, model, tok, pre: pd.DataFrame, post: pd.DataFrame, deltas: Deltas | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``pre`` and ``post`` with the beyond columns of ``spec.beyond`` merged in by case_id (unchanged
    when it is empty); writes the beyond summary files and ``run.json["beyond"]`` (not saved here)."""
    if not spec.beyond:
        return pre, post
    cov = spec.covariance.to_dict() if spec.covariance is not None else None
    settings = beyond_settings(spec, cov)
    t0 = time.perf_counter()
    res = evaluate_beyond(
        model,
        tok,
        ctx.records,
        deltas=deltas,
        dataset=spec.dataset,
        settings=settings,
        covariance_tokens=_cov_tokens(cov),
        store=pre_store(model) if ctx.reuse_pre_eval else None,
        progress=ctx.progress,
    )
    files = write_beyond_files(ctx.store.path, res)
    ctx.state.data["beyond"] = {
        "settings": settings.to_dict(),
        "wall_s": {**res.wall_s, "total": round(time.perf_counter() - t0, 3)},
        "files": files,
        **_perplexity_note(res),
    }
    return _merge(pre, res, "pre"), _merge(post, res, "post")


def _merge(df: pd.DataFrame, res: BeyondResult, phase: str) -> pd.DataFrame:
    cols = res.records[res.records["phase"] == phase].drop(columns="phase")
    df = df.drop(columns=[c for c in cols.columns if c != "case_id"], errors="ignore")
    return df.merge(cols, on="case_id", how="left")


def _spec_of(run: dict) -> RunSpec:
    s = run.get("spec") or {}
    keys = ("model", "method", "dataset", "n_edits", "batch_size", "mode", "seed", "subset", "split")
    missing = [k for k in keys if k not in s]
    if missing:
        raise ValueError(f"run.json's spec lacks {missing}; is this a pmetlab run directory?")
    return RunSpec.build(**{k: s[k] for k in keys}, hparams=s.get("hparams_overrides") or {}, generation=False)


def _records_of(spec: RunSpec, run: dict, run_dir: Path) -> list[dict]:
    plan = plan_records(spec)
    want = ((run.get("dataset") or {}).get("selection") or {}).get("ids_hash")
    if want is not None and plan.selection.description.get("ids_hash") != want:
        raise ValueError(
            f"{run_dir}: the dataset's selection no longer matches the run's (ids_hash {want} vs "
            f"{plan.selection.description.get('ids_hash')}); the dataset file changed since the run"
        )
    return [r for b in plan.cut.batches for r in b]


def evaluate_beyond_run(
    run_dir: str | Path,
    *,
    families: Any = True,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    reuse_pre: bool = True,
    progress: bool = True,
    **settings: Any,
) -> BeyondResult:
    """Re-evaluate a finished run from its saved deltas with the beyond families (see the module
    docstring); ``settings`` override :class:`BeyondSettings` fields (e.g. ``max_new_tokens``).
    ``reuse_pre``: take the unedited model's values from the cross-run cache where another run of
    the same model, records and settings stored them (``$PMETLAB_CACHE_DIR/beyond_pre``).

    Raises:
        FileNotFoundError: no run.json, or no deltas.safetensors for an edit method.
        ValueError: the run is not complete, or its dataset selection changed.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no run.json; pass a run directory")
    run = json.loads((run_dir / "run.json").read_text())
    if run.get("status") != "complete":
        raise ValueError(f"{run_dir}: the run is {run.get('status')!r}, not complete; finish it first")
    spec = _spec_of(run)
    deltas = None
    if spec.method != "none":
        if not (run_dir / "deltas.safetensors").is_file():
            raise FileNotFoundError(f"{run_dir}: no deltas.safetensors to re-evaluate from")
        deltas = Deltas.load(run_dir / "deltas.safetensors")
    records = _records_of(spec, run, run_dir)
    if model_and_tokenizer is None:
        from ..models.loading import load_model

        model_and_tokenizer = load_model(spec.model)
    model, tok = model_and_tokenizer
    model.eval()
    cov = (run.get("spec") or {}).get("covariance")
    s = beyond_settings(spec, cov, families=families, **settings)
    t0 = time.perf_counter()
    res = evaluate_beyond(
        model,
        tok,
        records,
        deltas=deltas,
        dataset=spec.dataset,
        settings=s,
        covariance_tokens=_cov_tokens(cov),
        store=pre_store(model) if reuse_pre else None,
        progress=progress,
    )
    wall = time.perf_counter() - t0
    _write_run_files(run_dir, res, s, wall, len(records))
    return res


def _write_run_files(run_dir: Path, res: BeyondResult, s: BeyondSettings, wall: float, n: int) -> None:
    path = run_dir / ("beyond_records.parquet" if parquet_ok() else "beyond_records.csv")
    with atomic_path(path) as tmp:
        (res.records.to_parquet if path.suffix == ".parquet" else res.records.to_csv)(tmp, index=False)
    files = {"records": path.name, **write_beyond_files(run_dir, res)}
    note = {
        "at": now(),
        "pmetlab": __version__,
        "from": "deltas.safetensors",
        "settings": s.to_dict(),
        "n_records": n,
        "wall_s": {**res.wall_s, "total": round(wall, 3), "per_record": round(wall / max(n, 1), 3)},
        "files": files,
        **_perplexity_note(res),
    }
    with atomic_path(run_dir / "beyond.json") as tmp:
        Path(tmp).write_text(json.dumps(note, indent=2) + "\n")
