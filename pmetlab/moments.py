"""Accumulating second moments of module inputs: the sum-and-count record, its exact merge, and
one forward pass per batch that collects every requested module at once.

C = E[k kᵀ] (method.md §2 step 4) is kept as ``sum`` (d, d) of k kᵀ plus the token ``count``, so
partial results (several processes, or an interrupted run) merge exactly. Files go through the
keyed store (:mod:`pmetlab.store`): the key is written into the file and checked, the content
(sum and count) is checksummed, and non-finite sums are refused. Caching per layer and resuming
live in :mod:`pmetlab.stats`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .devices import model_device
from .distributed import Shard
from .progress import tqdm
from .store import DamagedEntryError, KeyedStore, StoreEntry
from .tracing import TraceDict, get_module

logger = logging.getLogger(__name__)

__all__ = [
    "SecondMoment",
    "NonFiniteStatisticsError",
    "collect_second_moments",
    "symmetric_accumulate_",
    "symmetrize",
    "plan_batches",
    "CHECKPOINT_SECONDS",
]

_BLOCK = 256

#: ``checkpoint(stats, next_batch_index)``: called by :func:`collect_second_moments` to save progress.
Checkpoint = Callable[[dict[str, "SecondMoment"], int], None]

#: Seconds of collection between two checkpoints by default: an interruption loses at most about
#: this much work (plus the batch that was running).
CHECKPOINT_SECONDS = 60.0


def symmetric_accumulate_(acc: torch.Tensor, x: torch.Tensor, block: int = _BLOCK) -> None:
    """``acc += xᵀ x`` on the upper block triangle only (about half the FLOPs of a full GEMM).

    ``acc`` (d, d) holds valid values on and above the diagonal; :func:`symmetrize` fills the
    rest. ``x`` (n_tokens, d) must have acc's dtype.
    """
    d = x.shape[1]
    for i in range(0, d, block):
        j = min(i + block, d)
        acc[i:j, i:].addmm_(x[:, i:j].T, x[:, i:])


def symmetrize(acc: torch.Tensor) -> torch.Tensor:
    """The full symmetric (d, d) matrix from an upper-triangle-valid (d, d) accumulator."""
    return torch.triu(acc) + torch.triu(acc, 1).T


class NonFiniteStatisticsError(ValueError):
    """Second moments holding NaN or inf: every edit solved with them would be NaN."""


@dataclass
class SecondMoment:
    """Uncentered second moment of one module's input: ``sum`` (d, d) of k kᵀ over ``count``
    tokens, and the cache ``key`` that identifies what it was computed from."""

    sum: torch.Tensor
    count: int
    key: dict = field(default_factory=dict)

    @property
    def mom2(self) -> torch.Tensor:
        """E[k kᵀ] = sum / count, (d, d)."""
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        return self.sum / self.count

    def require_finite(self, module: str, *, model_dtype: torch.dtype, spec_dtype: str) -> SecondMoment:
        """``self`` when its sum is finite, else :class:`NonFiniteStatisticsError` naming
        ``module``, how many entries are NaN/inf, the likely cause and what to do."""
        bad = int((~torch.isfinite(self.sum)).sum())
        if not bad:
            return self
        raise NonFiniteStatisticsError(
            f"the covariance statistics of {module} hold {bad} non-finite value(s) (NaN or inf) after "
            f"{self.count} tokens, so every edit solved with them would be NaN; nothing was cached. "
            f"Likely cause: the model's activations overflow in its dtype {model_dtype} or its weights "
            f"are not finite (sums accumulated in {spec_dtype}). To fix: load the model in float32 "
            f"(load_model(..., dtype='float32')) or check its weights; accumulating in float64 "
            f"(spec.replace(dtype='float64')) helps only when the sums themselves overflow."
        )

    def merge(self, other: SecondMoment) -> SecondMoment:
        """Combine partial statistics of the same quantity (e.g. from two workers)."""
        if self.key and other.key and _key_without_budget(self.key) != _key_without_budget(other.key):
            raise ValueError(
                "cannot merge second moments with different keys: "
                f"{_key_without_budget(self.key)} vs {_key_without_budget(other.key)}"
            )
        return SecondMoment(self.sum + other.sum.to(self.sum.dtype), self.count + other.count, dict(self.key))

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """What a store entry holds: ``sum`` (d, d) and ``count`` (a 0-d int64 tensor, so the
        store's checksum covers it too)."""
        return {f"{prefix}sum": self.sum.detach(), f"{prefix}count": torch.tensor(self.count, dtype=torch.int64)}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], key: dict, *, prefix: str = "", where: Any = "statistics entry"
    ) -> SecondMoment:
        """Inverse of :meth:`tensors`; raises :class:`~pmetlab.store.DamagedEntryError` naming
        ``where`` when the entry does not hold a square matrix and a count."""
        t, c = tensors.get(f"{prefix}sum"), tensors.get(f"{prefix}count")
        if t is None or c is None or c.ndim != 0 or c.is_floating_point():
            raise DamagedEntryError(f"{where} does not hold a {prefix}sum and a {prefix}count")
        if t.ndim != 2 or t.shape[0] != t.shape[1]:
            raise DamagedEntryError(f"{where} holds an invalid matrix {tuple(t.shape)}")
        return cls(t, int(c), dict(key))

    @classmethod
    def from_entry(cls, entry: StoreEntry) -> SecondMoment:
        """The statistic held by a store entry written by :meth:`save` (its key is in ``meta``)."""
        key = entry.meta.get("key")
        if not isinstance(key, dict):
            raise DamagedEntryError(f"{entry.path} has no statistics key in its header")
        return cls.from_tensors(entry.tensors, key, where=entry.path)

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` in the keyed store's format (key in the file, checksum, atomic)."""
        return KeyedStore.write_tensors(path, self.key, self.tensors(), {"key": self.key})

    def save_to(self, store: KeyedStore, *, prefix: str = "") -> Path | None:
        """Store under this statistic's key in ``store``; returns the file's path (None when the
        disk refused the write: a warning names the file, the statistic stays usable in memory)."""
        return store.save_tensors(self.key, self.tensors(), {"key": self.key}, prefix=prefix)

    @classmethod
    def load(cls, path: str | Path, expect_key: dict | None = None) -> SecondMoment:
        """Load and check a file written by :meth:`save`. An unreadable or damaged file, one whose
        stored key differs from ``expect_key``, or one holding non-finite values raises
        :class:`~pmetlab.store.DamagedEntryError` (a ValueError) that names the file."""
        return cls.from_entry(KeyedStore.read_tensors(path, expect_key, finite=True))


def _key_without_budget(key: dict) -> dict:
    return {k: v for k, v in key.items() if k not in ("tokens", "shard")}


def plan_batches(chunks: list[list[int]], tokens_per_batch: int) -> list[list[list[int]]]:
    """The deterministic batch plan: chunks sorted by decreasing length, grouped so that a
    padded batch holds at most ``tokens_per_batch`` tokens (a single longer chunk stays alone)."""
    return list(_batches(chunks, tokens_per_batch))


def _batches(chunks: list[list[int]], tokens_per_batch: int) -> Iterator[list[list[int]]]:
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i]))  # similar lengths together
    batch: list[list[int]] = []
    for i in order:
        if batch and (len(batch) + 1) * len(batch[0]) > tokens_per_batch:
            yield batch
            batch = []
        batch.append(chunks[i])
    if batch:
        yield batch


def _pad(batch: list[list[int]], pad: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``, both (batch, longest chunk), on ``dev``."""
    T = max(len(c) for c in batch)
    ids = torch.full((len(batch), T), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for r, c in enumerate(batch):
        ids[r, : len(c)] = torch.tensor(c)
        mask[r, : len(c)] = 1
    return ids.to(dev), mask.to(dev)


def _accumulate_batch(
    model: torch.nn.Module,
    module_names: Sequence[str],
    ids: torch.Tensor,
    mask: torch.Tensor,
    acc: dict[str, torch.Tensor],
    counts: dict[str, int],
    dtype: torch.dtype,
) -> int:
    """One forward pass (stopped after the deepest module) adding every module's non-padding
    inputs (n_tokens, d) into ``acc[name]`` (d, d); returns the number of tokens added."""
    keep = mask.reshape(-1).bool()
    with TraceDict(model, module_names, retain_output=False, retain_input=True, stop=True) as td:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for n in module_names:
        x = td[n].input  # on this module's device (layers may be spread over devices)
        x = x.reshape(-1, x.shape[-1])[keep.to(x.device)].to(dtype)
        if n not in acc:
            acc[n] = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
        elif acc[n].device != x.device:
            acc[n] = acc[n].to(x.device)
        symmetric_accumulate_(acc[n], x)
        counts[n] += x.shape[0]
    return int(keep.sum())


class _CheckpointSchedule:
    """When to save progress: once ``seconds`` have passed since the last checkpoint (or the
    start), and every ``batches`` batches (by absolute batch index); either may be None. Writing a
    checkpoint never takes more than about a tenth of the time: when one write takes longer than
    ``seconds / 10``, the interval grows to ten times that write."""

    def __init__(self, seconds: float | None, batches: int | None, clock: Callable[[], float]) -> None:
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0):
            raise ValueError(f"checkpoint_seconds must be a number >= 0 or None, got {seconds!r}")
        if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
            raise ValueError(f"checkpoint_every must be a positive number of batches or None, got {batches!r}")
        self.seconds, self.batches, self.clock = seconds, batches, clock
        self.interval = seconds
        self.last = clock()

    def due(self, next_batch: int) -> bool:
        if self.batches is not None and next_batch % self.batches == 0:
            return True
        return self.interval is not None and self.clock() - self.last >= self.interval

    def saved(self, began: float) -> None:
        """Record a checkpoint whose write began at ``began`` (a reading of the clock)."""
        self.last = self.clock()
        if self.seconds is not None and 10 * (self.last - began) > self.interval:
            self.interval = 10 * (self.last - began)
            logger.info(
                "a covariance checkpoint took %.1fs; checkpointing every %.0fs", self.last - began, self.interval
            )


@torch.no_grad()
def collect_second_moments(
    model: torch.nn.Module,
    tok: Any,
    module_names: Sequence[str],
    chunks: list[list[int]],
    *,
    dtype: torch.dtype = torch.float32,
    tokens_per_batch: int = 4096,
    start: int = 0,
    init: Mapping[str, SecondMoment] | None = None,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    progress: bool = True,
    shard: Shard | None = None,
) -> dict[str, SecondMoment]:
    """Accumulate E[k kᵀ] of each named module's input over ``chunks`` (lists of token ids) in
    one forward per batch, stopping after the deepest module. Returns ``{name: SecondMoment}``
    with (d, d) sums on the CPU. ``start``/``init`` resume from a checkpoint;
    ``checkpoint(stats, next_batch_index)`` is called after the first batch that ends
    ``checkpoint_seconds`` (by ``clock``) after the previous checkpoint, and every
    ``checkpoint_every`` batches when that is set; so an interruption loses at most
    ``checkpoint_seconds`` of work plus the batch that was running (the interval grows when a
    checkpoint write itself takes over a tenth of it). Where checkpoints fall does not change
    the result: a resumed run is bit-identical to an uninterrupted one.

    With ``shard`` only this worker's batches are run (indices refer to them) and the result
    is a partial sum: merge the workers' results with :func:`pmetlab.distributed.all_reduce_moments`
    or :meth:`SecondMoment.merge`."""
    if not chunks:
        raise ValueError(
            "no corpus chunks to collect statistics from (every document was shorter than 8 "
            "tokens, or the corpus is empty); use a larger corpus"
        )
    dev = model_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = (shard or Shard()).take(plan_batches(chunks, tokens_per_batch))
    if not 0 <= start <= len(batches):
        raise ValueError(f"start={start} is outside the {len(batches)} batches of this run")
    schedule = _CheckpointSchedule(checkpoint_seconds, checkpoint_every, clock)
    acc: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in module_names}
    if init:
        for n in module_names:
            acc[n] = init[n].sum.to(dev, dtype).clone()
            counts[n] = init[n].count
    bar = tqdm(
        total=sum(len(c) for b in batches[start:] for c in b),
        disable=not progress,
        desc="covariance",
        unit="tok",
        unit_scale=True,
    )
    t0, done = time.perf_counter(), 0
    try:
        for bi in range(start, len(batches)):
            ids, mask = _pad(batches[bi], pad, dev)
            ntok = _accumulate_batch(model, module_names, ids, mask, acc, counts, dtype)
            done += ntok
            bar.update(ntok)
            bar.set_postfix(tok_s=f"{done / max(time.perf_counter() - t0, 1e-9):.0f}")
            if checkpoint is not None and bi + 1 < len(batches) and schedule.due(bi + 1):
                began = schedule.clock()
                checkpoint({n: SecondMoment(symmetrize(acc[n]).cpu(), counts[n]) for n in module_names}, bi + 1)
                schedule.saved(began)
    finally:
        bar.close()
    for n in module_names:  # a worker whose shard is empty contributes zeros
        if n not in acc:
            d = _input_dim(model, n)
            acc[n] = torch.zeros(d, d, dtype=dtype, device=dev)
    return {n: SecondMoment(symmetrize(acc[n]).cpu(), counts[n]) for n in module_names}


def _input_dim(model: torch.nn.Module, name: str) -> int:
    """Input width of a projection module (nn.Linear ``in_features``, GPT-2 Conv1D ``nx``)."""
    mod = get_module(model, name)
    for attr in ("in_features", "nx"):
        if isinstance(getattr(mod, attr, None), int):
            return getattr(mod, attr)
    raise TypeError(f"cannot tell the input width of {name} ({type(mod).__name__})")
