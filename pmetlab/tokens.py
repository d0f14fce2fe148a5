"""Tokenisation helpers shared by the solver and the evaluation.

Targets are tokenised without special tokens and with the leading space the prompt expects;
the subject's last token is found from the tokenizer's character offsets (method.md §8).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["target_ids", "subject_last_index", "encode_batch", "Batch"]


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
    """A right-padded batch: ``input_ids``/``attention_mask`` (B, T) and each row's length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths.to(device))


def encode_batch(tok, texts: Sequence[str], device: torch.device | str = "cpu") -> Batch:
    """Right-padded encoding of ``texts`` (positions of real tokens are those of unpadded text)."""
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        enc = tok(list(texts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    am = enc["attention_mask"]
    return Batch(enc["input_ids"].to(device), am.to(device), am.sum(1).to(device))
