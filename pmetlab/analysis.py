"""The MHSA-vs-FFN hidden-state study (method.md §5).

For every layer l and each component (MHSA, FFN) we read the residual stream entering the
component and the residual stream after the component's contribution has been added, at the
last token of each prompt:

=============  =========================  ==========================================
block          MHSA in -> out             FFN in -> out
=============  =========================  ==========================================
sequential     h^{l-1} -> h^{l-1} + a^l   h^{l-1} + a^l -> h^l = h^{l-1} + a^l + m^l
parallel       h^{l-1} -> h^{l-1} + a^l   h^{l-1} -> h^{l-1} + m^l
=============  =========================  ==========================================

a^l and m^l are the contributions that actually join the residual stream: the output of the
MHSA / FFN module, or, for Gemma 2/3, of the post-norm the adapter names for each component.
h^{l-1} is the input of decoder layer l. Whether blocks are parallel comes from the adapter.

Two similarities compare each in/out pair:

- ``cosine``: cosine similarity of the raw residual vectors (computed in float64);
- ``jaccard``: |A ∩ B| / |A ∪ B| of the top-k vocabulary tokens of the two vectors, where a
  vector is projected onto the vocabulary with the "logit lens": the model's own final norm
  followed by its unembedding (``adapter.logits_from_normed(final_norm(x))``), i.e. exactly what
  the LM head would predict if the remaining layers were skipped. The paper only says
  "projecting onto the vocabulary"; applying the final norm first is the usual reading: the
  unembedding was trained on normed vectors, and the norm's per-dimension weight changes which
  tokens rank highest. Cosine similarity, by contrast, is taken on the raw (un-normed) vectors.

The paper reads a high, flat FFN curve as "FFN hidden states settle after some depth" and a
lower MHSA curve as "MHSA keeps changing the state (general extraction patterns)".
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from .devices import model_device, model_dtype
from .models.adapters import ModelAdapter, get_adapter
from .tokens import Batch, encode_batch
from .tracing import TraceDict, hidden_of

logger = logging.getLogger(__name__)

__all__ = ["COMPONENTS", "METRICS", "ComponentStates", "component_states", "component_similarity",
           "component_similarity_values", "summarize_similarity", "logit_lens_topk", "topk_jaccard",
           "mean_ci"]

#: Component labels used in every DataFrame this module returns, in plotting order.
COMPONENTS: tuple[str, ...] = ("MHSA", "FFN")
#: Metric labels used in every DataFrame this module returns.
METRICS: tuple[str, ...] = ("cosine", "jaccard")


@dataclass
class ComponentStates:
    """Residual-stream states around each component at each prompt's last token.

    Every tensor is float32 with shape ``(n_prompts, n_layers, d_model)`` and lives on the CPU.

    Attributes:
        mhsa_in: h^{l-1}, the input of decoder layer l.
        mhsa_out: h^{l-1} + a^l.
        ffn_in: h^{l-1} + a^l (sequential blocks) or h^{l-1} (parallel blocks).
        ffn_out: ffn_in + m^l (= h^l for sequential blocks).
        parallel: whether the model's blocks are parallel (from the adapter).
    """

    mhsa_in: torch.Tensor
    mhsa_out: torch.Tensor
    ffn_in: torch.Tensor
    ffn_out: torch.Tensor
    parallel: bool

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


def _batches(prompts: list[str], batch_size: int) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(prompts), batch_size):
        yield start, prompts[start:start + batch_size]


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="prompt")


# --- collecting states ----------------------------------------------------------------------------

def _contribution_names(adapter: ModelAdapter, layer: int) -> tuple[str, str]:
    """Modules whose output is what MHSA / FFN add to the residual stream at ``layer``."""
    attn = adapter.attn_post_norm_name(layer) or adapter.attn_name(layer)
    ffn = adapter.ffn_post_norm_name(layer) or adapter.mlp_name(layer)
    return attn, ffn


@torch.no_grad()
def _batch_states(model: torch.nn.Module, adapter: ModelAdapter, batch: Batch) -> ComponentStates:
    """One forward pass over a right-padded batch; states at each row's last real token."""
    n_layers = adapter.n_layers
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    last = batch.lengths - 1
    layer_names = [adapter.layer_name(l) for l in range(n_layers)]
    contrib = [_contribution_names(adapter, l) for l in range(n_layers)]
    picked: dict[str, torch.Tensor] = {}

    def pick(output: Any, name: str) -> Any:
        # Keep only the last-token rows (a copy), so memory does not grow with sequence length
        # and later in-place operations in the model cannot change what we read.
        h = hidden_of(output)
        if h.dim() == 2 and h.shape[0] == batch.input_ids.numel():  # OPT flattens (B·T, d) around its FFN
            h = h.view(*batch.input_ids.shape, h.shape[-1])
        picked[name] = h[rows.to(h.device), last.to(h.device)].detach().float().cpu()
        return output

    comp_names = [n for pair in contrib for n in pair]
    # stop=True ends the forward after the last layer: the final norm and the LM head over every
    # position are not needed (the logit lens below runs on the last tokens only).
    with TraceDict(model, layer_names, retain_input=True, retain_output=False, stop=True) as td_layers, \
            TraceDict(model, comp_names, retain_output=False, edit_output=pick):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    h_in = []
    for name in layer_names:
        x = td_layers[name].input
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(f"could not read the input of {name} (got {type(x).__name__})")
        h_in.append(x[rows.to(x.device), last.to(x.device)].detach().float().cpu())
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
    return ComponentStates(h, mhsa_out, ffn_in, ffn_out, parallel)


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


