"""The phases of a run, each a short function of the :class:`RunSpec` and the :class:`RunContext`,
composed by :func:`pmetlab.runs.experiment.run_experiment` (see :mod:`pmetlab.runs` for the files).

Everything that does heavy work (loading, statistics, editing, evaluation) is called through a
name of this module, so tests can replace it here; the dataset is loaded through
:mod:`pmetlab.runs.batches` (``batches.load_dataset``), which the target workers share.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..datasets import ConsistencyReference, Selection, load_consistency_reference
from ..editing.compute import compute_deltas
from ..editing.deltas import Deltas, apply_deltas_, restore_
from ..evaluation import evaluate_counterfact, evaluate_zsre, relative_specificity
from ..evaluation.generation import check_generation_length
from ..evaluation.scoring import encode_prompt
from ..models.loading import load_model, model_identity
from ..progress import tqdm
from ..stats import layer_covariances
from .batches import plan_records
from .beyond_eval import with_beyond
from .context import ModelPair, ModelPool, RunContext, check_model_name
from .edits import combine_batches, delivery_frame, target_summary
from .pre_eval import cached_pre_eval
from .rundir import RunMismatchError, now, summary_table
from .spec import RunSpec
from .verify import hparams_mismatch

logger = logging.getLogger(__name__)

__all__ = [
    "default_model_pool",
    "load_phase",
    "covariance_phase",
    "edit_phase",
    "eval_pre_phase",
    "eval_post_phase",
    "check_generation",
]


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (each phase seeds before random work)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _load_by_name(name: str) -> ModelPair:
    return load_model(name)  # looked up at call time, so tests can replace ``load_model`` here


def default_model_pool() -> ModelPool:
    """A pool that loads models by name with :func:`pmetlab.load_model`."""
    return ModelPool(_load_by_name)


# ---------------------------------------------------------------------------------------------
# load: the dataset now, the model only when a phase needs it
# ---------------------------------------------------------------------------------------------
def _check_same_dataset(ctx: RunContext, info: dict | None, description: dict) -> None:
    """Refuse a resumed run whose dataset file or selected records changed (run.json untouched)."""
    old = ctx.state.data.get("dataset")
    if old is not None and (
        (old.get("info") or {}).get("sha256") != (info or {}).get("sha256")
        or old["selection"].get("ids_hash") != description["ids_hash"]
    ):
        raise RunMismatchError(
            f"{ctx.store.path}: the dataset file or the selected records changed since the run "
            f"started ({(old.get('info') or {}).get('path')} -> {(info or {}).get('path')}); "
            f"use another out_dir or resume=False"
        )


def load_phase(spec: RunSpec, ctx: RunContext) -> None:
    """Load the dataset (a missing file is an error: no other dataset stands in), take the split,
    select the records, refuse a changed dataset file or selection, and cut the edit batches
    (:func:`~pmetlab.runs.batches.cut_batches`; ``dataset.skipped_conflicting`` in run.json
    counts the skipped records)."""
    t0 = time.perf_counter()
    plan = plan_records(spec)
    sel, cut = plan.selection, plan.cut
    _check_same_dataset(ctx, plan.info, sel.description)
    ctx.state.data["dataset"] = {
        "name": spec.dataset,
        "info": plan.info,
        "derived": (plan.info or {}).get("derivation"),
        "split": plan.split,
        "selection": {k: v for k, v in sel.description.items() if k != "dataset"},
        "n_edited": len(sel.records) - len(cut.skipped),
        "skipped_conflicting": len(cut.skipped),
        "skipped_conflicting_ids": [r.get("case_id") for r in cut.skipped],
    }
    ctx.selection = Selection([r for b in cut.batches for r in b], sel.description)
    ctx.batches = plan.requests(spec.dataset)
    ctx.requests = [r for b in ctx.batches for r in b]
    ctx.load_s = time.perf_counter() - t0


def get_model(spec: RunSpec, ctx: RunContext) -> ModelPair:
    """The run's ``(model, tokenizer)``, obtained on the first call (its time counts as loading);
    a model of another class or size than the run started with is refused."""
    if ctx.pair is None:
        t = time.perf_counter()
        pair = ctx.models.get(spec.model)
        check_model_name(pair[0], spec.model)
        ident = model_identity(pair[0])
        prev = ctx.state.data.get("model")
        if prev is not None and (prev.get("class"), prev.get("n_params")) != (ident["class"], ident["n_params"]):
            raise RunMismatchError(
                f"{ctx.store.path} was started with model {prev} but this model is {ident}; use "
                f"another out_dir or resume=False"
            )
        ctx.state.data["model"] = ident
        ctx.load_s += time.perf_counter() - t
        ctx.state.save()
        ctx.pair = pair
    return ctx.pair


def close_load_phase(ctx: RunContext) -> None:
    """Record the load time of the invocation that loaded the model (else of the first one), once
    the dataset is loaded; saves."""
    if ctx.selection is not None and (ctx.model_loaded or not ctx.state.done("load")):
        ctx.state.data.setdefault("wall_s", {})["load"] = round(ctx.load_s, 3)
        ctx.state.phase("load").update(
            status="done", wall_s=round(ctx.load_s, 3), finished_at=now(), model_loaded=ctx.model_loaded
        )
    ctx.state.save()


# ---------------------------------------------------------------------------------------------
# covariance and edit
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditStatistics:
    """E[k kᵀ] of the unedited model per critical layer: FFN keys, and MHSA-projection inputs
    when the MHSA output projection is updated too (else empty)."""

    ffn: dict
    attn: dict


def edit_needed(spec: RunSpec, ctx: RunContext) -> bool:
    """Whether the covariance and edit phases have work left (never for method "none")."""
    return spec.method != "none" and not (ctx.state.done("edit") and ctx.store.deltas.is_file())


def skip_edit(ctx: RunContext) -> None:
    """Method "none": mark the covariance and edit phases done without work."""
    for p in ("covariance", "edit"):
        if not ctx.state.done(p):
            ctx.state.finish(p, 0.0, skipped="method 'none'")


def covariance_phase(spec: RunSpec, ctx: RunContext) -> EditStatistics:
    """The unedited model's key statistics for ``spec.covariance`` (from the statistics cache when present)."""
    model, tok = get_model(spec, ctx)
    t0 = time.perf_counter()
    seed_all(spec.seed)
    kw = dict(spec=spec.covariance, use_cache=True, progress=ctx.progress)
    ffn = layer_covariances(model, tok, spec.hp.layers, kind="ffn", **kw)
    attn = layer_covariances(model, tok, spec.hp.layers, kind="attn", **kw) if spec.hp.update_attn_weights else {}
    ctx.state.finish("covariance", time.perf_counter() - t0, tokens={str(l): int(c.count) for l, c in ffn.items()})
    return EditStatistics(ffn, attn)


