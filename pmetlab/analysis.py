"""The MHSA-vs-FFN hidden-state study (method.md §5), under two clearly named protocols.

``protocol="paper"`` (the default) is the paper's quantity. For every layer l and each component
C ∈ {MHSA, FFN}, at the last token of each prompt, it compares what the component *reads* with
what it *computes*:

=============  ======================================  =============================================
block          MHSA: input -> output                   FFN: input -> output
=============  ======================================  =============================================
GPT-J, Phi     ln_1(h^{l-1}) -> a^l                    ln_1(h^{l-1}) (the same vector) -> m^l
GPT-NeoX       input_layernorm(h^{l-1}) -> a^l         post_attention_layernorm(h^{l-1}) -> m^l
LLaMA-like     input_layernorm(h^{l-1}) -> a^l         post_attention_layernorm(h^{l-1} + a^l) -> m^l
GPT-2          ln_1(h^{l-1}) -> a^l                    ln_2(h^{l-1} + a^l) -> m^l
OPT            self_attn_layer_norm(h^{l-1}) -> a^l    final_layer_norm(h^{l-1} + a^l) -> fc2 output
Gemma 2/3      input_layernorm(h^{l-1}) -> a^l         pre_feedforward_layernorm(h^{l-1}
                                                       + post_attention_layernorm(a^l)) -> m^l
=============  ======================================  =============================================

(LLaMA-like: LLaMA, Mistral, Qwen 2/3, Gemma 1.) Nothing is guessed from names: the input is
the first input of the module the adapter names in ``ArchSpec.attn_input`` /
``ArchSpec.ffn_input`` (default: the attention module ``attn`` and the FFN module ``mlp``; OPT,
whose FFN is inline in the decoder layer, reads the input of ``fc1``), and the output is the
output of ``attn`` / ``mlp`` (OPT: ``fc2``). For Gemma 2/3,
a^l and m^l are the modules' own outputs, *before* ``post_attention_layernorm`` /
``post_feedforward_layernorm``: the paper compares what a module reads with what it computes,
and the post-norm is a separate step on the way into the residual stream (it rescales the
output and reweights its dimensions, which would change both the cosine and the top-k).
The Jaccard projects both vectors onto the **input embedding matrix**
(``model.get_input_embeddings().weight``, no final norm), as the authors' notebook does.

``protocol="residual"`` asks a different question: how much each component changes the
**residual stream**, read through the logit lens:

=============  =========================  ==========================================
block          MHSA in -> out             FFN in -> out
=============  =========================  ==========================================
sequential     h^{l-1} -> h^{l-1} + a^l   h^{l-1} + a^l -> h^l = h^{l-1} + a^l + m^l
parallel       h^{l-1} -> h^{l-1} + a^l   h^{l-1} -> h^{l-1} + m^l
=============  =========================  ==========================================

Here a^l and m^l are the contributions that actually join the residual stream (for Gemma 2/3
the outputs of the post-norms), and the Jaccard reads vectors through the model's final norm
and unembedding (``adapter.logits_from_normed(final_norm(x))``). cos(h, h + a) mostly measures
‖a‖/‖h‖, so this is not the paper's quantity; it is kept, unchanged, under its own name.

Both protocols take the cosine similarity of the raw vectors (in float64) and the Jaccard
|A ∩ B| / |A ∪ B| of the top-k token sets; the projection can be chosen explicitly
(``projection="input_embeddings"`` or ``"logit_lens"``). Every DataFrame carries ``protocol``
and ``projection`` columns, so a saved CSV says what it measured. :func:`similarity_reading`
turns a summary into a short text saying whether the paper's reading ("MHSA states keep
changing across layers, FFN states settle after some depth") holds on the model.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from .devices import model_device, model_dtype
from .models.adapters import ModelAdapter, get_adapter
from .tokens import Batch, encode_batch
from .tracing import TraceDict, hidden_of

logger = logging.getLogger(__name__)

__all__ = ["COMPONENTS", "METRICS", "PROTOCOLS", "PROJECTIONS", "DEFAULT_PROJECTION", "ComponentStates",
           "component_states", "component_io_states", "component_similarity", "component_similarity_values",
           "summarize_similarity", "similarity_by_depth", "similarity_reading", "depth_thirds", "DEPTHS",
           "logit_lens_topk",
           "input_embedding_topk", "projection_topk", "topk_jaccard", "mean_ci"]

#: Component labels used in every DataFrame this module returns, in plotting order.
COMPONENTS: tuple[str, ...] = ("MHSA", "FFN")
#: Metric labels used in every DataFrame this module returns.
METRICS: tuple[str, ...] = ("cosine", "jaccard")
#: "paper": normed module input vs module output (method.md §5); "residual": residual stream
#: before vs after the component's contribution.
PROTOCOLS: tuple[str, ...] = ("paper", "residual")
#: How a vector becomes top-k tokens for the Jaccard similarity.
PROJECTIONS: tuple[str, ...] = ("input_embeddings", "logit_lens")
#: The projection each protocol uses unless one is passed explicitly.
DEFAULT_PROJECTION: dict[str, str] = {"paper": "input_embeddings", "residual": "logit_lens"}


@dataclass
class ComponentStates:
    """Input and output vectors of each component at each prompt's last token.

    Every tensor is float32 with shape ``(n_prompts, n_layers, d_model)`` and lives on the CPU.
    What the four tensors hold depends on ``protocol`` (see the module docstring):

    Attributes:
        mhsa_in: paper: what attention reads (its normed input); residual: h^{l-1}.
        mhsa_out: paper: a^l, the attention module's output; residual: h^{l-1} + a^l.
        ffn_in: paper: what the FFN reads (its normed input); residual: h^{l-1} + a^l
            (sequential blocks) or h^{l-1} (parallel blocks).
        ffn_out: paper: m^l, the FFN module's output; residual: ffn_in + m^l.
        parallel: whether the model's blocks are parallel (from the adapter).
        protocol: "paper" or "residual".
    """

    mhsa_in: torch.Tensor
    mhsa_out: torch.Tensor
    ffn_in: torch.Tensor
    ffn_out: torch.Tensor
    parallel: bool
    protocol: str = "residual"

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{component: (input, output)}`` in :data:`COMPONENTS` order."""
        return {"MHSA": (self.mhsa_in, self.mhsa_out), "FFN": (self.ffn_in, self.ffn_out)}

    @property
    def n_prompts(self) -> int:
        return int(self.mhsa_in.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.mhsa_in.shape[1])


