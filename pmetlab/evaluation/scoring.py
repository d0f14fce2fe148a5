"""Batched teacher-forced scoring of (prompt, candidate) pairs (method.md §6).

For a prompt and a candidate ``o`` the score is the mean per-token NLL of the candidate's tokens
after the prompt's. Both come from :func:`pmetlab.tokens.encode_prompt_targets`, the function the
solver's rows are built with: the prompt's ids (with BOS where the tokenizer adds one) followed by
the candidate's are the ids of the joined text ``prompt + " " + o`` (no lone "▁" from legacy
SentencePiece tokenizers), so every method in pmetlab scores exactly the tokens it writes.

Many pairs (prompts of many records, both candidates) go through one forward pass; rows are
padded on either side with position ids taken from the attention mask, so padding changes no
number beyond float round-off. Logits are computed only at the positions that predict candidate
tokens when the model has a pmetlab adapter (final-normed hidden state -> LM head); otherwise the
model's ordinary forward is used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..devices import model_device
from ..progress import tqdm
from ..tokens import check_prompt_target_lengths, encode_prompt_targets
from ..types import Model, Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["PairScores", "score_pairs", "score_pairs_reference", "encode_prompt", "pad_id_of", "position_ids_from_mask"]


@dataclass
class PairScores:
    """Teacher-forced scores of ``n_pairs`` (prompt, candidate) pairs, in input order.

    Attributes:
        nll: (n_pairs,) mean per-token negative log-likelihood (nats) of the candidate.
        n_tokens: (n_pairs,) number of candidate tokens.
        token_nll: per pair, (n_tokens,) NLL of each candidate token.
        token_pred: per pair, (n_tokens,) the model's top-1 token id at each candidate position.
        token_correct: per pair, (n_tokens,) whether the top-1 token is the candidate's token.
    """

    nll: np.ndarray
    n_tokens: np.ndarray
    token_nll: list[np.ndarray]
    token_pred: list[np.ndarray]
    token_correct: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.nll)

    @property
    def prob(self) -> np.ndarray:
        """(n_pairs,) exp(-mean NLL): the geometric mean of the per-token probabilities."""
        return np.exp(-self.nll)

    @property
    def token_accuracy(self) -> np.ndarray:
        """(n_pairs,) fraction of candidate tokens that are the model's top-1 (teacher-forced)."""
        return np.array([c.mean() for c in self.token_correct], dtype=np.float64)

    def take(self, idx: Sequence[int]) -> PairScores:
        idx = list(idx)
        return PairScores(
            self.nll[idx],
            self.n_tokens[idx],
            [self.token_nll[i] for i in idx],
            [self.token_pred[i] for i in idx],
            [self.token_correct[i] for i in idx],
        )


