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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cache import tensor_digest
from ..store import KeyedStore
from .deltas import Deltas
from .solve import SolveResult

logger = logging.getLogger(__name__)

__all__ = [
    "null_space_projector",
    "cached_null_space_projector",
    "projector_rank",
    "solve_update_null_space",
    "PreservedKeys",
    "NullSpaceSolve",
]

#: Version of the cached projector files (bump when what is stored or how it is computed changes).
PROJECTOR_FORMAT = 1
#: Version of :meth:`PreservedKeys.save` files.
PRESERVED_FORMAT = 1


def _null_basis(cov: torch.Tensor, threshold: float) -> tuple[torch.Tensor, bool]:
    """The narrower of the two orthonormal bases that define P: (U_0, False) with P = U_0 U_0ᵀ,
    or (U_1, True) with P = I - U_1 U_1ᵀ (U_1: eigenvectors at or above the threshold)."""
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square (d_in, d_in) matrix, got shape {tuple(cov.shape)}")
    if not threshold > 0:
        raise ValueError(f"null_space_threshold must be > 0, got {threshold}")
    c = cov.detach().to(torch.float64)
    ev, vecs = torch.linalg.eigh(0.5 * (c + c.T))
    below = ev < threshold
    rank = int(below.sum())
    if rank == 0:
        raise ValueError(
            f"no eigenvalue of the ({c.shape[0]}, {c.shape[0]}) covariance is below null_space_threshold="
            f"{threshold:g} (smallest eigenvalue {float(ev[0]):.4g}, largest {float(ev[-1]):.4g}; the scale is "
            f"E[k kᵀ]): the preserved keys span every direction, so no update leaves them unchanged. Raise "
            f"null_space_threshold above {float(ev[0]):.4g}"
        )
    if rank == c.shape[0]:
        logger.warning(
            "every eigenvalue of the covariance is below null_space_threshold=%g (largest %.4g): the "
            "projector is the identity and preserves nothing",
            threshold,
            float(ev[-1]),
        )
    if 2 * rank <= c.shape[0]:
        return vecs[:, below].contiguous(), False
    return vecs[:, ~below].contiguous(), True


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


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P_l = U_0 U_0ᵀ (d_in, d_in) float64: the projector onto the span of the eigenvectors of
    ``cov`` (C_l = E[k kᵀ], (d_in, d_in)) whose eigenvalues are below ``threshold`` (on the scale
    of ``cov`` itself). Symmetric and idempotent; ΔW P k ≈ 0 for keys k the covariance is made of.

    Raises:
        ValueError: no eigenvalue is below ``threshold`` (the message names the smallest one).
    """
    return _projector(*_null_basis(cov, threshold))


def projector_rank(projector: torch.Tensor) -> int:
    """The dimension of the null space P projects onto (its trace, rounded)."""
    return int(round(float(torch.diagonal(projector).sum())))


def cached_null_space_projector(
    cov: torch.Tensor, threshold: float, *, store: KeyedStore | None = None
) -> torch.Tensor:
    """:func:`null_space_projector`, computed once per covariance and threshold and kept in
    ``store`` (default: the cache's ``projectors/`` folder) under the covariance's
    :func:`~pmetlab.cache.tensor_digest`, the threshold and the format. A damaged entry is
    recomputed (the store logs and ignores it)."""
    store = store if store is not None else KeyedStore("projectors")
    d = int(cov.shape[0]) if cov.ndim else 0
    key = {"format": PROJECTOR_FORMAT, "cov": tensor_digest({"cov": cov}), "threshold": float(threshold), "d": d}
    prefix = f"d{d}-"
    entry = store.load_tensors(key, prefix=prefix, finite=True)
    if entry is not None and "basis" in entry.tensors and "complement" in entry.tensors:
        basis = entry.tensors["basis"].to(cov.device)
        return _projector(basis, bool(entry.tensors["complement"]))
    basis, complement = _null_basis(cov, threshold)
    store.save_tensors(
        key, {"basis": basis, "complement": torch.tensor(int(complement))}, {"threshold": threshold}, prefix=prefix
    )
    return _projector(basis, complement)


def solve_update_null_space(
    keys: torch.Tensor,
    resid: torch.Tensor,
    projector: torch.Tensor,
    preserved_gram: torch.Tensor | None = None,
    diagnostics: bool = True,
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

    Returns:
        :class:`~pmetlab.editing.solve.SolveResult` with ``delta`` (d_out, d_in) float64 and the
        condition number of P (K Kᵀ + G) P + I.
    """
    d_in = _check_null_space_inputs(keys, resid, projector, preserved_gram)
    K = keys.to(torch.float64)
    R = resid.to(K.device, torch.float64)
    P = projector.to(K.device, torch.float64)
    PK = P @ K.T  # (d_in, N)
    S = PK @ PK.T + torch.eye(d_in, dtype=torch.float64, device=K.device)
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


class PreservedKeys:
    """K_p K_pᵀ of the keys of earlier edits, per (component, layer), as a (d_in, d_in) float64
    sum and a count: the state of a sequential null-space experiment. Its owner decides what is
    added (:meth:`add`, :meth:`add_round`); nothing here is global or added implicitly.

    Args:
        device: where the Gram matrices live (the keys are moved there when added).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._gram: dict[tuple[str, int], torch.Tensor] = {}
        self._count: dict[tuple[str, int], int] = {}

    def add(self, layer: int, keys: torch.Tensor, component: str = "ffn") -> None:
        """Add the keys (N, d_in) used at ``layer`` (rows) to K_p K_pᵀ."""
        if keys.ndim != 2:
            raise ValueError(f"keys must be (N, d_in) rows, got shape {tuple(keys.shape)}")
        if not torch.isfinite(keys).all():
            raise ValueError(f"keys for layer {layer} ({component}) hold non-finite values")
        k = keys.detach().to(self.device, torch.float64)
        slot = (str(component), int(layer))
        old = self._gram.get(slot)
        if old is not None and old.shape[0] != k.shape[1]:
            raise ValueError(
                f"keys of size {k.shape[1]} for layer {layer} ({component}), which holds keys of size {old.shape[0]}"
            )
        self._gram[slot] = (old if old is not None else 0) + k.T @ k
        self._count[slot] = self._count.get(slot, 0) + int(k.shape[0])

    def add_round(self, deltas: Deltas) -> None:
        """Add every key the solves of one :func:`compute_deltas` call used (``deltas.keys``)."""
        if not deltas.keys:
            raise ValueError(
                "these deltas carry no solve keys: compute_deltas records them only with hparams.null_space=True "
                "(and they are not saved with the deltas)"
            )
        for (component, layer), keys in deltas.keys.items():
            self.add(layer, keys, component)

    def gram(self, layer: int, component: str = "ffn") -> torch.Tensor | None:
        """K_p K_pᵀ (d_in, d_in) float64 at ``layer``, or None when nothing was added there."""
        return self._gram.get((str(component), int(layer)))

    def count(self, layer: int, component: str = "ffn") -> int:
        return self._count.get((str(component), int(layer)), 0)

    def reset(self) -> None:
        """Forget every key (a new sequence of edits)."""
        self._gram.clear()
        self._count.clear()

    def __len__(self) -> int:
        """The number of (component, layer) entries held."""
        return len(self._gram)

    def to_dict(self) -> dict[str, Any]:
        """For run records: keys counted per component and layer, e.g. ``{"counts": {"ffn": {"3": 40}}}``."""
        counts: dict[str, dict[str, int]] = {}
        for (component, layer), n in sorted(self._count.items()):
            counts.setdefault(component, {})[str(layer)] = n
        return {"counts": counts}

    def save(self, path: str | Path) -> Path:
        """Write the state to a safetensors file (checksummed, atomic) for :meth:`load`."""
        tensors = {}
        for (component, layer), g in self._gram.items():
            tensors[f"{component}.L{layer:03d}.gram"] = g
            tensors[f"{component}.L{layer:03d}.count"] = torch.tensor(self._count[(component, layer)])
        return KeyedStore.write_tensors(path, _preserved_key(), tensors, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> PreservedKeys:
        """The state written by :meth:`save`; a missing or damaged file raises an error naming it."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no saved preserved keys at {path}")
        entry = KeyedStore.read_tensors(path, _preserved_key(), finite=True)
        out = cls(device)
        for name, t in entry.tensors.items():
            component, layer, what = name.split(".")
            slot = (component, int(layer[1:]))
            if what == "gram":
                out._gram[slot] = t.to(out.device, torch.float64)
            else:
                out._count[slot] = int(t)
        return out


