"""Seeded top-k sampling for the fluency and consistency metrics (method.md §6).

Prompts are generated in batches, LEFT-padded with a full attention mask and position ids taken
from the mask, using the model's KV cache. Every prompt has its own random stream (a CPU
``torch.Generator`` seeded per prompt), so a text does not depend on which other prompts share
its batch, on the batch size, or on the global RNG (which is left untouched). As in ROME's
``generate_fast``, sampling does not stop at EOS and the text is the prompt followed by the
continuation, decoded together without special tokens, NFKD-normalised, blank lines collapsed.
"""

from __future__ import annotations

import logging
import numbers
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import stable_hash
from ..devices import model_device
from ..forward import cache_kwarg, cache_of, forward_accepts
from ..progress import tqdm
from ..tokens import check_context_length, context_length
from .scoring import encode_prompt, pad_id_of, position_ids_from_mask

logger = logging.getLogger(__name__)

__all__ = [
    "generate_texts",
    "generate_ids",
    "derive_seed",
    "sample_top_k",
    "check_generation_length",
    "LONG_GENERATION_TOKENS",
]

#: More new tokens per prompt than this draws a cost warning (the metrics use 100, as ROME does).
LONG_GENERATION_TOKENS = 1000


def check_generation_length(model, prompt_lengths: Sequence[int] | int, n_new_tokens: int) -> None:
    """Check that ``n_new_tokens`` sampled after each prompt fit the model's context.

    Args:
        model: a model or its config (the context is :func:`pmetlab.tokens.context_length`).
        prompt_lengths: tokens of each prompt (special tokens included), or the longest one.
        n_new_tokens: tokens to generate per prompt (``n_gen_tokens`` of a run, ``--n-gen-tokens``).

    Raises:
        TypeError: ``n_new_tokens`` or a prompt length is not an int.
        ValueError: ``n_new_tokens < 1``, or the longest prompt + ``n_new_tokens`` exceeds the
            context (the message gives the largest ``n_new_tokens`` that fits).

    Logs a warning with the cost above :data:`LONG_GENERATION_TOKENS` new tokens.
    """
    lengths = [prompt_lengths] if isinstance(prompt_lengths, numbers.Integral) else list(prompt_lengths)
    for name, v in [("n_new_tokens", n_new_tokens)] + [("a prompt length", x) for x in lengths]:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}: {v!r}")
    if n_new_tokens < 1:
        raise ValueError(f"n_new_tokens must be >= 1 (tokens generated per prompt), got {n_new_tokens}")
    longest = max(lengths, default=0)
    ctx = context_length(model)
    room = f"use n_new_tokens <= {ctx - longest} (--n-gen-tokens)" if ctx and ctx > longest else "shorten the prompt"
    check_context_length(
        model,
        [longest + n_new_tokens],
        what=f"the longest prompt ({longest} tokens) + n_new_tokens={n_new_tokens}",
        fix=room,
    )
    if n_new_tokens > LONG_GENERATION_TOKENS:
        logger.warning(
            "generating %d tokens per prompt (the fluency/consistency metrics use 100): one forward pass "
            "per new token, so this takes about %.0fx as long as the default and the KV cache grows to "
            "%d positions per prompt",
            n_new_tokens,
            n_new_tokens / 100,
            longest + n_new_tokens,
        )


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any JSON-serialisable parts, e.g. ``(seed, case_id, prompt_index)``."""
    return int(stable_hash(list(parts), n=8), 16) & ((1 << 63) - 1)


def sample_top_k(logits: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
    """Draw one token per row from the softmax over the ``k`` largest logits.

    Args:
        logits: (B, vocab).
        u: (B,) uniforms in [0, 1) (float64), one per row: inverse-CDF sampling keeps each row's
            draw a function of its own stream only.

    Returns:
        (B,) token ids on ``logits.device``.
    """
    vals, idx = logits.float().topk(k, dim=-1)
    cdf = torch.softmax(vals.double().cpu(), dim=-1).cumsum(-1)
    choice = (cdf < u[:, None]).sum(-1).clamp(max=k - 1)
    return idx.gather(1, choice[:, None].to(idx.device))[:, 0]


def _clean(text: str) -> str:
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def generate_texts(
    model,
    tok,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    n_new_tokens: int = 100,
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Sample ``n_new_tokens`` tokens after each prompt (top-k, temperature 1) and decode.

    Args:
        seeds: one seed per prompt (see :func:`derive_seed`).
        batch_size: prompts per batch; the texts do not depend on it.

    Returns:
        One text per prompt, in input order: prompt + continuation, decoded together.
    """
    enc = [encode_prompt(tok, p) for p in prompts]
    new = generate_ids(
        model,
        tok,
        prompts,
        seeds=seeds,
        n_new_tokens=n_new_tokens,
        top_k=top_k,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    return [_clean(tok.decode(e + n, skip_special_tokens=True)) for e, n in zip(enc, new)]


def generate_ids(
    model,
    tok,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    n_new_tokens: int = 100,
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "generating",
) -> list[list[int]]:
    """The sampled token ids: one list of ``n_new_tokens`` ids per prompt (see :func:`generate_texts`).

    The progress bar counts generated tokens over all prompts (its rate is tokens/s), so a long
    generation visibly moves; the postfix names the batch.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
    for name, v in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {type(v).__name__}: {v!r}")
    enc = [encode_prompt(tok, p) for p in prompts]
    check_generation_length(model, [len(e) for e in enc], n_new_tokens)
    if getattr(model, "training", False):
        logger.warning("generating with a model in training mode (dropout is active); call model.eval() first")
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    out_ids: list[list[int] | None] = [None] * len(enc)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(total=len(enc) * n_new_tokens, desc=desc, disable=not progress, leave=False, unit="tok")
    sampler = _Sampler(model, top_k, forward_accepts(model, "logits_to_keep"), cache_kwarg(model), bar)
    with torch.no_grad(), bar:
        for b, batch in enumerate(batches):
            bar.set_postfix(batch=f"{b + 1}/{len(batches)}")
            ids, mask = _left_padded([enc[i] for i in batch], pad_id_of(tok), model_device(model))
            u = torch.stack(
                [
                    torch.rand(
                        n_new_tokens, generator=torch.Generator().manual_seed(int(seeds[i])), dtype=torch.float64
                    )
                    for i in batch
                ]
            )
            for i, new in zip(batch, sampler.run(ids, mask, u)):
                out_ids[i] = new
    return out_ids  # type: ignore[return-value]


def _left_padded(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask (B, T) of ``seqs`` padded on the left."""
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, T - len(x) :] = torch.tensor(x)
        mask[r, T - len(x) :] = 1
    return ids.to(device), mask.to(device)


@dataclass
class _Sampler:
    """Top-k sampling of one left-padded batch with the KV cache; advances ``bar`` per new token."""

    model: Any
    top_k: int
    keep_last: bool
    cache_kw: str
    bar: Any

    def run(self, ids: torch.Tensor, mask: torch.Tensor, u: torch.Tensor) -> list[list[int]]:
        """(B, n_new) sampled ids after ``ids``/``mask`` (B, T), one uniform per row and step in ``u``."""
        n_new = u.shape[1]
        pos = position_ids_from_mask(mask)
        kw = {"logits_to_keep": 1} if self.keep_last else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        new = []
        last_pos = pos[:, -1]
        for t in range(n_new):
            nxt = sample_top_k(out.logits[:, -1, :], u[:, t], self.top_k)
            new.append(nxt)
            self.bar.update(len(nxt))
            if t == n_new - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last_pos = last_pos + 1
            out = self.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=last_pos[:, None],
                use_cache=True,
                **{self.cache_kw: cache_of(out)},
            )
        return torch.stack(new, dim=1).cpu().tolist()
