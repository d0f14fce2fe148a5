"""How many requests' targets are optimised together (issue #22: batching across requests).

Requests do not interact in the target optimisation, so a chunk is only bounded by memory: the
activations kept for the backward pass grow with the positions recomputed per step. On a CPU small
chunks cost nothing (the machine is compute-bound at a few hundred positions, and the measured
setting :data:`CPU_BUDGET` is kept bit for bit). On an accelerator a 135M model is latency-bound:
each step's kernels are too small to fill the device, so the chunk grows with the free memory and one
forward/backward serves many requests at once (:func:`chunk_budget`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import free_memory, model_device
from ..models.adapters import get_adapter

__all__ = ["ChunkBudget", "CPU_BUDGET", "chunk_budget", "bytes_per_position", "CHUNK_SIZE", "CHUNK_TOKENS"]

# Measured on SmolLM2-135M on a CPU: about 1 MB of activations per recomputed position (kept for the
# backward pass, logits where the loss reads them included); a chunk of CHUNK_SIZE requests and at most
# CHUNK_TOKENS positions keeps a 100-edit run under 2 GB, and larger chunks are only slightly faster.
CHUNK_SIZE = 8
CHUNK_TOKENS = 256
#: That measurement per unit of d_model × n_layers at 4 bytes a value (1 MB / (576 · 30)).
_BYTES_PER_UNIT = 1e6 / (576 * 30)
#: The share of an accelerator's free memory a chunk may plan to use, and the largest chunk.
MEMORY_SHARE = 0.5
MAX_REQUESTS = 1024
_POSITIONS_PER_REQUEST = 32


@dataclass(frozen=True)
class ChunkBudget:
    """At most ``requests`` requests and ``positions`` recomputed positions per step in one chunk."""

    requests: int
    positions: int

    def __post_init__(self) -> None:
        if self.requests < 1 or self.positions < 1:
            raise ValueError(f"a chunk needs >= 1 request and position, got {self.requests}, {self.positions}")


CPU_BUDGET = ChunkBudget(CHUNK_SIZE, CHUNK_TOKENS)


def bytes_per_position(model: torch.nn.Module) -> float:
    """Estimated activation bytes per recomputed position: the CPU measurement scaled by d_model ×
    n_layers and the bytes of the model's dtype."""
    emb = model.get_input_embeddings().weight
    return _BYTES_PER_UNIT * emb.shape[1] * get_adapter(model).n_layers * emb.element_size() / 4


def chunk_budget(
    model: torch.nn.Module, chunk_size: int | None = None, *, free_bytes: int | None = None
) -> ChunkBudget:
    """The chunking of ``model``'s target optimisation: ``chunk_size`` requests when given (with the
    CPU's position bound); else :data:`CPU_BUDGET` on a CPU, and on an accelerator as many positions as
    :data:`MEMORY_SHARE` of its free memory holds (``free_bytes`` overrides the query, for tests), with
    one request per 32 of them (a CounterFact request recomputes about 35 positions a step; at most
    :data:`MAX_REQUESTS`)."""
    if chunk_size is not None:
        return ChunkBudget(int(chunk_size), CHUNK_TOKENS)
    device = model_device(model)
    free = free_bytes if free_bytes is not None else free_memory(device)
    if free is None:
        return CPU_BUDGET
    positions = max(CHUNK_TOKENS, int(MEMORY_SHARE * free / bytes_per_position(model)))
    return ChunkBudget(min(MAX_REQUESTS, max(CHUNK_SIZE, positions // _POSITIONS_PER_REQUEST)), positions)
