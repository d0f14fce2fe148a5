"""Which facts a model knows: ROME traces facts the model predicts (its known_1000 set was built for
GPT-2 XL); on another model, keep the records whose attribute's first token is the model's top-1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..evaluation.scoring import score_pairs

__all__ = ["known_facts_of"]


def known_facts_of(
    model: torch.nn.Module, tok, records: Sequence[Mapping], *, batch_size: int = 32, progress: bool = True
) -> list[dict]:
    """The records (``prompt``, ``attribute``) whose attribute's first token is the model's greedy
    next token after the prompt (teacher-forced, :func:`pmetlab.evaluation.score_pairs`)."""
    records = list(records)
    if not records:
        raise ValueError("records is empty; pass known-facts records, e.g. pmetlab.load_known_facts()")
    scores = score_pairs(
        model,
        tok,
        [r["prompt"] for r in records],
        [str(r["attribute"]) for r in records],
        batch_size=batch_size,
        progress=progress,
        desc="which facts the model knows",
    )
    return [dict(r) for r, ok in zip(records, scores.token_correct) if len(ok) and bool(ok[0])]
