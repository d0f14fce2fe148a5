"""zsRE metrics per record (method.md §6): teacher-forced top-1 token accuracy.

- ``efficacy_token_acc``: fraction of the tokens of `` answers[0]`` that are the model's top-1
  prediction after the question ``src`` (teacher-forced);
- ``paraphrase_token_acc`` (generalization): the same after ``rephrase``;
- ``neighborhood_token_acc`` (specificity): the same for `` loc_ans`` after the NQ question
  ``loc`` as given ("nq question: ...") followed by ``loc_suffix`` ("?", as ROME's
  ``MENDQADataset`` builds it).

Also stored: ``neighborhood_pred`` (the top-1 token ids on the NQ question's answer positions)
for :func:`pmetlab.evaluation.relative_specificity`. Values are fractions in [0, 1];
:func:`pmetlab.evaluation.summarize` scales them by 100.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ..datasets import validate_records, validate_zsre_record
from ..types import Model, Tokenizer
from .scoring import PairScores, score_pairs, score_pairs_reference

logger = logging.getLogger(__name__)

__all__ = ["evaluate_zsre", "evaluate_zsre_reference", "zsre_pairs", "ZSRE_METRICS"]

ZSRE_METRICS = ("efficacy_token_acc", "paraphrase_token_acc", "neighborhood_token_acc")


def zsre_pairs(record: Mapping[str, Any], loc_suffix: str = "?") -> dict[str, tuple[str, str]]:
    """The three scored (prompt, answer) pairs of a zsRE record."""
    return {
        "efficacy": (record["src"], record["answers"][0]),
        "paraphrase": (record["rephrase"], record["answers"][0]),
        "neighborhood": (record["loc"] + loc_suffix, record["loc_ans"]),
    }


def _rows(records, scores: PairScores) -> pd.DataFrame:
    acc = scores.token_accuracy
    rows = []
    for r, rec in enumerate(records):
        row: dict[str, Any] = {"case_id": rec.get("case_id", r)}
        for j, name in enumerate(("efficacy", "paraphrase", "neighborhood")):
            row[f"{name}_token_acc"] = float(acc[3 * r + j])
        row["neighborhood_pred"] = tuple(int(x) for x in scores.token_pred[3 * r + 2])
        rows.append(row)
    return pd.DataFrame(rows)


def _flat(records, loc_suffix: str) -> tuple[list[str], list[str]]:
    prompts, cands = [], []
    for rec in records:
        for p, c in zsre_pairs(rec, loc_suffix).values():
            prompts.append(p)
            cands.append(c)
    return prompts, cands


def evaluate_zsre(
    model: Model,
    tok: Tokenizer,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    loc_suffix: str = "?",
    batched: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """zsRE token accuracies of ``model`` on ``records``, one row per record.

    Args:
        records: zsRE records (e.g. from :func:`pmetlab.datasets.load_zsre`, which adds ``case_id``;
            without it the position in ``records`` is used).
        batch_size: (prompt, answer) pairs per forward pass.
        loc_suffix: appended to the ``loc`` question (ROME appends "?"; pass "" for the raw text).
        batched: False scores one pair per forward pass (the reference path).

    Returns:
        DataFrame with ``case_id``, ``efficacy_token_acc``, ``paraphrase_token_acc``,
        ``neighborhood_token_acc`` and ``neighborhood_pred``; the caller adds ``phase``.
    """
    records = validate_records(records, validate_zsre_record)
    prompts, cands = _flat(records, loc_suffix)
    if batched:
        scores = score_pairs(model, tok, prompts, cands, batch_size=batch_size, progress=progress, desc="zsRE scoring")
    else:
        scores = score_pairs_reference(model, tok, prompts, cands, progress=progress, desc="zsRE (reference)")
    return _rows(records, scores)


def evaluate_zsre_reference(
    model: Model, tok: Tokenizer, records: Sequence[Mapping[str, Any]], *, loc_suffix: str = "?", progress: bool = True
) -> pd.DataFrame:
    """Record-at-a-time version of :func:`evaluate_zsre` (one unpadded forward pass per pair)."""
    return evaluate_zsre(model, tok, records, loc_suffix=loc_suffix, batched=False, progress=progress)