def pad_id_of(tok) -> int:
    """A token id to fill padded positions with (masked out, so its value does not matter)."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return 0


def encode_prompt(tok, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as the model reads it (special tokens such as BOS included)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    ids = list(tok(prompt)["input_ids"])
    if not ids:
        raise ValueError(
            f"prompt {prompt!r} tokenizes to nothing; a candidate needs at least one token before it to be scored"
        )
    return ids


def _check_pairs(prompts: Sequence[str], candidates: Sequence[str]) -> None:
    if len(prompts) != len(candidates):
        raise ValueError(f"prompts and candidates must have the same length, got {len(prompts)} and {len(candidates)}")


def _adapter_or_none(model):
    from ..models.adapters import UnsupportedArchitectureError, get_adapter

    try:
        return get_adapter(model)
    except UnsupportedArchitectureError:
        return None


def _logits_at(
    model,
    adapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Logits ``(n_positions, vocab)`` at ``(rows, cols)`` of a padded batch ``(B, T)``."""
    base = getattr(model, "base_model", None)
    if adapter is not None and base is not None and base is not model:
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return adapter.logits_from_normed(h[rows.to(h.device), cols.to(h.device)])
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[rows.to(logits.device), cols.to(logits.device)]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pad ``seqs`` to ``(B, T)``; returns ids, attention mask and each row's offset of its first token."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    offsets = []
    for r, s in enumerate(seqs):
        off = 0 if side == "right" else T - len(s)
        ids[r, off : off + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, off : off + len(s)] = 1
        offsets.append(off)
    return ids.to(device), mask.to(device), offsets


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting real tokens only, so a left-padded row starts at position 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def score_pairs(
    model: Model,
    tok: Tokenizer,
    prompts: Sequence[str],
    candidates: Sequence[str],
    *,
    batch_size: int = 32,
    padding_side: Literal["right", "left"] = "right",
    progress: bool = False,
    desc: str = "scoring",
) -> PairScores:
    """Teacher-forced NLL and top-1 correctness of `` candidates[i]`` after ``prompts[i]``.

    Identical pairs are scored once. Pairs are sorted by length and ``batch_size`` of them go
    through each forward pass, padded on ``padding_side``.

    Returns:
        :class:`PairScores` with ``n_pairs = len(prompts)`` entries in input order.
    """
    _check_pairs(prompts, candidates)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if getattr(model, "training", False):
        logger.warning("scoring a model in training mode (dropout is active); call model.eval() first")
    n = len(prompts)
    if n == 0:
        return PairScores(np.zeros(0), np.zeros(0, dtype=np.int64), [], [], [])
    uniq: dict[tuple[str, str], int] = {}
    where = [uniq.setdefault((p, c), len(uniq)) for p, c in zip(prompts, candidates)]
    enc = encode_prompt_targets(tok, [p for p, _ in uniq], [c for _, c in uniq])
    check_prompt_target_lengths(model, enc, [p for p, _ in uniq], [c for _, c in uniq])
    order = sorted(range(len(enc)), key=lambda i: -(len(enc[i][0]) + len(enc[i][1])))
    device = model_device(model)
    adapter = _adapter_or_none(model)
    pad_id = pad_id_of(tok)
    res_nll: list[np.ndarray | None] = [None] * len(enc)
    res_pred: list[np.ndarray | None] = [None] * len(enc)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch")
    t0, n_tok = time.perf_counter(), 0
    with torch.no_grad():
        for batch in bar:
            seqs = [enc[i][0] + enc[i][1] for i in batch]
            ids, mask, offsets = _pad(seqs, pad_id, padding_side, device)
            rows, cols, tgts, spans = [], [], [], []
            for r, i in enumerate(batch):
                lp, lc = len(enc[i][0]), len(enc[i][1])
                start = len(rows)
                # the token at sequence position lp + j is predicted from position lp + j - 1
                rows += [r] * lc
                cols += [offsets[r] + lp - 1 + j for j in range(lc)]
                tgts += enc[i][1]
                spans.append((start, start + lc))
            rows_t = torch.tensor(rows, device=device)
            cols_t = torch.tensor(cols, device=device)
            logits = _logits_at(model, adapter, ids, mask, position_ids_from_mask(mask), rows_t, cols_t).float()
            tgt_t = torch.tensor(tgts, device=logits.device)
            tok_nll = -torch.log_softmax(logits, dim=-1).gather(1, tgt_t[:, None])[:, 0]
            pred = logits.argmax(-1)
            tok_nll_np = tok_nll.double().cpu().numpy()
            pred_np = pred.cpu().numpy().astype(np.int64)
            for (a, b), i in zip(spans, batch):
                res_nll[i] = tok_nll_np[a:b]
                res_pred[i] = pred_np[a:b]
            n_tok += int(mask.sum())
            bar.set_postfix(tok_per_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.0f}")
    return _collect(where, res_nll, res_pred, [e[1] for e in enc])


def _collect(where: Sequence[int], res_nll, res_pred, cand_ids) -> PairScores:
    token_nll = [res_nll[u] for u in where]
    token_pred = [res_pred[u] for u in where]
    token_correct = [res_pred[u] == np.asarray(cand_ids[u], dtype=np.int64) for u in where]
    nll = np.array([t.mean() for t in token_nll], dtype=np.float64)
    n_tokens = np.array([len(t) for t in token_nll], dtype=np.int64)
    return PairScores(nll, n_tokens, token_nll, token_pred, token_correct)  # type: ignore[arg-type]


def score_pairs_reference(
    model: Model,
    tok: Tokenizer,
    prompts: Sequence[str],
    candidates: Sequence[str],
    *,
    progress: bool = False,
    desc: str = "scoring (reference)",
) -> PairScores:
    """The same as :func:`score_pairs`, one pair per unpadded forward pass over the full logits.

    Slow and simple on purpose: the yardstick the batched path is tested and benchmarked against.
    """
    _check_pairs(prompts, candidates)
    device = model_device(model)
    res_nll, res_pred, cands = [], [], []
    enc = encode_prompt_targets(tok, prompts, candidates)
    check_prompt_target_lengths(model, enc, prompts, candidates)
    with torch.no_grad():
        for p_ids, c_ids in tqdm(enc, desc=desc, disable=not progress, leave=False):
            ids = torch.tensor([p_ids + c_ids], device=device)
            out = model(input_ids=ids)
            logits = (out.logits if hasattr(out, "logits") else out[0])[0].float()
            lp = len(p_ids)
            pred_logits = logits[lp - 1 : lp - 1 + len(c_ids)]
            logp = torch.log_softmax(pred_logits, dim=-1)
            tgt = torch.tensor(c_ids, device=logits.device)
            res_nll.append((-logp.gather(1, tgt[:, None])[:, 0]).double().cpu().numpy())
            res_pred.append(pred_logits.argmax(-1).cpu().numpy().astype(np.int64))
            cands.append(c_ids)
    return _collect(range(len(res_nll)), res_nll, res_pred, cands)
