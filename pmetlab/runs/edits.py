"""The edit of a run as a whole: the batches' updates combined into one :class:`Deltas`, and how
far the target optimisation got over all of them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..editing.deltas import Deltas
from ..hparams import EditHyperParams

__all__ = ["combine_batches", "target_summary", "delivery_frame"]


def combine_batches(parts: Sequence[Deltas], mode: str) -> Deltas:
    """One Deltas holding the **sum** of the batches' updates (float32), with ``meta["batches"]``
    describing each batch and ``meta["mode"]`` how they were computed (see :mod:`pmetlab.runs`)."""
    tensors: dict[str, torch.Tensor] = {}
    for d in parts:
        for n, t in d.tensors.items():
            tensors[n] = tensors[n] + t.float() if n in tensors else t.float().clone()
    meta = dict(parts[0].meta)
    meta["requests"] = [r for d in parts for r in d.meta.get("requests", [])]
    meta["mode"] = mode
    meta["n_batches"] = len(parts)
    meta["batches"] = [
        {
            "batch": i,
            "n_requests": len(d.meta.get("requests", [])),
            "base_fingerprint": d.meta.get("base_fingerprint"),
            "timings": d.meta.get("timings"),
            "targets": d.meta.get("targets"),
            "diagnostics": d.meta.get("diagnostics"),
        }
        for i, d in enumerate(parts)
    ]
    meta["diagnostics"] = [dict(row, batch=i) for i, d in enumerate(parts) for row in d.meta.get("diagnostics", [])]
    timings: dict[str, float] = {}
    for d in parts:
        for k, v in (d.meta.get("timings") or {}).items():
            timings[k] = timings.get(k, 0.0) + float(v)
    meta["timings"] = timings
    trace = [dict(row, batch=i) for i, d in enumerate(parts) for row in d.trace]
    return Deltas(tensors, meta, trace)


def _mean(x: Sequence[float]) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def target_summary(deltas: Deltas, hp: EditHyperParams) -> dict[str, float]:
    """How far the target optimisation got, over all requests of an edit (every batch): mean final
    p(o*) (mean over the rewrite prompts), mean steps, the share that ran to ``v_num_grad_steps``
    and the share whose δ ended on the norm-ball boundary (clamp_norm_factor · ‖init‖), and per
    optimised space the mean ‖init‖ (the scale of that bound) and mean ‖δ‖."""
    p, steps, clamped = [], [], []
    norms_of: dict[str, tuple[list, list]] = {}
    for t in _batch_targets(deltas):
        p += list(t.get("final_p_target", []))
        steps += list(t.get("n_steps", []))
        bound = (t.get("delivery") or {}).get
        for space, norms in (t.get("delta_norms") or {}).items():
            inits = t.get("init_norms", {}).get(space, [])
            released = [d >= hp.clamp_norm_factor * i * (1 - 1e-4) for d, i in zip(norms, inits)]
            on = bound(f"on_bound_{space}") or released
            clamped += [bool(o) for o, d, i in zip(on, norms, inits) if i > 0 and d > 0]
            norms_of.setdefault(space, ([], []))[0].extend(inits)
            norms_of[space][1].extend(norms)
    written = delivery_frame(deltas, hp)["p_written"].tolist()
    out = {
        "n_requests": len(p),
        "p_target_final_mean": _mean(p),
        "p_written_mean": _mean([w for w in written if np.isfinite(w)]),
        "steps_mean": _mean(steps),
        "share_at_step_cap": _mean([s >= hp.v_num_grad_steps for s in steps]),
        "share_delta_at_clamp": _mean(clamped),
    }
    for space, (inits, deltas) in sorted(norms_of.items()):  # the scale the norm bound is relative to
        out[f"init_norm_mean_{space}"] = _mean(inits)
        out[f"delta_norm_mean_{space}"] = _mean(deltas)
    return out


def _batch_targets(deltas: Deltas) -> list[dict]:
    """The ``targets`` metadata of every batch, in request order."""
    parts = deltas.meta.get("batches") or [{"targets": deltas.meta.get("targets")}]
    return [part.get("targets") or {} for part in parts]


def delivery_frame(deltas: Deltas, hp: EditHyperParams) -> pd.DataFrame:
    """One row per edited request (``case_id`` where the request has one): ``p_optimised`` (p(o*) in
    the optimised state), ``p_written`` (with only what the update writes at L), ``on_bound`` (every
    optimised δ of the request ended on its norm bound), ``steps`` and ``at_step_cap`` (issue #21).
    Edits computed before these diagnostics existed give NaN for the missing ones."""
    rows: list[dict] = []
    for t in _batch_targets(deltas):
        n = len(t.get("n_steps", []))
        dl = t.get("delivery") or {}
        written = t.get("p_written") or [float("nan")] * n
        bounds = [v for k, v in dl.items() if k.startswith("on_bound_")]
        for j in range(n):
            rows.append(
                {
                    "p_optimised": float((dl.get("p_optimised") or t.get("final_p_target"))[j]),
                    "p_written": float(written[j]),
                    "on_bound": float(all(b[j] for b in bounds)) if bounds else float("nan"),
                    "steps": int(t["n_steps"][j]),
                    "at_step_cap": float(t["n_steps"][j] >= hp.v_num_grad_steps),
                }
            )
    frame = pd.DataFrame(rows, columns=["p_optimised", "p_written", "on_bound", "steps", "at_step_cap"])
    ids = [r.get("case_id") for r in deltas.meta.get("requests", [])]
    frame.insert(0, "case_id", ids if len(ids) == len(frame) else [None] * len(frame))
    return frame
