"""The loss of the target optimisation and when to stop (method.md §2, "Loss" and "Early stops").

Per request: ``loss = w · NLL + KL + decay``. :func:`nll_term` is the mean over the request's
rewrite prompts of the mean per-token NLL of o*; :func:`kl_term` the kl_factor-weighted
KL(p_current || p_initial) at the subject's last token of "{subject} is a"; :func:`decay_term`
the released ‖δ‖ / ‖init‖² decay. After each Adam step :func:`project_to_ball` keeps each δ in
its norm ball, and :func:`stop_decision` applies ``hp.stop_rule``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..hparams import EditHyperParams
from .rows import KIND_KL, Rows

__all__ = [
    "LossLayout",
    "NLLTerm",
    "LossTerms",
    "nll_term",
    "kl_term",
    "decay_term",
    "project_to_ball",
    "stop_decision",
]


@dataclass(frozen=True)
class LossLayout:
    """Which rows feed which request's loss, on the logits' device: ``rewrite`` (R,) true for
    the rewrite rows (bare and prefixed prompts), ``req`` (R,) the request of each row,
    ``n_rewrite`` (N,) the number of rewrite rows of each request."""

    rewrite: torch.Tensor
    req: torch.Tensor
    n_rewrite: torch.Tensor

    @classmethod
    def of(cls, rows: Rows, device: torch.device) -> LossLayout:
        rewrite = (rows.kind != KIND_KL).to(device)
        req = rows.req.to(device)
        n_rewrite = torch.zeros(rows.n_requests, device=device).index_add(0, req, rewrite.float())
        return cls(rewrite, req, n_rewrite)


@dataclass
class NLLTerm:
    """Per request, (N,) each: ``nll`` the NLL term (differentiable); ``p_target`` the mean over
    rewrite prompts of exp(−mean token NLL); ``n_wrong`` target positions where o* is not the arg-max."""

    nll: torch.Tensor
    p_target: torch.Tensor
    n_wrong: torch.Tensor


def nll_term(t_logits: torch.Tensor, t_row: torch.Tensor, t_tok: torch.Tensor, layout: LossLayout) -> NLLTerm:
    """NLL of the new target o* (method.md §2): for each request, the mean over its rewrite
    prompts (bare + prefixed) of the mean per-token negative log-likelihood of o*.

    Args:
        t_logits: (n_t, vocab) logits at the positions that predict the target tokens.
        t_row: (n_t,) row of each target token; t_tok: (n_t,) its id (on the logits' device).
    """
    R = len(layout.req)
    N = len(layout.n_rewrite)
    t_logp = torch.log_softmax(t_logits.float(), -1)
    tok_lp = t_logp.gather(1, t_tok[:, None]).squeeze(1)
    argmax_ok = (t_logp.argmax(-1) == t_tok).float()
    row_nll = torch.zeros(R, device=tok_lp.device).index_add(0, t_row, -tok_lp)
    row_cnt = torch.zeros(R, device=tok_lp.device).index_add(0, t_row, torch.ones_like(tok_lp))
    row_ok = torch.zeros(R, device=tok_lp.device).index_add(0, t_row, argmax_ok)
    row_nll = torch.where(layout.rewrite, row_nll / row_cnt.clamp(min=1), torch.zeros_like(row_nll))
    per_request = lambda x: torch.zeros(N, device=tok_lp.device).index_add(0, layout.req, x)
    nll = per_request(row_nll) / layout.n_rewrite.clamp(min=1)
    p_target = per_request(
        torch.where(layout.rewrite & (row_cnt > 0), torch.exp(-row_nll), 0.0)
    ) / layout.n_rewrite.clamp(min=1)
    n_wrong = per_request(torch.where(layout.rewrite, row_cnt - row_ok, 0.0))
    return NLLTerm(nll, p_target, n_wrong)


def kl_term(k_logp: torch.Tensor, k_req: torch.Tensor, logp_init: torch.Tensor, kl_factor: float) -> torch.Tensor:
    """kl_factor · KL(p_current ‖ p_initial) of the next-token distribution at the subject's
    last token of "{subject} is a" (method.md §2): keeps the subject's general meaning.

    Args:
        k_logp: (n_k, vocab) current log-probabilities of the KL rows; k_req: (n_k,) their requests.
        logp_init: (N, vocab) log-probabilities at δ = 0 (the first step's ``k_logp``).

    Returns:
        (N,) the weighted KL term of each request.
    """
    kl_each = (k_logp.exp() * (k_logp - logp_init[k_req])).sum(-1)
    return torch.zeros(len(logp_init), device=k_logp.device).index_add(0, k_req, kl_each) * kl_factor


def decay_term(
    deltas: Mapping[str, torch.Tensor], init_norm: Mapping[str, torch.Tensor], weight: float, device: torch.device
) -> torch.Tensor:
    """v_weight_decay · Σ_spaces ‖δ‖ / ‖init‖² (method.md §2; a norm over a squared norm, exactly
    as the released code). ``deltas[s]`` (N, d_model), ``init_norm[s]`` (N,); returns (N,)."""
    decay = torch.zeros(len(next(iter(init_norm.values()))), device=device)
    for s, d in deltas.items():
        decay = decay + (weight * d.norm(dim=1) / init_norm[s] ** 2).to(device)
    return decay


@torch.no_grad()
def project_to_ball(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """In place: scale each row of ``delta`` (N, d) whose norm exceeds ``max_norm`` (N,) back
    onto that radius, clamp_norm_factor · ‖init‖ (method.md §2, after each step)."""
    norm = delta.norm(dim=1)
    scale = torch.where(norm > max_norm, max_norm / norm.clamp(min=1e-12), torch.ones_like(norm))
    delta.mul_(scale[:, None])


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


# --- the optimisation ------------------------------------------------------------------------------
@dataclass
class LossTerms:
    """The three terms of method.md §2 for each request, (N,) each (``nll`` with its diagnostics)."""

    nll: NLLTerm
    kl: torch.Tensor
    decay: torch.Tensor

    def total(self, nll_weight: torch.Tensor) -> torch.Tensor:
        """Per-request loss w · NLL + KL + decay, with the NLL weight w (N,) of :func:`stop_decision`."""
        return nll_weight * self.nll.nll + self.kl + self.decay
