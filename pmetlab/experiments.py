"""Experiments: edit a model on a dataset, evaluate before and after, keep everything on disk.

:func:`run_experiment` is the one entry point notebooks and the CLI use. A run directory holds

``run.json``
    resolved parameters (``params``, including the full hyperparameter dict), package versions,
    the model identity, the dataset (file, sha256, how it was found) and the selection (ids and
    their hash), the seed, and per phase its status and wall time (``phases`` / ``wall_s``).
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

Phases, in order: ``load`` (dataset, then the model when a phase needs it), ``covariance``
(E[k kᵀ] of the unedited model, from the statistics cache when present), ``edit``, ``eval_pre``,
``eval_post``. Each phase writes its output atomically and then marks itself done in
``run.json``; re-running with the same parameters and directory reuses finished phases (and
finished edit batches) and never loads the model when nothing is left to do. A different
parameter set in a directory that already holds a run raises :class:`RunMismatchError`;
``resume=False`` deletes the run's files and starts over.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .cache import atomic_path, atomic_write_json, stable_hash
from .datasets import (DatasetNotFoundError, Records, counterfact_requests, drop_conflicting, load_counterfact,
                       load_consistency_reference, load_dataset, select, zsre_requests)
from .editing.compute import compute_deltas
from .editing.deltas import Deltas, apply_deltas_, restore_
from .evaluation import evaluate_counterfact, evaluate_zsre, relative_specificity, summarize
from .hparams import EditHyperParams, MEMITHyperParams, PMETHyperParams, hparams_from_dict
from .models.loading import load_model, model_identity
from .stats import layer_covariances
from .versions import versions

logger = logging.getLogger(__name__)

__all__ = ["ExperimentResult", "RunMismatchError", "run_experiment", "run_sweep", "load_run", "summarize_runs",
           "resolve_hparams", "METHODS", "DATASETS", "MODES", "PHASES"]

RUN_FORMAT = 1
METHODS = ("pmet", "memit", "none")
DATASETS = ("counterfact", "multi_counterfact", "zsre")
MODES = ("batch", "sequential")
SUBSETS = ("first", "sample")
PHASES = ("load", "covariance", "edit", "eval_pre", "eval_post")
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_RUNS_DIR = Path("runs")
_HP_CLASSES: dict[str, type[EditHyperParams]] = {"pmet": PMETHyperParams, "memit": MEMITHyperParams}
_LIST_COLUMNS = ("neighborhood_prefers_true", "neighborhood_pred", "gen_texts")


class RunMismatchError(ValueError):
    """The run directory holds a run with other parameters (or another model/dataset)."""


@dataclass
class ExperimentResult:
    """What a run produced (also what :func:`load_run` reads back).

    Attributes:
        run_dir: the run directory.
        summary: one row per phase ("pre", "post"): metric columns (0–100) with ``_ci_low`` /
            ``_ci_high``, ``n_records``, and ``model``, ``method``, ``dataset``, ``n_edits``,
            ``mode``, ``batch_size``, ``seed`` and ``label`` (when given).
        records: per-record metrics with a ``phase`` column.
        run: the contents of ``run.json``.
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
        p = self.run_dir / "deltas.safetensors"
        return Deltas.load(p) if p.is_file() else None