def _edit_batch(spec: RunSpec, ctx: RunContext, i: int, batch: list, n_batches: int, stats: EditStatistics) -> Deltas:
    """Batch ``i``: reused from its checkpoint when an earlier invocation finished it, else computed
    (and checkpointed when there are several batches)."""
    model, tok = get_model(spec, ctx)
    path = ctx.store.batch_deltas(i)
    ph = ctx.state.phase("edit")
    if i < int(ph.get("batches_done", 0)) and path.is_file():
        try:
            d = Deltas.load(path)
            if d.meta.get("requests") != [json.loads(json.dumps(r.to_dict())) for r in batch]:
                raise ValueError(f"{path} holds an edit of other requests than this batch")
            if (other := hparams_mismatch(d.meta.get("hparams"), spec.hp)) is not None:
                raise ValueError(f"{path} holds {other}")
            logger.info("edit batch %d/%d reused from %s", i + 1, n_batches, path)
            return d
        except ValueError as exc:
            logger.warning("edit batch %d/%d: %s; computing the batch again", i + 1, n_batches, exc)
    seed_all(spec.seed + i)
    d = compute_deltas(
        model, tok, batch, spec.hp, progress=ctx.progress, covariances=stats.ffn, attn_covariances=stats.attn or None
    )
    if n_batches > 1:
        d.save(path)
        ph["batches_done"] = i + 1
        ctx.state.save()
    return d


