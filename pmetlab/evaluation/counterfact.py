"""CounterFact metrics per record (method.md §6).

For every prompt, NLL(o) is the mean per-token NLL of `` o`` after the prompt
(:mod:`pmetlab.evaluation.scoring`); o* = target_new, o^c = target_true.

Probability family (ROME/MEMIT), per record:

- ``efficacy_score``: fraction of rewrite prompts (1) with NLL(o*) < NLL(o^c), i.e. P(o*) > P(o^c)
  strictly; a tie is a failure.
- ``paraphrase_score``: the same over the paraphrase prompts (2).
- ``neighborhood_score``: fraction of neighborhood prompts (10) with NLL(o^c) < NLL(o*) strictly.
- ``*_magnitude``: mean of exp(-NLL(o*)) - exp(-NLL(o^c)) for efficacy and paraphrase, and of
  exp(-NLL(o^c)) - exp(-NLL(o*)) for the neighborhood (EM, PM, NM).

Token-accuracy family (teacher-forced top-1, as EasyEdit reports it), per record:

- ``efficacy_token_acc`` / ``paraphrase_token_acc``: fraction of o*'s tokens that are the model's
  top-1 prediction, averaged over the prompts;
- ``neighborhood_token_acc``: the same for o^c on the neighborhood prompts.

Generation (``generation=True``):

- ``fluency``: mean over the record's generation prompts of (2/3·H_2 + 4/3·H_3)/2 in bits
  (:mod:`pmetlab.evaluation.text`) of prompt + continuation (as ROME scores it), continuations of
  ``n_gen_tokens`` tokens from seeded top-5 sampling (:mod:`pmetlab.evaluation.generation`);
- ``consistency``: TF-IDF cosine between the record's generated texts (joined) and the attribute
  snippets about other subjects with relation r and object o*; NaN when no reference is given or
  it has no snippet for (r, o*) — never 0.

Also stored: ``neighborhood_prefers_true`` (a tuple of bools per neighborhood prompt) for
:func:`pmetlab.evaluation.relative_specificity`. Per-record values are fractions in [0, 1] and
entropies in bits; :func:`pmetlab.evaluation.summarize` scales them by 100.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..datasets import ConsistencyReference, load_consistency_reference, validate_counterfact_record, validate_records
from ..types import Model, Tokenizer
from .generation import derive_seed, generate_texts
from .scoring import PairScores, score_pairs, score_pairs_reference
from .text import mean_text_entropy, tfidf_cosine

logger = logging.getLogger(__name__)

__all__ = [
    "evaluate_counterfact",
    "evaluate_counterfact_reference",
    "preference_metrics",
    "counterfact_prompt_sets",
    "COUNTERFACT_METRICS",
]

PROMPT_SETS = ("efficacy", "paraphrase", "neighborhood")
COUNTERFACT_METRICS = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "efficacy_magnitude",
    "paraphrase_magnitude",
    "neighborhood_magnitude",
    "efficacy_token_acc",
    "paraphrase_token_acc",
    "neighborhood_token_acc",
    "fluency",
    "consistency",
)


def counterfact_prompt_sets(record: Mapping[str, Any]) -> dict[str, list[str]]:
    """The scored prompts of a record: {"efficacy": [rewrite prompt], "paraphrase": [...],
    "neighborhood": [...]}."""
    rw = record["requested_rewrite"]
    return {
        "efficacy": [rw["prompt"].format(rw["subject"])],
        "paraphrase": list(record["paraphrase_prompts"]),
        "neighborhood": list(record["neighborhood_prompts"]),
    }


def preference_metrics(
    nll_new: Sequence[float], nll_true: Sequence[float], *, prefer: Literal["new", "true"]
) -> dict[str, float]:
    """Score and magnitude over one record's prompts of one kind.

    Args:
        nll_new, nll_true: (n_prompts,) mean per-token NLL of o* and o^c.
        prefer: "new" (efficacy, paraphrase: success iff NLL(o*) < NLL(o^c)) or "true"
            (neighborhood: success iff NLL(o^c) < NLL(o*)). Ties are failures.

    Returns:
        {"score": fraction of successes, "magnitude": mean of exp(-NLL(preferred)) - exp(-NLL(other))};
        NaN for no prompts.
    """
    a = np.asarray(nll_new, dtype=np.float64)
    b = np.asarray(nll_true, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"nll_new and nll_true must be 1-D of equal length, got {a.shape} and {b.shape}")
    if prefer not in ("new", "true"):
        raise ValueError(f"prefer must be 'new' or 'true', got {prefer!r}")
    if prefer == "true":
        a, b = b, a
    if a.size == 0:
        return {"score": float("nan"), "magnitude": float("nan")}
    return {"score": float(np.mean(a < b)), "magnitude": float(np.mean(np.exp(-a) - np.exp(-b)))}


def _pairs(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], list[tuple[int, str, int, int]]]:
    """All (prompt, candidate) pairs: for every record and prompt set, the prompts with o* then o^c.

    Returns prompts, candidates and an index (record, set, start, n_prompts) into them."""
    prompts: list[str] = []
    cands: list[str] = []
    index = []
    for r, rec in enumerate(records):
        rw = rec["requested_rewrite"]
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        for name, ps in counterfact_prompt_sets(rec).items():
            index.append((r, name, len(prompts), len(ps)))
            prompts += ps + ps
            cands += [new] * len(ps) + [true] * len(ps)
    return prompts, cands, index


def _score_rows(
    records: Sequence[Mapping[str, Any]], scores: PairScores, index: list[tuple[int, str, int, int]]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rec in records:
        row: dict[str, Any] = {"case_id": rec["case_id"]}
        if "orig_case_id" in rec:
            row["orig_case_id"] = rec["orig_case_id"]
        rows.append(row)
    acc = scores.token_accuracy
    for r, name, start, n in index:
        new_idx = list(range(start, start + n))
        true_idx = list(range(start + n, start + 2 * n))
        prefer = "true" if name == "neighborhood" else "new"
        m = preference_metrics(scores.nll[new_idx], scores.nll[true_idx], prefer=prefer)
        rows[r][f"{name}_score"] = m["score"]
        rows[r][f"{name}_magnitude"] = m["magnitude"]
        acc_idx = true_idx if prefer == "true" else new_idx
        rows[r][f"{name}_token_acc"] = float(np.mean(acc[acc_idx])) if n else float("nan")
        if name == "neighborhood":
            rows[r]["neighborhood_prefers_true"] = tuple(bool(x) for x in scores.nll[true_idx] < scores.nll[new_idx])
    return rows


def _resolve_reference(reference) -> ConsistencyReference | None:
    if reference is None or isinstance(reference, ConsistencyReference):
        return reference
    if reference == "auto":
        return load_consistency_reference(download=False)
    raise ValueError(f"reference must be a ConsistencyReference, None or 'auto', got {reference!r}")


def _generation_columns(
    model,
    tok,
    records,
    rows,
    *,
    n_gen_tokens: int,
    batch_size: int,
    seed: int,
    reference: ConsistencyReference | None,
    keep_texts: bool,
    progress: bool,
) -> None:
    prompts, seeds, owner = [], [], []
    for r, rec in enumerate(records):
        for j, p in enumerate(rec["generation_prompts"]):
            prompts.append(p)
            seeds.append(derive_seed(seed, rec["case_id"], j))
            owner.append(r)
    texts = generate_texts(
        model,
        tok,
        prompts,
        seeds=seeds,
        n_new_tokens=n_gen_tokens,
        batch_size=batch_size,
        progress=progress,
        desc="CounterFact generation",
    )
    per_rec: list[list[str]] = [[] for _ in records]
    for r, t in zip(owner, texts):
        per_rec[r].append(t)
    for r, rec in enumerate(records):
        rows[r]["fluency"] = mean_text_entropy(per_rec[r])
        cons = float("nan")
        if reference is not None and per_rec[r]:
            rw = rec["requested_rewrite"]
            ref_texts = reference.texts(rw["relation_id"], rw["target_new"]["id"])
            if ref_texts:
                cons = tfidf_cosine(" ".join(per_rec[r]), " ".join(ref_texts), reference.idf, reference.vocab)
            else:
                logger.debug(
                    "no attribute snippets for (%s, %s); consistency is NaN for case %s",
                    rw["relation_id"],
                    rw["target_new"]["id"],
                    rec["case_id"],
                )
        rows[r]["consistency"] = cons
        if keep_texts:
            rows[r]["gen_texts"] = tuple(per_rec[r])


def _note_missing_consistency(df: pd.DataFrame, reference: ConsistencyReference | None) -> None:
    """One line per evaluation, not one per record, when the reference lacks some records' snippets."""
    n = int(df["consistency"].isna().sum()) if reference is not None and "consistency" in df else 0
    if n:
        logger.info(
            "consistency is NaN for %d of %d record(s): the reference has no attribute snippets for their "
            "(relation, target); DEBUG logging names them",
            n,
            len(df),
        )