# ---------------------------------------------------------------------------------------------
# argument resolution (everything here runs before any work)
# ---------------------------------------------------------------------------------------------
def resolve_hparams(model: str, method: str, overrides: Mapping[str, Any] | None = None
                    ) -> EditHyperParams | None:
    """The hyperparameters a run uses: the method's preset for ``model`` (class defaults when there
    is none) with ``overrides`` applied. None for method "none" (overrides are still checked).

    Raises:
        KeyError: an override names no hyperparameter (the message lists the valid ones).
        ValueError: unknown method, or an override value the hyperparameters reject.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    overrides = dict(overrides or {})
    cls = _HP_CLASSES.get(method, PMETHyperParams)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise KeyError(f"unknown hyperparameter(s) {unknown} for method {method!r}; valid keys: {sorted(valid)}")
    if method == "none":
        if overrides:
            logger.info("method 'none' edits nothing; hyperparameter overrides %s are ignored", sorted(overrides))
        return None
    try:
        base = cls.preset(str(model))
    except KeyError:
        logger.info("no %s preset for %r; using the %s defaults", method, model, cls.__name__)
        base = cls()
    if "layers" in overrides and not isinstance(overrides["layers"], (list, tuple)):
        raise ValueError(f"hyperparameter 'layers' must be a list of layer indices, got {overrides['layers']!r}")
    try:
        return base.replace(**overrides)
    except TypeError as exc:
        raise ValueError(f"bad hyperparameter value in {overrides}: {exc}") from None


def _preset_name(model: str, method: str) -> str | None:
    if method == "none":
        return None
    try:
        _HP_CLASSES[method].preset(str(model))
        return str(model).lower()
    except KeyError:
        return None


def _positive_int(name: str, v: Any, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {v!r}")


def _normalize_dataset(dataset: str) -> str:
    key = str(dataset).lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
    return key


@dataclass(frozen=True)
class _Args:
    """Validated arguments of one run; ``params`` is what identifies it on disk."""

    model: str
    method: str
    dataset: str
    n_edits: int
    batch_size: int | None
    mode: str
    hp: EditHyperParams | None
    overrides: dict
    seed: int
    subset: str
    generation: bool
    n_gen_tokens: int
    eval_batch_size: int
    label: str | None

    @property
    def params(self) -> dict:
        p = {"model": self.model, "method": self.method, "dataset": self.dataset, "n_edits": int(self.n_edits),
             "batch_size": None if self.batch_size is None else int(self.batch_size), "mode": self.mode,
             "seed": int(self.seed), "subset": self.subset,
             "generation": bool(self.generation) if self.dataset != "zsre" else None,
             "n_gen_tokens": int(self.n_gen_tokens) if self.generation and self.dataset != "zsre" else None,
             "hparams": self.hp.to_dict() if self.hp is not None else None}
        return json.loads(json.dumps(p))  # tuples -> lists, as they come back from run.json

    @property
    def batches_of(self) -> int:
        return int(self.batch_size or self.n_edits)


def _validate(model: str, method: str, dataset: str, n_edits: int, batch_size: int | None, mode: str,
              hparams: Mapping | None, seed: int, subset: str, generation: bool, n_gen_tokens: int,
              eval_batch_size: int, label: str | None) -> _Args:
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty string (an embedded name or a path), got {model!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    dataset = _normalize_dataset(dataset)
    _positive_int("n_edits", n_edits)
    _positive_int("batch_size", batch_size, allow_none=True)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; expected one of {list(SUBSETS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    _positive_int("n_gen_tokens", n_gen_tokens)
    _positive_int("eval_batch_size", eval_batch_size)
    if hparams is not None and not isinstance(hparams, Mapping):
        raise ValueError(f"hparams must be a dict of overrides, got {type(hparams).__name__}")
    overrides = dict(hparams or {})
    if method != "none" and "seed" not in overrides:
        overrides_eff = {**overrides, "seed": int(seed)}  # one seed for everything unless set explicitly
    else:
        overrides_eff = overrides
    hp = resolve_hparams(model, method, overrides_eff)
    return _Args(model, method, dataset, int(n_edits), None if batch_size is None else int(batch_size), mode, hp,
                 overrides, int(seed), subset, bool(generation), int(n_gen_tokens), int(eval_batch_size), label)


def _safe(s: Any) -> str:
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "-", str(s)).strip("-.")
    return s or "x"


def _default_slug(a: _Args) -> str:
    name = Path(a.model).name if ("/" in a.model or "\\" in a.model) else a.model
    parts = [_safe(name), a.method, a.dataset, f"n{a.n_edits}"]
    if a.batch_size is not None:
        parts.append(f"bs{a.batch_size}")
    if a.mode != "batch":
        parts.append(a.mode)
    if a.subset != "first":
        parts.append(a.subset)
    parts.append(f"seed{a.seed}")
    if a.overrides:
        parts.append("hp" + stable_hash(a.overrides, 4))
    return "_".join(parts)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# run-directory I/O
# ---------------------------------------------------------------------------------------------
def _parquet_ok() -> bool:
    try:
        import pyarrow  # noqa: F401
        return True
    except ImportError:
        return False


def _records_path(run_dir: Path) -> Path | None:
    for name in ("records.parquet", "records.csv"):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def _write_records(run_dir: Path, df: pd.DataFrame) -> Path:
    if _parquet_ok():
        path = run_dir / "records.parquet"
        out = df.copy()
        for c in _LIST_COLUMNS:
            if c in out.columns:
                out[c] = [list(v) if v is not None and not (isinstance(v, float) and np.isnan(v)) else None
                          for v in out[c]]
        with atomic_path(path) as tmp:
            out.to_parquet(tmp, index=False)
    else:
        path = run_dir / "records.csv"
        out = df.copy()
        for c in _LIST_COLUMNS:
            if c in out.columns:
                out[c] = [json.dumps([x.item() if hasattr(x, "item") else x for x in v])
                          if isinstance(v, (list, tuple, np.ndarray)) else None for v in out[c]]
        with atomic_path(path) as tmp:
            out.to_csv(tmp, index=False)
    return path


def _read_records(run_dir: Path) -> pd.DataFrame:
    path = _records_path(run_dir)
    if path is None:
        return pd.DataFrame()
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path)
        for c in _LIST_COLUMNS:
            if c in df.columns:
                df[c] = [tuple(json.loads(v)) if isinstance(v, str) else None for v in df[c]]
    for c in _LIST_COLUMNS:  # same cell type however it was stored
        if c in df.columns:
            df[c] = [tuple(v.tolist() if hasattr(v, "tolist") else v) if v is not None and not
                     (isinstance(v, float) and np.isnan(v)) else None for v in df[c]]
    return df


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _read_run_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({type(exc).__name__}: {exc}); pass resume=False to "
                         f"start the run over") from None


_RUN_FILES = ("run.json", "records.parquet", "records.csv", "summary.csv", "deltas.safetensors")


def _clear_run_dir(run_dir: Path) -> None:
    """Delete the files a run writes (and nothing else: the directory may hold the user's files)."""
    for name in _RUN_FILES:
        p = run_dir / name
        if p.is_file():
            p.unlink()
    if (run_dir / "deltas_batches").is_dir():
        shutil.rmtree(run_dir / "deltas_batches")


def _diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class _State:
    """run.json in memory; every change is written atomically."""

    def __init__(self, run_dir: Path, data: dict) -> None:
        self.run_dir = run_dir
        self.data = data

    def save(self) -> None:
        self.data["updated_at"] = _now()
        atomic_write_json(self.run_dir / "run.json", self.data)

    def phase(self, name: str) -> dict:
        return self.data.setdefault("phases", {}).setdefault(name, {"status": "pending"})

    def done(self, name: str) -> bool:
        return self.phase(name).get("status") == "done"

    def finish(self, name: str, wall_s: float, **extra: Any) -> None:
        ph = self.phase(name)
        ph.update(status="done", wall_s=round(wall_s, 3), finished_at=_now(), **extra)
        self.data.setdefault("wall_s", {})[name] = round(wall_s, 3)
        self.save()
        logger.info("phase %s done in %.1fs", name, wall_s)


def _open_state(run_dir: Path, a: _Args, resume: bool) -> _State:
    path = run_dir / "run.json"
    params = a.params
    if path.is_file() and resume:
        data = _read_run_json(path)
        if data.get("format") != RUN_FORMAT:
            raise RunMismatchError(f"{run_dir} holds a run of format {data.get('format')!r}, not {RUN_FORMAT}; "
                                   f"use another out_dir or resume=False to start over")
        if data.get("params") != params:
            changes = _diff(data.get("params") or {}, params)
            raise RunMismatchError(
                f"{run_dir} already holds a run with other parameters ({'; '.join(changes[:8])}"
                f"{'; ...' if len(changes) > 8 else ''}); use another out_dir, or resume=False to start over")
        cur = versions()
        if data.get("versions") != cur:
            logger.warning("resuming %s with other package versions than it started with: %s", run_dir,
                           "; ".join(_diff(data.get("versions") or {}, cur)))
            data.setdefault("resumes", []).append({"at": _now(), "versions": cur})
        data["label"] = a.label
        logger.info("resuming %s (done: %s)", run_dir,
                    [p for p, v in data.get("phases", {}).items() if v.get("status") == "done"] or "nothing")
        return _State(run_dir, data)
    if path.is_file():
        logger.info("resume=False: deleting the previous run in %s", run_dir)
    _clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"format": RUN_FORMAT, "status": "running", "created_at": _now(), "params": params,
            "label": a.label, "hparams_overrides": a.overrides,
            "hparams_preset": _preset_name(a.model, a.method), "seed": a.seed, "versions": versions(),
            "model": None, "dataset": None, "phases": {p: {"status": "pending"} for p in PHASES}, "wall_s": {},
            "outputs": {}}
    st = _State(run_dir, data)
    st.save()
    return st


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _load_records(dataset: str) -> tuple[Records, str | None]:
    """The dataset's records and, for a derived set, how it was derived."""
    if dataset == "multi_counterfact":
        try:
            return load_dataset("multi_counterfact"), None
        except DatasetNotFoundError as exc:
            cf = load_counterfact()
            logger.warning("multi_counterfact.json is not available (%s); using CounterFact without "
                           "conflicting (subject, relation) pairs instead", str(exc).splitlines()[0])
            return Records(drop_conflicting(cf), cf.info), "drop_conflicting(counterfact)"
    return load_dataset(dataset), None


