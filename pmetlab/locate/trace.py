"""Causal tracing of one fact (ROME, arXiv 2202.05262 §2.1 and Appendix B).

Three runs: clean (the prompt as is), corrupted (Gaussian noise N(0, ν²) added to the input
embeddings of the subject's tokens) and corrupted-with-restoration (one state taken back from
the clean run). The indirect effect of a state is
IE = p(o | corrupted, restored) − p(o | corrupted), averaged over ``n_samples`` noise draws,
where o is the clean run's top-1 next token (or the first token of a given target).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..devices import model_dtype
from ..models.adapters import get_adapter
from ..progress import tqdm
from .noise import check_noise, draw_noise, embedding_noise_scale
from .prompt import prepare_prompt
from .restore import (
    KINDS,
    TraceSetup,
    clean_run,
    component_name,
    embedding_name,
    restorations_for,
    run_batched,
    run_reference,
)

logger = logging.getLogger(__name__)

__all__ = ["CausalTrace", "trace_fact", "token_roles", "TOKEN_ROLES"]

#: Token groups of ROME's Figure 2 (plus "before_subject" for any token ahead of the subject, such as BOS).
TOKEN_ROLES = ("before_subject", "first_subject", "middle_subject", "last_subject", "first_after", "further", "last")


def token_roles(n_tokens: int, subject_range: tuple[int, int]) -> list[str]:
    """The ROME group of each token. Precedence: the prompt's last token is "last"; a one-token
    subject is "last_subject"."""
    s0, s1 = subject_range
    roles = []
    for t in range(n_tokens):
        if t == n_tokens - 1:
            roles.append("last")
        elif t < s0:
            roles.append("before_subject")
        elif t == s1 - 1:
            roles.append("last_subject")
        elif t == s0:
            roles.append("first_subject")
        elif t < s1:
            roles.append("middle_subject")
        else:
            roles.append("first_after" if t == s1 else "further")
    return roles


@dataclass
class CausalTrace:
    """The causal trace of one fact.

    Attributes:
        ie: kind -> indirect effects, (n_layers, n_tokens), float32: ``ie[k][l, t]`` is the IE of
            restoring state k of layer l (for mlp/attn: the window centred on l) at token t.
        p_clean / p_corrupted: p(o) in the clean run / averaged over the corrupted runs.
        tokens: the prompt's tokens, decoded; ``subject_range``: ``(start, stop)`` of the subject's.
        settings: kinds, window, noise, n_samples, seed, batch_size, reference, model class, dtype.
    """

    prompt: str
    subject: str
    target: str
    target_id: int
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]
    p_clean: float
    p_corrupted: float
    ie: dict[str, torch.Tensor]
    settings: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per (kind, layer, token): kind, layer, token, token_text, token_role, ie, p_restored."""
        roles = token_roles(len(self.tokens), self.subject_range)
        rows = [
            (kind, layer, t, self.tokens[t], roles[t], float(v), float(v) + self.p_corrupted)
            for kind, ie in self.ie.items()
            for layer in range(ie.shape[0])
            for t, v in enumerate(ie[layer].tolist())
            if v == v  # untraced positions are NaN
        ]
        cols = ["kind", "layer", "token", "token_text", "token_role", "ie", "p_restored"]
        return pd.DataFrame(rows, columns=cols)


