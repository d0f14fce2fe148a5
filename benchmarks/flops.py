"""Matmul FLOP counts of the benchmarked work, and the machine's peak matmul rate, for the
``limit`` of the benchmark rows: limit = FLOPs of the work that is actually needed / peak FLOP/s.

Only matrix products are counted (2 FLOPs per multiply-add); norms, activations, softmax,
rotary embeddings and the embedding lookup are free. Backward passes are taken with respect to
activations only (no weight gradients) and counted as 1x the forward's matmul FLOPs, a lower
bound: the limit is a figure no implementation can beat, not an estimate of what one achieves.

Usage::

    shape = DecoderShape.from_config(model.config)
    flops = target_optimisation_flops(shape, build_rows(tok, requests, templates), hp.layers[-1], n_steps)
    seconds_limit = flops / peak_matmul_flops()
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pmetlab.editing.rows import KIND_KL, Rows, recomputed_positions

__all__ = [
    "DecoderShape",
    "GATED_MODEL_TYPES",
    "PLAIN_MODEL_TYPES",
    "layer_dense_flops",
    "attention_flops",
    "layer_flops",
    "unembed_flops",
    "causal_context_sum",
    "target_step_flops",
    "target_optimisation_flops",
    "covariance_flops",
    "peak_matmul_flops",
]

#: LLaMA-style ``model_type``s (config attributes ``hidden_size``, ``intermediate_size``,
#: ``num_attention_heads``, ``num_key_value_heads``) whose MLP is gated (gate, up, down).
GATED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")

#: GPT-J-style ``model_type``s (config attributes ``n_embd``, ``n_inner``, ``n_head``, ``n_layer``)
#: whose MLP is plain (fc_in, fc_out); attention and MLP run in parallel, which changes no FLOP.
PLAIN_MODEL_TYPES = ("gptj",)


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that decide a decoder's matmul FLOPs."""

    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    n_layers: int
    gated: bool

    @property
    def d_attn(self) -> int:
        """Width of the attention heads together (n_heads · head_dim)."""
        return self.n_heads * self.head_dim

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """The shape of a LLaMA-style (:data:`GATED_MODEL_TYPES`) or GPT-J-style
        (:data:`PLAIN_MODEL_TYPES`) ``transformers`` config.

        Raises:
            ValueError: the config's ``model_type`` is neither.
        """
        if config.model_type in PLAIN_MODEL_TYPES:
            return cls._from_gptj_config(config)
        if config.model_type not in GATED_MODEL_TYPES:
            raise ValueError(
                f"no FLOP count for model_type {config.model_type!r}; supported: "
                f"{list(GATED_MODEL_TYPES + PLAIN_MODEL_TYPES)}"
            )
        n_heads = config.num_attention_heads
        return cls(
            d_model=config.hidden_size,
            d_ff=config.intermediate_size,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
            vocab=config.vocab_size,
            n_layers=config.num_hidden_layers,
            gated=True,
        )

    @classmethod
    def _from_gptj_config(cls, config) -> DecoderShape:
        d = config.n_embd
        return cls(
            d_model=d,
            d_ff=config.n_inner or 4 * d,
            n_heads=config.n_head,
            n_kv_heads=config.n_head,
            head_dim=d // config.n_head,
            vocab=config.vocab_size,
            n_layers=config.n_layer,
            gated=False,
        )


def layer_dense_flops(shape: DecoderShape, *, with_ffn_out: bool = True) -> int:
    """Forward FLOPs per token of one decoder layer's weight matmuls: the q/k/v/o projections
    (k and v with the grouped-query head count) and the MLP (gate, up, down when gated).
    ``with_ffn_out=False`` leaves out the MLP's output projection (down_proj)."""
    d, kv = shape.d_model, shape.n_kv_heads * shape.head_dim
    attn = 2 * d * shape.d_attn * 2 + 2 * d * kv * 2  # q and o, then k and v
    mlp_in = (2 if shape.gated else 1) * 2 * d * shape.d_ff
    return attn + mlp_in + (2 * shape.d_ff * d if with_ffn_out else 0)


def attention_flops(shape: DecoderShape, context: int) -> int:
    """Forward FLOPs of the attention scores q·kᵀ and the weighted sum of values over
    ``context`` keys, for one token or (``context`` a sum) for several: 2 · 2 · context · d_attn."""
    return 4 * context * shape.d_attn


