"""Collecting the input and output of MHSA and FFN at each prompt's last token, under the two
protocols of the package docstring: ``paper`` (normed module input vs module output) and
``residual`` (residual stream before vs after the component)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..devices import model_device, model_dtype
from ..models.adapters import ModelAdapter, get_adapter
from ..tokens import Batch, encode_batch
from ..tracing import TraceDict, hidden_of
from .checks import batches, check_positive_int, check_prompts, progress_bar

logger = logging.getLogger(__name__)

__all__ = ["ComponentStates", "component_states", "component_io_states", "COLLECTORS"]


@dataclass
class ComponentStates:
    """Input and output vectors of each component at each prompt's last token.

    Every tensor is float32 with shape ``(n_prompts, n_layers, d_model)`` and lives on the CPU.
    What the four tensors hold depends on ``protocol`` (see :mod:`pmetlab.analysis`):

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
    with (
        TraceDict(model, layer_names, retain_input=True, retain_output=False, stop=True) as td_layers,
        TraceDict(model, comp_names, retain_output=False, edit_output=_output_picker(batch, picked)),
    ):
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
    h = torch.stack(h_in, 1)  # (B, L, d)
    a = torch.stack([picked[n] for n, _ in contrib], 1)  # (B, L, d)
    m = torch.stack([picked[n] for _, n in contrib], 1)  # (B, L, d)
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
        logger.warning(
            "h^{l-1} + a^l + m^l differs from the next layer's input by %.3g (relative); "
            "the adapter's component modules may not be what joins the residual stream",
            err,
        )


def _traced_input(trace: Any, name: str, batch: Batch, d_model: int) -> torch.Tensor:
    """The retained first input of module ``name`` at the last tokens, ``(B, d_model)``."""
    x = trace.input
    if not isinstance(x, torch.Tensor) or x.shape[-1] != d_model:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise RuntimeError(
            f"the first input of {name} is not a (..., {d_model}) hidden state (got {got}); "
            f"fix the adapter's attn_input / ffn_input field for this model"
        )
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
    with (
        TraceDict(
            model, [n for p in ins for n in p], retain_input=True, retain_output=False, clone=True, detach=True
        ) as td_in,
        TraceDict(
            model,
            [n for p in outs for n in p],
            retain_output=False,
            edit_output=_output_picker(batch, picked),
            stop=True,
        ),
    ):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    missing = [n for p in outs for n in p if n not in picked]
    if missing:
        raise RuntimeError(f"the forward pass did not run module(s) {missing[:3]}; cannot read a^l / m^l")
    x_in = {n: _traced_input(td_in[n], n, batch, adapter.d_model) for n in td_in}
    return ComponentStates(
        mhsa_in=torch.stack([x_in[a] for a, _ in ins], 1),  # (B, L, d)
        mhsa_out=torch.stack([picked[a] for a, _ in outs], 1),
        ffn_in=torch.stack([x_in[f] for _, f in ins], 1),
        ffn_out=torch.stack([picked[f] for _, f in outs], 1),
        parallel=adapter.parallel,
        protocol="paper",
    )


COLLECTORS: dict[str, Callable[[torch.nn.Module, ModelAdapter, Batch], ComponentStates]] = {
    "paper": _batch_io_states,
    "residual": _batch_states,
}


def _collect_states(
    model: torch.nn.Module, tok, prompts: Sequence[str], protocol: str, batch_size: int, progress: bool
) -> ComponentStates:
    prompts = check_prompts(prompts)
    batch_size = check_positive_int("batch_size", batch_size)
    collect = COLLECTORS[protocol]
    adapter = get_adapter(model)
    device = model_device(model)
    parts: list[ComponentStates] = []
    with progress_bar(len(prompts), progress, f"component states ({protocol})") as bar:
        for _, chunk in batches(prompts, batch_size):
            parts.append(collect(model, adapter, encode_batch(tok, chunk, device)))
            bar.update(len(chunk))
    return ComponentStates(
        *(torch.cat([getattr(p, f) for p in parts]) for f in ("mhsa_in", "mhsa_out", "ffn_in", "ffn_out")),
        parallel=parts[0].parallel,
        protocol=protocol,
    )


def component_states(
    model: torch.nn.Module, tok, prompts: Sequence[str], *, batch_size: int = 16, progress: bool = False
) -> ComponentStates:
    """Residual-protocol states around MHSA and FFN at each prompt's last token, all layers.

    h^{l-1} -> h^{l-1} + a^l and the FFN's analogue (:mod:`pmetlab.analysis`); the paper protocol's
    states come from :func:`component_io_states`. Holds ``4 · n_prompts · n_layers · d_model``
    floats; for large prompt sets use :func:`component_similarity_values`.

    Returns:
        :class:`ComponentStates` (``protocol="residual"``), tensors ``(n_prompts, n_layers, d_model)``.
    """
    return _collect_states(model, tok, prompts, "residual", batch_size, progress)


def component_io_states(
    model: torch.nn.Module, tok, prompts: Sequence[str], *, batch_size: int = 16, progress: bool = False
) -> ComponentStates:
    """Paper-protocol states (method.md §5): what each component reads and what it computes.

    ``mhsa_in``/``ffn_in`` are the first inputs of the adapter's ``attn_input_name`` /
    ``ffn_input_name`` modules (the normed inputs), ``mhsa_out``/``ffn_out`` the outputs of the
    attention and FFN modules (a^l, m^l; Gemma 2/3: before their post-norms), at each prompt's
    last token.

    Returns:
        :class:`ComponentStates` (``protocol="paper"``), tensors ``(n_prompts, n_layers, d_model)``.
    """
    return _collect_states(model, tok, prompts, "paper", batch_size, progress)
