"""Steps 2–3: keys, residual, spread and the float64 least-squares update (method.md §2).

ΔW_l = R_l Kᵀ (K Kᵀ + λ C_l)^{-1}, with K (d_in × N) the keys, R_l (d_out × N) the spread
residual and C_l the key second moment. Solved in float64 through a Cholesky factorisation
(a symmetric positive-definite system), never through an explicit inverse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..devices import model_device
from ..models.adapters import ModelAdapter
from ..requests import EditRequest
from ..tokens import encode_batch, subject_last_index
from ..tracing import TraceDict, hidden_of

logger = logging.getLogger(__name__)

__all__ = ["SolveResult", "solve_update", "spread_residual", "keys_and_outputs"]


@dataclass
class SolveResult:
    """ΔW (d_out, d_in) and diagnostics of one least-squares solve."""

    delta: torch.Tensor
    condition_number: float
    residual_norm_before: float
    residual_norm_after: float
    update_norm: float


def spread_residual(resid: torch.Tensor, i: int, n: int, p: float) -> torch.Tensor:
    """R / (n - i)^p: the share of the residual the i-th of n critical layers takes on
    (p = 0.5: PMET's square-root spread; p = 1: MEMIT's even spread)."""
    if not 0 <= i < n:
        raise ValueError(f"layer position i={i} must be in 0..{n - 1}")
    return resid / float(n - i) ** p


def solve_update(
    keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float, diagnostics: bool = True
) -> SolveResult:
    """Solve ΔW = R Kᵀ (K Kᵀ + λ C)^{-1} in float64.

    Args:
        keys: (N, d_in) one key per request (rows).
        resid: (N, d_out) the (already spread) residual per request.
        cov: (d_in, d_in) the key second moment C.
        lam: λ (mom2_update_weight).

    Returns:
        :class:`SolveResult` with ``delta`` (d_out, d_in) in float64. It satisfies the normal
        equations ΔW (K Kᵀ + λ C) = R Kᵀ (K as columns).
    """
    if keys.ndim != 2 or resid.ndim != 2 or keys.shape[0] != resid.shape[0]:
        raise ValueError(
            f"keys (N, d_in) and resid (N, d_out) must share N; got {tuple(keys.shape)}, {tuple(resid.shape)}"
        )
    if cov.shape != (keys.shape[1], keys.shape[1]):
        raise ValueError(f"cov must be ({keys.shape[1]}, {keys.shape[1]}), got {tuple(cov.shape)}")
    K = keys.to(torch.float64)
    R = resid.to(K.device, torch.float64)
    A = K.T @ K + lam * cov.to(K.device, torch.float64)
    A = 0.5 * (A + A.T)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        X = torch.cholesky_solve(K.T, L)  # (d_in, N) = A^{-1} Kᵀ
    else:  # not positive definite (e.g. a degenerate covariance): general solver
        logger.warning("K Kᵀ + λC is not positive definite; falling back to a general solve")
        X = torch.linalg.solve(A, K.T)
    delta = R.T @ X.T  # (d_out, d_in)
    cond = float("nan")
    if diagnostics:
        ev = torch.linalg.eigvalsh(A)
        cond = float(ev[-1] / ev[0]) if float(ev[0]) > 0 else float("inf")
    achieved = K @ delta.T  # (N, d_out): what the update adds at the keys
    return SolveResult(
        delta=delta,
        condition_number=cond,
        residual_norm_before=float(R.norm()),
        residual_norm_after=float((R - achieved).norm()),
        update_norm=float(delta.norm()),
    )


@torch.no_grad()
def keys_and_outputs(
    model,
    tok,
    adapter: ModelAdapter,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    key_modules: Sequence[str],
    out_modules: Sequence[str],
    batch_size: int = 64,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs of ``key_modules`` averaged over the context templates, and outputs of
    ``out_modules`` on the bare prompt, all at the subject's last token; (N, d) each.

    Key averaging follows the released code: mean within each template group, then across the
    groups (the bare prompt weighs 1/2, the mean of the prefixed prompts 1/2).
    """
    dev = model_device(model)
    texts, looks, req, is_bare = [], [], [], []
    for i, r in enumerate(requests):
        for j, ctx in enumerate(templates):
            template = ctx.format(r.prompt)
            texts.append(template.format(r.subject))
            looks.append(subject_last_index(tok, template, r.subject))
            req.append(i)
            is_bare.append(j == 0)
    names = list(dict.fromkeys(list(key_modules) + list(out_modules)))
    ins = {n: [] for n in key_modules}
    outs = {n: [] for n in out_modules}
    for b in range(0, len(texts), batch_size):
        # right padding: the lookup indices of the unpadded texts stay valid
        enc = encode_batch(tok, texts[b : b + batch_size], dev, side="right")
        look = torch.tensor(looks[b : b + batch_size], device=dev)
        ar = torch.arange(len(look), device=dev)
        with TraceDict(model, names, retain_input=bool(key_modules), retain_output=True, stop=True) as td:
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
        B = len(look)
        # each module's rows stay on that module's device (layers may live on different devices)
        for n in key_modules:
            x = adapter.unflatten(td[n].input, B)
            ins[n].append(x[ar.to(x.device), look.to(x.device)].float())
        for n in out_modules:
            x = adapter.unflatten(hidden_of(td[n].output), B)
            outs[n].append(x[ar.to(x.device), look.to(x.device)].float())
    N = len(requests)
    n_pref = max(len(templates) - 1, 0)
    keys = {}
    for n, parts in ins.items():
        x = torch.cat(parts)
        req_t = torch.tensor(req, device=x.device)
        bare_t = torch.tensor(is_bare, device=x.device)
        bare = torch.zeros(N, x.shape[1], device=x.device).index_add(0, req_t[bare_t], x[bare_t])
        if n_pref:
            pref = torch.zeros(N, x.shape[1], device=x.device).index_add(0, req_t[~bare_t], x[~bare_t]) / n_pref
            keys[n] = 0.5 * bare + 0.5 * pref
        else:
            keys[n] = bare
    bare_out = {}
    for n, parts in outs.items():
        x = torch.cat(parts)
        bare_out[n] = x[torch.tensor(is_bare, device=x.device)]
    return keys, bare_out
