"""Null-space preservation (AlphaEdit, Fang et al., arXiv 2410.02355) as a solver option of every
method: the update is projected onto the null space of the preserved knowledge's keys, so that the
outputs of those keys do not change, and earlier edits' keys are kept in place of the λ C_l term.

With C_l = E[k kᵀ] the key second moment of layer l (method.md §2 step 4), U_0 the eigenvectors
of C_l whose eigenvalues are below a threshold and P_l = U_0 U_0ᵀ (d_in, d_in), every key k_0 of
the preserved knowledge lies (up to the threshold) in the span of the other eigenvectors, so
ΔW_l P_l k_0 ≈ 0. The projector depends only on C_l and the threshold: it is computed once per
covariance and cached under the covariance's digest. :class:`PreservedKeys` holds the Gram matrix
K_p K_pᵀ of the keys of earlier edits (sequential editing); its owner decides what goes in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..cache import tensor_digest
from ..store import KeyedStore
from .preserved import PreservedKeys
from .solve import SolveResult

logger = logging.getLogger(__name__)

__all__ = [
    "null_space_projector",
    "cached_null_space_projector",
    "projector_rank",
    "projector_leakage",
    "leakage_table",
    "solve_update_null_space",
    "PreservedKeys",
    "NullSpaceSolve",
]

#: Version of the cached projector files (bump when what is stored or how it is computed changes).
PROJECTOR_FORMAT = 1


def _null_mask(ev: torch.Tensor, threshold: float | None, energy: float | None) -> torch.Tensor:
    """Which eigenvalues ``ev`` (ascending) span the null space: those below ``threshold``, or
    (``energy``) the smallest ones whose sum is at most ``energy`` × their total (the trace)."""
    if energy is None:
        if threshold is None or not threshold > 0:
            raise ValueError(f"null_space_threshold must be > 0, got {threshold}")
        return ev < threshold
    if not 0 < energy < 1:
        raise ValueError(f"null_space_energy must be a share of the trace in (0, 1), got {energy}")
    share = torch.cumsum(ev.clamp_min(0), 0) / ev.clamp_min(0).sum()
    return share <= energy


def _null_basis(
    cov: torch.Tensor, threshold: float | None = None, energy: float | None = None
) -> tuple[torch.Tensor, bool]:
    """The narrower of the two orthonormal bases that define P: (U_0, False) with P = U_0 U_0ᵀ,
    or (U_1, True) with P = I - U_1 U_1ᵀ (U_1: the eigenvectors outside the null space). The null
    space is chosen by ``threshold`` (absolute) or, when given, ``energy`` (:func:`_null_mask`)."""
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square (d_in, d_in) matrix, got shape {tuple(cov.shape)}")
    c = cov.detach().to(torch.float64)
    ev, vecs = torch.linalg.eigh(0.5 * (c + c.T))
    below = _null_mask(ev, threshold, energy)
    rule = f"null_space_threshold={threshold:g}" if energy is None else f"null_space_energy={energy:g}"
    rank = int(below.sum())
    if rank == 0:
        raise ValueError(
            f"no eigenvalue of the ({c.shape[0]}, {c.shape[0]}) covariance falls in the null space by {rule} "
            f"(smallest eigenvalue {float(ev[0]):.4g}, largest {float(ev[-1]):.4g}; the scale is E[k kᵀ]): "
            f"the preserved keys span every direction, so no update leaves them unchanged. Raise the "
            f"threshold above {float(ev[0]):.4g} or the energy share above {float(ev[0] / ev.sum()):.3g}"
        )
    if rank == c.shape[0]:
        logger.warning(
            "every eigenvalue of the covariance is in the null space by %s (largest %.4g): the "
            "projector is the identity and preserves nothing",
            rule,
            float(ev[-1]),
        )
    if 2 * rank <= c.shape[0]:
        return vecs[:, below].contiguous(), False
    return vecs[:, ~below].contiguous(), True


def projector_leakage(projector: torch.Tensor, cov: torch.Tensor) -> float:
    """trace(P C) / trace(C): the share of the preserved keys' energy E[‖k‖²] inside P's range,
    i.e. what an update ΔW = ΔW P can still change of them (0: a true null space)."""
    c = cov.detach().to(projector.device, torch.float64)
    return float((projector.to(torch.float64) * c).sum() / torch.diagonal(c).sum())


def _projector(basis: torch.Tensor, complement: bool) -> torch.Tensor:
    """P (d_in, d_in) float64 from :func:`_null_basis`'s basis (one place, so a cached basis and a
    fresh one give the same P bit for bit)."""
    # a fresh copy: BLAS rounds differently on differently aligned memory (a tensor read from a
    # file may be 8-byte aligned), and a cached P must equal a fresh one bit for bit
    basis = basis.clone(memory_format=torch.contiguous_format)
    inner = basis @ basis.T
    if not complement:
        return inner
    return torch.eye(basis.shape[0], dtype=basis.dtype, device=basis.device) - inner


def null_space_projector(
    cov: torch.Tensor, threshold: float | None = None, *, energy: float | None = None
) -> torch.Tensor:
    """P_l = U_0 U_0ᵀ (d_in, d_in) float64: the projector onto the span of the eigenvectors of
    ``cov`` (C_l = E[k kᵀ], (d_in, d_in)) whose eigenvalues are below ``threshold`` (on the scale
    of ``cov`` itself) or, with ``energy``, the smallest eigenvalues holding at most that share of
    trace(C_l) (so :func:`projector_leakage` <= ``energy``). Symmetric and idempotent; ΔW P k ≈ 0
    for keys k the covariance is made of.

    Raises:
        ValueError: no eigenvalue is below ``threshold`` (the message names the smallest one).
    """
    return _projector(*_null_basis(cov, threshold, energy))


def projector_rank(projector: torch.Tensor) -> int:
    """The dimension of the null space P projects onto (its trace, rounded)."""
    return int(round(float(torch.diagonal(projector).sum())))


def cached_null_space_projector(
    cov: torch.Tensor, threshold: float | None = None, *, energy: float | None = None, store: KeyedStore | None = None
) -> torch.Tensor:
    """:func:`null_space_projector`, computed once per covariance and threshold and kept in
    ``store`` (default: the cache's ``projectors/`` folder) under the covariance's
    :func:`~pmetlab.cache.tensor_digest`, the threshold and the format. A damaged entry is
    recomputed (the store logs and ignores it)."""
    store = store if store is not None else KeyedStore("projectors")
    d = int(cov.shape[0]) if cov.ndim else 0
    rule = {"threshold": float(threshold)} if energy is None else {"energy": float(energy)}
    key = {"format": PROJECTOR_FORMAT, "cov": tensor_digest({"cov": cov}), **rule, "d": d}
    prefix = f"d{d}-"
    entry = store.load_tensors(key, prefix=prefix, finite=True)
    if entry is not None and "basis" in entry.tensors and "complement" in entry.tensors:
        basis = entry.tensors["basis"].to(cov.device)
        return _projector(basis, bool(entry.tensors["complement"]))
    basis, complement = _null_basis(cov, threshold, energy)
    store.save_tensors(key, {"basis": basis, "complement": torch.tensor(int(complement))}, rule, prefix=prefix)
    return _projector(basis, complement)


def solve_update_null_space(
    keys: torch.Tensor,
    resid: torch.Tensor,
    projector: torch.Tensor,
    preserved_gram: torch.Tensor | None = None,
    diagnostics: bool = True,
    ridge: float = 1.0,
) -> SolveResult:
    """Solve the null-space-projected update in float64 (AlphaEdit's objective, method.md notation).

    With K (d_in × N) the keys as columns, R_l (d_out × N) the spread residual, P = P_l and
    G = K_p K_pᵀ (zero without earlier edits), the update ΔW P minimises
    ‖ΔW P K − R_l‖² + ‖ΔW P‖² + ‖ΔW P K_p‖². With P = Pᵀ = P², its gradient vanishes when
    ΔW P (K Kᵀ + G + I) P = R_l Kᵀ P. The applied update ΔW_l := ΔW P satisfies ΔW_l = ΔW_l P,
    so these normal equations read ΔW_l (P (K Kᵀ + G) P + I) = R_l Kᵀ P, a symmetric positive
    definite system (eigenvalues >= 1), solved here by Cholesky:

        ΔW_l = R_l Kᵀ P (P (K Kᵀ + G) P + I)^{-1}  =  R_l Kᵀ P ((K Kᵀ + G) P + I)^{-1},

    the second form being AlphaEdit's (both sides solve the same system: with ΔW_l = ΔW_l P,
    ΔW_l (K Kᵀ + G) P = ΔW_l P (K Kᵀ + G) P). The unit weight on ‖ΔW P‖² takes the place of
    λ C_l: C_l enters only through P, and ΔW_l k_0 = ΔW_l P k_0 ≈ 0 for its preserved keys k_0.

    Args:
        keys: (N, d_in) one key per request (rows); resid: (N, d_out) the spread residual.
        projector: (d_in, d_in) P_l (:func:`null_space_projector`).
        preserved_gram: (d_in, d_in) K_p K_pᵀ of earlier edits' keys, or None.
        ridge: ρ > 0, the weight of ‖ΔW P‖².

    Returns:
        :class:`~pmetlab.editing.solve.SolveResult` with ``delta`` (d_out, d_in) float64 and the
        condition number of P (K Kᵀ + G) P + I.
    """
    d_in = _check_null_space_inputs(keys, resid, projector, preserved_gram)
    if not ridge > 0:
        raise ValueError(f"null_space_ridge must be > 0, got {ridge}")
    K = keys.to(torch.float64)
    R = resid.to(K.device, torch.float64)
    P = projector.to(K.device, torch.float64)
    PK = P @ K.T  # (d_in, N)
    eye = torch.eye(d_in, dtype=torch.float64, device=K.device)
    S = PK @ PK.T + (eye if ridge == 1.0 else ridge * eye)
    if preserved_gram is not None:
        S = S + P @ preserved_gram.to(K.device, torch.float64) @ P
    S = 0.5 * (S + S.T)
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) == 0:
        X = torch.cholesky_solve(PK, L)  # (d_in, N) = S^{-1} P K
    else:  # cannot happen for a true projector (S >= I); a damaged one is still solved
        logger.warning("P (K Kᵀ + G) P + I is not positive definite (is P a projector?); general solve")
        X = torch.linalg.solve(S, PK)
    delta = R.T @ X.T  # (d_out, d_in)
    cond = float("nan")
    if diagnostics:
        ev = torch.linalg.eigvalsh(S)
        cond = float(ev[-1] / ev[0]) if float(ev[0]) > 0 else float("inf")
    achieved = K @ delta.T
    return SolveResult(
        delta=delta,
        condition_number=cond,
        residual_norm_before=float(R.norm()),
        residual_norm_after=float((R - achieved).norm()),
        update_norm=float(delta.norm()),
    )


def _check_null_space_inputs(keys, resid, projector, preserved_gram) -> int:
    """d_in, after ValueErrors naming any shape that does not fit."""
    if keys.ndim != 2 or resid.ndim != 2 or keys.shape[0] != resid.shape[0]:
        raise ValueError(
            f"keys (N, d_in) and resid (N, d_out) must share N; got {tuple(keys.shape)}, {tuple(resid.shape)}"
        )
    d_in = keys.shape[1]
    if tuple(projector.shape) != (d_in, d_in):
        raise ValueError(f"projector must be ({d_in}, {d_in}) for keys of size {d_in}, got {tuple(projector.shape)}")
    if preserved_gram is not None and tuple(preserved_gram.shape) != (d_in, d_in):
        raise ValueError(
            f"preserved_gram (K_p K_pᵀ) must be ({d_in}, {d_in}) for keys of size {d_in}, got "
            f"{tuple(preserved_gram.shape)}: were the preserved keys collected at another layer or component?"
        )
    return d_in


@dataclass
class NullSpaceSolve:
    """The null-space solves of one :func:`compute_deltas` call: the projector of each covariance
    (cached in ``store`` when given), the preserved Gram matrix of each layer, and what the
    metadata records (projector ranks and measured leakage per layer) and the caller may add to
    ``preserved`` later (the keys). ``energy`` set: the energy rule, else the ``threshold`` rule."""

    threshold: float
    preserved: PreservedKeys | None = None
    store: KeyedStore | None = None
    ranks: dict[str, dict[int, int]] = field(default_factory=dict)
    keys: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    energy: float | None = None
    ridge: float = 1.0
    leakage: dict[str, dict[int, float]] = field(default_factory=dict)

    def projector(self, cov: torch.Tensor) -> torch.Tensor:
        """P_l of ``cov`` by this solve's rule (cached when a store is given)."""
        if self.store is not None:
            return cached_null_space_projector(cov, self.threshold, energy=self.energy, store=self.store)
        return null_space_projector(cov, self.threshold, energy=self.energy)

    def solve(
        self, component: str, layer: int, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, diagnostics: bool
    ) -> SolveResult:
        """:func:`solve_update_null_space` at ``layer`` for ``component`` with P_l from ``cov``."""
        try:
            P = self.projector(cov)
        except ValueError as exc:
            raise ValueError(f"layer {layer} ({component}): {exc}") from None
        gram = self.preserved.gram(layer, component) if self.preserved is not None else None
        res = solve_update_null_space(keys, resid, P, gram, diagnostics, ridge=self.ridge)
        self.ranks.setdefault(component, {})[layer] = projector_rank(P)
        self.leakage.setdefault(component, {})[layer] = projector_leakage(P, cov)
        self.keys[(component, layer)] = keys.detach().float().cpu()
        return res

    def meta(self) -> dict[str, Any]:
        """What the deltas' metadata records about the null space (``leakage``: trace(P C) / trace(C))."""
        by_layer = lambda d: {c: {str(l): v for l, v in sorted(by.items())} for c, by in d.items()}
        rule = {"rule": "threshold"} if self.energy is None else {"rule": "energy", "energy": self.energy}
        return {
            "enabled": True,
            **rule,
            "threshold": self.threshold,
            "ridge": self.ridge,
            "ranks": by_layer(self.ranks),
            "leakage": by_layer(self.leakage),
            "preserved": self.preserved.to_dict() if self.preserved is not None else None,
        }


def leakage_table(
    covariances: Mapping[int, torch.Tensor], thresholds: Sequence[float] = (1e-2,), energies: Sequence[float] = (0.005,)
) -> pd.DataFrame:
    """One row per layer, rule and setting (each of ``thresholds`` by the "threshold" rule, each of
    ``energies`` by the "energy" rule): the projector's rank, d_in and its measured leakage
    trace(P C_l) / trace(C_l) (method.md §8). ``covariances``: layer -> C_l (d_in, d_in)."""
    rows = []
    settings = [("threshold", t) for t in thresholds] + [("energy", e) for e in energies]
    for layer, cov in sorted(covariances.items()):
        ev, vecs = torch.linalg.eigh(0.5 * (cov.double() + cov.double().T))
        for rule, value in settings:
            mask = _null_mask(ev, value if rule == "threshold" else None, value if rule == "energy" else None)
            leak = float(ev[mask].sum() / ev.sum())  # = projector_leakage(U_0 U_0ᵀ, C_l)
            rows.append(
                {
                    "layer": layer,
                    "rule": rule,
                    "setting": value,
                    "d_in": int(cov.shape[0]),
                    "rank": int(mask.sum()),
                    "leakage": leak,
                }
            )
    return pd.DataFrame(rows)


def null_space_meta(solve: NullSpaceSolve | None) -> Mapping[str, Any]:
    """The ``null_space`` entry of the deltas' metadata (``{"enabled": False}`` when off)."""
    return solve.meta() if solve is not None else {"enabled": False}
