"""What the weight update can deliver of an optimised target (method.md §1, "δ^a"; issue #21).

The optimisation reaches a state with δ added to some hidden states at layer L; the update
writes only one vector into one space (PMET: the FFN output m^L; MEMIT: the layer output h^L).
On sequential blocks the FFN at L reads δ^a, so PMET's optimised state also holds the FFN's
response to δ^a, which the released target (m^L_init + δ^m) drops. This module measures that
gap per request, from the same forward the optimisation uses:

* :func:`observe_ffn`: the FFN output at L at the subject's last token of the bare prompt in the
  optimised pass, m^L(δ^a) + δ^m (the ``"observed"`` target);
* :func:`written_ffn_deltas`: what each ``ffn_target`` writes, as a δ on m^L_init;
* :func:`delivery`: p(o*) in the optimised state and with only a written target in place (no δ
  elsewhere), for every ``ffn_target``, and whether each δ ended on its norm bound.

p(o*) is the optimisation's own figure: per request, the mean over its rewrite prompts (bare and
prefixed) of exp(−mean token NLL of o*).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..hparams import FFN_TARGETS, EditHyperParams
from ..tracing import TraceDict, hidden_of, replace_hidden
from .loss import LossLayout, nll_term
from .rows import KIND_BARE
from .stepper import Stepper, StepSetup

__all__ = ["observe_ffn", "written_ffn_deltas", "delivery", "ON_BOUND_TOL"]

#: A δ counts as "on its bound" when its norm is within this relative distance of the radius.
ON_BOUND_TOL = 1e-4


@torch.no_grad()
def observe_ffn(setup: StepSetup, deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(N, d_model): the FFN output of layer L at each request's subject token on its bare
    prompt, with ``deltas`` added as in the optimisation (so it includes δ^m and, on sequential
    blocks, the FFN's response to δ^a)."""
    rows, ad, L = setup.rows, setup.adapter, setup.layer
    bare = rows.subset((rows.kind == KIND_BARE).nonzero().squeeze(1))
    B, ffn = len(bare.req), ad.ffn_out_name(L)

    def add_delta(output, name):
        h = hidden_of(output)
        h3 = ad.unflatten(h, B)
        at = (torch.arange(B, device=h.device), bare.lookup.to(h.device))
        for space, module in setup.names.items():
            if module == name:
                d = deltas[space][bare.req.to(deltas[space].device)].to(h.device, h.dtype)
                h3 = h3.index_put(at, d, accumulate=True)
        return replace_hidden(output, h3.reshape(h.shape))

    mods = list(dict.fromkeys([*setup.names.values(), ffn, ad.layer_name(L)]))
    with TraceDict(setup.model, mods, retain_output=True, edit_output=add_delta, stop=True) as td:
        setup.model(
            input_ids=bare.input_ids.to(setup.device),
            attention_mask=bare.attention_mask.to(setup.device),
            use_cache=False,
        )
    m = ad.unflatten(hidden_of(td[ffn].output), B)
    out = m[torch.arange(B, device=m.device), bare.lookup.to(m.device)].float()
    return out[torch.argsort(bare.req).to(out.device)]  # request order


def written_ffn_deltas(
    observed: torch.Tensor, init_ffn: torch.Tensor, deltas: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What each :data:`~pmetlab.hparams.FFN_TARGETS` entry writes into m^L, as a δ on m^L_init
    (N, d_model): released δ^m; observed m^L(δ^a) + δ^m − m^L_init; block observed + δ^a − m^L_init."""
    observed = observed.to(init_ffn.device, init_ffn.dtype)
    d_attn = deltas["attn"].detach().to(init_ffn.dtype) if "attn" in deltas else torch.zeros_like(init_ffn)
    return {
        "released": deltas["ffn"].detach().to(init_ffn.dtype),
        "observed": observed - init_ffn,
        "block": observed - init_ffn + d_attn.to(init_ffn.device),
    }


@torch.no_grad()
def _p_target(stepper: Stepper, deltas: Mapping[str, torch.Tensor], layout: LossLayout, ldev) -> torch.Tensor:
    rows = stepper.setup.rows
    out = stepper.run(deltas, torch.arange(len(rows.req)))
    t_row, t_tok = rows.t_row[out.t_idx].to(ldev), rows.t_tok[out.t_idx].to(ldev)
    return nll_term(out.t_logits, t_row, t_tok, layout).p_target.detach().cpu()


def delivery(
    stepper: Stepper,
    deltas: Mapping[str, torch.Tensor],
    inits: Mapping[str, torch.Tensor],
    radius: Mapping[str, torch.Tensor],
    p_optimised: torch.Tensor,
    hp: EditHyperParams,
    layout: LossLayout,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per request (each (N,), on the CPU): ``p_optimised``, ``p_written_<t>`` for every FFN target t
    (PMET; MEMIT writes its δ itself, so its written p is the optimised one), ``on_bound_<space>``
    (1.0 where ‖δ‖ reached its radius) and ``radius_<space>``; and the observed targets
    (``{"ffn": (N, d_model)}`` for FFN-space methods, else empty)."""
    out = {"p_optimised": p_optimised.detach().float().cpu()}
    for s, d in deltas.items():
        norm = d.detach().norm(dim=1).cpu()
        r = radius[s].detach().float().cpu()
        out[f"on_bound_{s}"] = (norm >= r * (1 - ON_BOUND_TOL)).float()
        out[f"radius_{s}"] = r
    if hp.residual_space != "ffn":
        return out, {}
    observed = observe_ffn(stepper.setup, deltas)
    ldev = layout.req.device
    zeros = {s: torch.zeros_like(d.detach()) for s, d in deltas.items()}
    for target, dw in written_ffn_deltas(observed, inits["ffn"], deltas).items():
        out[f"p_written_{target}"] = _p_target(stepper, {**zeros, "ffn": dw.to(deltas["ffn"].device)}, layout, ldev)
    assert set(FFN_TARGETS) == {k.removeprefix("p_written_") for k in out if k.startswith("p_written_")}
    return out, {"ffn": observed.to(inits["ffn"].device, inits["ffn"].dtype)}
