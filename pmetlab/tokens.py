"""Tokenisation helpers shared by the solver and the evaluation.

Targets are tokenised without special tokens and with the leading space the prompt expects;
the subject's last token is found from the tokenizer's character offsets (method.md §8).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .cache import stable_hash

__all__ = ["target_ids", "subject_last_index", "encode_batch", "pad_token_id", "tokenizer_identity", "Batch"]


def target_ids(tok, target: str) -> list[int]:
    """Token ids of `` target`` (leading space, no BOS/EOS)."""
    t = target if target.startswith(" ") else " " + target
    ids = tok(t, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return list(ids)


def _char_span(template: str, subject: str) -> tuple[int, int]:
    i = template.index("{}")
    return i, i + len(subject)


def subject_last_index(tok, template: str, subject: str) -> int:
    """Index (in the token ids of ``template.format(subject)``, special tokens included) of the
    token holding the subject's last character."""
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
    text = template.format(subject)
    start, end = _char_span(template, subject)
    enc = tok(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    last = None
    for j, (a, b) in enumerate(offsets):
        if b > a and a < end and b > start:
            last = j
    if last is None:
        raise ValueError(f"subject {subject!r} not found among the tokens of {text!r}")
    return last


@dataclass
class Batch:
    """A padded batch: ``input_ids``/``attention_mask`` (B, T) and each row's number of real tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths.to(device))


def pad_token_id(tok) -> int:
    """The id used to fill padded positions: the pad token, else EOS, else 0. Padded positions
    are masked out, so any id works; the tokenizer need not define a pad token (GPT-2's does not)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return 0


def encode_batch(tok, texts: Sequence[str], device: torch.device | str = "cpu", *, side: str = "right") -> Batch:
    """Padded encoding of ``texts`` (special tokens as the tokenizer adds them), padded on
    ``side``; with right padding the positions of real tokens are those of the unpadded text.

    The tokenizer's ``padding_side`` is restored afterwards. A tokenizer without a pad token
    (GPT-2's, GPT-J's, LLaMA's) is padded by hand with EOS (or 0): padded positions are masked.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode")
    if getattr(tok, "pad_token_id", None) is not None:
        old = tok.padding_side
        tok.padding_side = side
        try:
            enc = tok(texts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old
        ids, am = enc["input_ids"], enc["attention_mask"]
    else:
        seqs = [list(x) for x in tok(texts)["input_ids"]]
        T = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), T), pad_token_id(tok), dtype=torch.long)
        am = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, x in enumerate(seqs):
            if x:
                sl = slice(0, len(x)) if side == "right" else slice(T - len(x), T)
                ids[r, sl] = torch.tensor(x, dtype=torch.long)
                am[r, sl] = 1
    return Batch(ids.to(device), am.to(device), am.sum(1).to(device))


def tokenizer_identity(tok) -> dict:
    """What identifies a tokenizer for cache keys: class, size, a digest of its vocabulary and of
    the ids of a probe text (catches normalisation and special-token differences)."""
    try:
        vocab = sorted(tok.get_vocab().items())
    except (AttributeError, NotImplementedError):
        vocab = None
    probe = tok(_PROBE)["input_ids"]
    return {"class": type(tok).__name__, "size": len(tok), "vocab": stable_hash(vocab) if vocab else None,
            "probe": stable_hash(list(probe))}


_PROBE = "The Quick brown fox, 1984: naïve café -- Mr. O'Neil's ‘test’ \t  end."