def component_states(model: torch.nn.Module, tok, prompts: Sequence[str], *, batch_size: int = 16,
                     progress: bool = False) -> ComponentStates:
    """Residual-stream states around MHSA and FFN at each prompt's last token, all layers.

    Holds ``4 · n_prompts · n_layers · d_model`` floats; for large prompt sets use
    :func:`component_similarity_values`, which keeps only the similarities.

    Returns:
        :class:`ComponentStates` with tensors of shape ``(n_prompts, n_layers, d_model)``.
    """
    prompts = _check_prompts(prompts)
    batch_size = _check_positive_int("batch_size", batch_size)
    adapter = get_adapter(model)
    device = model_device(model)
    parts: list[ComponentStates] = []
    with _progress_bar(len(prompts), progress, "component states") as bar:
        for _, chunk in _batches(prompts, batch_size):
            parts.append(_batch_states(model, adapter, encode_batch(tok, chunk, device)))
            bar.update(len(chunk))
    return ComponentStates(*(torch.cat([getattr(p, f) for p in parts]) for f in
                             ("mhsa_in", "mhsa_out", "ffn_in", "ffn_out")), parallel=parts[0].parallel)


# --- metrics ---------------------------------------------------------------------------------------

@torch.no_grad()
def logit_lens_topk(model: torch.nn.Module, x: torch.Tensor, k: int,
                    max_elements: int = 2 ** 25) -> torch.Tensor:
    """Top-``k`` vocabulary ids of residual vectors read through the final norm and unembedding.

    Args:
        x: ``(..., d_model)`` residual-stream vectors (any dtype/device).
        k: number of tokens per vector.
        max_elements: logits are computed in row chunks of at most this many entries.

    Returns:
        ``(..., k)`` int64 token ids on the CPU, in descending logit order.
    """
    adapter = get_adapter(model)
    vocab = int(adapter.unembed_weight.shape[0])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"top_k must be an int in 1..{vocab} (the vocabulary size), got {k!r}")
    norm = adapter.module(adapter.final_norm_name)
    device, dtype = model_device(model), model_dtype(model)
    flat = x.reshape(-1, x.shape[-1])
    step = max(1, max_elements // vocab)
    out = []
    for i in range(0, flat.shape[0], step):
        logits = adapter.logits_from_normed(norm(flat[i:i + step].to(device=device, dtype=dtype)))
        out.append(logits.float().topk(k, dim=-1).indices.cpu())
    return torch.cat(out).reshape(*x.shape[:-1], k)


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


def _similarities(model: torch.nn.Module, states: ComponentStates, top_k: int) -> dict[tuple[str, str], torch.Tensor]:
    """``{(component, metric): (n_prompts, n_layers) float64}``."""
    # Distinct vectors only: mhsa_out is ffn_in for sequential blocks, mhsa_in for parallel ones.
    topk = {"mhsa_in": logit_lens_topk(model, states.mhsa_in, top_k),
            "mhsa_out": logit_lens_topk(model, states.mhsa_out, top_k),
            "ffn_out": logit_lens_topk(model, states.ffn_out, top_k)}
    topk["ffn_in"] = topk["mhsa_in"] if states.parallel else topk["mhsa_out"]
    res = {}
    for comp, (x_in, x_out) in states.pairs().items():
        key_in, key_out = ("mhsa_in", "mhsa_out") if comp == "MHSA" else ("ffn_in", "ffn_out")
        cos = F.cosine_similarity(x_in.double(), x_out.double(), dim=-1).clamp(-1.0, 1.0)
        res[(comp, "cosine")] = cos
        res[(comp, "jaccard")] = topk_jaccard(topk[key_in], topk[key_out])
    return res


def component_similarity_values(model: torch.nn.Module, tok, prompts: Sequence[str], *, top_k: int = 50,
                                batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Per-prompt similarities between each component's input and output (method.md §5).

    Prompts are right-padded in batches (one forward per batch, all layers traced at once) and
    read at each row's last real token. See the module docstring for the definitions.

    Args:
        model: a causal LM with a pmetlab adapter (eval mode; it is not modified).
        tok: its tokenizer (needs a pad token).
        prompts: prompt strings, e.g. ``record["prompt"]`` of the known-facts records.
        top_k: tokens per vector for the Jaccard similarity (the paper uses 50).
        batch_size: prompts per forward pass.
        progress: show a progress bar.

    Returns:
        Tidy DataFrame, one row per (prompt, layer, component, metric), columns
        ``prompt_id`` (index into ``prompts``), ``layer`` (0-based), ``component`` ("MHSA" or
        "FFN"), ``metric`` ("cosine" or "jaccard"), ``value`` (float).
    """
    prompts = _check_prompts(prompts)
    batch_size = _check_positive_int("batch_size", batch_size)
    adapter = get_adapter(model)
    vocab = int(adapter.unembed_weight.shape[0])
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be an int in 1..{vocab} (the vocabulary size), got {top_k!r}")
    if model.training:
        logger.warning("the model is in training mode (dropout active); call model.eval() for "
                       "reproducible similarities")
    device = model_device(model)
    frames = []
    t0 = time.perf_counter()
    with _progress_bar(len(prompts), progress, "MHSA/FFN similarity") as bar:
        for start, chunk in _batches(prompts, batch_size):
            states = _batch_states(model, adapter, encode_batch(tok, chunk, device))
            for (comp, metric), vals in _similarities(model, states, top_k).items():
                n, n_layers = vals.shape
                frames.append(pd.DataFrame({
                    "prompt_id": torch.arange(start, start + n).repeat_interleave(n_layers).numpy(),
                    "layer": torch.arange(n_layers).repeat(n).numpy(),
                    "component": comp, "metric": metric, "value": vals.reshape(-1).numpy()}))
            bar.update(len(chunk))
            bar.set_postfix(prompts_per_s=f"{(start + len(chunk)) / (time.perf_counter() - t0):.1f}")
    df = pd.concat(frames, ignore_index=True)
    df["component"] = pd.Categorical(df["component"], categories=list(COMPONENTS))
    df["metric"] = pd.Categorical(df["metric"], categories=list(METRICS))
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


def summarize_similarity(values: pd.DataFrame, *, confidence: float = 0.95) -> pd.DataFrame:
    """Mean over prompts with a Student-t confidence interval, per layer, component and metric.

    Args:
        values: the output of :func:`component_similarity_values` (columns ``layer``,
            ``component``, ``metric``, ``value``).

    Returns:
        Tidy DataFrame with columns ``layer``, ``component``, ``metric``, ``mean``, ``ci_low``,
        ``ci_high``, ``n`` (number of prompts).
    """
    missing = {"layer", "component", "metric", "value"} - set(values.columns)
    if missing:
        raise KeyError(f"values lacks column(s) {sorted(missing)}; expected the output of "
                       f"component_similarity_values (got columns {list(values.columns)})")
    rows = []
    for (layer, comp, metric), grp in values.groupby(["layer", "component", "metric"], observed=True, sort=True):
        mean, lo, hi = mean_ci(grp["value"].to_numpy(), confidence)
        rows.append({"layer": int(layer), "component": comp, "metric": metric, "mean": mean,
                     "ci_low": lo, "ci_high": hi, "n": int(len(grp))})
    out = pd.DataFrame(rows, columns=["layer", "component", "metric", "mean", "ci_low", "ci_high", "n"])
    comps = [c for c in COMPONENTS if c in set(out["component"])] + \
        sorted(set(out["component"]) - set(COMPONENTS))
    out["component"] = pd.Categorical(out["component"].astype(str), categories=comps)
    out["metric"] = out["metric"].astype(str)
    return out.sort_values(["metric", "component", "layer"], ignore_index=True)


def component_similarity(model: torch.nn.Module, tok, prompts: Sequence[str], *, top_k: int = 50,
                         batch_size: int = 16, confidence: float = 0.95,
                         progress: bool = True) -> pd.DataFrame:
    """The MHSA-vs-FFN study (method.md §5): similarity of each component's input and output
    hidden state per layer, averaged over prompts.

    Equivalent to ``summarize_similarity(component_similarity_values(...))``; use those two for
    the per-prompt values.

    Returns:
        Tidy DataFrame with columns ``layer`` (0-based), ``component`` ("MHSA", "FFN"),
        ``metric`` ("cosine", "jaccard"), ``mean``, ``ci_low``, ``ci_high`` (Student-t interval
        at ``confidence``), ``n`` (prompts); ``2 · 2 · n_layers`` rows.
    """
    values = component_similarity_values(model, tok, prompts, top_k=top_k, batch_size=batch_size,
                                         progress=progress)
    return summarize_similarity(values, confidence=confidence)