def _requests_of(dataset: str, records: Sequence[dict]):
    return zsre_requests(records) if dataset == "zsre" else counterfact_requests(records)


# ---------------------------------------------------------------------------------------------
# editing
# ---------------------------------------------------------------------------------------------
def _combine(parts: list[Deltas], mode: str) -> Deltas:
    """One Deltas holding the sum of the batches' updates (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    for d in parts:
        for n, t in d.tensors.items():
            tensors[n] = tensors[n] + t.float() if n in tensors else t.float().clone()
    meta = dict(parts[0].meta)
    meta["requests"] = [r for d in parts for r in d.meta.get("requests", [])]
    meta["mode"] = mode
    meta["n_batches"] = len(parts)
    meta["batches"] = [{"batch": i, "n_requests": len(d.meta.get("requests", [])),
                        "base_fingerprint": d.meta.get("base_fingerprint"), "timings": d.meta.get("timings"),
                        "targets": d.meta.get("targets"), "diagnostics": d.meta.get("diagnostics")}
                       for i, d in enumerate(parts)]
    meta["diagnostics"] = [dict(row, batch=i) for i, d in enumerate(parts) for row in d.meta.get("diagnostics", [])]
    timings: dict[str, float] = {}
    for d in parts:
        for k, v in (d.meta.get("timings") or {}).items():
            timings[k] = timings.get(k, 0.0) + float(v)
    meta["timings"] = timings
    trace = [dict(row, batch=i) for i, d in enumerate(parts) for row in d.trace]
    return Deltas(tensors, meta, trace)


def target_summary(deltas: Deltas, hp) -> dict[str, float]:
    """How far the target optimisation got, over all requests of an edit (every batch): mean final
    p(o*) (mean over the rewrite prompts), mean steps, the share that ran to ``v_num_grad_steps``
    and the share whose δ ended on the norm-ball boundary (clamp_norm_factor · ‖init‖)."""
    parts = deltas.meta.get("batches") or [{"targets": deltas.meta.get("targets")}]
    p, steps, clamped = [], [], []
    for part in parts:
        t = part.get("targets") or {}
        p += list(t.get("final_p_target", []))
        steps += list(t.get("n_steps", []))
        for space, norms in (t.get("delta_norms") or {}).items():
            inits = t.get("init_norms", {}).get(space, [])
            clamped += [d >= hp.clamp_norm_factor * i * (1 - 1e-4) for d, i in zip(norms, inits) if i > 0 and d > 0]
    mean = lambda x: float(np.mean(x)) if len(x) else float("nan")
    return {"n_requests": len(p), "p_target_final_mean": mean(p), "steps_mean": mean(steps),
            "share_at_step_cap": mean([s >= hp.v_num_grad_steps for s in steps]),
            "share_delta_at_clamp": mean(clamped)}


def _edit(model, tok, requests, a: _Args, st: _State, covs, attn_covs, progress: bool) -> Deltas:
    bs = a.batches_of
    batches = [requests[i:i + bs] for i in range(0, len(requests), bs)]
    ckpt = st.run_dir / "deltas_batches"
    ph = st.phase("edit")
    n_done = int(ph.get("batches_done", 0))
    parts: list[Deltas] = []
    undo_stack: list[dict] = []
    try:
        bar = tqdm(total=len(batches), desc=f"{a.method} {a.mode} edit", unit="batch",
                   disable=not progress or len(batches) == 1)
        with bar:
            for i, batch in enumerate(batches):
                path = ckpt / f"batch_{i:04d}.safetensors"
                if i < n_done and path.is_file():
                    d = Deltas.load(path)
                    logger.info("edit batch %d/%d reused from %s", i + 1, len(batches), path)
                else:
                    _seed_all(a.seed + i)
                    d = compute_deltas(model, tok, batch, a.hp, progress=progress, covariances=covs,
                                       attn_covariances=attn_covs or None)
                    if len(batches) > 1:
                        d.save(path)
                        ph["batches_done"] = i + 1
                        st.save()
                parts.append(d)
                if a.mode == "sequential" and i + 1 < len(batches):
                    # the next batch is computed on the model carrying this one (checked: the
                    # batch's base fingerprint must match the current weights)
                    undo_stack.append(apply_deltas_(model, d))
                bar.update(1)
                bar.set_postfix(edits=sum(len(b) for b in batches[:i + 1]))
    finally:
        for undo in reversed(undo_stack):
            restore_(model, undo)
    return _combine(parts, a.mode)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def _summary(records: pd.DataFrame, a: _Args) -> pd.DataFrame:
    if records.empty:
        return pd.DataFrame()
    s = summarize(records, by=("phase",))
    info = {"label": a.label, "model": a.model, "method": a.method, "dataset": a.dataset, "n_edits": a.n_edits,
            "mode": a.mode, "batch_size": a.batch_size, "seed": a.seed}
    if a.label is None:
        info.pop("label")
    for i, (k, v) in enumerate(info.items()):
        s.insert(i, k, [v] * len(s))
    return s


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def run_experiment(model: str = DEFAULT_MODEL, method: str = "pmet", dataset: str = "counterfact",
                   n_edits: int = 10, *, batch_size: int | None = None, mode: str = "batch",
                   hparams: dict | None = None, seed: int = 0, subset: str = "first",
                   out_dir: str | Path | None = None, generation: bool = True, n_gen_tokens: int = 100,
                   eval_batch_size: int = 32, label: str | None = None, resume: bool = True,
                   progress: bool = True, model_and_tokenizer=None) -> ExperimentResult:
    """Edit ``n_edits`` facts of ``dataset`` into ``model`` with ``method`` and evaluate the model
    before and after, on the same records (method.md §6). See the module docstring for the files.

    Args:
        model: an embedded model name or a path (what :func:`pmetlab.load_model` takes); also the
            preset looked up for ``hparams``. With ``model_and_tokenizer`` it names that model.
        method: "pmet", "memit", or "none" (no edit: post = pre, a baseline row).
        dataset: "counterfact", "multi_counterfact" (without its file: CounterFact minus conflicting
            (subject, relation) pairs, recorded in run.json) or "zsre".
        n_edits: number of records edited and evaluated.
        batch_size: requests per compute_deltas call (None: all in one batch).
        mode: "batch": every batch computed on the unedited model, all applied together;
            "sequential": batch i computed on the model edited by batches < i (covariances are
            those of the unedited model).
        hparams: overrides of the method's preset for ``model`` (class defaults when there is none);
            an unknown key raises KeyError before any work. ``seed`` defaults to the run's seed.
        seed: seeds the subset ("sample"), the edit (context prefixes) and generation sampling.
        subset: "first" n_edits records or a seeded "sample".
        out_dir: the run directory (default ``runs/<model>_<method>_<dataset>_n<n>_..._seed<seed>``).
        generation: CounterFact fluency/consistency (generates ``n_gen_tokens`` per prompt).
        eval_batch_size: prompt pairs per forward pass in evaluation.
        label: a free name carried into the summary (not part of the run's identity).
        resume: reuse the finished phases of a run with the same parameters in ``out_dir``;
            False deletes that run and starts over.
        model_and_tokenizer: an already loaded ``(model, tokenizer)``; it is left unedited.

    Returns:
        :class:`ExperimentResult` (run_dir, summary, records, run).

    Raises:
        KeyError: unknown hyperparameter. ValueError: bad argument. RunMismatchError: ``out_dir``
        holds a run with other parameters. DatasetNotFoundError: dataset file unavailable.
    """
    provider = None
    if model_and_tokenizer is not None:
        try:
            m, t = model_and_tokenizer
        except (TypeError, ValueError):
            raise ValueError("model_and_tokenizer must be a (model, tokenizer) pair, got "
                             f"{type(model_and_tokenizer).__name__}") from None
        provider = (lambda: (m, t))
    return _run(model=model, method=method, dataset=dataset, n_edits=n_edits, batch_size=batch_size, mode=mode,
                hparams=hparams, seed=seed, subset=subset, out_dir=out_dir, generation=generation,
                n_gen_tokens=n_gen_tokens, eval_batch_size=eval_batch_size, label=label, resume=resume,
                progress=progress, provider=provider, given=model_and_tokenizer is not None)


def _check_model_name(model_obj, name: str) -> None:
    src = getattr(model_obj, "pmetlab_source", None)
    if src is not None and str(src).lower() != str(name).lower():
        raise ValueError(f"model={name!r} but model_and_tokenizer holds {src!r}; pass model={src!r} so that "
                         f"the run uses that model's preset and is recorded under its name")


def _run(*, model, method, dataset, n_edits, batch_size, mode, hparams, seed, subset, out_dir, generation,
         n_gen_tokens, eval_batch_size, label, resume, progress,
         provider: Callable[[], tuple] | None, given: bool) -> ExperimentResult:
    t_run = time.perf_counter()
    a = _validate(model, method, dataset, n_edits, batch_size, mode, hparams, seed, subset, generation,
                  n_gen_tokens, eval_batch_size, label)
    if given:
        _check_model_name(provider()[0], a.model)
    run_dir = Path(out_dir) if out_dir is not None else DEFAULT_RUNS_DIR / _default_slug(a)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"out_dir {str(run_dir)!r} exists and is not a directory")
    st = _open_state(run_dir, a, resume)

    # --- load: the dataset now, the model only when a phase needs it -------------------------
    t0 = time.perf_counter()
    records_all, derived = _load_records(a.dataset)
    sel = select(records_all, a.n_edits, mode=a.subset, seed=a.seed)
    info = records_all.info.to_dict() if records_all.info is not None else None
    ds = {"name": a.dataset, "info": info, "derived": derived,
          "selection": {k: v for k, v in sel.description.items() if k != "dataset"}}
    old = st.data.get("dataset")
    if old is not None and ((old.get("info") or {}).get("sha256") != (info or {}).get("sha256")
                            or old["selection"].get("ids_hash") != ds["selection"]["ids_hash"]):
        raise RunMismatchError(f"{run_dir}: the dataset file or the selected records changed since the run "
                               f"started ({(old.get('info') or {}).get('path')} -> {(info or {}).get('path')}); "
                               f"use another out_dir or resume=False")
    st.data["dataset"] = ds
    requests = _requests_of(a.dataset, sel.records)
    load_s = time.perf_counter() - t0
    st.save()

    loaded: dict[str, Any] = {}

    def get_model():
        nonlocal load_s
        if "mt" not in loaded:
            t = time.perf_counter()
            if provider is not None:
                mt = provider()
            else:
                mt = load_model(a.model)
            _check_model_name(mt[0], a.model)
            ident = model_identity(mt[0])
            prev = st.data.get("model")
            if prev is not None and (prev.get("class"), prev.get("n_params")) != (ident["class"], ident["n_params"]):
                raise RunMismatchError(f"{run_dir} was started with model {prev} but this model is {ident}; use "
                                       f"another out_dir or resume=False")
            st.data["model"] = ident
            load_s += time.perf_counter() - t
            st.save()
            loaded["mt"] = mt
        return loaded["mt"]

    reference_box: dict[str, Any] = {}

    def evaluate(mdl, tk, phase: str, recs: list | None = None) -> pd.DataFrame:
        recs = sel.records if recs is None else recs
        _seed_all(a.seed)
        if a.dataset == "zsre":
            df = evaluate_zsre(mdl, tk, recs, batch_size=a.eval_batch_size, progress=progress)
        else:
            if a.generation and "ref" not in reference_box:
                reference_box["ref"] = load_consistency_reference(download=False)
            df = evaluate_counterfact(mdl, tk, recs, generation=a.generation, n_gen_tokens=a.n_gen_tokens,
                                      batch_size=a.eval_batch_size, seed=a.seed,
                                      reference=reference_box.get("ref"), progress=progress)
        df.insert(0, "phase", phase)
        return df

    deltas_path = run_dir / "deltas.safetensors"
    records = _read_records(run_dir)
    try:
        # --- covariance + edit ------------------------------------------------------------
        deltas: Deltas | None = None
        if a.method == "none":
            for p in ("covariance", "edit"):
                if not st.done(p):
                    st.finish(p, 0.0, skipped="method 'none'")
        elif not (st.done("edit") and deltas_path.is_file()):
            mdl, tk = get_model()
            hp = a.hp
            t0 = time.perf_counter()
            _seed_all(a.seed)
            cov_kw = dict(corpus=hp.cov_corpus, n_tokens=hp.cov_tokens, seq_len=hp.cov_seq_len, dtype=hp.cov_dtype,
                          use_cache=True, progress=progress, seed=hp.seed)
            covs = layer_covariances(mdl, tk, hp.layers, kind="ffn", **cov_kw)
            attn_covs = layer_covariances(mdl, tk, hp.layers, kind="attn", **cov_kw) if hp.update_attn_weights else {}
            st.finish("covariance", time.perf_counter() - t0,
                      tokens={str(l): int(c.count) for l, c in covs.items()})
            t0 = time.perf_counter()
            st.phase("edit")["status"] = "running"
            deltas = _edit(mdl, tk, requests, a, st, covs, attn_covs, progress)
            deltas.save(deltas_path)
            st.data["outputs"]["deltas"] = deltas_path.name
            st.data["deltas"] = {"file": deltas_path.name, "content": "sum of all batches", "mode": a.mode,
                                 "n_batches": int(deltas.meta.get("n_batches", 1)), "batch_size": a.batches_of,
                                 "norms": deltas.norms()}
            st.data["targets"] = target_summary(deltas, a.hp)
            st.finish("edit", time.perf_counter() - t0)
            if (run_dir / "deltas_batches").is_dir():
                shutil.rmtree(run_dir / "deltas_batches")
        else:
            logger.info("edit reused from %s", deltas_path)

        # --- eval_pre -------------------------------------------------------------------------
        have_pre = not records.empty and "phase" in records and (records["phase"] == "pre").any()
        if not (st.done("eval_pre") and have_pre):
            mdl, tk = get_model()
            t0 = time.perf_counter()
            if a.dataset != "zsre" and a.generation and "ref" not in reference_box:
                reference_box["ref"] = load_consistency_reference(download=False)
            pre, n_reused = _pre_eval_cached(mdl, tk, a, sel.records, reference_box.get("ref") is not None,
                                             lambda recs: evaluate(mdl, tk, "pre", recs))
            records = pre
            st.data["outputs"]["records"] = _write_records(run_dir, records).name
            _write_csv(run_dir / "summary.csv", _summary(records, a))
            st.finish("eval_pre", time.perf_counter() - t0, reused_records=n_reused)
        pre = records[records["phase"] == "pre"].drop(columns="relative_specificity", errors="ignore")
        pre = pre.reset_index(drop=True)

        # --- eval_post ------------------------------------------------------------------------
        have_post = (records["phase"] == "post").any()
        if not (st.done("eval_post") and have_post):
            t0 = time.perf_counter()
            if a.method == "none":
                post = pre.assign(phase="post")  # nothing was edited: the same model, the same numbers
                extra = {"copied_from": "eval_pre"}
            else:
                mdl, tk = get_model()
                if deltas is None:
                    deltas = Deltas.load(deltas_path)
                undo = apply_deltas_(mdl, deltas)
                try:
                    post = evaluate(mdl, tk, "post")
                finally:
                    restore_(mdl, undo)
                extra = {}
            rs = relative_specificity(pre, post)
            post = post.drop(columns="relative_specificity", errors="ignore").merge(rs, on="case_id", how="left")
            records = pd.concat([pre, post], ignore_index=True)
            st.data["outputs"]["records"] = _write_records(run_dir, records).name
            st.finish("eval_post", time.perf_counter() - t0, **extra)
    except BaseException as exc:
        st.data["status"] = "failed"
        st.data["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        raise
    finally:
        # the load time of the invocation that loaded the model (else of the first one)
        if "mt" in loaded or not st.done("load"):
            st.data.setdefault("wall_s", {})["load"] = round(load_s, 3)
            st.phase("load").update(status="done", wall_s=round(load_s, 3), finished_at=_now(),
                                    model_loaded="mt" in loaded)
        st.save()

    records = _read_records(run_dir)
    summary = _summary(records, a)
    _write_csv(run_dir / "summary.csv", summary)
    st.data["outputs"]["summary"] = "summary.csv"
    st.data["status"] = "complete"
    st.data.pop("error", None)
    st.data.setdefault("wall_s", {})["last_invocation"] = round(time.perf_counter() - t_run, 3)
    st.save()
    logger.info("run %s complete", run_dir)
    return ExperimentResult(run_dir, summary, records, st.data)


# ---------------------------------------------------------------------------------------------
# sweeps and loading
# ---------------------------------------------------------------------------------------------
_RUN_PARAMS = [p for p in inspect.signature(run_experiment).parameters]


def _grid_slug(entry: Mapping[str, Any]) -> str:
    parts = []
    for k, v in entry.items():
        if isinstance(v, Mapping):
            parts += [f"{_safe(sk)}-{_safe(json.dumps(sv) if isinstance(sv, (list, tuple)) else sv)}"
                      for sk, sv in v.items()]
        else:
            parts.append(f"{_safe(k)}-{_safe(v)}")
    slug = "__".join(parts) or "default"
    if len(slug) > 100:
        slug = slug[:80] + "__" + stable_hash(entry, 6)
    return slug


def _grid_columns(entry: Mapping[str, Any], taken: set[str]) -> dict[str, Any]:
    """Grid keys as summary columns; a dict value (hparams) contributes one column per key
    (prefixed ``hparams.`` when the name is taken by another column)."""
    cols: dict[str, Any] = {}
    for k, v in entry.items():
        if isinstance(v, Mapping):
            for sk, sv in v.items():
                name = sk if sk not in taken and sk not in entry else f"{k}.{sk}"
                cols[name] = tuple(sv) if isinstance(sv, list) else sv
        else:
            cols[k] = v
    return cols


PRE_EVAL_CACHE_FORMAT = 2
REUSE_PRE_EVAL = True  # set False to always re-evaluate the unedited model


def _pre_eval_cached(mdl, tk, a: "_Args", recs: list, has_reference: bool,
                     evaluate: Callable[[list], pd.DataFrame]) -> tuple[pd.DataFrame, int]:
    """The unedited model's per-record metrics, reused across runs (e.g. the points of a sweep
    over the number of edits) that share the model weights, tokenizer, dataset and evaluation
    settings; only records not seen before are evaluated. Generation is seeded per record, so
    a record's metrics do not depend on the others. Returns the rows and how many were reused."""
    from . import __version__
    from .cache import cache_dir, weights_fingerprint
    from .tokens import tokenizer_identity

    if not REUSE_PRE_EVAL:
        return evaluate(recs), 0
    setting = {"format": PRE_EVAL_CACHE_FORMAT, "pmetlab": __version__, "model_class": type(mdl).__name__,
               "weights": weights_fingerprint(mdl), "tokenizer": tokenizer_identity(tk), "dataset": a.dataset,
               "generation": bool(a.generation), "n_gen_tokens": a.n_gen_tokens, "seed": a.seed,
               "eval_batch_size": a.eval_batch_size, "consistency_reference": has_reference}
    folder = cache_dir("evals", type(mdl).__name__) / stable_hash(setting)
    keys = [stable_hash(dict(r)) for r in recs]
    cached = pd.DataFrame()
    try:
        cached = _read_records(folder)
        if not cached.empty and ("record_key" not in cached or (cached["phase"] != "pre").any()):
            raise ValueError("unexpected columns")
    except Exception as exc:  # a damaged cache is ignored and rewritten
        logger.warning("ignoring the pre-edit evaluation cache in %s (%s)", folder, exc)
        cached = pd.DataFrame()
    have = set() if cached.empty else set(cached["record_key"])
    missing = sorted({i for i, k in enumerate(keys) if k not in have})
    missing = [i for i in missing if keys.index(keys[i]) == i]  # each distinct record once
    union = cached
    if missing:
        new = evaluate([recs[i] for i in missing])
        new["record_key"] = [keys[i] for i in missing]
        union = new if cached.empty else pd.concat([cached, new], ignore_index=True)
        folder.mkdir(parents=True, exist_ok=True)
        _write_records(folder, union)
    n_reused = sum(1 for k in keys if k in have)
    if n_reused:
        logger.info("pre-edit metrics of %d of %d records reused from %s", n_reused, len(keys), folder)
    out = union.drop_duplicates("record_key").set_index("record_key").loc[keys].reset_index(drop=True)
    return out, n_reused


