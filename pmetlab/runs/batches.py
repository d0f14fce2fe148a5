"""Which records a run edits: the split, the selection and the edit batches of a :class:`RunSpec`.

Shared by the load phase and the target workers (:mod:`pmetlab.runs.workers`), so both always
see the same requests in the same batches.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from ..datasets import (
    Batches,
    Selection,
    counterfact_requests,
    drop_conflicting_per_batch,
    load_dataset,
    select,
    split_records,
    zsre_requests,
)
from ..requests import EditRequest
from .spec import RunSpec

logger = logging.getLogger(__name__)

__all__ = ["PlannedRecords", "cut_batches", "plan_records"]


class PlannedRecords(NamedTuple):
    """The dataset's info, the split's description, the selection and the edit batches."""

    info: dict[str, Any] | None
    split: dict[str, Any]
    selection: Selection
    cut: Batches

    def requests(self, dataset: str) -> list[list[EditRequest]]:
        """The edit requests, batch by batch."""
        to_requests = zsre_requests if dataset == "zsre" else counterfact_requests
        return [to_requests(b) for b in self.cut.batches]


def cut_batches(spec: RunSpec, records: list[dict]) -> Batches:
    """The edit batches of ``records`` (``spec.batches_of`` each). On CounterFact data each batch
    keeps only the first record for each (subject, relation_id) (the multi-CounterFact rule); the
    others are skipped: neither edited nor evaluated, counted and logged."""
    if spec.dataset == "zsre":
        bs = spec.batches_of
        return Batches([records[i : i + bs] for i in range(0, len(records), bs)], [])
    cut = drop_conflicting_per_batch(records, spec.batches_of)
    if cut.skipped:
        logger.warning(
            "%d of %d selected records skipped (not edited, not evaluated): each repeats the (subject, "
            "relation_id) of an earlier record in its edit batch of %d; case_ids %s",
            len(cut.skipped),
            len(records),
            spec.batches_of,
            [r.get("case_id") for r in cut.skipped][:20],
        )
    return cut


def plan_records(spec: RunSpec) -> PlannedRecords:
    """Load ``spec.dataset`` (a missing file is an error), take ``spec.split``, select
    ``spec.n_edits`` records by ``spec.subset`` and cut the edit batches."""
    records_all = load_dataset(spec.dataset)
    part, split_desc = split_records(records_all, spec.split)
    sel = select(part, spec.n_edits, mode=spec.subset, seed=spec.seed)
    info = records_all.info.to_dict() if records_all.info is not None else None
    return PlannedRecords(info, split_desc, sel, cut_batches(spec, sel.records))
