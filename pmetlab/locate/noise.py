"""The corruption of ROME §2.1: Gaussian noise ε ~ N(0, ν²) added to the subject tokens'
input embeddings, with ν three times the standard deviation of input embeddings."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ..devices import model_device

logger = logging.getLogger(__name__)

__all__ = ["embedding_noise_scale", "draw_noise", "check_noise"]


def _default_texts() -> list[str]:
    from ..datasets import load_known_facts

    return [r["subject"] for r in load_known_facts()]


@torch.no_grad()
def embedding_noise_scale(
    model: torch.nn.Module, tok, texts: Sequence[str] | None = None, factor: float = 3.0
) -> float:
    """ν = ``factor`` × the standard deviation of the input embeddings of a text sample.

    The sample is the tokens of ``texts`` (encoded without special tokens); by default the
    subjects of the 1,209 known facts (``pmetlab.load_known_facts()``), the sample ROME uses.
    The std is taken over every coordinate of every token's embedding (the output of
    ``model.get_input_embeddings()``, where :func:`trace_fact` adds the noise), in float64.
    """
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 0):
        raise ValueError(f"factor must be a finite number >= 0, got {factor!r}")
    texts = _default_texts() if texts is None else list(texts)
    ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]]
    if len(ids) < 2:
        raise ValueError(f"the text sample has {len(ids)} token(s); pass texts with at least two tokens")
    emb = model.get_input_embeddings()
    x = emb(torch.tensor(ids, dtype=torch.long, device=model_device(model)))
    return float(factor * x.double().std())


def check_noise(noise: float) -> float:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0 (the std ν of the corruption), got {noise!r}")
    return float(noise)


def draw_noise(n_samples: int, n_tokens: int, d_model: int, noise: float, seed: int) -> torch.Tensor:
    """The n_samples corruptions, (n_samples, n_tokens, d_model), float32 on the CPU.

    Drawn once from a generator seeded with ``seed``, so every restoration (and every device)
    sees the same draws.
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n_samples, n_tokens, d_model, generator=g) * check_noise(noise)
