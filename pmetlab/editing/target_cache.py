"""Many requests' targets: chunking and a per-request disk cache (method.md §2 step 1).

Requests do not interact in the target optimisation (each has its own δ rows and loss), so
they can be optimised in chunks, which bounds the memory of the backward pass, and each
request's targets can be cached on their own: sweeps over the number of edits, λ or the
spread then reuse them. The cache is a :class:`~pmetlab.store.KeyedStore` ("targets" kind):
the key names every input that changes the targets and is checked on load, entries carry a
checksum and are written atomically, and a damaged entry is recomputed.

The functions here take the optimiser as ``optimize`` (a function with the signature of
:func:`~pmetlab.editing.targets.optimize_targets`); :mod:`.targets` binds its own and exports
them as ``optimize_targets_chunked`` and ``optimize_targets_cached`` (this module sits below
it, so the imports stay one-way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import weights_fingerprint
from ..devices import model_device
from ..hparams import EditHyperParams
from ..requests import EditRequest
from ..store import KeyedStore
from ..tokens import tokenizer_identity
from .chunking import CHUNK_SIZE, CHUNK_TOKENS, chunk_budget
from .delivery import ON_BOUND_TOL
from .rows import build_rows, recomputed_positions
from .stepper import ForwardChecks
from .target_result import RESULT_GROUPS, TargetResult

logger = logging.getLogger(__name__)

__all__ = [
    "run_cached",
    "run_chunked",
    "fill_cache_sharded",
    "plan_chunks",
    "target_keys",
    "optimisation_fields",
    "CHUNK_SIZE",
    "CHUNK_TOKENS",
    "TARGET_CACHE_FORMAT",
]

#: ``optimize(model, tok, requests, hp, templates, *, reference, progress, checks) -> TargetResult``
Optimizer = Callable[..., TargetResult]


#: Version of the cached entries: 3 = KeyedStore files (key and checksum in the header).
TARGET_CACHE_FORMAT = 3
#: Hyperparameters the targets depend on (besides the layer L = layers[-1]).
_TARGET_FIELDS = (
    "v_lr",
    "v_num_grad_steps",
    "clamp_norm_factor",
    "kl_factor",
    "v_weight_decay",
    "optimize_attn",
    "stop_rule",
    "loss_stop",
    "kl_stop",
    "argmax_nll_scale",
)
#: Target fields added after format 3, with the value every earlier entry was computed with.
_LATER_TARGET_FIELDS = {"clamp_reference": "component"}


def plan_chunks(
    tok,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    *,
    chunk_size: int = CHUNK_SIZE,
    max_tokens: int = CHUNK_TOKENS,
) -> list[range]:
    """Consecutive chunks of at most ``chunk_size`` requests whose rows recompute at most
    ``max_tokens`` positions per step (a single longer request gets a chunk of its own)."""
    if chunk_size < 1 or max_tokens < 1:
        raise ValueError(f"chunk_size and max_tokens must be >= 1, got {chunk_size} and {max_tokens}")
    sizes = [recomputed_positions(build_rows(tok, [r], templates)) for r in requests]
    chunks, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and (i - start >= chunk_size or total + n > max_tokens):
            chunks.append(range(start, i))
            start, total = i, 0
        total += n
    if sizes:
        chunks.append(range(start, len(sizes)))
    return chunks


def run_chunked(
    optimize: Optimizer,
    model,
    tok,
    requests: Sequence[EditRequest],
    hp: EditHyperParams,
    templates: Sequence[str],
    *,
    chunk_size: int | None = None,
    reference: bool = False,
    progress: bool = True,
) -> TargetResult:
    """``optimize`` over the chunks of :func:`plan_chunks`, one after another, concatenated in
    request order (the strategy check of :class:`ForwardChecks` runs once for all chunks)."""
    requests, checks = list(requests), ForwardChecks()
    return TargetResult.concat(
        [
            optimize(
                model,
                tok,
                [requests[i] for i in c],
                hp,
                templates,
                reference=reference,
                progress=progress,
                checks=checks,
            )
            for c in _plan(model, tok, requests, templates, chunk_size)
        ]
    )


def _plan(model, tok, requests: Sequence[EditRequest], templates: Sequence[str], chunk_size: int | None) -> list[range]:
    """:func:`plan_chunks` with the budget of ``model``'s device (:func:`.chunking.chunk_budget`)."""
    budget = chunk_budget(model, chunk_size)
    return plan_chunks(tok, requests, templates, chunk_size=budget.requests, max_tokens=budget.positions)


