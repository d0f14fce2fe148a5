"""The restoration runs of causal tracing (ROME §2.1, Appendix B).

A *restoration* is a tuple of ``(module name, token)`` pairs: in a corrupted run, the output of
each named module at that token is overwritten with its value from the clean run. The modules
are those whose output joins the residual stream h^l = h^{l-1} + a^l + m^l (method.md §1):

========  =====================================================================
kind      module (from the model's adapter, never from its name)
========  =====================================================================
hidden    the decoder layer ``layer_name(l)``: its output is h^l
attn      ``attn_post_norm_name(l)`` when the family has one (Gemma 2/3), else ``attn_name(l)``: a^l
mlp       ``ffn_post_norm_name(l)`` when the family has one (Gemma 2/3), else ``mlp_name(l)``: m^l
========  =====================================================================

:func:`run_batched` puts many restorations in one forward (row ``r · n_samples + s`` is
restoration r under noise draw s); :func:`run_reference` runs one restoration per forward with
the simplest code, and the tests hold the two equal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..models.adapters import ModelAdapter
from ..tracing import TraceDict, hidden_of, replace_hidden
from .prompt import TracedPrompt

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "Restoration", "TraceSetup", "component_name", "window_layers", "restorations_for"]

KINDS = ("hidden", "mlp", "attn")

#: ``((module name, token), ...)``: the clean values written back in one restored run.
Restoration = tuple[tuple[str, int], ...]


def component_name(adapter: ModelAdapter, kind: str, layer: int) -> str:
    """The module whose output is the ``kind`` state of ``layer`` (table above)."""
    if kind == "hidden":
        return adapter.layer_name(layer)
    if kind == "attn":
        return adapter.attn_post_norm_name(layer) or adapter.attn_name(layer)
    if kind == "mlp":
        return adapter.ffn_post_norm_name(layer) or adapter.mlp_name(layer)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The ``window`` layers centred on ``layer`` (``layer - window//2`` onwards), clipped to the model."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def restorations_for(
    adapter: ModelAdapter, kind: str, window: int, n_tokens: int, tokens: Sequence[int] | None = None
) -> list[Restoration]:
    """One restoration per (layer, token), layer-major: hidden restores h^l at the token; mlp and
    attn restore that component at the token in every layer of the window centred on l.
    ``tokens``: only these token positions (default all ``n_tokens``)."""
    positions = range(n_tokens) if tokens is None else list(tokens)
    out: list[Restoration] = []
    for layer in range(adapter.n_layers):
        span = [layer] if kind == "hidden" else window_layers(layer, window, adapter.n_layers)
        names = [component_name(adapter, kind, j) for j in span]
        out += [tuple((n, t) for n in names) for t in positions]
    return out


@dataclass
class TraceSetup:
    """Everything a restored run needs.

    Attributes:
        noise: the corruptions, (n_samples, n_subject_tokens, d_model), in the model's dtype and device.
        clean: module name -> its clean output, (n_tokens, d_model).
        embed_name: the input embedding module (where the noise is added).
    """

    model: torch.nn.Module
    adapter: ModelAdapter
    prompt: TracedPrompt
    noise: torch.Tensor
    clean: dict[str, torch.Tensor]
    embed_name: str

    @property
    def n_samples(self) -> int:
        return int(self.noise.shape[0])


def embedding_name(model: torch.nn.Module) -> str:
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return name
    raise LookupError(f"the input embeddings of {type(model).__name__} are not among its modules")


@torch.no_grad()
def clean_run(model: torch.nn.Module, adapter: ModelAdapter, ids: torch.Tensor, names: Sequence[str]):
    """Clean outputs of ``names`` ({name: (n_tokens, d)}) and the next-token distribution (vocab,)."""
    final = adapter.final_norm_name
    with TraceDict(model, [*names, final], detach=True, stop=True) as td:
        model(input_ids=ids[None])
    clean = {n: adapter.unflatten(hidden_of(td[n].output), 1)[0].clone() for n in names}
    probs = adapter.logits_from_normed(hidden_of(td[final].output)[0, -1]).float().softmax(-1)
    return clean, probs


def _forward(setup: TraceSetup, n_rest: int, writes: dict[str, tuple[list[int], list[int]]]) -> torch.Tensor:
    """p(o) of each row, (n_rest · n_samples,); ``writes``: name -> (rows, tokens) to restore."""
    model, adapter, B = setup.model, setup.adapter, n_rest * setup.n_samples
    s0, s1 = setup.prompt.subject_range
    noise = setup.noise.repeat(n_rest, 1, 1)
    index = {n: (torch.tensor(r), torch.tensor(t)) for n, (r, t) in writes.items()}

    def edit(output, name: str):
        if name == adapter.final_norm_name:
            return None
        h = hidden_of(output).clone()
        if name == setup.embed_name:
            h[:, s0:s1] += noise.to(h.device)
        else:
            rows, toks = index[name]
            clean = setup.clean[name]  # on the module's own device (device_map models)
            view = adapter.unflatten(h, B)
            view[rows.to(h.device), toks.to(h.device)] = clean[toks.to(clean.device)].to(h.device)
        return replace_hidden(output, h)

    final = adapter.final_norm_name
    with TraceDict(model, [setup.embed_name, *writes, final], edit_output=edit, stop=True) as td:
        model(input_ids=setup.prompt.ids.expand(B, -1))
    logits = adapter.logits_from_normed(hidden_of(td[final].output)[:, -1])
    return logits.float().softmax(-1)[:, setup.prompt.target_id]


@torch.no_grad()
def run_batched(
    setup: TraceSetup,
    restorations: Sequence[Restoration],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Mean over the noise draws of p(o | corrupted, restored), (n_restorations,), float32 on the CPU.

    ``batch_size`` rows per forward: ``max(1, batch_size // n_samples)`` restorations each.
    An empty restoration ``()`` gives p(o | corrupted).
    """
    S = setup.n_samples
    per = max(1, batch_size // S)
    out = []
    for c in range(0, len(restorations), per):
        chunk = restorations[c : c + per]
        writes: dict[str, tuple[list[int], list[int]]] = {}
        for r, rest in enumerate(chunk):
            for name, t in rest:
                rows, toks = writes.setdefault(name, ([], []))
                rows += [r * S + s for s in range(S)]
                toks += [t] * S
        p = _forward(setup, len(chunk), writes)
        out.append(p.view(len(chunk), S).mean(1).cpu())
        if on_batch is not None:
            on_batch(len(chunk))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def run_reference(setup: TraceSetup, restorations: Sequence[Restoration]) -> torch.Tensor:
    """As :func:`run_batched`, one restoration per forward (its n_samples rows), read from the
    model's own logits: the simplest code, kept as the tests' reference."""
    model, o = setup.model, setup.prompt.target_id
    s0, s1 = setup.prompt.subject_range
    ids = setup.prompt.ids.expand(setup.n_samples, -1)
    out = []
    for rest in restorations:

        def edit(output, name: str, rest: Restoration = rest):
            h = hidden_of(output).clone()
            if name == setup.embed_name:
                h[:, s0:s1] = h[:, s0:s1] + setup.noise.to(h.device)
            view = setup.adapter.unflatten(h, setup.n_samples)
            for n, t in rest:
                if n == name:
                    view[:, t] = setup.clean[n][t].to(h.device)
            return replace_hidden(output, h)

        names = [setup.embed_name, *dict.fromkeys(n for n, _ in rest)]
        with TraceDict(model, names, retain_output=False, edit_output=edit):
            logits = model(input_ids=ids).logits[:, -1]
        out.append(logits.float().softmax(-1)[:, o].mean().cpu())
    return torch.stack(out) if out else torch.zeros(0)