def _edit_batches(spec: RunSpec, ctx: RunContext, stats: EditStatistics) -> Deltas:
    model, _ = get_model(spec, ctx)
    batches = ctx.batches
    parts: list[Deltas] = []
    undo_stack: list[dict] = []
    try:
        with tqdm(
            total=len(batches),
            desc=f"{spec.method} {spec.mode} edit",
            unit="batch",
            disable=not ctx.progress or len(batches) == 1,
        ) as bar:
            for i, batch in enumerate(batches):
                d = _edit_batch(spec, ctx, i, batch, len(batches), stats)
                parts.append(d)
                if spec.mode == "sequential" and i + 1 < len(batches):
                    # the next batch is computed on the model carrying this one (checked: the
                    # batch's base fingerprint must match the current weights)
                    undo_stack.append(apply_deltas_(model, d))
                bar.update(1)
                bar.set_postfix(edits=sum(len(b) for b in batches[: i + 1]))
    finally:
        for undo in reversed(undo_stack):
            restore_(model, undo)
    return combine_batches(parts, spec.mode)


def edit_phase(spec: RunSpec, ctx: RunContext, stats: EditStatistics) -> Deltas:
    """Compute the edit batch by batch (resuming at the first unfinished batch), save the sum of
    the batches' updates and how far the targets got; the model is left unedited."""
    t0 = time.perf_counter()
    ctx.state.phase("edit")["status"] = "running"
    deltas = _edit_batches(spec, ctx, stats)
    deltas.require_finite()  # a NaN/inf edit is refused here, not saved as the run's edit
    deltas.save(ctx.store.deltas)
    ctx.state.set_output("deltas", ctx.store.deltas)
    ctx.state.data["deltas"] = {
        "file": ctx.store.deltas.name,
        "content": "sum of all batches",
        "mode": spec.mode,
        "n_batches": int(deltas.meta.get("n_batches", 1)),
        "batch_size": spec.batches_of,
        "norms": deltas.norms(),
        "base_fingerprint": deltas.meta.get("base_fingerprint"),  # the unedited weights, checked on reuse
    }
    ctx.state.data["targets"] = target_summary(deltas, spec.hp)
    ctx.state.finish("edit", time.perf_counter() - t0)
    ctx.store.remove_batches()
    return deltas


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def consistency_reference(spec: RunSpec, ctx: RunContext) -> ConsistencyReference | None:
    """The TF-IDF consistency reference when evaluation generates (loaded once; None when absent)."""
    if spec.generates and not ctx.reference_loaded:
        ctx.reference = load_consistency_reference(download=False)
        ctx.reference_loaded = True
    return ctx.reference


def _generation_left(spec: RunSpec, ctx: RunContext) -> bool:
    """Whether an evaluation phase that generates text is still to run in this invocation."""
    if not spec.generates:
        return False
    return not ctx.state.done("eval_pre") or (spec.method != "none" and not ctx.state.done("eval_post"))


def check_generation(spec: RunSpec, ctx: RunContext) -> None:
    """Refuse, before any edit, ``spec.n_gen_tokens`` that does not fit in the model's context after
    the longest generation prompt (:func:`pmetlab.evaluation.generation.check_generation_length`).
    ``n_gen_tokens`` is part of the run's identity, so a failure in evaluation would leave an edit
    that a rerun with a smaller value cannot reuse."""
    if not _generation_left(spec, ctx):
        return
    model, tok = get_model(spec, ctx)
    prompts = dict.fromkeys(p for r in ctx.records for p in r.get("generation_prompts", []))
    check_generation_length(model, [len(encode_prompt(tok, p)) for p in prompts], spec.n_gen_tokens)


def evaluate_records(
    spec: RunSpec, ctx: RunContext, model: Any, tok: Any, phase: str, records: list | None = None
) -> pd.DataFrame:
    """Per-record metrics of ``model`` on ``records`` (default: the selection), with a ``phase`` column."""
    records = ctx.records if records is None else records
    seed_all(spec.seed)
    if spec.dataset == "zsre":
        df = evaluate_zsre(model, tok, records, batch_size=spec.eval_batch_size, progress=ctx.progress)
    else:
        df = evaluate_counterfact(
            model,
            tok,
            records,
            generation=spec.generation,
            n_gen_tokens=spec.n_gen_tokens,
            batch_size=spec.eval_batch_size,
            seed=spec.seed,
            reference=consistency_reference(spec, ctx),
            progress=ctx.progress,
        )
    df.insert(0, "phase", phase)
    return df


