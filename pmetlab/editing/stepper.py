"""The forward pass of one optimisation step, in three exact strategies.

The loss of method.md §2 needs, each step, the logits at the target positions and at the KL
prompts' subject token, with δ added at each row's subject token in the hooked modules of
layer L. :class:`Stepper` computes them in one of three ways that give the same numbers up
to float rounding:

* ``"reference"``: the whole model on every row, full logits (the faithful definition);
* ``"replay"``: layers < L do not depend on δ, so their output (:func:`initial_pass`) is
  replayed through pass-through layers (:func:`pmetlab.forward.replay_from_layer`), and the
  vocabulary projection is applied only where the loss reads;
* ``"prefix"``: replay of the positions from each row's subject token on only; the keys and
  values of the earlier positions (which never see δ under causal attention) are computed
  once and handed to the model as a KV cache every step.

Whether a model's cache reproduces the uncached logits is checked once per call owner by
:class:`ForwardChecks` (sliding-window attention shorter than a prompt, for instance, does not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..forward import cache_from_layers, cache_kwarg, cache_layers, new_cache, replay_from_layer
from ..models.adapters import ModelAdapter
from ..tracing import Trace, TraceDict, hidden_of, replace_hidden
from .rows import KIND_KL, Rows

logger = logging.getLogger(__name__)

__all__ = ["StepSetup", "StepOutput", "Stepper", "ForwardChecks", "initial_pass", "prefix_reproduces", "MODES"]

MODES = ("reference", "replay", "prefix")


@dataclass(frozen=True)
class StepSetup:
    """What every forward of one optimisation needs.

    ``h_in``: (R, T, d_model), the input of layer L for every row (from :func:`initial_pass`);
    ``names``: the hooked module of each optimised space ("ffn", "attn", "layer");
    ``as_tuple``: whether decoder layers return tuples; ``device``: where the inputs go.
    """

    model: nn.Module
    adapter: ModelAdapter
    rows: Rows
    layer: int
    h_in: torch.Tensor
    as_tuple: bool
    names: Mapping[str, str]
    device: torch.device

    def first_request(self) -> StepSetup:
        """The same setup restricted to the rows of request 0."""
        first = (self.rows.req == 0).nonzero().squeeze(1)
        sub = self.rows.subset(first)
        return replace(self, rows=sub, h_in=self.h_in[first.to(self.h_in.device), : sub.input_ids.shape[1]])


@dataclass
class StepOutput:
    """Logits of one step over the active rows: ``t_idx`` (n_t,) indexes ``rows.t_*`` and
    ``t_logits`` (n_t, vocab) predicts those tokens; ``k_rows`` (n_k,) are the KL rows (global
    indices) and ``k_logits`` (n_k, vocab) their logits at the subject's last token."""

    t_idx: torch.Tensor
    t_logits: torch.Tensor
    k_rows: torch.Tensor
    k_logits: torch.Tensor


@torch.no_grad()
def initial_pass(
    model: nn.Module, adapter: ModelAdapter, rows: Rows, L: int, names: Mapping[str, str], device: torch.device
) -> tuple[StepSetup, dict[str, torch.Tensor]]:
    """One forward up to layer L on the unedited model.

    Returns the :class:`StepSetup` (with layer L's input for every row) and the hidden states
    h^L ("layer"), a^L ("attn") and m^L ("ffn") at each row's subject token, each (R, d_model).
    """
    mods = [adapter.layer_name(L), adapter.attn_out_name(L), adapter.ffn_out_name(L)]
    with TraceDict(model, mods, retain_input=True, retain_output=True, stop=True) as td:
        model(input_ids=rows.input_ids.to(device), attention_mask=rows.attention_mask.to(device), use_cache=False)
    B = len(rows.req)
    at_lookup = {}
    for k, n in zip(("layer", "attn", "ffn"), mods):
        x = adapter.unflatten(hidden_of(td[n].output), B)  # on layer L's device
        at_lookup[k] = x[torch.arange(B, device=x.device), rows.lookup.to(x.device)].detach()
    as_tuple = isinstance(td[mods[0]].output, tuple)
    setup = StepSetup(model, adapter, rows, L, td[mods[0]].input.detach(), as_tuple, dict(names), device)
    return setup, at_lookup


