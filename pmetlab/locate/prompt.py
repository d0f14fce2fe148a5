"""The fact being traced: prompt ids, the subject's token span and the token whose probability
is measured (ROME §2.1)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..devices import model_device
from ..tokens import encode_prompt_target

logger = logging.getLogger(__name__)

__all__ = ["TracedPrompt", "prepare_prompt", "subject_token_range"]


@dataclass(frozen=True)
class TracedPrompt:
    """A prompt ready for tracing.

    Attributes:
        ids: the prompt's token ids, (n_tokens,) (special tokens the tokenizer prepends kept,
            any it appends such as EOS dropped, so the next token is read after the prompt).
        tokens: each id decoded.
        subject_range: ``(start, stop)``, the subject's tokens are ``ids[start:stop]``.
        target_id: the token o whose probability is measured.
    """

    ids: torch.Tensor
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]
    target_id: int

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])


def subject_token_range(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """``(first, stop)`` of the tokens whose character span overlaps ``[start, end)``."""
    hit = [j for j, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hit:
        raise ValueError(f"no token covers the characters {start}..{end} of the prompt")
    return hit[0], hit[-1] + 1


def _own_ids(tok, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The prompt's ids and offsets with appended special tokens (EOS) removed."""
    enc = tok(prompt, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    special = set(getattr(tok, "all_special_ids", []) or [])
    while len(ids) > 1 and ids[-1] in special and offsets[-1][1] <= offsets[-1][0]:
        ids.pop()
        offsets.pop()
    return ids, offsets


def prepare_prompt(model: torch.nn.Module, tok, prompt: str, subject: str, target: str | None) -> TracedPrompt:
    """Tokenise ``prompt`` and locate ``subject`` (its first occurrence) in it.

    ``target`` None: o is the model's top-1 next token, filled in by the caller (``target_id``
    -1 here). Otherwise o is the first token of ``target`` after the prompt, as
    :func:`pmetlab.tokens.encode_prompt_target` splits ``prompt + " " + target``.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"subject must be a non-empty string, got {subject!r}")
    start = prompt.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}; pass the filled-in prompt")
    ids, offsets = _own_ids(tok, prompt)
    target_id = -1
    if target is not None:
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"target must be None or a non-empty string, got {target!r}")
        p_ids, t_ids = encode_prompt_target(tok, prompt, target)
        ids, offsets, target_id = p_ids, offsets[: len(p_ids)], int(t_ids[0])
    first, stop = subject_token_range(offsets, start, start + len(subject))
    return TracedPrompt(
        ids=torch.tensor(ids, dtype=torch.long, device=model_device(model)),
        tokens=tuple(tok.decode([i]) for i in ids),
        subject_range=(first, stop),
        target_id=target_id,
    )