def run_sweep(grid: Sequence[Mapping], *, out_dir: str | Path, **common) -> pd.DataFrame:
    """Run :func:`run_experiment` for each grid entry (``**common`` updated by the entry; an
    ``hparams`` dict in both is merged) in ``out_dir/<slug of the entry>``.

    Every entry is validated (argument names, hyperparameter keys) before anything runs; models
    are loaded once per name (lazily) unless ``model_and_tokenizer`` is given.

    Returns:
        The runs' summaries concatenated, with ``run_dir`` and the grid keys as columns (a dict
        value such as ``{"hparams": {"spread_exponent": 1.0}}`` gives a ``spread_exponent`` column).
    """
    grid = [dict(g) for g in grid]
    if not grid:
        raise ValueError("grid is empty; expected a list of dicts of run_experiment arguments")
    bad = sorted({k for g in [common, *grid] for k in g if k not in _RUN_PARAMS or k == "out_dir"})
    if bad:
        raise KeyError(f"unknown run_experiment argument(s) {bad} in the sweep (out_dir is the sweep's); "
                       f"valid: {[p for p in _RUN_PARAMS if p != 'out_dir']}")
    kwargs_list, slugs = [], []
    for g in grid:
        kw = {**common, **g}
        if isinstance(common.get("hparams"), Mapping) and isinstance(g.get("hparams"), Mapping):
            kw["hparams"] = {**common["hparams"], **g["hparams"]}
        slug = _grid_slug(g)
        if slug in slugs:
            raise ValueError(f"two grid entries map to the same run directory {slug!r}: {g}")
        slugs.append(slug)
        kw.setdefault("label", slug)
        sig = {p: v.default for p, v in inspect.signature(run_experiment).parameters.items()}
        full = {**sig, **kw}
        _validate(full["model"], full["method"], full["dataset"], full["n_edits"], full["batch_size"], full["mode"],
                  full["hparams"], full["seed"], full["subset"], full["generation"], full["n_gen_tokens"],
                  full["eval_batch_size"], full["label"])
        kwargs_list.append(full)
    models: dict[str, tuple] = {}
    frames = []
    for g, slug, kw in zip(grid, slugs, kwargs_list):
        given = kw.pop("model_and_tokenizer", None)
        name = kw["model"]
        if given is not None:
            provider, is_given = (lambda mt=given: mt), True
        else:
            def provider(name=name):
                if name not in models:
                    models[name] = load_model(name)
                return models[name]
            is_given = False
        kw.pop("out_dir", None)
        logger.info("sweep: run %d/%d %s", len(frames) + 1, len(grid), slug)
        res = _run(out_dir=Path(out_dir) / slug, provider=provider, given=is_given, **kw)
        s = res.summary.copy()
        for col, val in _grid_columns(g, set(s.columns)).items():
            s[col] = [val] * len(s)
        s["run_dir"] = str(res.run_dir)
        frames.append(s)
    return pd.concat(frames, ignore_index=True)


