"""Covariance statistics per layer (method.md §2 step 4), cached in the keyed store.

C_l = E[k kᵀ] over the tokens of a generic corpus, where k is the input of a module (the FFN
output projection for the key covariance, the MHSA output projection for the attention
ablation). What a statistic is computed from is a :class:`~pmetlab.covspec.CovarianceSpec`
(``hp.covariance`` for a method's hyperparameters). All missing layers are collected in ONE
forward pass that stops after the deepest of them (:mod:`pmetlab.moments`).

Every file goes through :class:`pmetlab.store.KeyedStore` under ``stats/<model class>/``:
``<kind>-L<layer>-<hash of key>.safetensors`` per layer, and ``partial-<kind>-<hash>.safetensors``
while a pass runs (the sums of every layer and the next batch index in one atomic file, written
about every minute of collection, so an interrupted pass loses at most about a minute and resumes
exactly). A damaged, foreign or non-finite file is logged with its path
and recomputed; statistics that come out non-finite are refused with
:class:`~pmetlab.moments.NonFiniteStatisticsError` (naming the module), never cached or returned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import stable_hash, tensor_digest
from .corpus import Corpus, resolve_corpus, tokenize_corpus
from .covspec import CovarianceSpec
from .distributed import Shard, all_reduce_moments, barrier, consensus, current_shard
from .hparams import check_layer_indices
from .models.adapters import get_adapter
from .moments import (
    CHECKPOINT_SECONDS,
    NonFiniteStatisticsError,
    SecondMoment,
    collect_second_moments,
    plan_batches,
    symmetric_accumulate_,
    symmetrize,
)
from .store import DamagedEntryError, KeyedStore
from .tokens import tokenizer_identity
from .types import Model, Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "SecondMoment",
    "collect_second_moments",
    "layer_covariances",
    "covariance_cache_paths",
    "stats_key",
    "tokenize_corpus",
    "symmetric_accumulate_",
    "symmetrize",
    "tokenizer_identity",
    "FORMAT_VERSION",
]

#: 2: keyed-store files (the token count is checksummed with the sum, non-finite sums refused),
#: one-file partial checkpoints, and weight fingerprints by :func:`pmetlab.cache.tensor_digest`.
#: Files of format 1 are not read; the statistics are recomputed.
FORMAT_VERSION = 2

_KINDS = ("ffn", "attn")


def stats_key(
    model: torch.nn.Module,
    module_name: str,
    layer_fp: str,
    spec: CovarianceSpec,
    *,
    corpus: Corpus | None = None,
    tokenizer: dict | None = None,
) -> dict:
    """Everything that changes a statistic; stored in the file and checked on load.

    ``layer_fp``: the fingerprint of the weights the module's input depends on; ``corpus``: the
    resolved ``spec.corpus`` (resolved here when omitted); ``tokenizer``: the
    :func:`tokenizer_identity` of the tokenizer that cut the corpus. The seed only matters (and is
    only recorded) for corpora sampled from the model.
    """
    corpus = corpus if corpus is not None else resolve_corpus(spec.corpus)
    key = {
        "model_class": type(model).__name__,
        "weights": layer_fp,
        "module": module_name,
        "corpus": corpus.identity,
        "tokens": int(spec.n_tokens),
        "seq_len": int(spec.seq_len),
        "dtype": spec.dtype,
        "format": FORMAT_VERSION,
    }
    if tokenizer is not None:
        key["tokenizer"] = tokenizer
    if corpus.model_samples:
        key["seed"] = int(spec.seed)
    return key


def _layer_fingerprints(model: torch.nn.Module, adapter: Any) -> list[str]:
    """fp[l]: digest of the parameters layer l's input depends on (whatever runs before the
    layers, e.g. the embeddings, plus layers 0..l; not the final norm or the head), so an edit of
    layer l keeps the statistics of layers < l valid. Each group of parameters is digested once
    by :func:`tensor_digest`; fp[l] hashes the chain of group digests up to l."""
    layers_prefix = adapter.spec.layers + "."
    downstream = (adapter.final_norm_name + ".", adapter.unembed_name + ".")
    base: list[tuple[str, torch.Tensor]] = []
    per_layer: dict[int, list[tuple[str, torch.Tensor]]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(p.data_ptr())
        if name.startswith(layers_prefix):
            per_layer.setdefault(int(name[len(layers_prefix) :].split(".")[0]), []).append((name, p))
        elif not name.startswith(downstream):
            base.append((name, p))  # embeddings and anything else upstream (e.g. OPT's project_in)
    chain = [tensor_digest(base)]
    out = []
    for l in range(adapter.n_layers):
        chain.append(tensor_digest(per_layer.get(l, [])))
        out.append(stable_hash(chain))
    return out


def _store(model: torch.nn.Module) -> KeyedStore:
    return KeyedStore("stats", type(model).__name__)


def _prefix(kind: str, layer: int) -> str:
    return f"{kind}-L{layer:03d}-"


def covariance_cache_paths(
    model: torch.nn.Module, covs: Mapping[int, SecondMoment], *, kind: str = "ffn"
) -> dict[int, Path]:
    """Where the store keeps each of ``covs`` (as returned by :func:`layer_covariances` for this
    ``model`` and ``kind``); a path need not exist (``use_cache=False``)."""
    store = _store(model)
    return {l: store.path(sm.key, prefix=_prefix(kind, l)) for l, sm in covs.items()}


def _resolve_spec(
    spec: CovarianceSpec | None, corpus: str | Corpus | None, **legacy: Any
) -> tuple[CovarianceSpec, Corpus]:
    """The spec and its resolved corpus, from ``spec`` or from the legacy keyword settings."""
    given = {k: v for k, v in legacy.items() if v is not None}
    if spec is not None:
        if given or corpus is not None:
            raise ValueError(
                f"pass either spec= or the keyword settings, not both (got spec={spec} and "
                f"{sorted(given) + (['corpus'] if corpus is not None else [])}); "
                f"use spec=spec.replace(...) to change a field"
            )
        return spec, resolve_corpus(spec.corpus)
    if isinstance(corpus, Corpus):
        return CovarianceSpec(corpus=corpus.name, **given), corpus
    spec = CovarianceSpec().replace(corpus=corpus, **given)
    return spec, resolve_corpus(spec.corpus)


def layer_covariances(
    model: Model,
    tok: Tokenizer,
    layers: Sequence[int],
    *,
    kind: str = "ffn",
    spec: CovarianceSpec | None = None,
    use_cache: bool = True,
    progress: bool = True,
    tokens_per_batch: int = 4096,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
    shard: Shard | None = None,
    corpus: str | Corpus | None = None,
    n_tokens: int | None = None,
    seq_len: int | None = None,
    dtype: str | None = None,
    seed: int | None = None,
) -> dict[int, SecondMoment]:
    """E[k kᵀ] for the FFN keys (``kind="ffn"``) or MHSA-projection inputs (``kind="attn"``) of
    ``layers``, computed from ``spec``: cached per layer; the missing ones computed together in
    one pass.

    Returns ``{layer: SecondMoment}``; ``.mom2`` is the (d, d) matrix C_l of method.md §2 step 4
    (d = d_ff for "ffn", the attention width for "attn"). With ``use_cache``, a checkpoint is
    written once ``checkpoint_seconds`` of collection have passed since the last one (and every
    ``checkpoint_every`` batches when set), so an interruption loses at most about that much work;
    the next call resumes from it and returns bit-identical statistics.

    A budget ``spec.n_tokens`` below d, or a corpus yielding fewer than d tokens, is refused:
    C would be singular (:meth:`CovarianceSpec.check_key_dim`).

    ``corpus``, ``n_tokens``, ``seq_len``, ``dtype`` and ``seed`` are the older form of ``spec``,
    kept for backward compatibility (unset ones take :class:`CovarianceSpec`'s defaults; a
    :class:`Corpus` object is accepted as ``corpus``); pass either them or ``spec``, e.g.
    ``spec=hp.covariance.replace(n_tokens=20_000)``.

    Under ``torch.distributed`` (``shard`` defaults to this process's rank and world size),
    every worker runs its share of the batches, the sums and counts are all-reduced, the main
    worker writes the cache and all workers return the same merged statistics.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'ffn' or 'attn', got {kind!r}")
    spec, corp = _resolve_spec(spec, corpus, n_tokens=n_tokens, seq_len=seq_len, dtype=dtype, seed=seed)
    adapter = get_adapter(model)
    check_layer_indices(tuple(sorted(set(layers))), adapter.n_layers, owner=type(model).__name__)
    fps = _layer_fingerprints(model, adapter)
    names = {l: adapter.ffn_out_name(l) if kind == "ffn" else adapter.attn_out_name(l) for l in layers}
    key_dim = adapter.d_ff if kind == "ffn" else adapter.d_attn
    if layers:
        spec.check_key_dim(key_dim, names[layers[0]])
    tok_id = tokenizer_identity(tok)
    keys = {l: stats_key(model, names[l], fps[l], spec, corpus=corp, tokenizer=tok_id) for l in layers}
    store = _store(model)
    out = {}
    if use_cache:
        out = {l: sm for l in layers if (sm := _load_layer(store, keys[l], _prefix(kind, l))) is not None}
    # every worker must agree on what to compute (their caches may differ)
    agreed = consensus([l in out for l in layers])
    out = {l: out[l] for l, ok in zip(layers, agreed) if ok}
    missing = [l for l in layers if l not in out]
    if missing:
        shard = shard if shard is not None else current_shard()
        chunks = tokenize_corpus(tok, corp, spec.n_tokens, spec.seq_len, model=model, seed=spec.seed)
        spec.check_key_dim(key_dim, names[missing[0]], yielded=sum(len(c) for c in chunks))
        run = _PartialRun.plan(store, kind, {l: keys[l] for l in missing}, names, chunks, tokens_per_batch, shard)
        out.update(
            _compute(
                model,
                tok,
                run,
                chunks,
                spec,
                use_cache=use_cache,
                progress=progress,
                tokens_per_batch=tokens_per_batch,
                checkpoint_every=checkpoint_every,
                checkpoint_seconds=checkpoint_seconds,
            )
        )
    return {l: out[l] for l in layers}


def _load_layer(store: KeyedStore, key: dict, prefix: str) -> SecondMoment | None:
    """The cached statistic for ``key``, or None when missing or unusable (logged with its path)."""
    entry = store.load_tensors(key, prefix=prefix, finite=True)
    if entry is None:
        return None
    try:
        sm = SecondMoment.from_tensors(entry.tensors, key, where=entry.path)
    except DamagedEntryError as exc:
        logger.warning("ignoring cache entry (it will be recomputed): %s", exc)
        return None
    logger.info("covariance for %s loaded from cache %s", key["module"], entry.path)
    return sm


@dataclass(frozen=True)
class _PartialRun:
    """One collection pass over the missing layers and its checkpoint, a single store entry
    keyed by everything that gives a batch index its meaning (the layers' keys, the batch plan,
    the shard)."""

    store: KeyedStore
    kind: str
    keys: dict[int, dict]  # missing layer -> its statistics key
    names: dict[int, str]  # missing layer -> the module whose input is collected
    run_key: dict
    n_batches: int  # batches of this shard
    shard: Shard

    @classmethod
    def plan(
        cls,
        store: KeyedStore,
        kind: str,
        keys: dict[int, dict],
        names: dict[int, str],
        chunks: list[list[int]],
        tokens_per_batch: int,
        shard: Shard,
    ) -> _PartialRun:
        n_batches = len(plan_batches(chunks, tokens_per_batch))
        run_key = {
            "layers": list(keys),
            "keys": list(keys.values()),
            "tokens_per_batch": int(tokens_per_batch),
            "n_batches": n_batches,
            **({"shard": [shard.rank, shard.world]} if shard.world > 1 else {}),
        }
        return cls(
            store, kind, keys, {l: names[l] for l in keys}, run_key, len(shard.take(list(range(n_batches)))), shard
        )

    @property
    def prefix(self) -> str:
        return f"partial-{self.kind}-"

    def save(self, stats: Mapping[str, SecondMoment], next_batch: int) -> None:
        """Checkpoint (the ``checkpoint`` callback of :func:`collect_second_moments`): the partial
        sums of every layer and the next batch index in one atomic file, so an interruption can
        never pair new sums with an old index."""
        tensors = {"next_batch": torch.tensor(next_batch, dtype=torch.int64)}
        for l, n in self.names.items():
            tensors.update(stats[n].tensors(prefix=f"L{l}."))
        self.store.save_tensors(self.run_key, tensors, prefix=self.prefix)

    def resume(self) -> tuple[int, dict[str, SecondMoment] | None]:
        """(next batch, partial statistics per module) from a usable checkpoint, else (0, None)."""
        entry = self.store.load_tensors(self.run_key, prefix=self.prefix, finite=True)
        if entry is None:
            return 0, None
        try:
            init = {
                self.names[l]: SecondMoment.from_tensors(entry.tensors, key, prefix=f"L{l}.", where=entry.path)
                for l, key in self.keys.items()
            }
            start = int(entry.tensors["next_batch"])
            if not 0 < start <= self.n_batches:
                raise DamagedEntryError(f"next batch {start} outside 1..{self.n_batches}")
        except (DamagedEntryError, KeyError) as exc:
            logger.warning("ignoring unusable checkpoint %s (%s)", entry.path, exc)
            return 0, None
        logger.info("resuming covariance collection at batch %d of %d from %s", start, self.n_batches, entry.path)
        return start, init

    def discard(self) -> None:
        self.store.path(self.run_key, prefix=self.prefix).unlink(missing_ok=True)


def _compute(
    model: torch.nn.Module,
    tok: Any,
    run: _PartialRun,
    chunks: list[list[int]],
    spec: CovarianceSpec,
    *,
    use_cache: bool,
    progress: bool,
    tokens_per_batch: int,
    checkpoint_every: int | None,
    checkpoint_seconds: float | None,
) -> dict[int, SecondMoment]:
    """Collect the missing layers of ``run`` (resuming its checkpoint), merge the workers' sums,
    and let the main worker store them.

    Raises:
        NonFiniteStatisticsError: a layer's sums hold NaN/inf (nothing is cached: every edit
            solved with them would be NaN).
    """
    start, init = run.resume() if use_cache else (0, None)
    if run.shard.is_main:
        logger.info(
            "computing covariance statistics once: ~%d tokens of corpus %r through %s; %s",
            spec.n_tokens,
            spec.corpus,
            ", ".join(run.names.values()),
            f"cached in {run.store.folder}" if use_cache else "not cached (use_cache=False)",
        )
    res = collect_second_moments(
        model,
        tok,
        list(run.names.values()),
        chunks,
        dtype=getattr(torch, spec.dtype),
        tokens_per_batch=tokens_per_batch,
        start=start,
        init=init,
        checkpoint=run.save if use_cache else None,
        checkpoint_every=checkpoint_every,
        checkpoint_seconds=checkpoint_seconds,
        progress=progress and run.shard.is_main,
        shard=run.shard,
    )
    sums, counts = all_reduce_moments({n: r.sum for n, r in res.items()}, {n: r.count for n, r in res.items()})
    out = {l: SecondMoment(sums[n], counts[n], run.keys[l]) for l, n in run.names.items()}
    for l, sm in out.items():  # every worker holds the merged sums, so all of them stop here
        try:
            sm.require_finite(run.names[l], model_dtype=next(model.parameters()).dtype, spec_dtype=spec.dtype)
        except NonFiniteStatisticsError:
            if use_cache:
                run.discard()
            raise
    if use_cache and run.shard.is_main:
        for l, sm in out.items():
            sm.save_to(run.store, prefix=_prefix(run.kind, l))
    barrier()  # the main worker's files exist before anyone returns
    if use_cache:
        run.discard()
    return out