# --- checks ------------------------------------------------------------------------------------

def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, got a single string; wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt string (e.g. record['prompt'] "
                         "of each known-facts record)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{i}] must be a non-empty string, got {p!r}")
    return prompts


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_protocol(protocol: Any, projection: Any) -> tuple[str, str]:
    """Validated ``(protocol, projection)``; ``projection=None`` picks the protocol's default."""
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}: 'paper' compares "
                         f"each component's normed input with its output (method.md §5), 'residual' the "
                         f"residual stream before and after the component")
    if projection is None:
        return protocol, DEFAULT_PROJECTION[protocol]
    if not isinstance(projection, str) or projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {list(PROJECTIONS)} or None (the protocol's default, "
                         f"{DEFAULT_PROJECTION}), got {projection!r}")
    return protocol, projection


def _batches(prompts: list[str], batch_size: int) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(prompts), batch_size):
        yield start, prompts[start:start + batch_size]


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="prompt")


# --- collecting states ----------------------------------------------------------------------------

def _at_last_token(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Rows of a traced ``(B, T, d)`` (or OPT's flattened ``(B·T, d)``) tensor at each prompt's
    last real token, as a float32 CPU copy ``(B, d)``."""
    if x.dim() == 2 and x.shape[0] == batch.input_ids.numel():  # OPT flattens (B·T, d) around its FFN
        x = x.view(*batch.input_ids.shape, x.shape[-1])
    rows = torch.arange(batch.input_ids.shape[0], device=x.device)
    return x[rows, batch.lengths.to(x.device) - 1].detach().float().cpu()


def _contribution_names(adapter: ModelAdapter, layer: int) -> tuple[str, str]:
    """Modules whose output is what MHSA / FFN add to the residual stream at ``layer``."""
    attn = adapter.attn_post_norm_name(layer) or adapter.attn_name(layer)
    ffn = adapter.ffn_post_norm_name(layer) or adapter.mlp_name(layer)
    return attn, ffn


def _output_picker(batch: Batch, picked: dict[str, torch.Tensor]) -> Callable[[Any, str], Any]:
    def pick(output: Any, name: str) -> Any:
        # Keep only the last-token rows (a copy), so memory does not grow with sequence length
        # and later in-place operations in the model cannot change what we read.
        picked[name] = _at_last_token(hidden_of(output), batch)
        return output
    return pick


@torch.no_grad()
def _batch_states(model: torch.nn.Module, adapter: ModelAdapter, batch: Batch) -> ComponentStates:
    """Residual protocol: one forward over a right-padded batch; states at each row's last token."""
    n_layers = adapter.n_layers
    layer_names = [adapter.layer_name(l) for l in range(n_layers)]
    contrib = [_contribution_names(adapter, l) for l in range(n_layers)]
    picked: dict[str, torch.Tensor] = {}
    comp_names = [n for pair in contrib for n in pair]
    # stop=True ends the forward after the last layer: the final norm and the LM head over every
    # position are not needed (the projection runs on the last tokens only).
    with TraceDict(model, layer_names, retain_input=True, retain_output=False, stop=True) as td_layers, \
            TraceDict(model, comp_names, retain_output=False, edit_output=_output_picker(batch, picked)):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    h_in = []
    for name in layer_names:
        x = td_layers[name].input
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(f"could not read the input of {name} (got {type(x).__name__})")
        h_in.append(_at_last_token(x, batch))
    missing = [n for n in comp_names if n not in picked]
    if missing:
        raise RuntimeError(f"the forward pass did not run module(s) {missing[:3]}; cannot read a^l / m^l")
    h = torch.stack(h_in, 1)                                         # (B, L, d)
    a = torch.stack([picked[n] for n, _ in contrib], 1)              # (B, L, d)
    m = torch.stack([picked[n] for _, n in contrib], 1)              # (B, L, d)
    parallel = adapter.parallel
    mhsa_out = h + a
    ffn_in = h if parallel else mhsa_out
    ffn_out = ffn_in + m
    _check_residual(h, a, m, model_dtype(model))
    return ComponentStates(h, mhsa_out, ffn_in, ffn_out, parallel, "residual")


def _check_residual(h: torch.Tensor, a: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> None:
    """Warn when h^{l-1} + a^l + m^l does not reproduce the next layer's input: then the traced
    modules are not what joins the residual stream and the analysis would be wrong."""
    if h.shape[1] < 2:
        return
    recon = (h + a + m)[:, :-1]
    err = ((recon - h[:, 1:]).norm(dim=-1) / h[:, 1:].norm(dim=-1).clamp_min(1e-12)).max().item()
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    if err > tol:
        logger.warning("h^{l-1} + a^l + m^l differs from the next layer's input by %.3g (relative); "
                       "the adapter's component modules may not be what joins the residual stream", err)


def _traced_input(trace: Any, name: str, batch: Batch, d_model: int) -> torch.Tensor:
    """The retained first input of module ``name`` at the last tokens, ``(B, d_model)``."""
    x = trace.input
    if not isinstance(x, torch.Tensor) or x.shape[-1] != d_model:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise RuntimeError(f"the first input of {name} is not a (..., {d_model}) hidden state (got {got}); "
                           f"fix the adapter's attn_input / ffn_input field for this model")
    return _at_last_token(x, batch)


@torch.no_grad()
def _batch_io_states(model: torch.nn.Module, adapter: ModelAdapter, batch: Batch) -> ComponentStates:
    """Paper protocol: one forward over a right-padded batch; each component's first input
    (``adapter.attn_input_name`` / ``ffn_input_name``) and output (``attn_name`` / ``mlp_name``)
    at each row's last real token."""
    n_layers = adapter.n_layers
    ins = [(adapter.attn_input_name(l), adapter.ffn_input_name(l)) for l in range(n_layers)]
    outs = [(adapter.attn_name(l), adapter.mlp_name(l)) for l in range(n_layers)]
    picked: dict[str, torch.Tensor] = {}
    # Inputs are hooked first, so on a module traced for both its input hook runs before the
    # stopper (stop=True: the final norm and LM head over every position are not needed).
    with TraceDict(model, [n for p in ins for n in p], retain_input=True, retain_output=False,
                   clone=True, detach=True) as td_in, \
            TraceDict(model, [n for p in outs for n in p], retain_output=False,
                      edit_output=_output_picker(batch, picked), stop=True):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    missing = [n for p in outs for n in p if n not in picked]
    if missing:
        raise RuntimeError(f"the forward pass did not run module(s) {missing[:3]}; cannot read a^l / m^l")
    x_in = {n: _traced_input(td_in[n], n, batch, adapter.d_model) for n in td_in}
    return ComponentStates(mhsa_in=torch.stack([x_in[a] for a, _ in ins], 1),       # (B, L, d)
                           mhsa_out=torch.stack([picked[a] for a, _ in outs], 1),
                           ffn_in=torch.stack([x_in[f] for _, f in ins], 1),
                           ffn_out=torch.stack([picked[f] for _, f in outs], 1),
                           parallel=adapter.parallel, protocol="paper")


_COLLECTORS: dict[str, Callable[[torch.nn.Module, ModelAdapter, Batch], ComponentStates]] = {
    "paper": _batch_io_states, "residual": _batch_states}


def _collect_states(model: torch.nn.Module, tok, prompts: Sequence[str], protocol: str, batch_size: int,
                    progress: bool) -> ComponentStates:
    prompts = _check_prompts(prompts)
    batch_size = _check_positive_int("batch_size", batch_size)
    collect = _COLLECTORS[protocol]
    adapter = get_adapter(model)
    device = model_device(model)
    parts: list[ComponentStates] = []
    with _progress_bar(len(prompts), progress, f"component states ({protocol})") as bar:
        for _, chunk in _batches(prompts, batch_size):
            parts.append(collect(model, adapter, encode_batch(tok, chunk, device)))
            bar.update(len(chunk))
    return ComponentStates(*(torch.cat([getattr(p, f) for p in parts]) for f in
                             ("mhsa_in", "mhsa_out", "ffn_in", "ffn_out")), parallel=parts[0].parallel,
                           protocol=protocol)


def component_states(model: torch.nn.Module, tok, prompts: Sequence[str], *, batch_size: int = 16,
                     progress: bool = False) -> ComponentStates:
    """Residual-protocol states around MHSA and FFN at each prompt's last token, all layers.

    h^{l-1} -> h^{l-1} + a^l and the FFN's analogue (module docstring); the paper protocol's
    states come from :func:`component_io_states`. Holds ``4 · n_prompts · n_layers · d_model``
    floats; for large prompt sets use :func:`component_similarity_values`.

    Returns:
        :class:`ComponentStates` (``protocol="residual"``), tensors ``(n_prompts, n_layers, d_model)``.
    """
    return _collect_states(model, tok, prompts, "residual", batch_size, progress)


def component_io_states(model: torch.nn.Module, tok, prompts: Sequence[str], *, batch_size: int = 16,
                        progress: bool = False) -> ComponentStates:
    """Paper-protocol states (method.md §5): what each component reads and what it computes.

    ``mhsa_in``/``ffn_in`` are the first inputs of the adapter's ``attn_input_name`` /
    ``ffn_input_name`` modules (the normed inputs), ``mhsa_out``/``ffn_out`` the outputs of the
    attention and FFN modules (a^l, m^l; Gemma 2/3: before their post-norms), at each prompt's
    last token.

    Returns:
        :class:`ComponentStates` (``protocol="paper"``), tensors ``(n_prompts, n_layers, d_model)``.
    """
    return _collect_states(model, tok, prompts, "paper", batch_size, progress)


# --- projections and metrics ---------------------------------------------------------------------------

def _check_k(k: Any, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"top_k must be an int in 1..{vocab} (the vocabulary size), got {k!r}")
    return k


def _chunked_topk(x: torch.Tensor, k: int, vocab: int, scores: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device, dtype: torch.dtype, max_elements: int) -> torch.Tensor:
    """``scores`` applied to row chunks of ``x`` ``(..., d)`` (at most ``max_elements`` scores per
    chunk) and reduced to top-``k`` ids ``(..., k)`` (int64, CPU, in descending score order)."""
    flat = x.reshape(-1, x.shape[-1])
    step = max(1, max_elements // vocab)
    out = []
    for i in range(0, flat.shape[0], step):
        out.append(scores(flat[i:i + step].to(device=device, dtype=dtype)).float().topk(k, dim=-1).indices.cpu())
    return torch.cat(out).reshape(*x.shape[:-1], k)


@torch.no_grad()
def logit_lens_topk(model: torch.nn.Module, x: torch.Tensor, k: int,
                    max_elements: int = 2 ** 25) -> torch.Tensor:
    """Top-``k`` vocabulary ids of vectors read through the final norm and unembedding.

    Args:
        x: ``(..., d_model)`` vectors (any dtype/device).
        k: number of tokens per vector.
        max_elements: logits are computed in row chunks of at most this many entries.

    Returns:
        ``(..., k)`` int64 token ids on the CPU, in descending logit order.
    """
    adapter = get_adapter(model)
    vocab = int(adapter.unembed_weight.shape[0])
    _check_k(k, vocab)
    norm = adapter.module(adapter.final_norm_name)
    return _chunked_topk(x, k, vocab, lambda v: adapter.logits_from_normed(norm(v)), model_device(model),
                         model_dtype(model), max_elements)


@torch.no_grad()
def input_embedding_topk(model: torch.nn.Module, x: torch.Tensor, k: int,
                         max_elements: int = 2 ** 25) -> torch.Tensor:
    """Top-``k`` ids of ``x @ E^T``, E = ``model.get_input_embeddings().weight`` (vocab, d_model),
    with no norm (the projection of method.md §5).

    Args:
        x: ``(..., d_model)`` vectors (any dtype/device).
        k: number of tokens per vector.
        max_elements: scores are computed in row chunks of at most this many entries.

    Returns:
        ``(..., k)`` int64 token ids on the CPU, in descending score order.
    """
    emb = get_adapter(model).input_embed_weight
    vocab = int(emb.shape[0])
    _check_k(k, vocab)
    if emb.shape[1] != x.shape[-1]:
        raise ValueError(f"the input embeddings are {tuple(emb.shape)} (vocab, d) but the vectors have "
                         f"d = {x.shape[-1]}; use projection='logit_lens' for this model")
    return _chunked_topk(x, k, vocab, lambda v: v.to(emb.device) @ emb.T, emb.device, emb.dtype, max_elements)


def _projection_vocab(model: torch.nn.Module, projection: str) -> int:
    adapter = get_adapter(model)
    w = adapter.input_embed_weight if projection == "input_embeddings" else adapter.unembed_weight
    return int(w.shape[0])


def projection_topk(model: torch.nn.Module, x: torch.Tensor, k: int,
                    projection: str = "input_embeddings") -> torch.Tensor:
    """Top-``k`` token ids of ``x`` ``(..., d_model)`` -> ``(..., k)`` under ``projection``
    (:func:`input_embedding_topk` or :func:`logit_lens_topk`)."""
    if projection == "input_embeddings":
        return input_embedding_topk(model, x, k)
    if projection == "logit_lens":
        return logit_lens_topk(model, x, k)
    raise ValueError(f"projection must be one of {list(PROJECTIONS)}, got {projection!r}")


def topk_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jaccard similarity |A ∩ B| / |A ∪ B| of two id sets per row.

    Args:
        a, b: ``(..., k)`` ids; each row holds distinct ids (as top-k indices do).

    Returns:
        ``(...)`` float64 values in [0, 1].
    """
    if a.shape != b.shape:
        raise ValueError(f"id tensors must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    k = a.shape[-1]
    inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).double()
    return inter / (2 * k - inter)


def _distinct_topk(model: torch.nn.Module, tensors: dict[str, torch.Tensor], top_k: int,
                   projection: str) -> dict[str, torch.Tensor]:
    """Top-k ids per named tensor, projecting each distinct tensor once (e.g. ``ffn_in`` is
    ``mhsa_out`` in the residual protocol's sequential blocks, ``mhsa_in`` for GPT-J)."""
    done: dict[str, torch.Tensor] = {}
    for name, x in tensors.items():
        same = next((n for n in done if tensors[n] is x or torch.equal(tensors[n], x)), None)
        done[name] = done[same] if same is not None else projection_topk(model, x, top_k, projection)
    return done


def _similarities(model: torch.nn.Module, states: ComponentStates, top_k: int,
                  projection: str) -> dict[tuple[str, str], torch.Tensor]:
    """``{(component, metric): (n_prompts, n_layers) float64}``."""
    topk = _distinct_topk(model, {"mhsa_in": states.mhsa_in, "mhsa_out": states.mhsa_out,
                                  "ffn_in": states.ffn_in, "ffn_out": states.ffn_out}, top_k, projection)
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
        frames.append(pd.DataFrame({
            "prompt_id": torch.arange(start, start + n).repeat_interleave(n_layers).numpy(),
            "layer": torch.arange(n_layers).repeat(n).numpy(),
            "component": comp, "metric": metric, "value": vals.reshape(-1).numpy()}))
    return frames


def component_similarity_values(model: torch.nn.Module, tok, prompts: Sequence[str], *,
                                protocol: str = "paper", projection: str | None = None, top_k: int = 50,
                                batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Per-prompt similarities between each component's input and output (method.md §5).

    Prompts are right-padded in batches (one forward per batch, all layers traced at once) and
    read at each row's last real token. See the module docstring for the definitions.

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
    protocol, projection = _check_protocol(protocol, projection)
    prompts = _check_prompts(prompts)
    batch_size = _check_positive_int("batch_size", batch_size)
    _check_k(top_k, _projection_vocab(model, projection))
    if model.training:
        logger.warning("the model is in training mode (dropout active); call model.eval() for "
                       "reproducible similarities")
    adapter, device, collect = get_adapter(model), model_device(model), _COLLECTORS[protocol]
    frames: list[pd.DataFrame] = []
    t0 = time.perf_counter()
    with _progress_bar(len(prompts), progress, f"MHSA/FFN similarity ({protocol})") as bar:
        for start, chunk in _batches(prompts, batch_size):
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


# --- summaries -------------------------------------------------------------------------------------

def _t_quantile(p: float, dof: int) -> float:
    """Quantile of Student's t (exact for 1 and 2 degrees of freedom, else the Cornish-Fisher
    expansion of Abramowitz & Stegun 26.7.5, accurate to ~1e-3 for dof >= 3)."""
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3 + g4 / dof ** 4


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and a two-sided Student-t confidence interval of the mean: ``(mean, low, high)``.

    With fewer than two values the interval is undefined and returned as NaN.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = math.fsum(x) / n
    if n < 2:
        return mean, math.nan, math.nan
    sem = statistics.stdev(x) / math.sqrt(n)
    half = _t_quantile(0.5 + confidence / 2, n - 1) * sem
    return mean, mean - half, mean + half


def _label_keys(df: pd.DataFrame) -> list[str]:
    """The ``protocol``/``projection`` columns present in ``df`` (older frames lack them)."""
    return [c for c in ("protocol", "projection") if c in df.columns]


def summarize_similarity(values: pd.DataFrame, *, confidence: float = 0.95) -> pd.DataFrame:
    """Mean over prompts with a Student-t confidence interval, per layer, component and metric.

    Args:
        values: the output of :func:`component_similarity_values` (columns ``layer``,
            ``component``, ``metric``, ``value``; ``protocol``/``projection`` are kept).

    Returns:
        Tidy DataFrame with columns ``protocol``, ``projection`` (when ``values`` has them),
        ``layer``, ``component``, ``metric``, ``mean``, ``ci_low``, ``ci_high``, ``n`` (prompts).
    """
    missing = {"layer", "component", "metric", "value"} - set(values.columns)
    if missing:
        raise KeyError(f"values lacks column(s) {sorted(missing)}; expected the output of "
                       f"component_similarity_values (got columns {list(values.columns)})")
    labels = _label_keys(values)
    keys = labels + ["layer", "component", "metric"]
    rows = []
    for key, grp in values.groupby(keys, observed=True, sort=True):
        mean, lo, hi = mean_ci(grp["value"].to_numpy(), confidence)
        row = dict(zip(keys, key))
        rows.append({**row, "layer": int(row["layer"]), "mean": mean, "ci_low": lo, "ci_high": hi, "n": len(grp)})
    out = pd.DataFrame(rows, columns=keys + ["mean", "ci_low", "ci_high", "n"])
    comps = [c for c in COMPONENTS if c in set(out["component"])] + \
        sorted(set(out["component"]) - set(COMPONENTS))
    out["component"] = pd.Categorical(out["component"].astype(str), categories=comps)
    out["metric"] = out["metric"].astype(str)
    return out.sort_values(labels + ["metric", "component", "layer"], ignore_index=True)


def component_similarity(model: torch.nn.Module, tok, prompts: Sequence[str], *, protocol: str = "paper",
                         projection: str | None = None, top_k: int = 50, batch_size: int = 16,
                         confidence: float = 0.95, progress: bool = True) -> pd.DataFrame:
    """The MHSA-vs-FFN study (method.md §5): similarity of each component's input and output
    per layer, averaged over prompts.

    Equivalent to ``summarize_similarity(component_similarity_values(...))``; use those two for
    the per-prompt values. ``protocol``/``projection`` as in :func:`component_similarity_values`
    (default: the paper's protocol, Jaccard over the input embeddings).

    Returns:
        Tidy DataFrame with columns ``protocol``, ``projection``, ``layer`` (0-based),
        ``component`` ("MHSA", "FFN"), ``metric`` ("cosine", "jaccard"), ``mean``, ``ci_low``,
        ``ci_high`` (Student-t interval at ``confidence``), ``n`` (prompts); ``2 · 2 · n_layers`` rows.
    """
    values = component_similarity_values(model, tok, prompts, protocol=protocol, projection=projection,
                                         top_k=top_k, batch_size=batch_size, progress=progress)
    return summarize_similarity(values, confidence=confidence)


# --- depth and the reading --------------------------------------------------------------------------

#: Labels of the three equal-width layer bins used by :func:`similarity_by_depth` and the reading.
DEPTHS: tuple[str, ...] = ("early", "middle", "late")


def depth_thirds(layers: pd.Series) -> pd.Series:
    """"early" / "middle" / "late" per row: three equal-width bins of the layer index
    (``pd.cut(layers, 3)``; 30 layers: 0–9, 10–19, 20–29; 18 layers: 0–5, 6–11, 12–17)."""
    return pd.cut(layers, 3, labels=list(DEPTHS)).astype(str)


def _check_summary(summary: pd.DataFrame, what: str, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in summary.columns]
    if missing:
        raise KeyError(f"{what}: summary lacks column(s) {missing}; expected the output of "
                       f"component_similarity / summarize_similarity (got {list(summary.columns)})")
    if summary["layer"].nunique() < 3:
        raise ValueError(f"{what}: needs at least 3 layers to split into thirds, got "
                         f"{summary['layer'].nunique()}")


def similarity_by_depth(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean of the per-layer means over the early, middle and late thirds of the layers.

    Args:
        summary: one or more outputs of :func:`component_similarity` (concatenated; the
            ``protocol``/``projection`` columns keep them apart).

    Returns:
        Tidy DataFrame with columns ``protocol``, ``projection`` (when present), ``metric``,
        ``component``, ``early``, ``middle``, ``late``.
    """
    _check_summary(summary, "similarity_by_depth", ["layer", "component", "metric", "mean"])
    keys = _label_keys(summary) + ["metric", "component"]
    s = summary.assign(depth=depth_thirds(summary["layer"]), component=summary["component"].astype(str))
    wide = s.pivot_table(index=keys, columns="depth", values="mean", observed=True).reset_index()
    wide.columns.name = None
    wide["component"] = pd.Categorical(wide["component"], categories=list(COMPONENTS))
    return wide[keys + [d for d in DEPTHS if d in wide.columns]].sort_values(keys, ignore_index=True)


@dataclass(frozen=True)
class _MetricReading:
    """The numbers behind one metric's verdict (see :func:`similarity_reading`)."""

    metric: str
    ffn_late: tuple[float, float, float]   # mean, ci_low, ci_high over the late third
    mhsa_late: tuple[float, float, float]
    ffn_step: float                        # mean |change| between consecutive layers, late third
    mhsa_step: float
    ffn_early: float

    @property
    def higher(self) -> bool:
        return self.ffn_late[1] > self.mhsa_late[2]

    @property
    def flatter(self) -> bool:
        return self.ffn_step < self.mhsa_step

    @property
    def rises(self) -> bool:
        return self.ffn_late[0] > self.ffn_early

    @property
    def holds(self) -> bool:
        return self.higher and self.flatter and self.rises

    def sentence(self) -> str:
        f, m = self.ffn_late, self.mhsa_late
        if self.higher:
            order = "FFN is higher (the intervals do not overlap)"
        elif m[1] > f[2]:
            order = "MHSA is higher (the intervals do not overlap)"
        else:
            order = "the intervals overlap, so neither is clearly higher"
        return (f"{self.metric.capitalize()}: over the late third FFN averages {f[0]:.3f} "
                f"[{f[1]:.3f}, {f[2]:.3f}] and MHSA {m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}], so {order}; "
                f"there FFN's curve moves {self.ffn_step:.3f} per layer against MHSA's {self.mhsa_step:.3f} "
                f"({'flatter' if self.flatter else 'not flatter'}), and FFN goes from {self.ffn_early:.3f} "
                f"in the early third to {f[0]:.3f} ({'rises' if self.rises else 'does not rise'}).")


def _metric_reading(summary: pd.DataFrame, metric: str) -> _MetricReading:
    s = summary[summary["metric"].astype(str) == metric]
    layers = sorted(int(l) for l in s["layer"].unique())
    depth = dict(zip(layers, depth_thirds(pd.Series(layers))))
    late = [l for l in layers if depth[l] == "late"]
    window = layers[max(layers.index(late[0]) - 1, 0):]  # the step into the late third counts too

    def curve(comp: str) -> pd.DataFrame:
        c = s[s["component"].astype(str) == comp].set_index("layer").sort_index()
        if c.index.has_duplicates or len(c) != len(layers):
            raise ValueError(f"similarity_reading: expected one {comp} row per layer for metric {metric!r}; "
                             f"pass a single summary (one protocol, one model)")
        return c

    def late_ci(c: pd.DataFrame) -> tuple[float, float, float]:
        # The mean of per-layer interval bounds is a conservative interval for the late-third
        # mean: the standard deviation of an average is at most the average of the deviations.
        return tuple(float(c.loc[late, k].mean()) for k in ("mean", "ci_low", "ci_high"))  # type: ignore

    def step(c: pd.DataFrame) -> float:
        return float(c.loc[window, "mean"].diff().abs().mean())

    ffn, mhsa = curve("FFN"), curve("MHSA")
    early = [l for l in layers if depth[l] == "early"]
    return _MetricReading(metric, late_ci(ffn), late_ci(mhsa), step(ffn), step(mhsa),
                          float(ffn.loc[early, "mean"].mean()))


def _reading_header(summary: pd.DataFrame, model_name: str | None) -> str:
    layers = sorted(summary["layer"].unique())
    late = [l for l, d in zip(layers, depth_thirds(pd.Series(layers))) if d == "late"]
    what = []
    for col in ("protocol", "projection"):
        if col in summary.columns:
            what.append(f"{col} {summary[col].iloc[0]}")
    where = f"On {model_name}" if model_name else "On this model"
    n = int(summary["n"].min()) if "n" in summary.columns else None
    size = f"{n:,} prompts, " if n is not None else ""
    return (f"{where} ({', '.join(what) + '; ' if what else ''}{size}{len(layers)} layers, late third = "
            f"layers {late[0]}–{late[-1]})")


def similarity_reading(summary: pd.DataFrame, *, model_name: str | None = None) -> str:
    """A short paragraph, generated from the numbers, saying whether the paper's reading holds.

    The paper's reading (method.md §5): MHSA states keep changing across layers (lower, varying
    input/output similarity), FFN states settle after some depth (FFN similarity rises and stays
    high in later layers). The test, per metric, on the per-layer means of one summary, with
    the late third as in :func:`depth_thirds`:

    1. *higher*: FFN's late-third interval lies entirely above MHSA's. A late-third interval is
       the mean of the per-layer ``ci_low`` / ``ci_high`` over those layers (conservative);
    2. *flatter*: FFN's mean absolute change between consecutive layers, from the last layer
       before the late third to the last layer, is smaller than MHSA's;
    3. *rises*: FFN's late-third mean exceeds its early-third mean.

    The reading *holds* when all three pass for every metric, *does not hold* when (1) fails
    for every metric, and *holds only in part* otherwise.

    Args:
        summary: the output of :func:`component_similarity` for one model and one protocol
            (columns ``layer``, ``component``, ``metric``, ``mean``, ``ci_low``, ``ci_high``).
        model_name: named in the text.

    Returns:
        Markdown text: a verdict sentence, one sentence of numbers per metric, the test applied.
    """
    _check_summary(summary, "similarity_reading", ["layer", "component", "metric", "mean", "ci_low", "ci_high"])
    for col in _label_keys(summary):
        if summary[col].nunique() > 1:
            raise ValueError(f"similarity_reading: the summary mixes {col}s {sorted(summary[col].unique())}; "
                             f"pass one, e.g. summary[summary[{col!r}] == {summary[col].iloc[0]!r}]")
    metrics = [m for m in METRICS if m in set(summary["metric"].astype(str))]
    if not metrics:
        raise ValueError(f"similarity_reading: no metric among {list(METRICS)} in the summary")
    readings = [_metric_reading(summary, m) for m in metrics]
    if all(r.holds for r in readings):
        verdict = "holds"
    elif not any(r.higher for r in readings):
        verdict = "does not hold"
    else:
        verdict = "holds only in part"
    return (f"{_reading_header(summary, model_name)}, the paper's reading — MHSA states keep changing across "
            f"layers while FFN states settle after some depth — **{verdict}**. "
            + " ".join(r.sentence() for r in readings)
            + " Test applied per metric: FFN's late-third 95% interval (mean of the per-layer bounds) lies "
              "above MHSA's; FFN's mean absolute layer-to-layer change over the late third is smaller than "
              "MHSA's; FFN's late-third mean exceeds its early-third mean. The reading holds when all three "
              "pass for every metric and does not hold when FFN is not above MHSA for any metric.")
