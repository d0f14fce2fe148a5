"""What the target optimisation returns (method.md §2 step 1, "Outputs"), per request or stacked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["TargetResult", "RESULT_GROUPS", "norm_anchored"]

#: The tensor groups of a result, each a dict space -> (N, d_model) ("observed": FFN-space
#: methods only), or name -> (N,) for "delivery".
RESULT_GROUPS = ("values", "inits", "deltas", "observed", "delivery")


def norm_anchored(values: torch.Tensor, inits: torch.Tensor) -> torch.Tensor:
    """Norm-anchor scaling (arXiv 2602.02543, as assumed in docs/method_notes.md): each row of
    ``values`` (N, d) rescaled to the norm of the unedited state at that position, the matching row
    of ``inits`` (N, d): v ← v · ‖init‖ / ‖v‖. Only the target's norm changes, never its direction."""
    scale = inits.norm(dim=1, keepdim=True).to(values.dtype) / values.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return values * scale


@dataclass
class TargetResult:
    """Optimised targets at layer L for N requests.

    ``values[k]`` = ``inits[k] + deltas[k]``, each (N, d_model), for k in ``hp.value_spaces``:
    "ffn" (v^m) and "attn" (v^a) for PMET, "layer" (v) for MEMIT (δ = 0 where a space was not
    optimised). ``trace`` holds one dict per (request, step): the loss terms, p(target), the NLL
    weight used at that step and whether o* was the arg-max at every target position ("argmax").
    ``n_steps[i]``: steps request i took (its last step included).

    ``observed["ffn"]`` (N, d_model): the FFN output at L in the optimised pass, m^L(δ^a) + δ^m
    (FFN-space methods); ``delivery`` holds (N,) diagnostics by name (p(o*) optimised and written,
    δ on its bound; :func:`pmetlab.editing.delivery.delivery`).
    """

    layer: int
    values: dict[str, torch.Tensor]
    inits: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]
    n_steps: list[int]
    trace: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    observed: dict[str, torch.Tensor] = field(default_factory=dict)
    delivery: dict[str, torch.Tensor] = field(default_factory=dict)

    def written(self, space: str, ffn_target: str = "released", norm_anchor: bool = False) -> torch.Tensor:
        """(N, d_model): the target the update writes in ``space`` (method.md §1): the FFN target
        named by ``ffn_target`` in "ffn" ("released" v^m = m^L_init + δ^m; "observed" m^L(δ^a) + δ^m;
        "block" observed + δ^a), else ``values[space]``; with ``norm_anchor`` rescaled to
        ‖inits[space]‖ per request (:func:`norm_anchored`)."""
        v = self._written(space, ffn_target)
        return norm_anchored(v, self.inits[space]) if norm_anchor else v

    def _written(self, space: str, ffn_target: str) -> torch.Tensor:
        if space != "ffn" or ffn_target == "released":
            return self.values[space]
        if "ffn" not in self.observed:
            raise ValueError(
                f"ffn_target={ffn_target!r} needs the observed FFN output, which these targets lack "
                f"(computed by an older pmetlab); recompute them (use_cache=False or a fresh cache)"
            )
        obs = self.observed["ffn"].to(self.values["ffn"].dtype)
        if ffn_target == "observed":
            return obs
        if ffn_target == "block":
            return obs + self.deltas["attn"].to(obs.dtype) if "attn" in self.deltas else obs
        raise ValueError(f"ffn_target must be 'released', 'observed' or 'block', got {ffn_target!r}")

    def request(self, j: int) -> TargetResult:
        """Request ``j`` alone (N = 1, its trace rows renumbered to request 0)."""
        pick = lambda group: {k: t[j : j + 1] for k, t in getattr(self, group).items()}
        return TargetResult(
            self.layer,
            pick("values"),
            pick("inits"),
            pick("deltas"),
            [self.n_steps[j]],
            [{**row, "request": 0} for row in self.trace if row["request"] == j],
            observed=pick("observed"),
            delivery=pick("delivery"),
        )

    def to(self, device: torch.device | str) -> TargetResult:
        """The same result with its tensors on ``device``."""
        move = lambda group: {k: t.to(device) for k, t in getattr(self, group).items()}
        return TargetResult(
            self.layer,
            move("values"),
            move("inits"),
            move("deltas"),
            list(self.n_steps),
            list(self.trace),
            self.seconds,
            move("observed"),
            move("delivery"),
        )

    @staticmethod
    def concat(parts: Sequence[TargetResult]) -> TargetResult:
        """The results of consecutive groups of requests as one (requests renumbered in order)."""
        if len(parts) == 1:
            return parts[0]
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + len(p.n_steps))
        # a name missing from one part (targets cached by an older pmetlab) is left out of the whole
        common = lambda group: [k for k in getattr(parts[0], group) if all(k in getattr(p, group) for p in parts)]
        cat = lambda group: {k: torch.cat([getattr(p, group)[k] for p in parts]) for k in common(group)}
        trace = [{**row, "request": row["request"] + off} for p, off in zip(parts, offsets) for row in p.trace]
        return TargetResult(
            layer=parts[0].layer,
            values=cat("values"),
            inits=cat("inits"),
            deltas=cat("deltas"),
            n_steps=[n for p in parts for n in p.n_steps],
            trace=trace,
            seconds=sum(p.seconds for p in parts),
            observed=cat("observed"),
            delivery=cat("delivery"),
        )