def load_run(run_dir: str | Path) -> ExperimentResult:
    """Read a run directory written by :func:`run_experiment` (finished or not).

    Raises:
        FileNotFoundError: ``run_dir`` has no ``run.json``.
    """
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a pmetlab run directory (no run.json there)")
    run = _read_run_json(path)
    records = _read_records(run_dir)
    if (run_dir / "summary.csv").is_file():
        summary = pd.read_csv(run_dir / "summary.csv")
    elif not records.empty:
        p = run.get("params", {})
        a = _Args(p.get("model"), p.get("method"), p.get("dataset"), p.get("n_edits"), p.get("batch_size"),
                  p.get("mode"), None, {}, p.get("seed"), p.get("subset"), p.get("generation"), 1, 1, run.get("label"))
        summary = _summary(records, a)
    else:
        summary = pd.DataFrame()
    if run.get("status") != "complete":
        logger.warning("run %s is not complete (phases done: %s)", run_dir,
                       [k for k, v in run.get("phases", {}).items() if v.get("status") == "done"])
    return ExperimentResult(run_dir, summary, records, run)


def _expand_run_dirs(run_dirs: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    out: list[Path] = []
    for d in run_dirs:
        d = Path(d)
        if (d / "run.json").is_file():
            out.append(d)
        elif d.is_dir() and (subs := sorted(p.parent for p in d.glob("*/run.json"))):
            out.extend(subs)  # a sweep directory
        elif d.is_dir():
            raise FileNotFoundError(f"{str(d)!r} is not a pmetlab run directory (no run.json in it or in its "
                                    f"sub-directories)")
        else:
            raise FileNotFoundError(f"run directory {str(d)!r} does not exist")
    if not out:
        raise ValueError("no run directories given")
    return out


def summarize_runs(run_dirs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """The summaries of several runs in one table, with a ``run_dir`` column. A directory without
    ``run.json`` whose sub-directories hold runs (a sweep) stands for all of them."""
    frames = []
    for d in _expand_run_dirs(run_dirs):
        res = load_run(d)
        s = _with_run_columns(res.summary.copy(), res.run, d)
        s["run_dir"] = str(d)
        frames.append(s)
    return pd.concat(frames, ignore_index=True)


def _with_run_columns(summary: pd.DataFrame, run: Mapping, run_dir: Path) -> pd.DataFrame:
    """The summary with the run's resolved hyperparameters (``hp_<field>``; layers as "3-8" or
    "3,5") and, on post-edit rows, how far its target optimisation got (``target_*``)."""
    if summary.empty:
        return summary
    hp = dict((run.get("params") or {}).get("hparams") or {})
    hp.pop("method", None)
    for k, v in hp.items():
        if isinstance(v, list):
            v = _layers_text(v) if k == "layers" else ",".join(map(str, v))
        summary[f"hp_{k}"] = [v] * len(summary)
    targets = run.get("targets")
    if targets is None and (run_dir / "deltas.safetensors").is_file() and hp:
        method = (run.get("params") or {}).get("method")
        targets = target_summary(Deltas.load(run_dir / "deltas.safetensors"), hparams_from_dict({"method": method, **hp}))
    post = summary["phase"] == "post" if "phase" in summary else pd.Series(True, index=summary.index)
    for k, v in (targets or {}).items():
        if k != "n_requests":
            summary[f"target_{k}"] = np.where(post, v, np.nan)
    return summary


def _layers_text(layers: Sequence[int]) -> str:
    ls = list(layers)
    if ls and ls == list(range(ls[0], ls[-1] + 1)) and len(ls) > 1:
        return f"{ls[0]}-{ls[-1]}"
    return ",".join(map(str, ls))
