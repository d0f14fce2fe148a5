"""Step 1: optimise the target hidden states at the last critical layer L (method.md §2).

PMET adds δ^a to the MHSA output a^L and δ^m to the FFN output m^L; MEMIT adds one δ to the
layer output h^L. Both minimise the same loss (NLL of the new target after each context
template + KL on "{subject} is a" + a norm decay), with the same norm-ball projection and
early stopping. Many requests are optimised in one batch, each with its own δ rows.

Fast path (default): the layers below L do not depend on δ, so their output is computed once
and those layers are replaced by pass-through modules during the optimisation; the vocabulary
projection is applied only at the positions the loss reads. ``reference=True`` runs the
faithful full-recompute version (whole model each step, full logits) used to test the fast path.
"""
from __future__ import annotations

import logging
import time
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import model_device
from ..hparams import EditHyperParams, PMETHyperParams
from ..models.adapters import ModelAdapter, get_adapter
from ..requests import EditRequest
from ..tokens import encode_prompt_targets, subject_last_index, tokenizer_identity
from ..tracing import Trace, TraceDict, get_module, hidden_of, replace_hidden

logger = logging.getLogger(__name__)

__all__ = ["TargetResult", "optimize_targets", "optimize_targets_chunked", "optimize_targets_cached", "build_rows",
           "plan_chunks", "Rows", "CHUNK_SIZE", "CHUNK_TOKENS"]

KL_TEMPLATE = "{} is a"
# Requests optimised together. Memory grows with the positions recomputed per step (about
# 1 MB each on SmolLM2-135M, activations kept for the backward pass, plus the logits where
# the loss reads them): a chunk holds at most CHUNK_SIZE requests and CHUNK_TOKENS positions,
# which keeps a 100-edit run under 2 GB on the CPU; larger chunks are only slightly faster.
CHUNK_SIZE = 8
CHUNK_TOKENS = 256


