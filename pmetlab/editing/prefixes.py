"""Context prefixes: short texts the unedited model writes, prepended to the rewrite prompt.

Generated once per (model, seed, settings) with a seeded sampler and cached on disk, so every
run with the same settings sees the same prefixes (the released code samples them unseeded).
"""

from __future__ import annotations

import logging

import torch

from ..cache import weights_fingerprint
from ..devices import model_device
from ..store import KeyedStore
from ..tokens import encode_batch, tokenizer_identity

logger = logging.getLogger(__name__)

__all__ = ["context_templates", "generate_prefixes"]

#: Version of the cached prefixes: 2 = KeyedStore JSON (key and checksum in the file).
FORMAT = 2


@torch.no_grad()
def generate_prefixes(model, tok, starts: tuple[str, ...], n: int, length: int, seed: int, top_k: int = 5) -> list[str]:
    """``n`` texts of ``length`` tokens (start word included), top-k sampled with ``seed``.

    Sampling runs in one left-padded batch with the full attention mask (method.md §8) and a
    CPU generator, so the result does not depend on the device's RNG.
    """
    if n == 0:
        return []
    dev = model_device(model)
    g = torch.Generator(device="cpu").manual_seed(seed)
    texts = [starts[i % len(starts)] for i in range(n)]
    enc = encode_batch(tok, texts, dev, side="left")  # works without a pad token (GPT-2's tokenizer)
    ids, mask = enc.input_ids, enc.attention_mask
    n_start = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    new_tokens = max(1, length - min(n_start))
    out = []
    for _ in range(new_tokens):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        top = torch.topk(logits.float().cpu(), top_k, dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=g)
        nxt = top.indices.gather(1, choice).to(dev)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    for r in range(n):
        row = ids[r][mask[r].bool()]
        text = tok.decode(row, skip_special_tokens=True)
        out.append(text.replace("{", " ").replace("}", " ").strip())
    return out


def context_templates(model, tok, hp, *, use_cache: bool = True) -> list[str]:
    """``["{}"] + [prefix + ". {}" for each prefix]`` for the hyperparameters ``hp``.

    Cached in the "prefixes" :class:`~pmetlab.store.KeyedStore`, keyed by the model's weights, the
    tokenizer (vocabulary and normalisation, :func:`~pmetlab.tokens.tokenizer_identity`) and the
    settings; a missing or damaged entry is regenerated.
    """
    settings = {
        "starts": list(hp.prefix_starts),
        "n": hp.n_prefixes,
        "length": hp.prefix_tokens,
        "seed": hp.seed,
        "format": FORMAT,
    }
    key = {
        "model": type(model).__name__,
        "weights": weights_fingerprint(model),
        "vocab": len(tok),
        "tokenizer": tokenizer_identity(tok),
        **settings,
    }
    store = KeyedStore("prefixes")
    stored = store.load_json(key) if use_cache else None
    prefixes = stored.get("prefixes") if isinstance(stored, dict) else None
    if not isinstance(prefixes, list):
        prefixes = generate_prefixes(model, tok, tuple(hp.prefix_starts), hp.n_prefixes, hp.prefix_tokens, hp.seed)
        if use_cache:
            store.save_json(key, {"prefixes": prefixes})
    return ["{}"] + [p + ". {}" for p in prefixes]
