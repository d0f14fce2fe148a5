"""Post-norms: the RMSNorm some families (Gemma 2/3) apply to the FFN output before it joins the
residual stream, read from the model exactly, and the pre-image of a residual meant for its output.

N(x) = g ⊙ x / rms_ε(x), rms_ε(x) = sqrt(mean(x²) + ε), g = offset + w (Gemma: 1 + w), computed in
float32 as Gemma's RMSNorm does. A change r of N's output is reached by writing m* − m into the FFN
output m, with m* = rms(m) · u / rms(u), u = (N(m) + r) ⊘ g (docs/method_notes.md, "Writes through a
post-norm (Gemma 2/3)"): N(m*) is N(m) + r up to one scalar per request, and what the scale cannot
reach is reported as ``undeliverable``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PostNorm", "PreImage", "PREIMAGES", "post_norm", "post_norm_preimage", "read_post_norm"]


@dataclass(frozen=True)
class PostNorm:
    """An RMSNorm on a component's output: ``weight`` (d,), gain g = ``offset`` + weight, ``eps``."""

    weight: torch.Tensor
    offset: float
    eps: float
    name: str = ""

    def gain(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """g = offset + w, (d,), in ``dtype`` (float32: exactly the factor the module multiplies by)."""
        return self.offset + self.weight.detach().to(dtype)


def post_norm(norm: PostNorm, x: torch.Tensor) -> torch.Tensor:
    """N(x) = g ⊙ x / sqrt(mean(x²) + ε) over the last dim, ``(..., d) -> (..., d)`` in x's dtype.

    Float32 and lower inputs are computed as the module does (in float32, cast back), so the result
    equals the module's output bit for bit; a float64 input is computed in float64 (same formula)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dt)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (out * norm.gain(dt).to(x.device)).to(x.dtype)


@dataclass
class PreImage:
    """The FFN-output residual that writes a post-norm residual (one row per request).

    ``residual`` (N, d): R̃ = m* − m; ``undeliverable`` (N,): ‖N(m*) − y*‖ / ‖r‖ (0 where r = 0);
    ``scale`` (N,): for "ray", c with N(m*) = c · y* (1 when y* is reached exactly)."""

    residual: torch.Tensor
    undeliverable: torch.Tensor
    scale: torch.Tensor


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


#: How the pre-image picks the output N can reach: "ray" (N(m*) on the ray through y*, the issue's
#: m* = rms(m)·u/rms(u)) or "nearest" (the reachable output nearest to y*).
PREIMAGES = ("ray", "nearest")


def _nearest_direction(g: torch.Tensor, y: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """v (N, d) minimising ‖g ⊙ v − y‖ subject to rms(v) = ρ (N, 1): v = g ⊙ y / (g² + μ) with μ
    (one per row, > −min g²) found by bisection so that rms(v) = ρ (rms(v) falls as μ grows)."""
    g2, gy = g.pow(2), g * y
    rms_at = lambda mu: _rms(gy / (g2 + mu))  # noqa: E731
    lo = torch.full_like(rho, -float(g2.min())) + 1e-12
    hi = (_rms(gy) / rho - float(g2.min())).clamp_min(0.0) + 1.0
    for _ in range(200):  # float64 bisection: the bracket halves to far below the tolerance
        mid = 0.5 * (lo + hi)
        big = rms_at(mid) > rho
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    return gy / (g2 + 0.5 * (lo + hi))


def post_norm_preimage(norm: PostNorm, m: torch.Tensor, r: torch.Tensor, how: str = "ray") -> PreImage:
    """The target of the FFN output m that moves N's output by r, up to scale (float64 inside).

    With y* = N(m) + r and u = y* ⊘ g, ``how="ray"``: m* = rms(m) · u / rms(u) keeps m's size (N reads
    only the direction of its input, up to ε) and points where N must point; then
    N(m*) = y* · c, c = rms(m) / (rms_ε(m) · rms(u)). ``how="nearest"``: m* = rms(m) · v / rms(v) with v
    the direction whose output g ⊙ v · ρ / rms(v), ρ = rms(m) / rms_ε(m), is nearest to y* (the same as
    the ray when g is constant; never farther). With r = 0, m* = m (exactly for "ray").

    Args:
        m: (N, d) the current FFN output (before the norm) at each request's key position.
        r: (N, d) the change of N's output each request asks for.
    """
    if m.shape != r.shape or m.ndim != 2:
        raise ValueError(f"m and r must both be (N, d); got {tuple(m.shape)} and {tuple(r.shape)}")
    if how not in PREIMAGES:
        raise ValueError(f"how must be one of {list(PREIMAGES)}, got {how!r}")
    m64, r64 = m.to(torch.float64), r.to(m.device, torch.float64)
    g = norm.gain(torch.float64).to(m.device)
    y = post_norm(norm, m64) + r64
    # a zero gain cannot carry any value in its coordinate: u is 0 there and the loss is reported
    u_ray = torch.where(g != 0, y / torch.where(g != 0, g, 1.0), 0.0)
    rho = _rms(m64) / (_rms(m64).pow(2) + norm.eps).sqrt()
    u = _nearest_direction(g, y, rho) if how == "nearest" else u_ray
    m_star = _rms(m64) * u / _rms(u).clamp_min(torch.finfo(torch.float64).tiny)
    miss = (post_norm(norm, m_star) - y).norm(dim=-1)
    r_norm = r64.norm(dim=-1)
    undeliverable = torch.where(r_norm > 0, miss / torch.where(r_norm > 0, r_norm, 1.0), 0.0)
    scale = (rho / _rms(u_ray).clamp_min(1e-300)).squeeze(-1)
    return PreImage((m_star - m64).to(r.dtype), undeliverable, scale)


def read_post_norm(module: nn.Module, offset: float, name: str = "") -> PostNorm:
    """``module`` (an RMSNorm with a ``weight`` and ``eps`` or ``variance_epsilon``) as a
    :class:`PostNorm` with gain offset + weight; checked on a probe input against the module itself,
    so a record that does not describe the module (wrong offset, a LayerNorm) fails here."""
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    weight = getattr(module, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"post-norm {name or type(module).__name__} is a {type(module).__name__} without weight and eps; "
            f"only RMSNorms (g ⊙ x / rms(x)) can be written through"
        )
    norm = PostNorm(weight, float(offset), float(eps), name)
    probe = torch.linspace(-2.0, 3.0, weight.shape[-1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        want = module(probe[None])
    if not torch.allclose(post_norm(norm, probe[None]).float(), want.float(), rtol=1e-3, atol=1e-4):
        raise ValueError(
            f"post-norm {name!r} ({type(module).__name__}) is not g ⊙ x / rms(x) with g = {offset} + weight, "
            f"eps = {eps}; fix the adapter's post_norm_offset (Gemma: 1.0, plain RMSNorm: 0.0)"
        )
    return norm
