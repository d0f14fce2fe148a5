"""The logic behind the interactive edit explorer: pick or type a fact, edit it in with PMET or
MEMIT and chosen knobs, see what changed, undo, save. No widgets here (see :mod:`.widget`), so
every step is testable headless.

An :class:`EditSession` holds one model and at most one applied edit: :meth:`EditSession.edit`
computes the update on the unedited model (an applied edit is undone first), applies it and
returns an :class:`EditOutcome` (top-k next tokens before/after on the rewrite prompt, a
paraphrase and a neighbourhood prompt, p(new)/p(true) on each, the per-layer update norms and a
greedy continuation before/after); :meth:`EditSession.undo` restores the weights bit-exactly,
and refuses when they are no longer the ones its own edit left (another session, or code, changed
them since: restoring would throw that change away or bring back the wrong weights).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..devices import model_device
from ..editing.compute import compute_deltas
from ..editing.deltas import Deltas, EditMismatchError, apply_deltas_, param_fingerprint, restore_
from ..evaluation.generation import generate_texts
from ..evaluation.scoring import encode_prompt, score_pairs
from ..hparams import EditHyperParams
from ..requests import EditRequest
from ..runs.spec import resolve_hparams

logger = logging.getLogger(__name__)

__all__ = ["Fact", "EditOutcome", "EditSession", "next_token_topk", "KNOBS"]

#: The knobs the explorer offers, as hyperparameter fields (None: the preset's value).
KNOBS = ("layers", "mom2_update_weight", "spread_exponent", "optimize_attn")


@dataclass(frozen=True)
class Fact:
    """A fact to edit and the prompts it is probed on."""

    request: EditRequest
    paraphrase: str | None = None
    neighborhood: str | None = None
    neighborhood_target: str | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Fact:
        """From a CounterFact or a zsRE record."""
        if "requested_rewrite" in record:
            req = EditRequest.from_counterfact(record)
            para = (record.get("paraphrase_prompts") or [None])[0]
            neigh = (record.get("neighborhood_prompts") or [None])[0]
            return cls(req, para, neigh, req.target_true)
        req = EditRequest.from_zsre(record)
        return cls(req, record.get("rephrase"), record.get("loc"), record.get("loc_ans"))

    @classmethod
    def typed(cls, subject: str, prompt: str, target_new: str, target_true: str = "", **probes: str | None) -> Fact:
        """From typed text: ``prompt`` holds ``{}`` where ``subject`` goes (checked by EditRequest)."""
        req = EditRequest(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true or None)
        return cls(req, probes.get("paraphrase") or None, probes.get("neighborhood") or None)

    def probes(self) -> dict[str, str]:
        """The prompts the outcome is read on, by kind."""
        out = {"rewrite": self.request.text, "paraphrase": self.paraphrase, "neighborhood": self.neighborhood}
        return {k: v for k, v in out.items() if v}


@dataclass
class EditOutcome:
    """What one edit changed (tables ready to display)."""

    deltas: Deltas
    topk: pd.DataFrame  # probe, state ("before"/"after"), rank, token, prob
    targets: pd.DataFrame  # probe, state, p_new, p_true
    norms: pd.DataFrame  # layer, component, update_norm
    generations: dict[str, str] = field(default_factory=dict)  # state -> text
    seconds: float = 0.0


@torch.no_grad()
def next_token_topk(model, tok, prompts: Mapping[str, str], k: int = 5) -> pd.DataFrame:
    """The ``k`` most likely next tokens after each prompt: rows (probe, rank, token, prob)."""
    rows = []
    for name, text in prompts.items():
        ids = torch.tensor([encode_prompt(tok, text)], device=model_device(model))
        logits = model(input_ids=ids).logits[0, -1].float()
        p, idx = torch.softmax(logits, -1).topk(k)
        rows += [
            {"probe": name, "rank": r + 1, "token": tok.decode([int(i)]), "prob": float(v)}
            for r, (v, i) in enumerate(zip(p.tolist(), idx.tolist()))
        ]
    return pd.DataFrame(rows, columns=["probe", "rank", "token", "prob"])


class EditSession:
    """One model, at most one applied edit at a time (see the module docstring).

    Args:
        model, tok: the model to edit (left as loaded when the session's edit is undone).
        model_name: names the presets (:func:`pmetlab.runs.resolve_hparams`).
        n_gen_tokens: length of the greedy continuation of the rewrite prompt.
        fixed: hyperparameter overrides under the knobs (e.g. a smaller covariance for a quick look).
    """

    def __init__(
        self,
        model,
        tok,
        model_name: str,
        *,
        n_gen_tokens: int = 20,
        top_k: int = 5,
        fixed: Mapping[str, Any] | None = None,
    ) -> None:
        self.model, self.tok, self.model_name = model, tok, model_name
        self.n_gen_tokens, self.top_k, self.fixed = n_gen_tokens, top_k, dict(fixed or {})
        self._undo: dict | None = None
        self._left: str | None = None  # fingerprint of the weights the applied edit left
        self.outcome: EditOutcome | None = None
        self._failed: str | None = None  # why the last edit failed (then there is nothing to save)

    @property
    def edited(self) -> bool:
        """Whether an edit is applied now."""
        return self._undo is not None

    def hparams(
        self, method: str, knobs: Mapping[str, Any] | None = None, dataset: str | None = None
    ) -> EditHyperParams:
        """The method's preset for the model (and ``dataset``) with the knobs that are set (None:
        the preset's value). Raises KeyError on a knob that is not a hyperparameter."""
        overrides = {k: v for k, v in (knobs or {}).items() if v is not None}
        unknown = sorted(set(overrides) - set(KNOBS))
        if unknown:
            raise KeyError(f"unknown knob(s) {unknown}; the explorer offers {list(KNOBS)}")
        if "layers" in overrides:
            overrides["layers"] = list(overrides["layers"])
        return resolve_hparams(self.model_name, method, {**self.fixed, **overrides}, dataset=dataset)

    def observe(self, fact: Fact, state: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
        """Top-k next tokens, p(new)/p(true) on every probe, and the rewrite prompt's greedy
        continuation, on the model as it is now; ``state`` labels the rows."""
        probes = fact.probes()
        topk = next_token_topk(self.model, self.tok, probes, self.top_k).assign(state=state)
        texts = list(probes.values())
        new = score_pairs(self.model, self.tok, texts, [fact.request.target_new] * len(texts))
        targets = pd.DataFrame({"probe": list(probes), "state": state, "p_new": new.prob})
        if fact.request.target_true:
            targets["p_true"] = score_pairs(self.model, self.tok, texts, [fact.request.target_true] * len(texts)).prob
        gen = generate_texts(
            self.model, self.tok, [fact.request.text], seeds=[0], n_new_tokens=self.n_gen_tokens, top_k=1
        )
        return topk, targets, gen[0]

    def edit(self, fact: Fact, hp: EditHyperParams, *, progress: bool = True) -> EditOutcome:
        """Undo any applied edit, compute this one on the unedited model, apply it and return what
        changed. A failure leaves the model unedited."""
        self.undo()
        self.outcome, self._failed = None, None
        t0 = time.perf_counter()
        try:
            before = self.observe(fact, "before")
            deltas = compute_deltas(self.model, self.tok, [fact.request], hp, progress=progress)
            self._undo = apply_deltas_(self.model, deltas)
            self._left = param_fingerprint(self.model, list(deltas.tensors))
            after = self.observe(fact, "after")
        except BaseException as exc:
            self._failed = f"{type(exc).__name__}: {exc}"
            self.undo()
            raise
        norms = pd.DataFrame(deltas.meta.get("diagnostics", []))
        norms = norms[["layer", "component", "update_norm"]] if not norms.empty else norms
        self.outcome = EditOutcome(
            deltas,
            pd.concat([before[0], after[0]], ignore_index=True),
            pd.concat([before[1], after[1]], ignore_index=True),
            norms,
            {"before": before[2], "after": after[2]},
            time.perf_counter() - t0,
        )
        logger.info("edit applied in %.1fs: %s -> %s", self.outcome.seconds, fact.request.text, fact.request.target_new)
        return self.outcome

    def undo(self) -> bool:
        """Restore the weights the applied edit changed (bit-exact); False when none was applied."""
        if self._undo is None:
            return False
        if param_fingerprint(self.model, list(self._undo)) != self._left:
            raise EditMismatchError(
                f"cannot undo this session's edit: the weights it changed ({len(self._undo)} parameters, e.g. "
                f"{next(iter(self._undo))!r}) are no longer the ones it left; another session or code edited them "
                f"since. Undo those edits first (the latest first), then this one"
            )
        restore_(self.model, self._undo)
        self._undo, self._left = None, None
        return True

    def save(self, path: str | Path) -> Path:
        """Write the last edit's update (:meth:`pmetlab.Deltas.save`; reload with ``Deltas.load``)."""
        if self._failed is not None:
            raise ValueError(f"the last edit failed ({self._failed[:200]}); there is no edit to save, run one first")
        if self.outcome is None:
            raise ValueError("no edit to save yet; run an edit first")
        return self.outcome.deltas.save(path)
