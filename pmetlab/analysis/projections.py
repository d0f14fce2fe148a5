"""Top-k tokens of hidden vectors (input embeddings or logit lens) and their Jaccard similarity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..devices import model_device, model_dtype
from ..models.adapters import get_adapter
from .labels import PROJECTIONS

__all__ = ["logit_lens_topk", "input_embedding_topk", "projection_topk", "topk_jaccard"]


def check_k(k: Any, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"top_k must be an int in 1..{vocab} (the vocabulary size), got {k!r}")
    return k


def _chunked_topk(
    x: torch.Tensor,
    k: int,
    vocab: int,
    scores: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    max_elements: int,
) -> torch.Tensor:
    """``scores`` applied to row chunks of ``x`` ``(..., d)`` (at most ``max_elements`` scores per
    chunk) and reduced to top-``k`` ids ``(..., k)`` (int64, CPU, in descending score order)."""
    flat = x.reshape(-1, x.shape[-1])
    step = max(1, max_elements // vocab)
    out = []
    for i in range(0, flat.shape[0], step):
        out.append(scores(flat[i : i + step].to(device=device, dtype=dtype)).float().topk(k, dim=-1).indices.cpu())
    return torch.cat(out).reshape(*x.shape[:-1], k)


@torch.no_grad()
def logit_lens_topk(model: torch.nn.Module, x: torch.Tensor, k: int, max_elements: int = 2**25) -> torch.Tensor:
    """Top-``k`` vocabulary ids of vectors read through the final norm and unembedding.

    Args:
        x: ``(..., d_model)`` vectors (any dtype/device).
        k: number of tokens per vector.
        max_elements: logits are computed in row chunks of at most this many entries.

    Returns:
        ``(..., k)`` int64 token ids on the CPU, in descending logit order.
    """
    adapter = get_adapter(model)
    vocab = int(adapter.unembed_weight.shape[0])
    check_k(k, vocab)
    norm = adapter.module(adapter.final_norm_name)
    return _chunked_topk(
        x,
        k,
        vocab,
        lambda v: adapter.logits_from_normed(norm(v)),
        model_device(model),
        model_dtype(model),
        max_elements,
    )


@torch.no_grad()
def input_embedding_topk(model: torch.nn.Module, x: torch.Tensor, k: int, max_elements: int = 2**25) -> torch.Tensor:
    """Top-``k`` ids of ``x @ E^T``, E = ``model.get_input_embeddings().weight`` (vocab, d_model),
    with no norm (the projection of method.md §5).

    Args:
        x: ``(..., d_model)`` vectors (any dtype/device).
        k: number of tokens per vector.
        max_elements: scores are computed in row chunks of at most this many entries.

    Returns:
        ``(..., k)`` int64 token ids on the CPU, in descending score order.
    """
    emb = get_adapter(model).input_embed_weight
    vocab = int(emb.shape[0])
    check_k(k, vocab)
    if emb.shape[1] != x.shape[-1]:
        raise ValueError(
            f"the input embeddings are {tuple(emb.shape)} (vocab, d) but the vectors have "
            f"d = {x.shape[-1]}; use projection='logit_lens' for this model"
        )
    return _chunked_topk(x, k, vocab, lambda v: v.to(emb.device) @ emb.T, emb.device, emb.dtype, max_elements)


def projection_vocab(model: torch.nn.Module, projection: str) -> int:
    adapter = get_adapter(model)
    w = adapter.input_embed_weight if projection == "input_embeddings" else adapter.unembed_weight
    return int(w.shape[0])


def projection_topk(
    model: torch.nn.Module, x: torch.Tensor, k: int, projection: str = "input_embeddings"
) -> torch.Tensor:
    """Top-``k`` token ids of ``x`` ``(..., d_model)`` -> ``(..., k)`` under ``projection``
    (:func:`input_embedding_topk` or :func:`logit_lens_topk`)."""
    if projection == "input_embeddings":
        return input_embedding_topk(model, x, k)
    if projection == "logit_lens":
        return logit_lens_topk(model, x, k)
    raise ValueError(f"projection must be one of {list(PROJECTIONS)}, got {projection!r}")


def topk_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jaccard similarity |A ∩ B| / |A ∪ B| of two id sets per row.

    Args:
        a, b: ``(..., k)`` ids; each row holds distinct ids (as top-k indices do).

    Returns:
        ``(...)`` float64 values in [0, 1].
    """
    if a.shape != b.shape:
        raise ValueError(f"id tensors must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    k = a.shape[-1]
    inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).double()
    return inter / (2 * k - inter)
