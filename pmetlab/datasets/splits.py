"""Tuning and evaluation splits: hyperparameters are chosen on records that are never evaluated.

Every editing dataset has a fixed tuning split, **the last** :data:`TUNE_SIZE` **records of the
dataset as loaded** (CounterFact: the last 200 of ``counterfact_filtered.json``; zsRE: the last 200
of the zsRE file; a file of fewer than ``5 * TUNE_SIZE`` records gives its last fifth, rounded
down), and an evaluation split, every record before them. Runs select from the
evaluation split unless asked otherwise (``split="tune"`` for :func:`pmetlab.tune`, ``"all"`` for
the whole file), so "the first n records" of a run never reaches a tuning record.

The derived ``counterfact+conflict_filter`` splits the same way after filtering; its evaluation
split is then a subset of CounterFact's (the filter only removes records, keeping the order), so a
preset tuned on CounterFact's tuning split is never evaluated on its own records there either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .records import Records

__all__ = ["SPLITS", "TUNE_SIZE", "split_records", "split_rule", "split_bounds", "tune_size"]

#: The named splits: "eval" (everything before the tuning records), "tune" and "all".
SPLITS = ("eval", "tune", "all")
#: Records in each dataset's tuning split (the last ones of the file).
TUNE_SIZE = 200


def split_rule() -> str:
    """The split's definition in words (recorded in run.json next to the split's name)."""
    return (
        f"tune = the last min({TUNE_SIZE}, n_total // 5) records of the dataset as loaded; "
        "eval = every record before them"
    )


def tune_size(n_total: int) -> int:
    """Records in the tuning split of a dataset of ``n_total`` records."""
    return min(TUNE_SIZE, n_total // 5)


def split_bounds(n_total: int, split: str) -> tuple[int, int]:
    """``(start, stop)`` of ``split`` in a dataset of ``n_total`` records.

    Raises:
        ValueError: an unknown split, or a dataset too small to hold a tuning split and at least
            one evaluation record.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if split == "all":
        return 0, n_total
    if tune_size(n_total) < 1:
        raise ValueError(
            f"a dataset of {n_total} records cannot be split: the tuning split takes the last fifth "
            f"(at most {TUNE_SIZE}) and needs at least one record; pass split='all'"
        )
    cut = n_total - tune_size(n_total)
    return (cut, n_total) if split == "tune" else (0, cut)


def split_records(records: Sequence[dict], split: str) -> tuple[Records, dict[str, Any]]:
    """The records of ``split`` (a :class:`Records` keeping the dataset's ``.info``) and the split's
    description for run records: name, rule, ``start``/``stop`` in the dataset, ``n_total``."""
    start, stop = split_bounds(len(records), split)
    info = getattr(records, "info", None)
    part = Records(list(records[start:stop]), info)
    desc = {"split": split, "rule": split_rule(), "start": start, "stop": stop, "n_total": len(records)}
    return part, desc
