"""Evaluation beyond teacher forcing (issue #23), per record, of the unedited ("pre") and the edited
("post") model. Families (:data:`BEYOND_FAMILIES`), each opt-in:

- ``generation`` — greedy continuations (:mod:`.greedy`, cap ``max_new_tokens``, stop at newline or
  EOS) of the rewrite prompt (zsRE: the question ``src``), the paraphrases (zsRE: ``rephrase``) and
  the neighbourhood prompts (zsRE: ``loc`` + "?"). Columns, fractions of the record's prompts:
  ``gen_{efficacy,paraphrase}_{new,true}_{begins,contains}`` (o* / o^c; zsRE has no o^c: NaN) and
  ``gen_neighborhood_true_{begins,contains}`` (the original answer survives; zsRE: ``loc_ans``).
- ``nkl`` — ``neighborhood_kl``: mean KL(unedited ‖ edited) over the neighbourhood prompts at the
  positions of the original answer (:mod:`.nkl`), nats; 0 on the pre row.
- ``cfplus`` — CounterFact+ specificity: each neighbourhood prompt preceded by the rewrite prompt and
  its new target, ``f"{rewrite} {o*}. {neighbourhood prompt}"`` (:func:`cfplus_prompt`), scored as NS:
  ``cfplus_neighborhood_score``/``_magnitude`` (zsRE: ``cfplus_neighborhood_token_acc``).
- ``prefix`` — efficacy after ``prefix_tokens`` tokens of held-out corpus text, ``f"{passage} {rewrite}"``
  (:mod:`.heldout`, one seeded passage per case_id, the same for every method):
  ``prefix_efficacy_score``/``_magnitude`` (zsRE: ``prefix_efficacy_token_acc``); ``prefix_chunk``
  names the passage.
- ``perplexity`` — perplexity of held-out corpus chunks (never covariance text): a model-level value,
  in :attr:`BeyondResult.perplexity` (per chunk) and the summary (``perplexity``, ``perplexity_rel_change``).

Measured cost on SmolLM2-135M, CPU, ``OMP_NUM_THREADS=1``, 8 CounterFact records, both models
(unedited and edited), default settings, wall seconds on a shared 2-core machine (about half of it
CPU time): generation 6.6 s/record (13 prompts × 12 tokens × 2), cfplus + prefix 7.0 s/record (22
scored pairs × 2, prefixes of 50 tokens), nkl 1.2 s/record, perplexity 53 s per run (16 chunks × 256
tokens × 2) and 1.1 s to cut the held-out text: about 15 s/record + 55 s/run for every family.
Command: ``python benchmarks/beyond_cost.py <run dir with deltas.safetensors> 8``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..datasets import validate_counterfact_record, validate_records, validate_zsre_record
from ..editing.deltas import apply_deltas_, edited, restore_
from .counterfact import counterfact_prompt_sets, preference_metrics
from .greedy import answer_match, greedy_continuations
from .heldout import HELDOUT_SKIP, chunk_nll, heldout_pool, perplexity_chunks, prefix_passages
from .nkl import neighborhood_kl
from .scoring import score_pairs

logger = logging.getLogger(__name__)

__all__ = ["BEYOND_FAMILIES", "BeyondSettings", "BeyondResult", "beyond_families", "cfplus_prompt", "evaluate_beyond"]

BEYOND_FAMILIES = ("generation", "nkl", "cfplus", "prefix", "perplexity")
#: The per-record columns, in the order of the records (cached rows come back with sorted keys).
COLUMN_ORDER = tuple(
    [f"gen_{s}_{w}_{m}" for s in ("efficacy", "paraphrase") for w in ("new", "true") for m in ("begins", "contains")]
    + ["gen_neighborhood_true_begins", "gen_neighborhood_true_contains"]
    + [f"{f}_{m}" for f in ("cfplus_neighborhood", "prefix_efficacy") for m in ("score", "magnitude", "token_acc")]
    + ["prefix_chunk", "neighborhood_kl"]
)


def beyond_families(value: Any) -> tuple[str, ...]:
    """The families a setting names: True/"all" → all, False/None/"none"/"" → (), a comma-separated
    string or a sequence of names → those (in :data:`BEYOND_FAMILIES` order).

    Raises:
        ValueError: an unknown family (the message lists the valid ones) or a value of another type.
    """
    if value is True or value == "all":
        return BEYOND_FAMILIES
    if value is False or value is None or value in ("none", ""):
        return ()
    names = [s.strip() for s in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"beyond must be True, False, 'all' or family names, got {value!r}")
    unknown = sorted(set(names) - set(BEYOND_FAMILIES))
    if unknown:
        raise ValueError(
            f"unknown beyond famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; valid: {list(BEYOND_FAMILIES)}"
        )
    return tuple(f for f in BEYOND_FAMILIES if f in names)


@dataclass(frozen=True)
class BeyondSettings:
    """Settings of :func:`evaluate_beyond` (validated on construction; one-line errors).

    Attributes:
        families: which families to compute (:func:`beyond_families` accepts the same values).
        max_new_tokens: the greedy decoding cap (tokens).
        prefix_tokens: held-out tokens before the rewrite prompt (``prefix``).
        seed: draws the prefix passages and the perplexity chunks.
        corpus: the corpus the held-out text comes from (the covariance corpus).
        heldout_skip: corpus tokens skipped before the held-out pool (>= the covariance budget).
        seq_len: held-out chunk length (the covariance chunking).
        pool_chunks: held-out chunks in the pool; ``ppl_chunks`` of them are scored for perplexity.
        batch_size: prompt pairs per forward pass (greedy decoding: prompts per batch).
    """

    families: tuple[str, ...] = BEYOND_FAMILIES
    max_new_tokens: int = 12
    prefix_tokens: int = 50
    seed: int = 0
    corpus: str = "default"
    heldout_skip: int = HELDOUT_SKIP
    seq_len: int = 256
    pool_chunks: int = 64
    ppl_chunks: int = 16
    batch_size: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", beyond_families(self.families))
        for name in ("max_new_tokens", "prefix_tokens", "pool_chunks", "ppl_chunks", "batch_size", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"beyond setting {name} must be an int >= 1, got {type(v).__name__}: {v!r}")
        if self.ppl_chunks > self.pool_chunks:
            raise ValueError(f"ppl_chunks={self.ppl_chunks} exceeds pool_chunks={self.pool_chunks}")
        if isinstance(self.heldout_skip, bool) or not isinstance(self.heldout_skip, int) or self.heldout_skip < 0:
            raise ValueError(f"heldout_skip must be an int >= 0, got {self.heldout_skip!r}")

    @property
    def needs_corpus(self) -> bool:
        return "prefix" in self.families or "perplexity" in self.families

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["families"] = list(self.families)
        return d


@dataclass
class BeyondResult:
    """What :func:`evaluate_beyond` measured.

    Attributes:
        records: one row per (phase, record): ``phase`` ("pre"/"post"), ``case_id`` and the columns
            of the families computed (see the module docstring).
        perplexity: one row per held-out chunk: ``chunk``, ``n_tokens``, ``nll_pre``, ``nll_post``
            (summed nats); empty without the family.
        wall_s: seconds per family (both models together).
    """

    records: pd.DataFrame
    perplexity: pd.DataFrame = field(default_factory=pd.DataFrame)
    wall_s: dict[str, float] = field(default_factory=dict)


def cfplus_prompt(rewrite: str, new_target: str, neighborhood_prompt: str) -> str:
    """The CounterFact+ prompt: the rewrite prompt, its new target and the neighbourhood prompt."""
    return f"{rewrite} {new_target}. {neighborhood_prompt}"


def _view(rec: Mapping[str, Any], kind: str, position: int) -> dict[str, Any]:
    """One record as the families read it: prompts per set, o*, o^c (None for zsRE), the
    neighbourhood answer, the rewrite prompt (a zsRE record without case_id is named by ``position``)."""
    if kind == "zsre":
        return {
            "case_id": rec.get("case_id", position),
            "sets": {"efficacy": [rec["src"]], "paraphrase": [rec["rephrase"]], "neighborhood": [rec["loc"] + "?"]},
            "new": rec["answers"][0],
            "true": None,
            "neigh": rec["loc_ans"],
            "rewrite": rec["src"],
        }
    rw = rec["requested_rewrite"]
    sets = counterfact_prompt_sets(rec)
    return {
        "case_id": rec["case_id"],
        "sets": sets,
        "new": rw["target_new"]["str"],
        "true": rw["target_true"]["str"],
        "neigh": rw["target_true"]["str"],
        "rewrite": sets["efficacy"][0],
    }


def _generation(model, tok, views, s: BeyondSettings, rows, progress: bool) -> None:
    owners, prompts = [], []
    for r, v in enumerate(views):
        for name, ps in v["sets"].items():
            owners += [(r, name)] * len(ps)
            prompts += ps
    conts = greedy_continuations(
        model, tok, prompts, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, progress=progress
    )
    hits: dict[tuple[int, str, str], list[tuple[bool, bool]]] = {}
    for (r, name), c in zip(owners, conts):
        v = views[r]
        for which in ("new", "true") if name != "neighborhood" else ("neigh",):
            target = v[which]
            hits.setdefault((r, name, which), []).append(answer_match(c, target) if target else (np.nan, np.nan))
    for (r, name, which), h in hits.items():
        label = "true" if which == "neigh" else which
        arr = np.asarray(h, dtype=np.float64)
        rows[r][f"gen_{name}_{label}_begins"] = float(arr[:, 0].mean())
        rows[r][f"gen_{name}_{label}_contains"] = float(arr[:, 1].mean())


def _scored(model, tok, views, kind: str, s: BeyondSettings, passages, rows, progress: bool) -> None:
    """``cfplus`` and ``prefix`` in one teacher-forced scoring pass."""
    prompts, cands, index = [], [], []
    for r, v in enumerate(views):
        if "cfplus" in s.families:
            ps = [cfplus_prompt(v["rewrite"], v["new"], p) for p in v["sets"]["neighborhood"]]
            index.append((r, "cfplus_neighborhood", len(prompts), len(ps), "true"))
            prompts += ps if kind == "zsre" else ps + ps
            cands += [v["neigh"]] * len(ps) if kind == "zsre" else [v["new"]] * len(ps) + [v["true"]] * len(ps)
        if "prefix" in s.families:
            p = f"{passages[r]} {v['rewrite']}"
            index.append((r, "prefix_efficacy", len(prompts), 1, "new"))
            prompts += [p] if kind == "zsre" else [p, p]
            cands += [v["new"]] if kind == "zsre" else [v["new"], v["true"]]
    sc = score_pairs(model, tok, prompts, cands, batch_size=s.batch_size, progress=progress, desc="beyond scoring")
    acc = sc.token_accuracy
    for r, name, a, n, prefer in index:
        if kind == "zsre":
            rows[r][f"{name}_token_acc"] = float(acc[a : a + n].mean())
            continue
        m = preference_metrics(sc.nll[a : a + n], sc.nll[a + n : a + 2 * n], prefer=prefer)
        rows[r][f"{name}_score"], rows[r][f"{name}_magnitude"] = m["score"], m["magnitude"]


def _measure(model, tok, views, kind, s: BeyondSettings, held: dict, progress: bool, wall: dict) -> list[dict]:
    """The per-record families of one model state (pre or post), one row per record of ``views``
    (``held["passages"]``/``["passage_chunks"]`` aligned with them); adds each family's time."""
    rows: list[dict[str, Any]] = [{"case_id": v["case_id"]} for v in views]
    t = time.perf_counter()
    if "generation" in s.families:
        _generation(model, tok, views, s, rows, progress)
        wall["generation"] = wall.get("generation", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    if "cfplus" in s.families or "prefix" in s.families:
        _scored(model, tok, views, kind, s, held.get("passages"), rows, progress)
        wall["cfplus+prefix"] = wall.get("cfplus+prefix", 0.0) + time.perf_counter() - t
    if "prefix" in s.families:
        for r, i in enumerate(held["passage_chunks"]):
            rows[r]["prefix_chunk"] = int(i)
    return rows


def _perplexity(model, tok, held: dict, progress: bool, wall: dict) -> np.ndarray:
    t = time.perf_counter()
    out = chunk_nll(model, tok, held["ppl"], progress=progress)
    wall["perplexity"] = wall.get("perplexity", 0.0) + time.perf_counter() - t
    return out


def _unedited(model, tok, views, kind, s: BeyondSettings, held: dict, progress: bool, wall: dict, store) -> list[dict]:
    """The pre rows (and ``held["nll"]``), from ``store`` where it has them (None: no cache)."""
    has_ppl = "perplexity" in s.families
    if store is None:
        held["nll"] = [_perplexity(model, tok, held, progress, wall)] if has_ppl else []
        return _measure(model, tok, views, kind, s, held, progress, wall)
    from .beyond_cache import cached_array, cached_rows, pre_setting

    setting = pre_setting(model, tok, kind, s.to_dict())
    passages = held.get("passages") or [None] * len(views)

    def compute(idx: list[int]) -> list[dict]:
        part = {k: [held[k][i] for i in idx] for k in ("passages", "passage_chunks") if k in held}
        return _measure(model, tok, [views[i] for i in idx], kind, s, part, progress, wall)

    rows, _ = cached_rows(store, setting, [{"view": v, "passage": p} for v, p in zip(views, passages)], compute)
    if has_ppl:
        held["nll"] = [cached_array(store, setting, held["ppl"], lambda: _perplexity(model, tok, held, progress, wall))]
    return rows


def _held_out(tok, views, s: BeyondSettings, covariance_tokens: int | None) -> dict[str, Any]:
    if not s.needs_corpus:
        return {}
    pool = heldout_pool(
        tok,
        corpus=s.corpus,
        skip=s.heldout_skip,
        seq_len=s.seq_len,
        n_chunks=s.pool_chunks,
        covariance_tokens=covariance_tokens,
    )
    passages, idx = prefix_passages(tok, pool, [v["case_id"] for v in views], n_tokens=s.prefix_tokens, seed=s.seed)
    ppl = perplexity_chunks(pool, s.ppl_chunks, seed=s.seed)
    return {"passages": passages, "passage_chunks": idx, "ppl": [pool[i] for i in ppl], "ppl_index": ppl}


def evaluate_beyond(
    model,
    tok,
    records: Sequence[Mapping[str, Any]],
    *,
    deltas=None,
    dataset: str = "counterfact",
    settings: BeyondSettings | None = None,
    covariance_tokens: int | None = None,
    store=None,
    progress: bool = True,
) -> BeyondResult:
    """The beyond-teacher-forcing families of the unedited ``model`` and of ``model`` + ``deltas``.

    Args:
        records: CounterFact records, or zsRE records when ``dataset == "zsre"``.
        deltas: a :class:`pmetlab.Deltas` (not applied; put on and taken off here), or None: an
            identity edit (post = pre, NKL 0, perplexity change 0).
        settings: :class:`BeyondSettings` (default: every family).
        covariance_tokens: the covariance budget of the edit; refused above ``settings.heldout_skip``.
        store: a :class:`pmetlab.store.KeyedStore` holding the unedited model's values across runs
            (:mod:`.beyond_cache`); None measures them every time.

    Returns:
        :class:`BeyondResult`. The model is left unedited (also on errors).
    """
    s = settings if settings is not None else BeyondSettings()
    if not records:
        raise ValueError("evaluate_beyond needs at least one record")
    kind = "zsre" if dataset == "zsre" else "counterfact"
    records = validate_records(records, validate_zsre_record if kind == "zsre" else validate_counterfact_record)
    views = [_view(r, kind, i) for i, r in enumerate(records)]
    wall: dict[str, float] = {}
    t = time.perf_counter()
    held = _held_out(tok, views, s, covariance_tokens)
    wall["heldout_text"] = time.perf_counter() - t
    pre = _unedited(model, tok, views, kind, s, held, progress, wall, store)

    def edit():
        undo = apply_deltas_(model, deltas)
        return lambda: restore_(model, undo)

    if deltas is None:
        post = [dict(r) for r in pre]
        if "perplexity" in s.families:
            held["nll"].append(held["nll"][0])
    else:
        with edited(model, deltas):
            post = _measure(model, tok, views, kind, s, held, progress, wall)
            if "perplexity" in s.families:
                held["nll"].append(_perplexity(model, tok, held, progress, wall))
    _nkl(model, tok, views, s, pre, post, edit if deltas is not None else None, wall, progress)
    df = pd.concat([pd.DataFrame(pre).assign(phase="pre"), pd.DataFrame(post).assign(phase="post")], ignore_index=True)
    order = ["phase", "case_id", *COLUMN_ORDER]
    df = df[[c for c in order if c in df.columns] + [c for c in df.columns if c not in order]]
    return BeyondResult(df, _perplexity_frame(held), {k: round(v, 3) for k, v in wall.items()})


def _nkl(model, tok, views, s: BeyondSettings, pre, post, edit, wall, progress: bool) -> None:
    if "nkl" not in s.families:
        return
    t = time.perf_counter()
    prompts, answers, owner = [], [], []
    for r, v in enumerate(views):
        ps = v["sets"]["neighborhood"]
        prompts += ps
        answers += [v["neigh"]] * len(ps)
        owner += [r] * len(ps)
    vals = neighborhood_kl(model, tok, prompts, answers, edit, batch_size=s.batch_size, progress=progress)
    per: list[list[float]] = [[] for _ in views]
    for r, x in zip(owner, vals):
        per[r].append(x)
    for r in range(len(views)):
        pre[r]["neighborhood_kl"] = 0.0
        post[r]["neighborhood_kl"] = float(np.mean(per[r])) if per[r] else float("nan")
    wall["nkl"] = time.perf_counter() - t


def _perplexity_frame(held: dict) -> pd.DataFrame:
    if not held.get("nll"):
        return pd.DataFrame()
    pre, post = held["nll"]
    return pd.DataFrame(
        {"chunk": held["ppl_index"], "n_tokens": pre[:, 1].astype(int), "nll_pre": pre[:, 0], "nll_post": post[:, 0]}
    )
