"""Writes through the FFN's post-norm (Gemma 2/3; ``hparams.post_norm_write``).

On a post-norm block the FFN output m^l reaches the residual stream as N_l(m^l). A residual meant
for the stream is therefore written as the pre-image R̃ = m* − m of layer l's norm
(:func:`~pmetlab.models.postnorm.post_norm_preimage`), not as a change of m^l itself.

What the residual r at layer l is meant for (docs/method_notes.md, "Writes through a post-norm"):
MEMIT: the spread h-space residual (V − h^L) / (n − i)^p, a change of h that on these blocks is a change
of N_l's output. PMET: its residual V − M lives before layer L's norm, so its meaning for the stream is
N_L(V) − N_L(M) (M: the current FFN output at L); that is spread the same way and written through
layer l's norm, at l = L too (there it writes V's direction at M's size, which N_L cannot tell apart).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ..models.adapters import ModelAdapter
from ..models.postnorm import PreImage, post_norm, post_norm_preimage
from .solve import spread_residual

logger = logging.getLogger(__name__)

__all__ = ["resolve_post_norm_write", "post_norm_modules", "through_post_norm", "post_norm_diag"]


def resolve_post_norm_write(setting: str, adapter: ModelAdapter) -> bool:
    """Whether this model's writes go through its FFN post-norm: "auto" and "on" where the adapter
    names one (Gemma 2/3), never with "off" or on a family without one (logged)."""
    has = adapter.spec.ffn_post_norm is not None
    on = has and setting != "off"
    if setting == "on" and not has:
        logger.info(
            "post_norm_write='on': the %s family has no FFN post-norm, nothing to write through", adapter.spec.family
        )
    logger.info("post_norm_write=%r resolves to %s on %s", setting, "on" if on else "off", type(adapter.model).__name__)
    return on


def post_norm_modules(adapter: ModelAdapter, space: str, layers: tuple[int, int], out_mod: str) -> list[str]:
    """The outputs a solve at layer l reads for :func:`through_post_norm`, each once: the residual's
    own ``out_mod``, the FFN output at l and, for an FFN-space residual, at L (``layers`` = (l, L))."""
    l, L = layers
    names = [out_mod, adapter.ffn_out_name(l)] + ([adapter.ffn_out_name(L)] if space == "ffn" else [])
    return list(dict.fromkeys(names))


def through_post_norm(
    adapter: ModelAdapter,
    space: str,
    layers: tuple[int, int],
    target: torch.Tensor,
    cur: Mapping[str, torch.Tensor],
    spread: tuple[int, int, float],
    how: str = "ray",
) -> PreImage:
    """The residual of the solve at layer l, written through N_l (rows: requests).

    Args:
        space: "layer" (target V in h^L) or "ffn" (target V in m^L, before N_L); ``layers``: (l, L).
        target: (N, d_model) V; ``cur``: the current outputs by module name at the key positions,
            holding those of :func:`post_norm_modules` and, for "layer", layer L's output.
        spread: (i, n, p): the i-th of n critical layers takes r / (n - i)^p (:func:`.solve.spread_residual`).
        how: the pre-image's aim, "ray" or "nearest" (:func:`~pmetlab.models.postnorm.post_norm_preimage`).
    """
    l, L = layers
    i, n, p = spread
    if space == "ffn":
        norm_L, M = adapter.ffn_post_norm(L), cur[adapter.ffn_out_name(L)].to(torch.float64)
        r = spread_residual(post_norm(norm_L, target.to(M.device, torch.float64)) - post_norm(norm_L, M), i, n, p)
    else:
        r = spread_residual(
            target.to(torch.float64) - cur[adapter.layer_name(L)].to(target.device, torch.float64), i, n, p
        )
    m = cur[adapter.ffn_out_name(l)]
    pre = post_norm_preimage(adapter.ffn_post_norm(l), m, r.to(m.device), how)
    pre.residual = pre.residual.to(target.dtype)
    return pre


def post_norm_diag(pre: PreImage) -> dict[str, float]:
    """Layer-diagnostics entries of one layer's write: the undeliverable share ‖N_l(m*) − y*‖ / ‖r‖
    (mean and max over requests) and the norm of R̃."""
    u = pre.undeliverable
    return {
        "post_norm_undeliverable": float(u.mean()),
        "post_norm_undeliverable_max": float(u.max()),
        "post_norm_residual_norm": float(pre.residual.norm()),
    }