def optimisation_fields(hp: EditHyperParams) -> dict[str, Any]:
    """What of ``hp`` the targets depend on: the method, the layer L and the target fields (switches
    added later only when set, so entries cached before them stay valid). Two settings with equal
    fields share one optimisation; λ, the spread and ``ffn_target`` are not among them."""
    later = {f: getattr(hp, f) for f, default in _LATER_TARGET_FIELDS.items() if getattr(hp, f) != default}
    return {"method": hp.method, "layer": hp.layers[-1], **{f: getattr(hp, f) for f in _TARGET_FIELDS}, **later}


def target_keys(
    model,
    tok,
    requests: Sequence[EditRequest],
    hp: EditHyperParams,
    templates: Sequence[str],
    *,
    reference: bool = False,
) -> list[dict[str, Any]]:
    """The cache key of each request's targets: every input that changes them (the model's
    class and a digest of its weights, the tokenizer, the templates, the layer, the target
    fields of ``hp``, the request without its case id, the format)."""
    base = {
        "format": TARGET_CACHE_FORMAT,
        "reference": reference,
        "weights": weights_fingerprint(model),
        "model_class": type(model).__name__,
        "tokenizer": tokenizer_identity(tok),
        "templates": list(templates),
        **optimisation_fields(hp),
    }
    return [{**base, "request": {k: v for k, v in r.to_dict().items() if k != "case_id"}} for r in requests]


def run_cached(
    optimize: Optimizer,
    model,
    tok,
    requests: Sequence[EditRequest],
    hp: EditHyperParams,
    templates: Sequence[str],
    *,
    reference: bool = False,
    progress: bool = True,
    use_cache: bool = True,
    chunk_size: int | None = None,
) -> TargetResult:
    """``optimize`` with a per-request disk cache.

    Cached requests are read; the others are optimised chunk by chunk (:func:`plan_chunks`)
    and each chunk's entries are written as soon as it is done, so an interrupted run resumes
    after the last finished chunk. Cached values may differ from a fresh batch in the last
    float bits (batch padding changes the rounding). ``use_cache=False``: no cache at all.
    """
    if not use_cache:
        return run_chunked(
            optimize, model, tok, requests, hp, templates, chunk_size=chunk_size, reference=reference, progress=progress
        )
    job = _CacheJob(optimize, model, tok, list(requests), hp, list(templates), reference, progress)
    found, missing = job.read()
    chunks = _plan(model, tok, [job.requests[i] for i in missing], templates, chunk_size)
    found.update(job.optimise(missing, chunks))
    return TargetResult.concat([found[i] for i in range(len(job.requests))]).to(model_device(model))


def fill_cache_sharded(
    optimize: Optimizer,
    model,
    tok,
    requests: Sequence[EditRequest],
    hp: EditHyperParams,
    templates: Sequence[str],
    *,
    rank: int,
    world: int,
    barrier: Callable[[], None],
    progress: bool = True,
    chunk_size: int | None = None,
) -> int:
    """One worker's part of filling the per-request cache for ``requests``: every worker reads
    which requests are missing, waits at ``barrier`` (so none has written yet), plans the same
    chunks as :func:`run_cached` would in one process, optimises chunks ``rank, rank + world,
    ...`` and writes their entries, then waits at ``barrier`` again. Each chunk is computed
    exactly as one process computes it, so the cache ends bit-identical to one process's.
    Returns the number of requests this worker optimised."""
    job = _CacheJob(optimize, model, tok, list(requests), hp, list(templates), False, progress)
    _, missing = job.read()
    barrier()
    chunks = _plan(model, tok, [job.requests[i] for i in missing], templates, chunk_size)
    mine = chunks[rank::world]
    done = job.optimise(missing, mine)
    barrier()
    return len(done)