@dataclass
class Rows:
    """All prompts of a set of requests, right-padded, with what the loss reads.

    ``req[r]``: request of row r; ``lookup[r]``: subject's last token; ``kind[r]``: 0 = bare
    rewrite prompt, 1 = prefixed rewrite prompt, 2 = KL prompt. Targets are flattened:
    ``t_row``/``t_pos``/``t_tok``: row, position whose logits predict the token, token id.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    req: torch.Tensor
    lookup: torch.Tensor
    kind: torch.Tensor
    t_row: torch.Tensor
    t_pos: torch.Tensor
    t_tok: torch.Tensor
    n_requests: int

    def subset(self, rows: torch.Tensor) -> "Rows":
        """Rows ``rows`` (sorted indices), with target entries remapped."""
        remap = torch.full((len(self.req),), -1, dtype=torch.long)
        remap[rows] = torch.arange(len(rows))
        keep = remap[self.t_row] >= 0
        T = int(self.attention_mask[rows].sum(1).max())
        return Rows(self.input_ids[rows, :T], self.attention_mask[rows, :T], self.req[rows], self.lookup[rows],
                    self.kind[rows], remap[self.t_row[keep]], self.t_pos[keep], self.t_tok[keep], self.n_requests)


def build_rows(tok, requests: Sequence[EditRequest], templates: Sequence[str]) -> Rows:
    """Token-level assembly: prompt ids + target ids[:-1] (teacher forcing), one row per
    (request, template), then one KL row per request.

    Prompt and target ids come from :func:`pmetlab.tokens.encode_prompt_targets`, so each row is
    the joined text's encoding ``ids(prompt + " " + target)`` without its last token.
    """
    prompts = [ctx.format(r.prompt).format(r.subject) for r in requests for ctx in templates]
    encoded = iter(encode_prompt_targets(tok, prompts, [r.target_new for r in requests for _ in templates]))
    seqs: list[list[int]] = []
    req, lookup, kind, t_row, t_pos, t_tok = [], [], [], [], [], []
    for i, r in enumerate(requests):
        for j, ctx in enumerate(templates):
            template = ctx.format(r.prompt)
            ids, tgt = next(encoded)
            look = subject_last_index(tok, template, r.subject)
            if look >= len(ids):
                raise ValueError(f"the subject {r.subject!r} of {template!r} merges with the target "
                                 f"{r.target_new!r} when joined; end the prompt with text after the subject")
            row = len(seqs)
            seqs.append(ids + tgt[:-1])
            req.append(i), lookup.append(look), kind.append(0 if j == 0 else 1)
            for k, t in enumerate(tgt):
                t_row.append(row), t_pos.append(len(ids) - 1 + k), t_tok.append(t)
        # the KL logits are read at the subject's last token: later tokens cannot change them
        look = subject_last_index(tok, KL_TEMPLATE, r.subject)
        seqs.append(list(tok(KL_TEMPLATE.format(r.subject))["input_ids"])[: look + 1])
        req.append(i), lookup.append(look), kind.append(2)
    T = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    L = torch.tensor
    return Rows(input_ids, mask, L(req), L(lookup), L(kind), L(t_row), L(t_pos), L(t_tok), len(requests))


@dataclass
class TargetResult:
    """Optimised targets at layer L for N requests.

    ``values[k]`` = ``inits[k] + deltas[k]``, each (N, d_model), for k in the optimised spaces:
    "ffn" (v^m) and "attn" (v^a) for PMET, "layer" (v) for MEMIT. ``trace`` holds one dict per
    (request, step): loss terms, p(target), the NLL weight
    used at that step and whether o* was the arg-max at every target position ("argmax").
    """

    layer: int
    values: dict[str, torch.Tensor]
    inits: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]
    n_steps: list[int]
    trace: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _PassThrough(nn.Module):
    """Stands in for a decoder layer below L: returns its input hidden state unchanged."""

    def __init__(self, original: nn.Module, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        for attr in ("attention_type", "layer_idx", "is_sliding", "sliding_window"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


@contextmanager
def _replay_from_layer(adapter: ModelAdapter, L: int, h_in: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Run only layers >= L: layers < L become pass-throughs and layer L's input is ``h_in``
    (B, T, d). Restores the original layers on exit, also on exceptions."""
    layers = adapter.layers()
    originals = [layers[i] for i in range(L)]

    def pre_hook(mod, args, kwargs):
        if args:
            return (h_in,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = h_in
        return args, kwargs

    handle = layers[L].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(L):
            layers[i] = _PassThrough(originals[i], as_tuple)
        yield
    finally:
        for i in range(L):
            layers[i] = originals[i]
        handle.remove()


def _spaces(hp: EditHyperParams) -> list[str]:
    return list(hp.optimized_spaces)


def stop_decision(hp: EditHyperParams, loss: float, kl: float, n_wrong: float) -> tuple[bool, float]:
    """Early stopping of one request after a step (method.md §2): ``(stop, next NLL weight)``.

    Both rules stop when the total loss < ``loss_stop``. MEMIT's released rule ("loss") does
    nothing else. PMET's ("pmet"): once o* is the arg-max at every target position of every
    prompt (``n_wrong == 0``), stop if the kl_factor-weighted KL term <= ``kl_stop``, else scale
    the NLL by ``argmax_nll_scale`` for the next step; otherwise the NLL weight is back to 1.
    """
    if loss < hp.loss_stop:
        return True, 1.0
    if hp.stop_rule == "loss" or n_wrong > 0:
        return False, 1.0
    if kl <= hp.kl_stop:
        return True, 1.0
    return False, hp.argmax_nll_scale


def _module_for(adapter: ModelAdapter, space: str, L: int) -> str:
    return {"ffn": adapter.ffn_out_name(L), "attn": adapter.attn_out_name(L), "layer": adapter.layer_name(L)}[space]


@torch.no_grad()
def _initial_pass(model, adapter: ModelAdapter, rows: Rows, L: int, dev) -> tuple[torch.Tensor, dict, bool]:
    """Input of layer L for every row, and a^L, m^L, h^L at each row's lookup token."""
    names = [adapter.layer_name(L), adapter.attn_out_name(L), adapter.ffn_out_name(L)]
    with TraceDict(model, names, retain_input=True, retain_output=True, stop=True) as td:
        model(input_ids=rows.input_ids.to(dev), attention_mask=rows.attention_mask.to(dev), use_cache=False)
    B = len(rows.req)
    out = {}
    for k, n in zip(("layer", "attn", "ffn"), names):
        x = adapter.unflatten(hidden_of(td[n].output), B)  # on layer L's device
        out[k] = x[torch.arange(B, device=x.device), rows.lookup.to(x.device)].detach()
    as_tuple = isinstance(td[names[0]].output, tuple)
    return td[names[0]].input.detach(), out, as_tuple


def _kv_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a transformers cache (v5 ``layers`` or the older lists)."""
    if hasattr(cache, "layers"):
        return [(ly.keys, ly.values) for ly in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _cache_kwarg(model) -> str:
    import inspect
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class _Group:
    """Rows run in one forward. Row r recomputes only its positions >= ``splits[r]``: in
    "prefix" mode the split is the subject's last token (causal attention: earlier positions
    never see δ), and their keys/values (``kv``, right-padded to the longest split, masked
    by ``prefix_mask``) are computed once and reused every step."""

    rows: torch.Tensor
    splits: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
    prefix_mask: torch.Tensor | None = None


class _Stepper:
    """One forward of the optimisation for a set of rows; three exact strategies:
    "reference" (whole model, full logits), "replay" (layers >= L only, logits where read),
    "prefix" (replay of positions after each row's subject only, earlier keys/values cached).

    ``overhead_tokens`` is the fixed cost of one extra forward in token-equivalents (each
    matrix multiply reads all its weights, so on a CPU a forward of few tokens is not cheap):
    rows are grouped by the number of positions they recompute, and adjacent groups merge
    while one forward of the union costs less than two."""

    def __init__(self, model, adapter: ModelAdapter, rows: Rows, L: int, h_in: torch.Tensor, as_tuple: bool,
                 names: dict[str, str], mode: str, dev, overhead_tokens: int = 32) -> None:
        self.model, self.adapter, self.rows, self.L, self.h_in = model, adapter, rows, L, h_in
        self.as_tuple, self.names, self.mode, self.dev = as_tuple, names, mode, dev
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
        below L are replayed from ``h_in``; the forward stops at the final norm). Entries of
        layers < L are None (those layers are pass-throughs)."""
        from transformers import DynamicCache
        S = int(splits.max())
        mask = (torch.arange(S)[None] < splits[:, None]).long()
        cache = DynamicCache(config=self.model.config)
        kwargs = {_cache_kwarg(self.model): cache}
        with _replay_from_layer(self.adapter, self.L, self.h_in[idx.to(self.dev), :S], self.as_tuple), \
                Trace(self.model, self.adapter.final_norm_name, retain_output=False, stop=True):
            self.model(input_ids=self.rows.input_ids[idx, :S].to(self.dev), attention_mask=mask.to(self.dev),
                       use_cache=True, **kwargs)
        kv = [None if li < self.L else (k.detach(), v.detach()) for li, (k, v) in enumerate(_kv_of(cache))]
        return mask, kv

    def _cache_for(self, g: _Group, sel: torch.Tensor):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        ref = next(kv[0] for kv in g.kv if kv is not None)
        for li, kv in enumerate(g.kv):
            if kv is None:  # a pass-through layer: only the cached length is read (masks, positions)
                z = ref.new_zeros(len(sel), 1, ref.shape[-2], 1)
                cache.update(z, z, li)
            else:
                cache.update(kv[0][sel], kv[1][sel], li)
        return cache

    def run(self, deltas: dict[str, torch.Tensor], active_rows: torch.Tensor):
        """Returns, over the active rows: target entry indices (into rows.t_*), their logits,
        the KL rows (global indices) and their logits at the subject's last token."""
        rows, dev = self.rows, self.dev
        t_idx_all, t_logits_all, k_rows_all, k_logits_all = [], [], [], []
        for g in self.groups:
            sel = torch.isin(g.rows, active_rows).nonzero().squeeze(1)
            if len(sel) == 0:
                continue
            r_glob = g.rows[sel]
            split = g.splits[sel]
            B = len(r_glob)
            Tq = int((self.length[r_glob] - split).max())
            pos = split[:, None] + torch.arange(Tq)[None]                    # (B, Tq) absolute positions
            valid = pos < self.length[r_glob][:, None]
            pos_c = pos.clamp(max=rows.input_ids.shape[1] - 1)
            ids = torch.where(valid, rows.input_ids[r_glob[:, None], pos_c], self.pad).to(dev)
            look = rows.lookup[r_glob] - split
            req = rows.req[r_glob]
            t_sel = torch.isin(rows.t_row, r_glob).nonzero().squeeze(1)      # target entries of these rows
            local = torch.full((len(rows.req),), -1, dtype=torch.long)
            local[r_glob] = torch.arange(B)
            t_r = local[rows.t_row[t_sel]]
            t_p = rows.t_pos[t_sel] - split[t_r]
            kl_local = (rows.kind[r_glob] == 2).nonzero().squeeze(1)

            def add_delta(output, name):
                h = hidden_of(output)
                h3 = self.adapter.unflatten(h, B)  # OPT's FFN works on (batch·seq, d)
                at = (torch.arange(B, device=h.device), look.to(h.device))
                for sp, n in self.names.items():
                    if n == name:
                        d = deltas[sp][req.to(deltas[sp].device)].to(h.device, h.dtype)
                        h3 = h3.index_put(at, d, accumulate=True)
                return replace_hidden(output, h3.reshape(h.shape))

            kwargs: dict = {"attention_mask": valid.long().to(dev), "use_cache": False}
            if g.kv is not None:
                kwargs[_cache_kwarg(self.model)] = self._cache_for(g, sel)
                kwargs["attention_mask"] = torch.cat([g.prefix_mask[sel], valid.long()], 1).to(dev)
                kwargs["use_cache"] = True
                kwargs["position_ids"] = pos.to(dev)
            with ExitStack() as stack:
                if self.mode != "reference":
                    h_in = self.h_in[r_glob[:, None].to(self.h_in.device), pos_c.to(self.h_in.device)]
                    stack.enter_context(_replay_from_layer(self.adapter, self.L, h_in, self.as_tuple))
                stack.enter_context(TraceDict(self.model, list(self.names.values()), retain_output=False,
                                              edit_output=add_delta))
                if self.mode == "reference":
                    logits = self.model(input_ids=ids, **kwargs).logits
                    ld = logits.device
                    t_logits = logits[t_r.to(ld), t_p.to(ld)]
                    k_logits = logits[kl_local.to(ld), look[kl_local].to(ld)]
                else:
                    with Trace(self.model, self.adapter.final_norm_name, retain_output=True, stop=True) as tr:
                        self.model(input_ids=ids, **kwargs)  # stops right after the final norm
                    hn = hidden_of(tr.output)
                    hd = hn.device
                    lg = self.adapter.logits_from_normed(torch.cat([hn[t_r.to(hd), t_p.to(hd)],
                                                                    hn[kl_local.to(hd), look[kl_local].to(hd)]]))
                    t_logits, k_logits = lg[: len(t_r)], lg[len(t_r):]
            t_idx_all.append(t_sel)
            t_logits_all.append(t_logits)
            k_rows_all.append(r_glob[kl_local])
            k_logits_all.append(k_logits)
        return (torch.cat(t_idx_all), torch.cat(t_logits_all), torch.cat(k_rows_all), torch.cat(k_logits_all))


def optimize_targets(model, tok, requests: Sequence[EditRequest], hp: EditHyperParams, templates: Sequence[str],
                     *, reference: bool = False, strategy: str = "auto", progress: bool = True) -> TargetResult:
    """Optimise the targets of ``requests`` at layer L = hp.layers[-1] (method.md §2 step 1).

    Args:
        templates: context templates (``"{}"`` first), from :func:`context_templates`.
        reference: full recompute of every layer and full logits each step (slow; for tests
            and benchmarks). Results agree with the fast path up to float rounding.
        strategy: "auto" (= "prefix" when the model's cache reproduces the uncached logits,
            else "replay"), "prefix" or "replay"; ignored when ``reference``.

    Returns:
        :class:`TargetResult` with (N, d_model) values, inits and deltas per optimised space.
    """
    if strategy not in ("auto", "prefix", "replay"):
        raise ValueError(f"strategy must be 'auto', 'prefix' or 'replay', got {strategy!r}")
    adapter = get_adapter(model)
    L = hp.layers[-1]
    adapter.layer_name(L)
    dev = model_device(model)
    t0 = time.perf_counter()
    rows = build_rows(tok, requests, templates)
    N = len(requests)
    spaces = _spaces(hp)
    h_in, init_all, as_tuple = _initial_pass(model, adapter, rows, L, dev)
    bare = (rows.kind == 0).nonzero().squeeze(1)  # one bare row per request, in request order
    inits = {k: init_all[k][bare.to(init_all[k].device)].clone() for k in ("layer", "attn", "ffn")}
    pdtype = torch.float32
    # δ lives on layer L's device; the loss is computed where the logits are (devices may differ
    # when the model is spread with device_map)
    pdev = inits[spaces[0]].device
    ldev = adapter.unembed_weight.device
    deltas = {s: torch.zeros(N, inits[s].shape[1], device=pdev, dtype=pdtype, requires_grad=True) for s in spaces}
    names = {s: _module_for(adapter, s, L) for s in spaces}
    mode = "reference" if reference else ("replay" if strategy == "replay" else "prefix")
    if mode == "prefix" and strategy == "auto" and not _prefix_ok(model, adapter, rows, L, h_in, as_tuple, names,
                                                                   deltas, dev):
        mode = "replay"
    stepper = _Stepper(model, adapter, rows, L, h_in, as_tuple, names, mode, dev)
    opt = torch.optim.Adam(list(deltas.values()), lr=hp.v_lr)
    init_norm = {s: inits[s].norm(dim=1).to(pdtype) for s in spaces}
    active = torch.ones(N, dtype=torch.bool)
    nll_weight = torch.ones(N, device=ldev)
    n_steps = [0] * N
    kl_init: torch.Tensor | None = None
    trace: list[dict] = []
    R_all = len(rows.req)
    rw_all = (rows.kind != 2).to(ldev)
    req_all = rows.req.to(ldev)
    n_rw = torch.zeros(N, device=ldev).index_add(0, req_all, rw_all.float())
    bar = tqdm(range(hp.v_num_grad_steps), disable=not progress, desc=f"{hp.method} targets (N={N})")
    for it in bar:
        act_idx = active.nonzero().squeeze(1)
        with torch.enable_grad():
            act_rows = torch.isin(rows.req, act_idx).nonzero().squeeze(1)
            t_idx, t_logits, k_rows, k_logits = stepper.run(deltas, act_rows)
            t_row = rows.t_row[t_idx].to(ldev)
            t_tok = rows.t_tok[t_idx].to(ldev)
            t_logp = torch.log_softmax(t_logits.float(), -1)
            tok_lp = t_logp.gather(1, t_tok[:, None]).squeeze(1)
            argmax_ok = (t_logp.argmax(-1) == t_tok).float()
            # per-row mean NLL over target tokens, then mean over the request's rewrite rows
            row_nll = torch.zeros(R_all, device=ldev).index_add(0, t_row, -tok_lp)
            row_cnt = torch.zeros(R_all, device=ldev).index_add(0, t_row, torch.ones_like(tok_lp))
            row_ok = torch.zeros(R_all, device=ldev).index_add(0, t_row, argmax_ok)
            row_nll = torch.where(rw_all, row_nll / row_cnt.clamp(min=1), torch.zeros_like(row_nll))
            nll = torch.zeros(N, device=ldev).index_add(0, req_all, row_nll) / n_rw.clamp(min=1)
            p_target = torch.zeros(N, device=ldev).index_add(
                0, req_all, torch.where(rw_all & (row_cnt > 0), torch.exp(-row_nll), 0.0)) / n_rw.clamp(min=1)
            wrong = torch.zeros(N, device=ldev).index_add(0, req_all, torch.where(rw_all, row_cnt - row_ok, 0.0))
            k_logp = torch.log_softmax(k_logits.float(), -1)
            kl_req = rows.req[k_rows].to(ldev)
            if kl_init is None:
                kl_init = torch.zeros(N, k_logp.shape[1], device=ldev)
                kl_init[kl_req] = k_logp.detach()
            kl_each = (k_logp.exp() * (k_logp - kl_init[kl_req])).sum(-1)
            kl = torch.zeros(N, device=ldev).index_add(0, kl_req, kl_each) * hp.kl_factor
            wd = torch.zeros(N, device=ldev)
            for s in spaces:
                wd = wd + (hp.v_weight_decay * deltas[s].norm(dim=1) / init_norm[s] ** 2).to(ldev)
            loss_each = nll_weight * nll + kl + wd
            act_dev = active.clone().to(ldev)
            loss = loss_each[act_dev].sum()
            stats = torch.stack([loss_each, nll, kl, wd, p_target, wrong]).detach().cpu().tolist()
            new_weight = nll_weight.clone()
            stop_now = torch.zeros(N, dtype=torch.bool)
            for i in act_idx.tolist():
                l_i, nll_i, kl_i, wd_i, p_i, wrong_i = (col[i] for col in stats)
                trace.append({"request": i, "step": it, "loss": l_i, "nll": nll_i, "kl": kl_i, "decay": wd_i,
                              "p_target": p_i, "nll_weight": float(nll_weight[i]), "argmax": wrong_i == 0})
                n_steps[i] = it
                stop_now[i], new_weight[i] = stop_decision(hp, l_i, kl_i, wrong_i)
            if progress:
                a = act_idx.tolist()
                bar.set_postfix(loss=f"{sum(stats[0][i] for i in a) / len(a):.3f}",
                                p=f"{sum(stats[4][i] for i in a) / len(a):.3f}", active=len(a))
            active &= ~stop_now
            if not active.any() or it == hp.v_num_grad_steps - 1:
                break
            frozen = {s: deltas[s].detach()[~active.to(pdev)].clone() for s in spaces}
            params = list(deltas.values())
            # autograd.grad, not backward(): no .grad is left on model weights that require grad
            for p_, g_ in zip(params, torch.autograd.grad(loss, params)):
                p_.grad = g_
            opt.step()
        nll_weight = new_weight
        with torch.no_grad():
            inact = ~active.to(pdev)
            for s in spaces:
                d = deltas[s]
                d[inact] = frozen[s]
                max_norm = hp.clamp_norm_factor * init_norm[s]
                norm = d.norm(dim=1)
                scale = torch.where(norm > max_norm, max_norm / norm.clamp(min=1e-12), torch.ones_like(norm))
                d.mul_(scale[:, None])
                if not torch.isfinite(d).all():
                    raise FloatingPointError(f"non-finite δ in space {s!r} at step {it}; lower v_lr")
    bar.close()
    keep = list(hp.value_spaces)
    out_deltas = {s: deltas[s].detach().clone() if s in deltas else torch.zeros_like(inits[s]) for s in keep}
    values = {k: (inits[k] + out_deltas[k].to(inits[k].dtype)) for k in keep}
    return TargetResult(layer=L, values=values, inits={k: inits[k] for k in keep}, deltas=out_deltas,
                        n_steps=[s + 1 for s in n_steps], trace=trace, seconds=time.perf_counter() - t0)


_PREFIX_OK: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, bool]]" = weakref.WeakKeyDictionary()