def _frame(rows: list[dict[str, Any]], generation: bool) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if not generation:
        df["fluency"] = np.nan
        df["consistency"] = np.nan
    lead = [c for c in ("case_id", "orig_case_id") if c in df.columns]
    rest = [c for c in COUNTERFACT_METRICS if c in df.columns]
    other = [c for c in df.columns if c not in lead and c not in rest]
    return df[lead + rest + other]


def evaluate_counterfact(
    model: Model,
    tok: Tokenizer,
    records: Sequence[Mapping[str, Any]],
    *,
    generation: bool = True,
    n_gen_tokens: int = 100,
    batch_size: int = 32,
    gen_batch_size: int | None = None,
    seed: int = 0,
    reference: ConsistencyReference | Literal["auto"] | None = None,
    keep_texts: bool = False,
    batched: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """CounterFact metrics of ``model`` on ``records``, one row per record (see the module docstring).

    Args:
        records: CounterFact records (original schema, e.g. from :func:`pmetlab.datasets.load_counterfact`).
        generation: also sample texts for ``fluency``/``consistency`` (else those columns are NaN).
        n_gen_tokens: new tokens per generation prompt (ROME: 100 tokens including the prompt).
        batch_size: (prompt, candidate) pairs per forward pass.
        gen_batch_size: prompts per generation batch (default ``batch_size``).
        seed: generation seed; each prompt's stream is derived from (seed, case_id, prompt index).
        reference: the consistency reference, "auto" to load it from local files if present, or
            None (consistency NaN).
        keep_texts: add a ``gen_texts`` column (tuple of texts per record).
        batched: False runs :func:`evaluate_counterfact_reference` (one pair per forward pass).

    Returns:
        DataFrame with ``case_id`` (and ``orig_case_id`` when the records have it), the metric
        columns of ``COUNTERFACT_METRICS`` and ``neighborhood_prefers_true``. The caller adds
        ``phase`` ("pre"/"post").
    """
    if not batched:
        return evaluate_counterfact_reference(
            model,
            tok,
            records,
            generation=generation,
            n_gen_tokens=n_gen_tokens,
            seed=seed,
            reference=reference,
            keep_texts=keep_texts,
            progress=progress,
        )
    records = validate_records(records, validate_counterfact_record)
    reference = _resolve_reference(reference) if generation else None
    prompts, cands, index = _pairs(records)
    scores = score_pairs(
        model, tok, prompts, cands, batch_size=batch_size, progress=progress, desc="CounterFact scoring"
    )
    rows = _score_rows(records, scores, index)
    if generation:
        _generation_columns(
            model,
            tok,
            records,
            rows,
            n_gen_tokens=n_gen_tokens,
            batch_size=gen_batch_size or batch_size,
            seed=seed,
            reference=reference,
            keep_texts=keep_texts,
            progress=progress,
        )
    df = _frame(rows, generation)
    _note_missing_consistency(df, reference)
    return df


def evaluate_counterfact_reference(
    model: Model,
    tok: Tokenizer,
    records: Sequence[Mapping[str, Any]],
    *,
    generation: bool = True,
    n_gen_tokens: int = 100,
    seed: int = 0,
    reference: ConsistencyReference | Literal["auto"] | None = None,
    keep_texts: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Record-at-a-time version of :func:`evaluate_counterfact`: each (prompt, candidate) pair in its own
    unpadded forward pass, each generation prompt alone. Same metrics (up to float round-off); the
    baseline the batched path is tested and benchmarked against."""
    records = validate_records(records, validate_counterfact_record)
    reference = _resolve_reference(reference) if generation else None
    all_rows: list[dict[str, Any]] = []
    from ..progress import tqdm

    for rec in tqdm(records, desc="CounterFact (reference)", disable=not progress):
        prompts, cands, index = _pairs([rec])
        scores = score_pairs_reference(model, tok, prompts, cands)
        rows = _score_rows([rec], scores, index)
        if generation:
            _generation_columns(
                model,
                tok,
                [rec],
                rows,
                n_gen_tokens=n_gen_tokens,
                batch_size=1,
                seed=seed,
                reference=reference,
                keep_texts=keep_texts,
                progress=False,
            )
        all_rows += rows
    df = _frame(all_rows, generation)
    _note_missing_consistency(df, reference)
    return df
