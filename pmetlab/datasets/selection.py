"""Choosing records and turning them into edit requests."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from ..cache import stable_hash
from ..requests import EditRequest

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# subsets and requests
# ---------------------------------------------------------------------------------------------
class Selection(NamedTuple):
    """Records chosen by :func:`select` and a JSON-serialisable description for run records."""

    records: list[dict]
    description: dict[str, Any]


def _id_of(rec: Mapping[str, Any], i: int) -> Any:
    for k in ("case_id", "known_id"):
        if k in rec:
            return rec[k]
    return i


def select(
    records: Sequence[dict], n: int | None = None, mode: Literal["first", "sample"] = "first", seed: int = 0
) -> Selection:
    """A deterministic subset of ``records``.

    Args:
        n: how many (None: all).
        mode: "first" takes the first ``n``; "sample" draws ``n`` without replacement with
            ``numpy.random.default_rng(seed)`` and keeps them in file order.

    Returns:
        :class:`Selection` ``(records, description)``; the description holds the dataset info (when
        ``records`` is a :class:`Records`), ``n_total``, ``n``, ``mode``, ``seed``, the selected ids
        and a hash of them.
    """
    if mode not in ("first", "sample"):
        raise ValueError(f"mode must be 'first' or 'sample', got {mode!r}")
    total = len(records)
    if n is None:
        n = total
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if n > total:
        raise ValueError(f"cannot select n={n} records from {total}; pass n <= {total} or n=None")
    if mode == "first":
        idx = list(range(int(n)))
    else:
        idx = sorted(int(i) for i in np.random.default_rng(seed).choice(total, size=int(n), replace=False))
    chosen = [records[i] for i in idx]
    ids = [_id_of(r, i) for r, i in zip(chosen, idx)]
    info = getattr(records, "info", None)
    desc = {
        "dataset": info.to_dict() if info is not None else None,
        "n_total": total,
        "n": int(n),
        "mode": mode,
        "seed": int(seed) if mode == "sample" else None,
        "ids": ids,
        "ids_hash": stable_hash(ids),
    }
    return Selection(chosen, desc)


def _conflict_key(rec: Any, i: int) -> tuple[str, str]:
    try:
        rw = rec["requested_rewrite"]
        return str(rw["subject"]), str(rw["relation_id"])
    except (KeyError, TypeError):
        raise KeyError(
            f"record {i} has no requested_rewrite.subject / requested_rewrite.relation_id; "
            f"conflicts are defined on CounterFact records only (got {type(rec).__name__})"
        ) from None


class Conflicts(NamedTuple):
    """Records split by the multi-CounterFact rule: ``kept`` (the first record for each
    (subject, relation_id)) and ``dropped`` (later records repeating one), both in input order."""

    kept: list[dict]
    dropped: list[dict]


def split_conflicting(records: Sequence[dict]) -> Conflicts:
    """:class:`Conflicts` of ``records`` (the first record for each (subject, relation_id) is kept).

    Raises:
        KeyError: a record lacks ``requested_rewrite.subject`` or ``.relation_id``.
    """
    seen: set[tuple[str, str]] = set()
    kept, dropped = [], []
    for i, r in enumerate(records):
        key = _conflict_key(r, i)
        (dropped if key in seen else kept).append(r)
        seen.add(key)
    return Conflicts(kept, dropped)


def drop_conflicting(records: Sequence[dict]) -> list[dict]:
    """Keep the first CounterFact record for each (subject, relation_id), as multi-CounterFact does,
    so that a batch of edits never asks for two objects of the same subject and relation."""
    return split_conflicting(records).kept


class Batches(NamedTuple):
    """Edit batches of records (each without conflicts) and the records left out of them."""

    batches: list[list[dict]]
    skipped: list[dict]


def drop_conflicting_per_batch(records: Sequence[dict], batch_size: int) -> Batches:
    """``records`` cut into consecutive batches of ``batch_size``, each then stripped of the records
    that repeat the (subject, relation_id) of an earlier record in the same batch (the
    multi-CounterFact rule, applied per batch; see :func:`split_conflicting`).

    Raises:
        ValueError: ``batch_size`` is not a positive integer. KeyError: a record is not CounterFact.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batches, skipped = [], []
    for start in range(0, len(records), int(batch_size)):
        split = split_conflicting(records[start : start + int(batch_size)])
        batches.append(split.kept)
        skipped += split.dropped
    return Batches(batches, skipped)


def counterfact_requests(records: Iterable[Mapping[str, Any]]) -> list[EditRequest]:
    """One :class:`EditRequest` per CounterFact record (target_new, with target_true kept)."""
    return [EditRequest.from_counterfact(r) for r in records]


def zsre_requests(records: Iterable[Mapping[str, Any]]) -> list[EditRequest]:
    """One :class:`EditRequest` per zsRE record: the question with ``{}`` for the subject, answers[0]."""
    return [EditRequest.from_zsre(r) for r in records]