def _prefix_ok(model, adapter, rows: Rows, L: int, h_in, as_tuple, names, deltas, dev) -> bool:
    """Whether the cached-prefix forward reproduces the replay forward for this model (checked
    once per model, attention implementation, dtype and layer, on the first request's rows)."""
    key = (getattr(model.config, "_attn_implementation", None), str(next(model.parameters()).dtype), L,
           tuple(sorted(names.items())))
    memo = _PREFIX_OK.setdefault(model, {})
    if key not in memo:
        first = (rows.req == 0).nonzero().squeeze(1)
        sub = rows.subset(first)
        sub_deltas = {s: d[:1] for s, d in deltas.items()}
        sub_h = h_in[first.to(h_in.device), : sub.input_ids.shape[1]]
        memo[key] = _prefix_matches(model, adapter, sub, L, sub_h, as_tuple, names, sub_deltas, dev)
        if not memo[key]:
            logger.info("cached-prefix optimisation does not reproduce the uncached logits for %s; using replay",
                        type(model).__name__)
    return memo[key]


@torch.no_grad()
def _prefix_matches(model, adapter, rows: Rows, L, h_in, as_tuple, names, deltas, dev, atol: float = 1e-3) -> bool:
    """Compare the cached-prefix forward with the replay forward once (δ = 0)."""
    try:
        all_rows = torch.arange(len(rows.req))
        a = _Stepper(model, adapter, rows, L, h_in, as_tuple, names, "prefix", dev).run(deltas, all_rows)
        b = _Stepper(model, adapter, rows, L, h_in, as_tuple, names, "replay", dev).run(deltas, all_rows)
    except Exception as exc:  # a model whose cache API differs: fall back to replay
        logger.info("cached-prefix forward failed (%s: %s)", type(exc).__name__, exc)
        return False
    oa, ob = torch.argsort(a[0]), torch.argsort(b[0])
    la = torch.log_softmax(a[1][oa].float(), -1)
    lb = torch.log_softmax(b[1][ob].float(), -1)
    ka = torch.log_softmax(a[3][torch.argsort(a[2])].float(), -1)
    kb = torch.log_softmax(b[3][torch.argsort(b[2])].float(), -1)
    return bool(torch.allclose(la, lb, atol=atol) and torch.allclose(ka, kb, atol=atol))


