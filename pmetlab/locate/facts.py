"""Causal traces over many known facts, averaged as in ROME's Figure 2, and the layer window
where the MLP's indirect effect at the subject's last token is largest."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from ..analysis.intervals import mean_ci
from ..progress import tqdm
from .noise import check_noise, embedding_noise_scale
from .restore import KINDS
from .trace import TOKEN_ROLES, trace_fact

logger = logging.getLogger(__name__)

__all__ = ["FactsTrace", "LayerWindow", "trace_facts", "summarize_traces", "best_window"]

_TARGETS = ("top1", "attribute")


@dataclass
class FactsTrace:
    """Causal traces of N facts.

    Attributes:
        frame: tidy, one row per (fact, kind, layer, token): fact, kind, layer, token, token_role, ie.
        facts: one row per fact: fact, prompt, subject, target, p_clean, p_corrupted, n_tokens.
        summary: :func:`summarize_traces` of ``frame``.
        settings: the settings every fact was traced with (noise ν resolved).
    """

    frame: pd.DataFrame
    facts: pd.DataFrame
    summary: pd.DataFrame
    settings: dict


@dataclass(frozen=True)
class LayerWindow:
    """Layers ``start .. stop-1`` and the mean of their summary means."""

    start: int
    stop: int
    mean_ie: float

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.stop))


def summarize_traces(frame: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean IE and its Student-t confidence interval over facts, by (kind, token_role, layer).

    Tokens of one role within a fact (several middle subject tokens) are averaged first, so each
    fact counts once. Columns: kind, token_role, layer, mean, ci_low, ci_high, n. Filter
    ``token_role == "last_subject"`` for the by-(kind, layer) summary at the subject's last token.
    """
    per_fact = frame.groupby(["fact", "kind", "token_role", "layer"], sort=False)["ie"].mean().reset_index()
    rows = []
    for (kind, role, layer), g in per_fact.groupby(["kind", "token_role", "layer"], sort=False):
        mean, lo, hi = mean_ci(g["ie"].tolist(), confidence)
        rows.append((kind, role, int(layer), mean, lo, hi, len(g)))
    out = pd.DataFrame(rows, columns=["kind", "token_role", "layer", "mean", "ci_low", "ci_high", "n"])
    out["token_role"] = pd.Categorical(out["token_role"], categories=TOKEN_ROLES, ordered=True)
    out["kind"] = pd.Categorical(out["kind"], categories=KINDS, ordered=True)
    return out.sort_values(["kind", "token_role", "layer"], ignore_index=True)


def best_window(
    summary: pd.DataFrame, kind: str = "mlp", width: int = 5, token_role: str = "last_subject"
) -> LayerWindow:
    """The ``width`` contiguous layers with the largest mean IE of ``kind`` at ``token_role``
    (ties: the earliest window)."""
    sel = summary[(summary["kind"] == kind) & (summary["token_role"] == token_role)].sort_values("layer")
    if sel.empty:
        raise ValueError(f"the summary has no rows for kind={kind!r}, token_role={token_role!r}")
    means = sel["mean"].to_numpy(dtype=float)
    layers = sel["layer"].to_numpy()
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= len(means):
        raise ValueError(f"width must be an integer in 1..{len(means)} (the traced layers), got {width!r}")
    best = max(range(len(means) - width + 1), key=lambda i: (means[i : i + width].mean(), -i))
    return LayerWindow(int(layers[best]), int(layers[best]) + width, float(means[best : best + width].mean()))


def _fact_target(rec: Mapping, target: str) -> str | None:
    return None if target == "top1" else str(rec["attribute"])


def trace_facts(
    model: torch.nn.Module,
    tok,
    records: Iterable[Mapping],
    *,
    kinds: tuple[str, ...] = KINDS,
    window: int = 10,
    noise: float | None = None,
    n_samples: int = 10,
    seed: int = 0,
    batch_size: int = 256,
    target: str = "top1",
    positions: str = "last_subject",
    progress: bool = True,
) -> FactsTrace:
    """:func:`trace_fact` over known-facts records (``prompt``, ``subject``, ``attribute``).

    ``target="top1"`` traces the model's own prediction (as ROME does on facts the model knows);
    ``"attribute"`` traces the record's attribute. ``positions="last_subject"`` (the default) traces
    only the subject's last token, which is what the averaged curves read; "all" for every token. ``noise`` None: ν from
    :func:`embedding_noise_scale` (known-facts subjects), computed once. Every fact uses ``seed``.
    """
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    records = list(records)
    if not records:
        raise ValueError("records is empty; pass known-facts records, e.g. pmetlab.load_known_facts()[:20]")
    noise = embedding_noise_scale(model, tok) if noise is None else check_noise(noise)
    kw = dict(kinds=kinds, window=window, noise=noise, n_samples=n_samples, seed=seed, batch_size=batch_size)
    kw["positions"] = positions
    frames, facts = [], []
    bar = tqdm(records, disable=not progress, desc="causal trace (facts)", unit="fact")
    for i, rec in enumerate(bar):
        tr = trace_fact(model, tok, rec["prompt"], rec["subject"], _fact_target(rec, target), progress=False, **kw)
        frames.append(tr.to_frame().drop(columns=["token_text", "p_restored"]).assign(fact=i))
        facts.append((i, tr.prompt, tr.subject, tr.target, tr.p_clean, tr.p_corrupted, len(tr.tokens)))
        bar.set_postfix(p_clean=f"{tr.p_clean:.3f}", p_corrupted=f"{tr.p_corrupted:.3f}")
    frame = pd.concat(frames, ignore_index=True)[["fact", "kind", "layer", "token", "token_role", "ie"]]
    cols = ["fact", "prompt", "subject", "target", "p_clean", "p_corrupted", "n_tokens"]
    return FactsTrace(frame, pd.DataFrame(facts, columns=cols), summarize_traces(frame), {**kw, "target": target})
