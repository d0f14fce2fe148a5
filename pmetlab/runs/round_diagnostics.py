"""Collapse diagnostics of editing over time (issue #25), measured after every round on the model as
it is, against the unedited model measured once at the start of the run:

* per edited weight: ‖W − W₀‖_F, its share of ‖W₀‖_F, the condition number s_max / s_min and the
  top singular-value ratio s_1 / s_2 of the edited matrix;
* perplexity on held-out corpus text: chunks of the covariance's corpus *after* the ones its
  statistics read (``cov_tokens``), a seeded choice, so never the text C_l was computed on;
* neighbourhood KL: KL(p_original || p_edited) of the next token after a fixed, seeded set of
  unrelated prompts (the first tokens of other held-out chunks), mean over prompts;
* the collapse point (:func:`collapse_point`): the first round whose efficacy or specificity on every
  edit so far falls below the lower end of the first round's interval.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..corpus import resolve_corpus, tokenize_corpus
from ..devices import model_device
from ..models.adapters import get_adapter
from ..tracing import get_parameter

logger = logging.getLogger(__name__)

__all__ = ["RoundDiagnostics", "collapse_point", "diagnostics_columns", "held_out_chunks"]

#: Held-out text: chunks for perplexity, prompts (and their length) for the neighbourhood KL, and
#: the tokens read past the covariance's to find them. Small on purpose: measured ~5 s a round on
#: SmolLM2-135M, one CPU thread on a loaded 2-core machine (perplexity ~3 s, KL ~1.5 s, SVDs ~1 s).
PPL_CHUNKS, PPL_TOKENS, KL_PROMPTS, KL_PROMPT_TOKENS, HELD_OUT_POOL = 8, 128, 32, 16, 30_000
#: Metrics whose fall marks a collapse (group "all": every edit so far).
COLLAPSE_METRICS = ("efficacy_score", "neighborhood_score")


def held_out_chunks(tok: Any, spec: Any, *, seed: int, model: Any = None) -> list[list[int]]:
    """Token chunks of ``spec``'s corpus (a :class:`~pmetlab.covspec.CovarianceSpec`) that its
    statistics never read: :func:`~pmetlab.corpus.tokenize_corpus` cuts the same chunks in the same
    order, so the chunks after the one that reaches ``spec.n_tokens`` are disjoint from them.
    Returned in a seeded order (``seed``)."""
    chunks = tokenize_corpus(
        tok, resolve_corpus(spec.corpus), spec.n_tokens + HELD_OUT_POOL, spec.seq_len, model=model, seed=spec.seed
    )
    total, first = 0, len(chunks)
    for i, c in enumerate(chunks):
        total += len(c)
        if total >= spec.n_tokens:
            first = i + 1  # chunk i is cut shorter in the covariance's pass: skipped as well
            break
    held = [c for c in chunks[first:] if len(c) >= KL_PROMPT_TOKENS + 1]
    random.Random(seed).shuffle(held)
    if len(held) < PPL_CHUNKS + KL_PROMPTS:
        logger.warning("only %d held-out chunks past the covariance's %d tokens", len(held), spec.n_tokens)
    return held


@dataclass
class RoundDiagnostics:
    """The unedited model's reference (W₀ of every edited weight, perplexity, next-token
    distributions on the KL prompts) and :meth:`measure`, the diagnostics of the model as it is now."""

    model: Any
    weights0: dict[str, torch.Tensor]
    ppl_chunks: list[list[int]]
    kl_ids: torch.Tensor  # (KL_PROMPTS, KL_PROMPT_TOKENS)
    logp0: torch.Tensor  # (KL_PROMPTS, vocab) float32, the original model's
    perplexity0: float

    @classmethod
    def start(cls, model: Any, tok: Any, hp: Any, seed: int) -> RoundDiagnostics:
        """Measure the (unedited) ``model``: call before any round is applied."""
        adapter = get_adapter(model)
        modules = [adapter.ffn_out_name(l) for l in hp.layers]
        modules += [adapter.attn_out_name(l) for l in hp.layers] if hp.update_attn_weights else []
        names = [adapter.weight_param_name(m) for m in modules]
        w0 = {n: get_parameter(model, n).detach().float().cpu().clone() for n in names}
        held = held_out_chunks(tok, hp.covariance, seed=seed, model=model)
        kl = held[PPL_CHUNKS : PPL_CHUNKS + KL_PROMPTS]
        kl_ids = torch.tensor([c[:KL_PROMPT_TOKENS] for c in kl], dtype=torch.long).reshape(-1, KL_PROMPT_TOKENS)
        out = cls(model, w0, [c[:PPL_TOKENS] for c in held[:PPL_CHUNKS]], kl_ids, torch.empty(0), float("nan"))
        out.logp0, out.perplexity0 = out._next_token_logp(), out._perplexity()
        return out

    @torch.no_grad()
    def _next_token_logp(self) -> torch.Tensor:
        if not len(self.kl_ids):
            return torch.empty(0)
        logits = self.model(input_ids=self.kl_ids.to(model_device(self.model))).logits[:, -1]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    @torch.no_grad()
    def _perplexity(self) -> float:
        """exp(mean next-token NLL) over every predicted token of the held-out chunks."""
        nll, n = 0.0, 0
        for c in self.ppl_chunks:
            ids = torch.tensor([c], dtype=torch.long, device=model_device(self.model))
            logits = self.model(input_ids=ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
        return math.exp(nll / n) if n else float("nan")

    def measure(self) -> dict[str, Any]:
        """The diagnostics of the model as it is now (JSON-ready; ``seconds``: their cost)."""
        t0 = time.perf_counter()
        weights = {}
        for name, w0 in self.weights0.items():
            w = get_parameter(self.model, name).detach().to("cpu", torch.float64)
            s = torch.linalg.svdvals(w.float()).double()  # float32: ~3x faster, ample for these ratios
            change = float((w - w0.double()).norm())
            weights[name] = {
                "change_fro": change,
                "change_rel": change / float(w0.double().norm()),
                "condition": float(s[0] / s[-1]) if float(s[-1]) > 0 else float("inf"),
                "top_sv_ratio": float(s[0] / s[1]) if len(s) > 1 else float("nan"),
            }
        logp = self._next_token_logp()
        kl = float((self.logp0.exp() * (self.logp0 - logp)).sum(-1).mean()) if len(logp) else float("nan")
        ppl = self._perplexity()
        return {
            "weights": weights,
            "perplexity": ppl,
            "perplexity_original": self.perplexity0,
            "neighbourhood_kl": kl,
            "kl_prompts": int(len(self.kl_ids)),
            "ppl_tokens": sum(len(c) - 1 for c in self.ppl_chunks),
            "seconds": round(time.perf_counter() - t0, 3),
        }


def diagnostics_columns(diag: dict[str, Any] | None) -> dict[str, float]:
    """Scalar summary columns of one round's diagnostics (NaN when the round has none): the
    perplexity and its ratio to the original's, the neighbourhood KL, the root sum of squares of
    ‖W − W₀‖_F over the edited weights, the largest condition number and top singular-value ratio."""
    nan = float("nan")
    if not diag:
        return dict.fromkeys(
            (
                "perplexity",
                "perplexity_ratio",
                "neighbourhood_kl",
                "weight_change",
                "max_condition",
                "max_top_sv_ratio",
            ),
            nan,
        )
    w = diag.get("weights", {}).values()
    return {
        "perplexity": diag.get("perplexity", nan),
        "perplexity_ratio": diag.get("perplexity", nan) / diag.get("perplexity_original", nan),
        "neighbourhood_kl": diag.get("neighbourhood_kl", nan),
        "weight_change": math.sqrt(sum(x["change_fro"] ** 2 for x in w)) if w else nan,
        "max_condition": max((x["condition"] for x in w), default=nan),
        "max_top_sv_ratio": max((x["top_sv_ratio"] for x in w), default=nan),
    }


def collapse_point(summary: pd.DataFrame, metrics: Sequence[str] = COLLAPSE_METRICS) -> dict[str, Any]:
    """The first round whose mean of any of ``metrics`` on every edit so far (group "all") falls
    below the lower end of round 0's interval; ``{"round": None, ...}`` when none did within the
    run ("none within N edits"). ``summary``: one rounds run's summary (:func:`run_rounds`)."""
    part = summary[summary["group"] == "all"].sort_values("after_round")
    n_edits = int(part["edits_total"].max()) if len(part) else 0
    out: dict[str, Any] = {"round": None, "edits_total": None, "metric": None, "within_edits": n_edits}
    if len(part) < 2:
        return out
    first = part.iloc[0]
    for _, row in part.iloc[1:].iterrows():
        fallen = [m for m in metrics if m in row and row[m] < first[f"{m}_ci_low"]]
        if fallen:
            out.update(round=int(row["after_round"]), edits_total=int(row["edits_total"]), metric=fallen[0])
            return out
    return out