def plan_chunks(tok, requests: Sequence[EditRequest], templates: Sequence[str], *, chunk_size: int = CHUNK_SIZE,
                max_tokens: int = CHUNK_TOKENS) -> list[range]:
    """Consecutive chunks of at most ``chunk_size`` requests whose rows recompute at most
    ``max_tokens`` positions per step (a single longer request gets a chunk of its own)."""
    if chunk_size < 1 or max_tokens < 1:
        raise ValueError(f"chunk_size and max_tokens must be >= 1, got {chunk_size} and {max_tokens}")
    sizes = []
    for r in requests:
        rows = build_rows(tok, [r], templates)
        sizes.append(int((rows.attention_mask.sum(1) - rows.lookup).sum()))
    chunks, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and (i - start >= chunk_size or total + n > max_tokens):
            chunks.append(range(start, i))
            start, total = i, 0
        total += n
    if sizes:
        chunks.append(range(start, len(sizes)))
    return chunks


def optimize_targets_chunked(model, tok, requests: Sequence[EditRequest], hp: EditHyperParams,
                             templates: Sequence[str], *, chunk_size: int = CHUNK_SIZE, reference: bool = False,
                             progress: bool = True) -> TargetResult:
    """:func:`optimize_targets` over the chunks of :func:`plan_chunks` (requests do not
    interact, so this only bounds the memory of the backward pass; chunks run one after another)."""
    requests = list(requests)
    parts = [optimize_targets(model, tok, [requests[i] for i in c], hp, templates, reference=reference,
                              progress=progress) for c in plan_chunks(tok, requests, templates, chunk_size=chunk_size)]
    if len(parts) == 1:
        return parts[0]
    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + len(p.n_steps))
    cat = lambda key: {k: torch.cat([getattr(p, key)[k] for p in parts]) for k in getattr(parts[0], key)}
    trace = [{**row, "request": row["request"] + off} for p, off in zip(parts, offsets) for row in p.trace]
    return TargetResult(layer=parts[0].layer, values=cat("values"), inits=cat("inits"), deltas=cat("deltas"),
                        n_steps=[n for p in parts for n in p.n_steps], trace=trace,
                        seconds=sum(p.seconds for p in parts))