def _check_args(kinds, window, n_samples, batch_size) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct names from {KINDS}, got {kinds!r}")
    for name, v in (("window", window), ("n_samples", n_samples), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return kinds


POSITIONS = ("all", "last_subject")


def _positions(positions: str, tp) -> list[int]:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return list(range(tp.n_tokens)) if positions == "all" else [tp.subject_range[1] - 1]


def _ie_matrix(values: torch.Tensor, n_layers: int, n_tokens: int, traced: list[int]) -> torch.Tensor:
    """(n_layers, n_tokens) IE from layer-major values over the traced tokens; NaN elsewhere."""
    out = torch.full((n_layers, n_tokens), float("nan"), dtype=values.dtype)
    out[:, traced] = values.view(n_layers, len(traced)).to(out.device)
    return out


def trace_fact(
    model: torch.nn.Module,
    tok,
    prompt: str,
    subject: str,
    target: str | None = None,
    *,
    kinds: tuple[str, ...] = KINDS,
    window: int = 10,
    noise: float | None = None,
    n_samples: int = 10,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    reference: bool = False,
    positions: str = "all",
) -> CausalTrace:
    """Causal trace of the fact ``prompt`` → o with ``subject`` corrupted (ROME §2.1).

    Args:
        prompt: the filled-in prompt; ``subject`` must occur in it (its first occurrence is corrupted).
        target: None: o is the clean run's top-1 next token; else o is the first token of
            ``target`` after the prompt (:func:`pmetlab.tokens.encode_prompt_target`).
        kinds: which states to restore ("hidden", "mlp", "attn").
        window: layers restored together for "mlp"/"attn", centred on l, clipped to the model.
        noise: ν, the std of the corruption; None: :func:`embedding_noise_scale` on its default sample.
        n_samples: noise draws, drawn once from ``seed`` and shared by every restoration.
        batch_size: rows (restoration × noise draw) per forward.
        reference: one restoration per forward, the simplest code (for tests and benchmarks).
        positions: "all" tokens (the ROME heatmaps) or only the subject's "last_subject" token
            (the averaged curves; n_tokens times cheaper); untraced entries of ``ie`` are NaN.
    """
    kinds = _check_args(kinds, window, n_samples, batch_size)
    noise = embedding_noise_scale(model, tok) if noise is None else check_noise(noise)
    adapter = get_adapter(model)
    tp = prepare_prompt(model, tok, prompt, subject, target)
    names = [component_name(adapter, k, layer) for k in kinds for layer in range(adapter.n_layers)]
    clean, probs = clean_run(model, adapter, tp.ids, names)
    if tp.target_id < 0:
        tp = type(tp)(tp.ids, tp.tokens, tp.subject_range, int(probs.argmax()))
    s0, s1 = tp.subject_range
    emb_w = model.get_input_embeddings().weight
    eps = draw_noise(n_samples, s1 - s0, int(emb_w.shape[-1]), noise, seed)
    setup = TraceSetup(model, adapter, tp, eps.to(emb_w.device, emb_w.dtype), clean, embedding_name(model))
    traced = _positions(positions, tp)
    work = {k: restorations_for(adapter, k, window, tp.n_tokens, traced) for k in kinds}
    bar = tqdm(total=1 + sum(map(len, work.values())), disable=not progress, desc="causal trace", unit="restore")
    t0 = time.perf_counter()

    def on_batch(n: int) -> None:
        bar.update(n)
        bar.set_postfix(restores_per_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.1f}")

    def run(rs):
        if reference:
            p = run_reference(setup, rs)
            on_batch(len(rs))
            return p
        return run_batched(setup, rs, batch_size, on_batch)

    with bar:
        p_corr = float(run([()])[0])
        ie = {k: _ie_matrix(run(rs) - p_corr, adapter.n_layers, tp.n_tokens, traced) for k, rs in work.items()}
    settings = dict(kinds=kinds, window=window, noise=noise, n_samples=n_samples, seed=seed, batch_size=batch_size)
    settings["positions"] = positions
    settings.update(
        reference=reference, model=type(model).__name__, dtype=str(model_dtype(model)).replace("torch.", "")
    )
    return CausalTrace(
        prompt=prompt,
        subject=subject,
        target=tok.decode([tp.target_id]),
        target_id=tp.target_id,
        tokens=tp.tokens,
        subject_range=tp.subject_range,
        p_clean=float(probs[tp.target_id]),
        p_corrupted=p_corr,
        ie=ie,
        settings=settings,
    )
