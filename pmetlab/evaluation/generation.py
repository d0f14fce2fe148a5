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
import time
import unicodedata
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..cache import stable_hash
from ..devices import model_device
from ..forward import cache_kwarg, cache_of, forward_accepts
from .scoring import encode_prompt, pad_id_of, position_ids_from_mask

logger = logging.getLogger(__name__)

__all__ = ["generate_texts", "generate_ids", "derive_seed", "sample_top_k"]


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
    """The sampled token ids: one list of ``n_new_tokens`` ids per prompt (see :func:`generate_texts`)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
    if n_new_tokens < 1 or top_k < 1 or batch_size < 1:
        raise ValueError(f"n_new_tokens, top_k and batch_size must be >= 1, got {n_new_tokens}, {top_k}, {batch_size}")
    if getattr(model, "training", False):
        logger.warning("generating with a model in training mode (dropout is active); call model.eval() first")
    device = model_device(model)
    pad_id = pad_id_of(tok)
    enc = [encode_prompt(tok, p) for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    keep_last = forward_accepts(model, "logits_to_keep")
    cache_kw = cache_kwarg(model)
    out_ids: list[list[int] | None] = [None] * len(enc)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch")
    t0, n_gen = time.perf_counter(), 0
    with torch.no_grad():
        for batch in bar:
            T = max(len(enc[i]) for i in batch)
            ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, T - len(enc[i]) :] = torch.tensor(enc[i])
                mask[r, T - len(enc[i]) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            pos = position_ids_from_mask(mask)
            u = torch.stack(
                [
                    torch.rand(
                        n_new_tokens, generator=torch.Generator().manual_seed(int(seeds[i])), dtype=torch.float64
                    )
                    for i in batch
                ]
            )
            kw = {"logits_to_keep": 1} if keep_last else {}
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
            new = []
            last_pos = pos[:, -1]
            for t in range(n_new_tokens):
                nxt = sample_top_k(out.logits[:, -1, :], u[:, t], top_k)
                new.append(nxt)
                if t == n_new_tokens - 1:
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
            gen = torch.stack(new, dim=1).cpu().tolist()
            for r, i in enumerate(batch):
                out_ids[i] = gen[r]
            n_gen += len(batch) * n_new_tokens
            bar.set_postfix(new_tok_per_s=f"{n_gen / max(time.perf_counter() - t0, 1e-9):.1f}")
    return out_ids  # type: ignore[return-value]