TARGET_CACHE_FORMAT = 2
_TARGET_FIELDS = ("v_lr", "v_num_grad_steps", "clamp_norm_factor", "kl_factor", "v_weight_decay", "optimize_attn",
                  "stop_rule", "loss_stop", "kl_stop", "argmax_nll_scale")


def optimize_targets_cached(model, tok, requests: Sequence[EditRequest], hp: EditHyperParams,
                            templates: Sequence[str], *, reference: bool = False, progress: bool = True,
                            use_cache: bool = True, chunk_size: int = CHUNK_SIZE) -> TargetResult:
    """:func:`optimize_targets` with a per-request disk cache.

    Each request's targets depend only on the model, the request, the templates and the
    target-optimisation fields of ``hp`` (requests in a batch do not interact), so sweeps over
    the number of edits, λ or the spread reuse them. Keys hold every such input plus a digest
    of the model weights; files are written atomically and checked on load. Cached values may
    differ from a fresh batch in the last float bits (batch padding changes the rounding).
    """
    if not use_cache:
        return optimize_targets_chunked(model, tok, requests, hp, templates, chunk_size=chunk_size,
                                        reference=reference, progress=progress)
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..cache import atomic_path, cache_dir, stable_hash, weights_fingerprint

    base = {"format": TARGET_CACHE_FORMAT, "method": hp.method, "layer": hp.layers[-1], "reference": reference,
            "weights": weights_fingerprint(model), "model_class": type(model).__name__, "tokenizer": tokenizer_identity(tok),
            "templates": list(templates), **{f: getattr(hp, f) for f in _TARGET_FIELDS}}
    folder = cache_dir("targets", type(model).__name__)
    keys = [{**base, "request": {k: v for k, v in r.to_dict().items() if k != "case_id"}} for r in requests]
    paths = [folder / f"{stable_hash(k)}.safetensors" for k in keys]
    found: dict[int, dict] = {}
    for i, (k, p) in enumerate(zip(keys, paths)):
        if not p.is_file():
            continue
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != stable_hash(k, 32):
                    raise ValueError("key mismatch")
                found[i] = {"tensors": {n: f.get_tensor(n) for n in f.keys()},
                            "n_steps": int(meta["n_steps"]), "trace": json.loads(meta["trace"])}
        except Exception as exc:  # a damaged file is recomputed
            logger.warning("ignoring target cache entry %s (%s)", p, exc)
    missing = [i for i in range(len(requests)) if i not in found]
    # chunk by chunk, each chunk's entries written as soon as it is done: an interrupted run
    # resumes after the last finished chunk
    for chunk in plan_chunks(tok, [requests[i] for i in missing], templates, chunk_size=chunk_size):
        part = [missing[j] for j in chunk]
        c0 = chunk.start
        fresh = optimize_targets(model, tok, [requests[i] for i in part], hp, templates, reference=reference,
                                 progress=progress)
        logger.info("targets of requests %d-%d of %d optimised in %.1fs", c0 + 1, c0 + len(part), len(missing),
                    fresh.seconds)
        for j, i in enumerate(part):
            tensors = {}
            for group, d in (("values", fresh.values), ("inits", fresh.inits), ("deltas", fresh.deltas)):
                for s, t in d.items():
                    tensors[f"{group}.{s}"] = t[j].detach().cpu().contiguous()
            trace = [{**row, "request": 0} for row in fresh.trace if row["request"] == j]
            entry = {"tensors": tensors, "n_steps": fresh.n_steps[j], "trace": trace}
            found[i] = entry
            with atomic_path(paths[i]) as tmp:
                save_file(tensors, str(tmp), metadata={"key": stable_hash(keys[i], 32), "n_steps": str(entry["n_steps"]),
                                                       "trace": json.dumps(trace)})
    dev = model_device(model)
    groups: dict[str, dict[str, torch.Tensor]] = {"values": {}, "inits": {}, "deltas": {}}
    for name in found[0]["tensors"]:
        group, s = name.split(".", 1)
        groups[group][s] = torch.stack([found[i]["tensors"][name] for i in range(len(requests))]).to(dev)
    trace = [{**row, "request": i} for i in range(len(requests)) for row in found[i]["trace"]]
    return TargetResult(layer=hp.layers[-1], values=groups["values"], inits=groups["inits"], deltas=groups["deltas"],
                        n_steps=[found[i]["n_steps"] for i in range(len(requests))], trace=trace)