def eval_pre_phase(spec: RunSpec, ctx: RunContext, records: pd.DataFrame) -> pd.DataFrame:
    """Evaluate the unedited model unless a finished eval_pre is on disk; returns the records."""
    have_pre = not records.empty and "phase" in records and (records["phase"] == "pre").any()
    if ctx.state.done("eval_pre") and have_pre:
        return records
    model, tok = get_model(spec, ctx)
    t0 = time.perf_counter()
    has_reference = consistency_reference(spec, ctx) is not None
    evaluate = partial(evaluate_records, spec, ctx, model, tok, "pre")
    if ctx.reuse_pre_eval:
        records, n_reused = cached_pre_eval(
            model, tok, spec, ctx.records, has_reference=has_reference, evaluate=evaluate
        )
    else:
        records, n_reused = evaluate(ctx.records), 0
    ctx.state.set_output("records", ctx.store.write_records(records))
    ctx.store.write_summary(summary_table(records, spec.summary_columns()))
    ctx.state.finish("eval_pre", time.perf_counter() - t0, reused_records=n_reused)
    return records


def _evaluate_edited(spec: RunSpec, ctx: RunContext, deltas: Deltas | None) -> pd.DataFrame:
    model, tok = get_model(spec, ctx)
    deltas = deltas if deltas is not None else Deltas.load(ctx.store.deltas)
    undo = apply_deltas_(model, deltas)
    try:
        return evaluate_records(spec, ctx, model, tok, "post")
    finally:
        restore_(model, undo)


def _with_delivery(post: pd.DataFrame, deltas: Deltas, spec: RunSpec) -> pd.DataFrame:
    """``post`` with each record's delivery diagnostics (``target_p_optimised``, ``target_p_written``,
    ``target_on_bound``, ``target_steps``, ``target_at_step_cap``; :func:`.edits.delivery_frame`)."""
    frame = delivery_frame(deltas, spec.hp)
    if frame["case_id"].isna().any() or "case_id" not in post:
        return post
    frame = frame.drop_duplicates("case_id").set_index("case_id").add_prefix("target_")
    return post.drop(columns=list(frame.columns), errors="ignore").merge(
        frame, left_on="case_id", right_index=True, how="left"
    )


def eval_post_phase(spec: RunSpec, ctx: RunContext, records: pd.DataFrame, deltas: Deltas | None) -> None:
    """Evaluate the edited model (the unedited one carries the deltas only while it runs) unless a
    finished eval_post is on disk; adds ``relative_specificity`` and writes pre + post records."""
    pre = records[records["phase"] == "pre"].drop(columns="relative_specificity", errors="ignore")
    pre = pre.reset_index(drop=True)
    if ctx.state.done("eval_post") and (records["phase"] == "post").any():
        return
    t0 = time.perf_counter()
    if spec.method == "none":
        post = pre.assign(phase="post")  # nothing was edited: the same model, the same numbers
        extra = {"copied_from": "eval_pre"}
    else:
        deltas = deltas if deltas is not None else Deltas.load(ctx.store.deltas)
        post, extra = _with_delivery(_evaluate_edited(spec, ctx, deltas), deltas, spec), {}
    rs = relative_specificity(pre, post)
    post = post.drop(columns="relative_specificity", errors="ignore").merge(rs, on="case_id", how="left")
    if spec.beyond:  # issue #23: generation accuracy, NKL, CounterFact+, prefixes, perplexity
        pre, post = with_beyond(spec, ctx, *get_model(spec, ctx), pre, post, deltas)
    ctx.state.set_output("records", ctx.store.write_records(pd.concat([pre, post], ignore_index=True)))
    ctx.state.finish("eval_post", time.perf_counter() - t0, **extra)
