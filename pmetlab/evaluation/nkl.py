"""Neighbourhood KL (issue #23; CounterFact+ and NKL, Hoelscher-Obermaier et al., Findings ACL 2023):
KL(P_unedited ‖ P_edited) between the next-token distributions over the whole vocabulary, at each
position that predicts a token of the original answer after a neighbourhood prompt.

For prompt p and answer o with tokens o_1..o_m (the ids of :func:`pmetlab.tokens.encode_prompt_targets`,
as the teacher-forced scores use), position j reads p + o_<j and

    KL_j = Σ_v P(v | p, o_<j) · (log P(v | p, o_<j) − log P'(v | p, o_<j)),

P the unedited and P' the edited model; a prompt's value is the mean over j, a record's the mean
over its neighbourhood prompts. Zero exactly when the weights do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..devices import model_device
from ..progress import tqdm
from ..tokens import check_prompt_target_lengths, encode_prompt_targets
from .scoring import _adapter_or_none, _logits_at, _pad, pad_id_of, position_ids_from_mask

logger = logging.getLogger(__name__)

__all__ = ["target_log_probs", "kl_per_pair", "neighborhood_kl"]


def target_log_probs(
    model, tok, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 32
) -> list[torch.Tensor]:
    """Per (prompt, answer) pair, the (n_answer_tokens, vocab) float32 log-probabilities (CPU) at the
    positions that predict the answer's tokens (teacher-forced, right-padded batches)."""
    if len(prompts) != len(answers):
        raise ValueError(f"prompts and answers must have the same length, got {len(prompts)} and {len(answers)}")
    enc = encode_prompt_targets(tok, list(prompts), list(answers))
    check_prompt_target_lengths(model, enc, list(prompts), list(answers))
    device, adapter, pad = model_device(model), _adapter_or_none(model), pad_id_of(tok)
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for a in range(0, len(enc), batch_size):
            part = enc[a : a + batch_size]
            ids, mask, offsets = _pad([p + c for p, c in part], pad, "right", device)
            rows, cols, spans = [], [], []
            for r, (p, c) in enumerate(part):
                spans.append((len(rows), len(rows) + len(c)))
                rows += [r] * len(c)
                cols += [offsets[r] + len(p) - 1 + j for j in range(len(c))]
            rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
            logits = _logits_at(model, adapter, ids, mask, position_ids_from_mask(mask), rows_t, cols_t)
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            out += [logp[s:e] for s, e in spans]
    return out


def kl_per_pair(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> list[float]:
    """Mean over answer positions of KL(before ‖ after), nats, one value per pair (see the module
    docstring); inputs are log-probabilities (n_tokens, vocab)."""
    vals = []
    for b, a in zip(before, after, strict=True):
        kl = (b.exp() * (b - a)).sum(-1).clamp(min=0.0)  # clamp: float round-off below 0
        vals.append(float(kl.double().mean()))
    return vals


def neighborhood_kl(
    model,
    tok,
    prompts: Sequence[str],
    answers: Sequence[str],
    edit: Callable[[], Callable[[], None]] | None,
    *,
    batch_size: int = 32,
    chunk: int = 128,
    progress: bool = False,
) -> list[float]:
    """KL(unedited ‖ edited) per (prompt, answer) pair (see the module docstring).

    Args:
        edit: called to put the edit on ``model``; returns the function that takes it off again
            (None: the model is compared with itself, so every value is 0). Pairs go ``chunk`` at a
            time: the unedited log-probabilities of a chunk are kept (chunk × tokens × vocab floats),
            the edit is put on, the edited ones computed, the edit taken off.
    """
    vals: list[float] = []
    starts = range(0, len(prompts), chunk)
    for a in tqdm(starts, desc="neighbourhood KL", disable=not progress, leave=False, unit="chunk"):
        p, o = prompts[a : a + chunk], answers[a : a + chunk]
        before = target_log_probs(model, tok, p, o, batch_size=batch_size)
        undo = edit() if edit is not None else None
        try:
            after = target_log_probs(model, tok, p, o, batch_size=batch_size)
        finally:
            if undo is not None:
                undo()
        vals += kl_per_pair(before, after)
    return vals
