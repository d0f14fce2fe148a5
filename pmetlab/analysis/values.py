"""Per-prompt similarities between each component's input and output (method.md §5)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from ..devices import model_device
from ..models.adapters import get_adapter
from ..tokens import encode_batch
from .checks import batches, check_positive_int, check_prompts, check_protocol, progress_bar
from .labels import COMPONENTS, METRICS
from .projections import check_k, projection_topk, projection_vocab, topk_jaccard
from .states import COLLECTORS, ComponentStates

logger = logging.getLogger(__name__)

__all__ = ["component_similarity_values"]


def _distinct_topk(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], top_k: int, projection: str
) -> dict[str, torch.Tensor]:
    """Top-k ids per named tensor, projecting each distinct tensor once (e.g. ``ffn_in`` is
    ``mhsa_out`` in the residual protocol's sequential blocks, ``mhsa_in`` for GPT-J)."""
    done: dict[str, torch.Tensor] = {}
    for name, x in tensors.items():
        same = next((n for n in done if tensors[n] is x or torch.equal(tensors[n], x)), None)
        done[name] = done[same] if same is not None else projection_topk(model, x, top_k, projection)
    return done


def _similarities(
    model: torch.nn.Module, states: ComponentStates, top_k: int, projection: str
) -> dict[tuple[str, str], torch.Tensor]:
    """``{(component, metric): (n_prompts, n_layers) float64}``."""
    topk = _distinct_topk(
        model,
        {"mhsa_in": states.mhsa_in, "mhsa_out": states.mhsa_out, "ffn_in": states.ffn_in, "ffn_out": states.ffn_out},
        top_k,
        projection,
    )
    res = {}
    for comp, (x_in, x_out) in states.pairs().items():
        key_in, key_out = ("mhsa_in", "mhsa_out") if comp == "MHSA" else ("ffn_in", "ffn_out")
        cos = F.cosine_similarity(x_in.double(), x_out.double(), dim=-1).clamp(-1.0, 1.0)
        res[(comp, "cosine")] = cos
        res[(comp, "jaccard")] = topk_jaccard(topk[key_in], topk[key_out])
    return res


def _values_frame(sims: dict[tuple[str, str], torch.Tensor], start: int) -> list[pd.DataFrame]:
    frames = []
    for (comp, metric), vals in sims.items():
        n, n_layers = vals.shape
        frames.append(
            pd.DataFrame(
                {
                    "prompt_id": torch.arange(start, start + n).repeat_interleave(n_layers).numpy(),
                    "layer": torch.arange(n_layers).repeat(n).numpy(),
                    "component": comp,
                    "metric": metric,
                    "value": vals.reshape(-1).numpy(),
                }
            )
        )
    return frames


def component_similarity_values(
    model: torch.nn.Module,
    tok,
    prompts: Sequence[str],
    *,
    protocol: str = "paper",
    projection: str | None = None,
    top_k: int = 50,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-prompt similarities between each component's input and output (method.md §5).

    Prompts are right-padded in batches (one forward per batch, all layers traced at once) and
    read at each row's last real token. See :mod:`pmetlab.analysis` for the definitions.

    Args:
        model: a causal LM with a pmetlab adapter (eval mode; it is not modified).
        tok: its tokenizer (needs a pad token).
        prompts: prompt strings, e.g. ``record["prompt"]`` of the known-facts records.
        protocol: "paper" (normed module input vs module output) or "residual" (residual
            stream before vs after the component).
        projection: "input_embeddings" or "logit_lens" for the Jaccard; None: the protocol's
            default (:data:`DEFAULT_PROJECTION`).
        top_k: tokens per vector for the Jaccard similarity (the paper uses 50).
        batch_size: prompts per forward pass.
        progress: show a progress bar.

    Returns:
        Tidy DataFrame, one row per (prompt, layer, component, metric), columns ``protocol``,
        ``projection``, ``prompt_id`` (index into ``prompts``), ``layer`` (0-based),
        ``component`` ("MHSA" or "FFN"), ``metric`` ("cosine" or "jaccard"), ``value`` (float).
    """
    protocol, projection = check_protocol(protocol, projection)
    prompts = check_prompts(prompts)
    batch_size = check_positive_int("batch_size", batch_size)
    check_k(top_k, projection_vocab(model, projection))
    if model.training:
        logger.warning(
            "the model is in training mode (dropout active); call model.eval() for reproducible similarities"
        )
    adapter, device, collect = get_adapter(model), model_device(model), COLLECTORS[protocol]
    frames: list[pd.DataFrame] = []
    t0 = time.perf_counter()
    with progress_bar(len(prompts), progress, f"MHSA/FFN similarity ({protocol})") as bar:
        for start, chunk in batches(prompts, batch_size):
            states = collect(model, adapter, encode_batch(tok, chunk, device))
            frames += _values_frame(_similarities(model, states, top_k, projection), start)
            bar.update(len(chunk))
            bar.set_postfix(prompts_per_s=f"{(start + len(chunk)) / (time.perf_counter() - t0):.1f}")
    df = pd.concat(frames, ignore_index=True)
    df["component"] = pd.Categorical(df["component"], categories=list(COMPONENTS))
    df["metric"] = pd.Categorical(df["metric"], categories=list(METRICS))
    df.insert(0, "projection", projection)
    df.insert(0, "protocol", protocol)
    return df.sort_values(["metric", "component", "layer", "prompt_id"], ignore_index=True)
