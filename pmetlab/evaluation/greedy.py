"""Greedy decoding and answer matching for generation accuracy (issue #23, "The Mirage of Model
Editing", ACL 2025): what the model actually says after a prompt, not which of two given strings
it prefers.

Prompts are decoded in batches, LEFT-padded with a full attention mask and position ids taken from
the mask (so a row's continuation does not depend on its batch), with the KV cache. A row stops at
EOS or after ``max_new_tokens`` tokens (the batch stops when every row has hit EOS); the decoded
text is then cut at its first newline (a token holding text and a newline keeps the text).

Matching (:func:`answer_match`) compares normalised strings (:func:`normalize_answer`: NFKC, lower
case, punctuation to spaces, whitespace collapsed): ``begins`` when the continuation starts with the
target at a word boundary ("paris is" begins with "paris"; "parisian" does not), ``contains`` when
the target occurs anywhere in it at word boundaries.
"""

from __future__ import annotations

import logging
import numbers
import re
import unicodedata
from collections.abc import Sequence

import torch

from ..devices import model_device
from ..forward import cache_kwarg, cache_of, forward_accepts
from ..progress import tqdm
from ..tokens import check_context_length
from .generation import _left_padded
from .scoring import encode_prompt, pad_id_of, position_ids_from_mask

logger = logging.getLogger(__name__)

__all__ = ["greedy_continuations", "normalize_answer", "answer_match"]

_PUNCT = re.compile(r"[^\w\s]", flags=re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """NFKC, lower case, punctuation replaced by spaces, whitespace collapsed and stripped."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def answer_match(continuation: str, target: str) -> tuple[bool, bool]:
    """``(begins, contains)``: whether the normalised ``continuation`` starts with / contains the
    normalised ``target`` at word boundaries. An empty target matches nothing."""
    c, t = normalize_answer(continuation), normalize_answer(target)
    if not t:
        return False, False
    begins = c == t or c.startswith(t + " ")
    return begins, f" {t} " in f" {c} "


def _check(max_new_tokens: int, batch_size: int, prompts: Sequence[str]) -> None:
    for name, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {type(v).__name__}: {v!r}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(
            f"greedy decoding needs non-empty prompts; prompt(s) at {bad[:10]} are empty or not strings "
            f"(first: {prompts[bad[0]]!r})"
        )


def greedy_continuations(
    model,
    tok,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "greedy decoding",
) -> list[str]:
    """The greedy continuation of each prompt, decoded without special tokens, cut at EOS and at the
    first newline (see the module docstring).

    Args:
        prompts: (n,) non-empty prompts; identical prompts are decoded once.
        max_new_tokens: the token cap per prompt (>= 1).
        batch_size: prompts per batch; the texts do not depend on it.

    Returns:
        (n,) continuations (without the prompt), in input order.
    """
    _check(max_new_tokens, batch_size, prompts)
    uniq = list(dict.fromkeys(prompts))
    enc = [encode_prompt(tok, p) for p in uniq]
    check_context_length(
        model,
        [len(e) + max_new_tokens for e in enc],
        what=f"a prompt + max_new_tokens={max_new_tokens}",
        fix="use a smaller max_new_tokens or shorter prompts",
    )
    eos = getattr(tok, "eos_token_id", None)
    stop_ids = {int(eos)} if eos is not None else set()
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: dict[int, list[int]] = {}
    keep_last = forward_accepts(model, "logits_to_keep")
    cache_kw = cache_kwarg(model)
    with torch.no_grad(), tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch") as bar:
        for batch in bar:
            ids, mask = _left_padded([enc[i] for i in batch], pad_id_of(tok), model_device(model))
            rows = _decode_batch(model, ids, mask, max_new_tokens, keep_last, cache_kw, stop_ids)
            for i, row in zip(batch, rows):
                out[i] = _cut(row, stop_ids)
    texts = {p: tok.decode(out[i], skip_special_tokens=True) for i, p in enumerate(uniq)}
    return [texts[p].split("\n")[0] for p in prompts]


def _cut(row: list[int], stop_ids: set[int]) -> list[int]:
    """``row`` up to (without) its first stop id (EOS)."""
    for j, t in enumerate(row):
        if t in stop_ids:
            return row[:j]
    return row


def _decode_batch(model, ids, mask, n_new: int, keep_last: bool, cache_kw: str, stop_ids: set[int]) -> list[list[int]]:
    """(B, <= n_new) greedy ids after the left-padded ``ids``/``mask`` (B, T). A row that emitted a
    stop id keeps decoding until every row has (or the cap is reached); :func:`_cut` trims it."""
    pos = position_ids_from_mask(mask)
    kw = {"logits_to_keep": 1} if keep_last else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=ids.device)
    new, last_pos = [], pos[:, -1]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for t in range(n_new):
        nxt = out.logits[:, -1, :].argmax(-1)
        new.append(nxt)
        done |= torch.isin(nxt, stops)
        if t == n_new - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=last_pos[:, None],
            use_cache=True,
            **{cache_kw: cache_of(out)},
        )
    return torch.stack(new, dim=1).cpu().tolist()