def layer_flops(shape: DecoderShape, n_tokens: int, context_sum: int, *, with_ffn_out: bool = True) -> int:
    """Forward FLOPs of one decoder layer on ``n_tokens`` positions whose causal contexts
    (keys attended to, the position itself included) add up to ``context_sum``."""
    return n_tokens * layer_dense_flops(shape, with_ffn_out=with_ffn_out) + attention_flops(shape, context_sum)


def unembed_flops(shape: DecoderShape) -> int:
    """Forward FLOPs per position of the vocabulary projection: 2 · d_model · vocab."""
    return 2 * shape.d_model * shape.vocab


def causal_context_sum(start: int, stop: int) -> int:
    """Σ (p + 1) for positions p in [start, stop): the keys a causal layer reads at them."""
    return (stop * (stop + 1) - start * (start + 1)) // 2


def target_step_flops(shape: DecoderShape, rows: Rows, layer: int) -> list[int]:
    """Forward FLOPs of one optimisation step of each request (method.md §2 step 1), (N,).

    Per row, the positions from the subject's last token on (``rows.lookup``; earlier ones never
    see δ) through layers ``layer``..n_layers−1, plus the vocabulary projection at the positions
    the loss reads: every target position of the rewrite rows and the KL row's subject token.
    """
    lengths = rows.attention_mask.sum(1).tolist()
    lookups, reqs, kinds = rows.lookup.tolist(), rows.req.tolist(), rows.kind.tolist()
    per_request = [0] * rows.n_requests
    n_layers = shape.n_layers - layer
    for start, stop, req in zip(lookups, lengths, reqs):
        per_request[req] += n_layers * layer_flops(shape, stop - start, causal_context_sum(start, stop))
    read = [reqs[r] for r in rows.t_row.tolist()] + [reqs[r] for r, k in enumerate(kinds) if k == KIND_KL]
    for req in read:
        per_request[req] += unembed_flops(shape)
    assert sum(s - a for a, s in zip(lookups, lengths)) == recomputed_positions(rows)
    return per_request


def target_optimisation_flops(shape: DecoderShape, rows: Rows, layer: int, n_steps: Sequence[int]) -> int:
    """Matmul FLOPs of a target optimisation whose request i took ``n_steps[i]`` steps: a
    forward each step and a backward (w.r.t. activations, counted as 1x the forward) on every
    step but the last, whose gradient is never used."""
    step = target_step_flops(shape, rows, layer)
    return sum(f * (n + max(n - 1, 0)) for f, n in zip(step, n_steps))


def covariance_flops(
    shape: DecoderShape, layers: Sequence[int], chunk_lengths: Sequence[int], *, symmetric: bool = True
) -> int:
    """Matmul FLOPs of collecting E[k kᵀ] of the FFN keys of ``layers`` over chunks of
    ``chunk_lengths`` tokens (method.md §2 step 4).

    The forward runs layers 0..max(layers), the deepest without its FFN output projection (its
    input is the key); the accumulation adds k kᵀ for each token and layer: d_ff² multiply-adds,
    or with ``symmetric`` only the upper triangle's d_ff·(d_ff+1)/2 (the sum is symmetric).
    """
    n_tokens = sum(chunk_lengths)
    context = sum(causal_context_sum(0, n) for n in chunk_lengths)
    deepest = max(layers)
    forward = deepest * layer_flops(shape, n_tokens, context)
    forward += layer_flops(shape, n_tokens, context, with_ffn_out=False)
    per_key = shape.d_ff * (shape.d_ff + 1) if symmetric else 2 * shape.d_ff**2
    accumulate = len(layers) * n_tokens * per_key
    return forward + accumulate


def peak_matmul_flops(
    sizes: Sequence[int] = (1024, 2048), repeats: int = 5, device: str | torch.device = "cpu"
) -> float:
    """The best float32 FLOP/s of square ``torch.mm`` of ``sizes`` on ``device`` (on the CPU: this
    process's torch threads), each size warmed up once first."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        out = torch.mm(a, b)
        for _ in range(repeats):
            _synchronize(device)
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            _synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def _synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
