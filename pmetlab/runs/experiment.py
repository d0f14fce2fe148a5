"""A run end to end: :func:`execute` runs the phases of :mod:`pmetlab.runs.phases` in order and
:func:`run_experiment` is the public entry point (see :mod:`pmetlab.runs` for the files)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .context import GivenModel, ModelSource, RunContext, check_model_name
from .lock import hold_run_dir
from .phases import (
    check_generation,
    close_load_phase,
    covariance_phase,
    default_model_pool,
    edit_needed,
    edit_phase,
    eval_post_phase,
    eval_pre_phase,
    load_phase,
    skip_edit,
)
from .result import ExperimentResult
from .rundir import RunDir, RunMismatchError, RunState, summary_table
from .signals import terminate_as_interrupt
from .spec import DEFAULT_MODEL, RunSpec
from .verify import verify_saved
from .workers import launch_target_workers

logger = logging.getLogger(__name__)

__all__ = ["execute", "run_experiment"]


def _run_phases(spec: RunSpec, ctx: RunContext) -> None:
    """Verify what earlier invocations saved and the generation length, then covariance, edit,
    eval_pre and eval_post (each only when it has work left)."""
    deltas = verify_saved(spec, ctx)
    check_generation(spec, ctx)
    if spec.method == "none":
        skip_edit(ctx)
    elif edit_needed(spec, ctx):
        deltas = edit_phase(spec, ctx, covariance_phase(spec, ctx))
    else:
        logger.info("edit reused from %s (verified)", ctx.store.deltas)
    records = eval_pre_phase(spec, ctx, ctx.store.read_records())
    eval_post_phase(spec, ctx, records, deltas)


def _complete(spec: RunSpec, ctx: RunContext, t_run: float) -> ExperimentResult:
    close_load_phase(ctx)
    records = ctx.store.read_records()
    summary = summary_table(records, spec.summary_columns())
    ctx.state.set_output("summary", ctx.store.write_summary(summary))
    ctx.state.complete(time.perf_counter() - t_run)
    logger.info("run %s complete", ctx.store.path)
    return ExperimentResult(ctx.store.path, summary, records, ctx.state.data)


def execute(
    spec: RunSpec,
    *,
    out_dir: str | Path | None,
    models: ModelSource,
    resume: bool = True,
    progress: bool = True,
    reuse_pre_eval: bool = True,
) -> ExperimentResult:
    """Run (or resume) ``spec`` in ``out_dir``: load, covariance, edit, eval_pre, eval_post.

    Any exception (a dataset error in the load phase, Ctrl-C, SIGTERM: see
    :mod:`pmetlab.runs.signals`) marks the run failed in run.json with the reason, then is raised;
    only a refusal to resume a directory holding another run (:class:`RunMismatchError` before this
    invocation started working) leaves run.json as it was. A directory another live process works in
    is refused (:class:`pmetlab.runs.lock.RunDirInUseError`, naming its pid and host) before anything
    is touched."""
    t_run = time.perf_counter()
    store = RunDir.for_spec(spec, out_dir)
    if models.preloaded:
        check_model_name(models.get(spec.model)[0], spec.model)
    with hold_run_dir(store.path), terminate_as_interrupt():
        ctx = RunContext(
            store, RunState.open(store, spec, resume=resume), models, progress=progress, reuse_pre_eval=reuse_pre_eval
        )
        try:
            load_phase(spec, ctx)
            ctx.state.begin()
            _run_phases(spec, ctx)
            return _complete(spec, ctx, t_run)
        except BaseException as exc:
            if ctx.state.begun or not isinstance(exc, RunMismatchError):
                ctx.state.fail(exc)
                close_load_phase(ctx)  # saves
                logger.info("run %s failed: %s", store.path, ctx.state.data["error"])
            raise


def run_experiment(
    model: str = DEFAULT_MODEL,
    method: str = "pmet",
    dataset: str = "counterfact",
    n_edits: int = 10,
    *,
    batch_size: int | None = None,
    mode: str = "batch",
    hparams: dict | None = None,
    seed: int = 0,
    subset: str = "first",
    split: str = "eval",
    out_dir: str | Path | None = None,
    generation: bool = True,
    n_gen_tokens: int = 100,
    eval_batch_size: int = 32,
    label: str | None = None,
    resume: bool = True,
    progress: bool = True,
    model_and_tokenizer=None,
    reuse_pre_eval: bool = True,
    workers: int = 1,
    beyond: bool | str | tuple[str, ...] = (),
) -> ExperimentResult:
    """Edit ``n_edits`` facts of ``dataset`` into ``model`` with ``method`` and evaluate the model
    before and after, on the same records (method.md §6). See :mod:`pmetlab.runs` for the files.

    Args:
        model: an embedded model name or a path (what :func:`pmetlab.load_model` takes); also the
            preset looked up for ``hparams``. With ``model_and_tokenizer`` it names that model.
        method: "pmet", "memit", or "none" (no edit: post = pre, a baseline row).
        dataset: "counterfact", "multi_counterfact" (its file must be available: a missing file is
            a DatasetNotFoundError naming every place looked), "counterfact+conflict_filter"
            (CounterFact keeping the first record per (subject, relation_id), under that name) or
            "zsre". On CounterFact data each edit batch skips the records repeating the (subject,
            relation_id) of an earlier record of the batch (``run["dataset"]["skipped_conflicting"]``).
        n_edits: number of records edited and evaluated.
        batch_size: requests per compute_deltas call (None: all in one batch).
        mode: "batch": every batch computed on the unedited model, all applied together;
            "sequential": batch i computed on the model edited by batches < i (covariances are
            those of the unedited model).
        hparams: overrides of the method's preset for ``model`` (class defaults when there is none);
            an unknown key raises KeyError before any work. ``seed`` defaults to the run's seed.
        seed: seeds the subset ("sample"), the edit (context prefixes) and generation sampling.
        subset: "first" n_edits records or a seeded "sample" (of the split).
        split: "eval" (the default: never a tuning record), "tune" or "all" (:mod:`pmetlab.datasets.splits`).
        out_dir: the run directory (default ``runs/<model>_<method>_<dataset>_n<n>_..._seed<seed>``;
            an empty path is refused).
        generation: CounterFact fluency/consistency (generates ``n_gen_tokens`` per prompt).
        eval_batch_size: prompt pairs per forward pass in evaluation.
        label: a free name carried into the summary (not part of the run's identity).
        resume: reuse the finished phases of a run with the same parameters in ``out_dir`` (their
            files are verified first; a damaged one is set aside and its phases redone, see
            :mod:`pmetlab.runs.verify`); False deletes that run and starts over.
        model_and_tokenizer: an already loaded ``(model, tokenizer)``; it is left unedited.
        reuse_pre_eval: reuse the unedited model's metrics of records evaluated by earlier runs
            with the same model and settings (:mod:`pmetlab.runs.pre_eval`); False evaluates all.
        workers: processes that optimise the targets before the edit (:mod:`pmetlab.runs.workers`;
            they load ``model`` by name); 1: this process does it during the edit.
        beyond: evaluation beyond teacher forcing in eval_post (issue #23): True/"all", family names
            (:data:`pmetlab.evaluation.beyond.BEYOND_FAMILIES`) or () (off, the default); see
            :mod:`pmetlab.runs.beyond_eval` for the columns and files.

    Returns:
        :class:`ExperimentResult` (run_dir, summary, records, run).

    Raises:
        KeyError: unknown hyperparameter. ValueError: bad argument. RunMismatchError: ``out_dir``
        holds a run with other parameters. DatasetNotFoundError: dataset file unavailable.
    """
    models = GivenModel(model_and_tokenizer) if model_and_tokenizer is not None else default_model_pool()
    spec = RunSpec.build(
        model=model,
        method=method,
        dataset=dataset,
        n_edits=n_edits,
        batch_size=batch_size,
        mode=mode,
        hparams=hparams,
        seed=seed,
        subset=subset,
        split=split,
        generation=generation,
        n_gen_tokens=n_gen_tokens,
        eval_batch_size=eval_batch_size,
        label=label,
        beyond=beyond,
    )
    if workers != 1 and needs_edit(spec, out_dir, resume):
        launch_target_workers([spec], workers)
    return execute(
        spec, out_dir=out_dir, models=models, resume=resume, progress=progress, reuse_pre_eval=reuse_pre_eval
    )


def needs_edit(spec: RunSpec, out_dir: str | Path | None, resume: bool) -> bool:
    """Whether running ``spec`` in ``out_dir`` would still compute an edit (a finished run's is kept)."""
    if spec.hp is None:
        return False
    store = RunDir.for_spec(spec, out_dir)
    if not resume or not store.has_run():
        return True
    try:
        return store.read_run().get("phases", {}).get("edit", {}).get("status") != "done"
    except (OSError, ValueError):
        return True