@dataclass
class _CacheJob:
    """The requests of one cached target optimisation and their keys."""

    optimize: Optimizer
    model: Any
    tok: Any
    requests: list[EditRequest]
    hp: EditHyperParams
    templates: list[str]
    reference: bool
    progress: bool

    def __post_init__(self) -> None:
        self.store = KeyedStore("targets", type(self.model).__name__)
        self.keys = target_keys(self.model, self.tok, self.requests, self.hp, self.templates, reference=self.reference)

    def read(self) -> tuple[dict[int, TargetResult], list[int]]:
        """The cached results by request index, and the indices of the missing requests."""
        found: dict[int, TargetResult] = {}
        for i, key in enumerate(self.keys):
            entry = self.store.load_tensors(key)  # None when missing or damaged (logged)
            one = _from_entry(entry.tensors, entry.meta, self.hp) if entry is not None else None
            if one is not None:
                found[i] = one
        return found, [i for i in range(len(self.requests)) if i not in found]

    def optimise(self, missing: list[int], chunks: Sequence[range]) -> dict[int, TargetResult]:
        """Optimise ``chunks`` (ranges into ``missing``) one after another, writing each chunk's
        entries as soon as it is done."""
        checks, out = ForwardChecks(), {}  # the strategy check runs once for all chunks
        for chunk in chunks:
            part = [missing[j] for j in chunk]
            fresh = self.optimize(
                self.model,
                self.tok,
                [self.requests[i] for i in part],
                self.hp,
                self.templates,
                reference=self.reference,
                progress=self.progress,
                checks=checks,
            )
            logger.info(
                "targets of requests %d-%d of %d optimised in %.1fs",
                chunk.start + 1,
                chunk.start + len(part),
                len(missing),
                fresh.seconds,
            )
            for j, i in enumerate(part):
                out[i] = fresh.request(j)
                self.store.save_tensors(self.keys[i], *_to_entry(out[i]))
        return out


def _to_entry(one: TargetResult) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A one-request result as store tensors ("values.ffn" etc., (d_model,) each; "delivery.<name>"
    (1,)) and metadata (its step count and trace, the trace as columns + rows so the column order
    survives the store's sorted JSON)."""
    tensors = {
        f"{group}.{s}": t[0] if group != "delivery" else t[0:1].float()
        for group in RESULT_GROUPS
        for s, t in getattr(one, group).items()
    }
    columns = list(one.trace[0]) if one.trace else []
    meta = {
        "n_steps": one.n_steps[0],
        "trace": {"columns": columns, "rows": [[row[c] for c in columns] for row in one.trace]},
    }
    return tensors, meta


def _from_entry(tensors: dict[str, torch.Tensor], meta: dict[str, Any], hp: EditHyperParams) -> TargetResult | None:
    """The inverse of :func:`_to_entry` (spaces in ``hp.value_spaces`` order); None for an entry of an
    FFN-space method cached without the observed FFN output (an older pmetlab), which is recomputed.
    Entries without delivery diagnostics get those the trace and the norms determine."""
    if hp.residual_space == "ffn" and "observed.ffn" not in tensors:
        return None
    group = lambda g: {s: tensors[f"{g}.{s}"][None] for s in hp.value_spaces}
    trace = [dict(zip(meta["trace"]["columns"], row)) for row in meta["trace"]["rows"]]
    observed = {s: tensors[f"observed.{s}"][None] for s in ("ffn",) if f"observed.{s}" in tensors}
    delivery = {k.split(".", 1)[1]: t for k, t in tensors.items() if k.startswith("delivery.")}
    one = TargetResult(
        hp.layers[-1], group("values"), group("inits"), group("deltas"), [int(meta["n_steps"])], trace, 0.0, observed
    )
    one.delivery = delivery or _delivery_of_old_entry(one, hp)
    return one


def _delivery_of_old_entry(one: TargetResult, hp: EditHyperParams) -> dict[str, torch.Tensor]:
    """p(o*) optimised (the last trace row) and the bound of each optimised δ (component reference:
    entries without diagnostics predate ``clamp_reference``) for a one-request entry."""
    p = one.trace[-1]["p_target"] if one.trace else float("nan")
    out = {"p_optimised": torch.tensor([float(p)])}
    for s in hp.optimized_spaces:
        r = hp.clamp_norm_factor * one.inits[s].norm(dim=1).float()
        out[f"on_bound_{s}"] = (one.deltas[s].norm(dim=1).float() >= r * (1 - ON_BOUND_TOL)).float()
        out[f"radius_{s}"] = r
    return out