def _preserved_key() -> dict[str, Any]:
    return {"kind": "preserved_keys", "format": PRESERVED_FORMAT}


@dataclass
class NullSpaceSolve:
    """The null-space solves of one :func:`compute_deltas` call: the projector of each covariance
    (cached in ``store`` when given), the preserved Gram matrix of each layer, and what the
    metadata records (projector ranks) and the caller may add to ``preserved`` later (the keys)."""

    threshold: float
    preserved: PreservedKeys | None = None
    store: KeyedStore | None = None
    ranks: dict[str, dict[int, int]] = field(default_factory=dict)
    keys: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def solve(
        self, component: str, layer: int, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, diagnostics: bool
    ) -> SolveResult:
        """:func:`solve_update_null_space` at ``layer`` for ``component`` with P_l from ``cov``."""
        try:
            if self.store is not None:
                P = cached_null_space_projector(cov, self.threshold, store=self.store)
            else:
                P = null_space_projector(cov, self.threshold)
        except ValueError as exc:
            raise ValueError(f"layer {layer} ({component}): {exc}") from None
        gram = self.preserved.gram(layer, component) if self.preserved is not None else None
        res = solve_update_null_space(keys, resid, P, gram, diagnostics)
        self.ranks.setdefault(component, {})[layer] = projector_rank(P)
        self.keys[(component, layer)] = keys.detach().float().cpu()
        return res

    def meta(self) -> dict[str, Any]:
        """What the deltas' metadata records about the null space."""
        return {
            "enabled": True,
            "threshold": self.threshold,
            "ranks": {c: {str(l): r for l, r in sorted(by.items())} for c, by in self.ranks.items()},
            "preserved": self.preserved.to_dict() if self.preserved is not None else None,
        }


def null_space_meta(solve: NullSpaceSolve | None) -> Mapping[str, Any]:
    """The ``null_space`` entry of the deltas' metadata (``{"enabled": False}`` when off)."""
    return solve.meta() if solve is not None else {"enabled": False}