@dataclass
class _Group:
    """Rows run in one forward. Row r recomputes only its positions >= ``splits[r]``: in
    "prefix" mode the split is the subject's last token, and the keys/values of the earlier
    positions (``kv``, right-padded to the longest split, masked by ``prefix_mask``) are
    computed once and reused every step. ``kv[i]`` is None for pass-through layers."""

    rows: torch.Tensor
    splits: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
    prefix_mask: torch.Tensor | None = None


@dataclass
class _Batch:
    """The active rows of one group in batch coordinates (B rows, Tq recomputed positions):
    ``pos``/``pos_c``/``valid`` (B, Tq) absolute positions (clamped) and which are real;
    ``ids`` (B, Tq) on the model's device; ``look`` (B,) subject token relative to the split;
    ``t_sel`` (n_t,) target entries read here at (``t_r``, ``t_p``); ``kl_local`` KL rows."""

    sel: torch.Tensor
    rows: torch.Tensor
    pos: torch.Tensor
    pos_c: torch.Tensor
    valid: torch.Tensor
    ids: torch.Tensor
    look: torch.Tensor
    req: torch.Tensor
    t_sel: torch.Tensor
    t_r: torch.Tensor
    t_p: torch.Tensor
    kl_local: torch.Tensor


class Stepper:
    """One forward of the optimisation for a set of rows, in ``mode`` (one of :data:`MODES`).

    ``overhead_tokens`` is the fixed cost of one extra forward in token-equivalents (each
    matrix multiply reads all its weights, so on a CPU a forward of few tokens is not cheap):
    rows are grouped by the number of positions they recompute, and adjacent groups merge
    while one forward of the union costs less than two.
    """

    def __init__(self, setup: StepSetup, mode: str, overhead_tokens: int = 32) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        self.setup, self.mode = setup, mode
        rows = setup.rows
        self.length = rows.attention_mask.sum(1)
        self.pad = int(rows.input_ids[rows.attention_mask == 0][0]) if bool((rows.attention_mask == 0).any()) else 0
        n = len(rows.req)
        if mode == "prefix":
            self.groups = self._make_groups(rows.lookup.clone(), overhead_tokens)
        else:
            self.groups = [_Group(torch.arange(n), torch.zeros(n, dtype=torch.long))]

    def _make_groups(self, splits: torch.Tensor, overhead_tokens: int) -> list[_Group]:
        work = self.length - splits
        order = torch.argsort(work, stable=True).tolist()
        merged: list[list[int]] = []
        cost = lambda b: len(b) * max(int(work[r]) for r in b) + overhead_tokens
        for r in order:
            if merged and cost(merged[-1] + [r]) <= cost(merged[-1]) + cost([r]):
                merged[-1].append(r)
            else:
                merged.append([r])
        groups = []
        for b in merged:
            idx = torch.tensor(sorted(b))
            g = _Group(idx, splits[idx])
            if int(g.splits.max()) > 0:
                g.prefix_mask, g.kv = self._prefix_kv(idx, g.splits)
            groups.append(g)
        return groups

    @torch.no_grad()
    def _prefix_kv(self, idx: torch.Tensor, splits: torch.Tensor):
        """Keys/values of the positions before each row's split at layers >= L (the layers
        below L are replayed from ``h_in``; the forward stops at the final norm)."""
        s = self.setup
        S = int(splits.max())
        mask = (torch.arange(S)[None] < splits[:, None]).long()
        cache = new_cache(s.model)
        with (
            replay_from_layer(s.adapter, s.layer, s.h_in[idx.to(s.device), :S], s.as_tuple),
            Trace(s.model, s.adapter.final_norm_name, retain_output=False, stop=True),
        ):
            s.model(
                input_ids=s.rows.input_ids[idx, :S].to(s.device),
                attention_mask=mask.to(s.device),
                use_cache=True,
                **{cache_kwarg(s.model): cache},
            )
        kv = [None if li < s.layer else (k.detach(), v.detach()) for li, (k, v) in enumerate(cache_layers(cache))]
        return mask, kv

    def _cache_for(self, g: _Group, sel: torch.Tensor):
        """The group's cached prefix for its rows ``sel``. A pass-through layer gets a zero
        placeholder: only its cached length is read (masks, positions)."""
        ref = next(kv[0] for kv in g.kv if kv is not None)
        z = ref.new_zeros(len(sel), 1, ref.shape[-2], 1)
        return cache_from_layers(self.setup.model, [(z, z) if kv is None else (kv[0][sel], kv[1][sel]) for kv in g.kv])

    def _batch(self, g: _Group, active_rows: torch.Tensor) -> _Batch | None:
        rows = self.setup.rows
        sel = torch.isin(g.rows, active_rows).nonzero().squeeze(1)
        if len(sel) == 0:
            return None
        r_glob, split = g.rows[sel], g.splits[sel]
        B = len(r_glob)
        Tq = int((self.length[r_glob] - split).max())
        pos = split[:, None] + torch.arange(Tq)[None]
        valid = pos < self.length[r_glob][:, None]
        pos_c = pos.clamp(max=rows.input_ids.shape[1] - 1)
        ids = torch.where(valid, rows.input_ids[r_glob[:, None], pos_c], self.pad).to(self.setup.device)
        t_sel = torch.isin(rows.t_row, r_glob).nonzero().squeeze(1)
        local = torch.full((len(rows.req),), -1, dtype=torch.long)
        local[r_glob] = torch.arange(B)
        t_r = local[rows.t_row[t_sel]]
        return _Batch(
            sel,
            r_glob,
            pos,
            pos_c,
            valid,
            ids,
            rows.lookup[r_glob] - split,
            rows.req[r_glob],
            t_sel,
            t_r,
            rows.t_pos[t_sel] - split[t_r],
            (rows.kind[r_glob] == KIND_KL).nonzero().squeeze(1),
        )

    def _delta_adder(self, deltas: Mapping[str, torch.Tensor], b: _Batch) -> Callable:
        """The hook edit that adds each request's δ rows at its subject token (method.md §2)."""
        B = len(b.rows)

        def add_delta(output, name):
            h = hidden_of(output)
            h3 = self.setup.adapter.unflatten(h, B)  # OPT's FFN works on (batch·seq, d)
            at = (torch.arange(B, device=h.device), b.look.to(h.device))
            for sp, n in self.setup.names.items():
                if n == name:
                    d = deltas[sp][b.req.to(deltas[sp].device)].to(h.device, h.dtype)
                    h3 = h3.index_put(at, d, accumulate=True)
            return replace_hidden(output, h3.reshape(h.shape))

        return add_delta

    def _forward_kwargs(self, g: _Group, b: _Batch) -> dict:
        dev = self.setup.device
        kwargs: dict = {"attention_mask": b.valid.long().to(dev), "use_cache": False}
        if g.kv is not None:
            kwargs[cache_kwarg(self.setup.model)] = self._cache_for(g, b.sel)
            kwargs["attention_mask"] = torch.cat([g.prefix_mask[b.sel], b.valid.long()], 1).to(dev)
            kwargs["use_cache"] = True
            kwargs["position_ids"] = b.pos.to(dev)
        return kwargs

    def _forward(self, g: _Group, b: _Batch, deltas: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(target logits (n_t, vocab), KL logits (n_k, vocab)) of one forward of ``b``."""
        s = self.setup
        kwargs = self._forward_kwargs(g, b)
        with ExitStack() as stack:
            if self.mode != "reference":
                h_in = s.h_in[b.rows[:, None].to(s.h_in.device), b.pos_c.to(s.h_in.device)]
                stack.enter_context(replay_from_layer(s.adapter, s.layer, h_in, s.as_tuple))
            stack.enter_context(
                TraceDict(
                    s.model, list(s.names.values()), retain_output=False, edit_output=self._delta_adder(deltas, b)
                )
            )
            if self.mode == "reference":
                logits = s.model(input_ids=b.ids, **kwargs).logits
                ld = logits.device
                return (logits[b.t_r.to(ld), b.t_p.to(ld)], logits[b.kl_local.to(ld), b.look[b.kl_local].to(ld)])
            with Trace(s.model, s.adapter.final_norm_name, retain_output=True, stop=True) as tr:
                s.model(input_ids=b.ids, **kwargs)  # stops right after the final norm
            hn = hidden_of(tr.output)
            hd = hn.device
            lg = s.adapter.logits_from_normed(
                torch.cat([hn[b.t_r.to(hd), b.t_p.to(hd)], hn[b.kl_local.to(hd), b.look[b.kl_local].to(hd)]])
            )
            return lg[: len(b.t_r)], lg[len(b.t_r) :]

    def run(self, deltas: Mapping[str, torch.Tensor], active_rows: torch.Tensor) -> StepOutput:
        """The logits the loss reads, over the rows ``active_rows`` (global indices), with
        ``deltas[space]`` (N, d_model) added at each row's subject token."""
        parts = []
        for g in self.groups:
            b = self._batch(g, active_rows)
            if b is not None:
                t_logits, k_logits = self._forward(g, b, deltas)
                parts.append((b.t_sel, t_logits, b.rows[b.kl_local], k_logits))
        return StepOutput(*(torch.cat([p[i] for p in parts]) for i in range(4)))


@torch.no_grad()
def prefix_reproduces(setup: StepSetup, deltas: Mapping[str, torch.Tensor], atol: float = 1e-3) -> bool:
    """Whether the "prefix" forward gives the "replay" forward's log-probabilities (within
    ``atol``) for ``setup``'s rows at ``deltas``; False also when the prefix forward fails."""
    all_rows = torch.arange(len(setup.rows.req))
    try:
        a = Stepper(setup, "prefix").run(deltas, all_rows)
        b = Stepper(setup, "replay").run(deltas, all_rows)
    except Exception as exc:  # broad on purpose: any model whose cache API differs falls back to replay
        logger.info("cached-prefix forward failed (%s: %s)", type(exc).__name__, exc)
        return False
    la = torch.log_softmax(a.t_logits[torch.argsort(a.t_idx)].float(), -1)
    lb = torch.log_softmax(b.t_logits[torch.argsort(b.t_idx)].float(), -1)
    ka = torch.log_softmax(a.k_logits[torch.argsort(a.k_rows)].float(), -1)
    kb = torch.log_softmax(b.k_logits[torch.argsort(b.k_rows)].float(), -1)
    return bool(torch.allclose(la, lb, atol=atol) and torch.allclose(ka, kb, atol=atol))


class ForwardChecks:
    """Verdicts of the one-time check "does the cached prefix reproduce the uncached logits",
    owned by whoever runs a batch of optimisations (one per :func:`optimize_targets_cached` call,
    hence one per ``compute_deltas``), so nothing outlives the call that needed it.

    The verdict is a property of the model's implementation, so it is checked on the first
    request of the first chunk (δ = 0) and reused, keyed by the model object, its attention
    implementation and dtype, the layer and the hooked modules.
    """

    def __init__(self) -> None:
        self._verdicts: dict[tuple, bool] = {}

    def prefix_ok(self, setup: StepSetup, deltas: Mapping[str, torch.Tensor]) -> bool:
        m = setup.model
        key = (
            id(m),
            getattr(m.config, "_attn_implementation", None),
            str(next(m.parameters()).dtype),
            setup.layer,
            tuple(sorted(setup.names.items())),
        )
        if key not in self._verdicts:
            self._verdicts[key] = prefix_reproduces(setup.first_request(), {s: d[:1] for s, d in deltas.items()})
        return self._verdicts[key]
