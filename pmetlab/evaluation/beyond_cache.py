"""A cross-run cache of the unedited model's beyond-teacher-forcing values (:mod:`.beyond`): every
method evaluated on the same records and model repeats the same "pre" measurements (greedy
continuations, CounterFact+ and prefix scores, held-out perplexity), about half of the cost.

One :class:`~pmetlab.store.KeyedStore` JSON entry per record (and one per perplexity chunk set),
keyed by every input that changes the values: format, pmetlab version, model class, weights
fingerprint, tokenizer, dataset kind, the settings, and the record's prompts, targets and prefix
passage (or the chunks' token ids). Damaged entries read as missing and are computed again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._version import __version__
from ..cache import stable_hash, weights_fingerprint
from ..store import KeyedStore
from ..tokens import tokenizer_identity

logger = logging.getLogger(__name__)

__all__ = ["BEYOND_PRE_FORMAT", "pre_setting", "cached_rows", "cached_array"]

#: Bumped whenever a stored entry would no longer equal a fresh measurement.
BEYOND_PRE_FORMAT = 1


def pre_setting(model, tok, kind: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Everything but the record that the unedited values depend on."""
    return {
        "format": BEYOND_PRE_FORMAT,
        "pmetlab": __version__,
        "model_class": type(model).__name__,
        "weights": weights_fingerprint(model),
        "tokenizer": tokenizer_identity(tok),
        "dataset_kind": kind,
        "settings": dict(settings),
    }


def cached_rows(
    store: KeyedStore,
    setting: Mapping[str, Any],
    records: Sequence[Any],
    compute: Callable[[list[int]], list[dict[str, Any]]],
) -> tuple[list[dict[str, Any]], int]:
    """One row per record: from ``store`` where present, else ``compute(missing positions)`` (then saved).

    Returns:
        The rows in order and how many were reused.
    """
    prefix = stable_hash(setting, 4) + "-"
    keys = [stable_hash(r) for r in records]
    rows: list[dict[str, Any] | None] = [None] * len(keys)
    for i, k in enumerate(keys):
        entry = store.load_json({**setting, "record": k}, prefix=prefix)
        rows[i] = entry if isinstance(entry, dict) else None
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        for i, row in zip(missing, compute(missing), strict=True):
            rows[i] = row
            store.save_json({**setting, "record": keys[i]}, row, prefix=prefix)
    if len(missing) < len(keys):
        logger.info(
            "unedited beyond values of %d of %d records reused from %s",
            len(keys) - len(missing),
            len(keys),
            store.folder,
        )
    return rows, len(keys) - len(missing)  # type: ignore[return-value]


def cached_array(
    store: KeyedStore, setting: Mapping[str, Any], what: Any, compute: Callable[[], np.ndarray]
) -> np.ndarray:
    """``compute()`` (a float array) stored under ``setting`` and ``what`` (e.g. the chunks' ids)."""
    key = {**setting, "array": stable_hash(what)}
    entry = store.load_json(key, prefix="ppl-")
    if isinstance(entry, list):
        return np.asarray(entry, dtype=np.float64)
    arr = compute()
    store.save_json(key, arr.tolist(), prefix="ppl-")
    return arr
