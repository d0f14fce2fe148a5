"""The cross-run cache of pre-edit metrics: the unedited model's per-record metrics, reused by runs
(e.g. the points of a sweep over the number of edits) that share the model weights, tokenizer,
dataset and evaluation settings; only records not seen before are evaluated.

One :class:`~pmetlab.store.KeyedStore` entry per record under ``$PMETLAB_CACHE_DIR/pre_eval/<model
class>/``, keyed by every input that changes the metrics (format, pmetlab version, model class,
weights fingerprint, tokenizer, dataset, generation settings, seed, evaluation batch size, whether
the consistency reference is present, and the record itself). Generation is seeded per record, so a
record's metrics do not depend on the others. The store writes atomically, checks the key and a
checksum on load and treats a damaged entry as missing, so that record is evaluated again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._version import __version__
from ..cache import stable_hash, weights_fingerprint
from ..store import KeyedStore
from ..tokens import tokenizer_identity
from ..types import Model, Tokenizer
from .spec import RunSpec

logger = logging.getLogger(__name__)

__all__ = ["cached_pre_eval", "pre_eval_setting", "PRE_EVAL_FORMAT"]

#: Bumped whenever a stored entry would no longer equal a fresh evaluation.
PRE_EVAL_FORMAT = 3


def pre_eval_setting(model: Model, tok: Tokenizer, spec: RunSpec, *, has_reference: bool) -> dict[str, Any]:
    """Everything but the record that the pre-edit metrics of one record depend on."""
    return {
        "format": PRE_EVAL_FORMAT,
        "pmetlab": __version__,
        "model_class": type(model).__name__,
        "weights": weights_fingerprint(model),
        "tokenizer": tokenizer_identity(tok),
        "dataset": spec.dataset,
        "generation": spec.generation,
        "n_gen_tokens": spec.n_gen_tokens,
        "seed": spec.seed,
        "eval_batch_size": spec.eval_batch_size,
        "consistency_reference": has_reference,
    }


# ---------------------------------------------------------------------------------------------
# one record's row <-> JSON, exactly (dtypes kept, tuples of Python values in list cells)
# ---------------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    """``v`` as a JSON value; TypeError for what JSON cannot hold exactly."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    raise TypeError(f"cannot store a {type(v).__name__} in the pre-edit metric cache")


def _encode_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    cols, dtypes = [str(c) for c in df.columns], [str(t) for t in df.dtypes]
    return [
        {"columns": cols, "dtypes": dtypes, "values": [_plain(v) for v in row]}
        for row in df.itertuples(index=False, name=None)
    ]


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("columns"), list)
        and isinstance(entry.get("dtypes"), list)
        and isinstance(entry.get("values"), list)
        and len(entry["columns"]) == len(entry["dtypes"]) == len(entry["values"])
        and "phase" in entry["columns"]
        and entry["values"][entry["columns"].index("phase")] == "pre"
    )


def _decode_rows(entries: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows of entries with the same columns and dtypes, as one DataFrame."""
    if not entries:
        return pd.DataFrame()
    cols, dtypes = entries[0]["columns"], entries[0]["dtypes"]
    data = {}
    for j, (c, t) in enumerate(zip(cols, dtypes)):
        values = [e["values"][j] for e in entries]
        if t == "object":
            data[c] = pd.Series([tuple(v) if isinstance(v, list) else v for v in values], dtype=object)
        else:
            data[c] = pd.Series(values, dtype=t)
    return pd.DataFrame(data)


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------
def _load(store: KeyedStore, setting: Mapping[str, Any], prefix: str, keys: Sequence[str]) -> dict[str, dict]:
    """The usable entries among ``keys`` (missing, damaged or foreign ones left out)."""
    found: dict[str, dict] = {}
    for k in dict.fromkeys(keys):
        entry = store.load_json({**setting, "record": k}, prefix=prefix)  # None when missing or damaged
        if entry is None:
            continue
        if not _valid_entry(entry):
            logger.warning("ignoring a malformed pre-edit metric entry for record %s in %s", k, store.folder)
            continue
        found[k] = entry
    layout = next(((e["columns"], e["dtypes"]) for e in found.values()), None)
    return {k: e for k, e in found.items() if (e["columns"], e["dtypes"]) == layout}


def _save(store: KeyedStore, setting: Mapping[str, Any], prefix: str, keys: Sequence[str], new: pd.DataFrame) -> None:
    try:
        rows = _encode_rows(new)
    except TypeError as exc:
        logger.warning("pre-edit metrics not cached (%s)", exc)
        return
    for k, row in zip(keys, rows):
        store.save_json({**setting, "record": k}, row, prefix=prefix)


def cached_pre_eval(
    model: Model,
    tok: Tokenizer,
    spec: RunSpec,
    records: Sequence[Mapping[str, Any]],
    *,
    has_reference: bool,
    evaluate: Callable[[list], pd.DataFrame],
    store: KeyedStore | None = None,
) -> tuple[pd.DataFrame, int]:
    """The unedited model's metrics of ``records`` (one row each, in order), evaluating with
    ``evaluate(records) -> DataFrame`` only the records not in the cache.

    Args:
        has_reference: whether evaluation has the consistency reference (part of the key).
        store: the store to use (default ``KeyedStore("pre_eval", <model class>)``).

    Returns:
        The rows (``evaluate``'s columns) and how many records were reused.
    """
    store = store if store is not None else KeyedStore("pre_eval", type(model).__name__)
    setting = pre_eval_setting(model, tok, spec, has_reference=has_reference)
    prefix = stable_hash(setting, 4) + "-"  # the entries of one setting sort together
    keys = [stable_hash(dict(r)) for r in records]
    cached = _load(store, setting, prefix, keys)
    first = {k: i for i, k in reversed(list(enumerate(keys)))}  # each distinct record once
    missing = sorted(i for k, i in first.items() if k not in cached)
    union = _decode_rows(list(cached.values())).assign(record_key=list(cached))
    if missing:
        new = evaluate([records[i] for i in missing])
        assert len(new) == len(missing), "evaluate must return one row per record"
        _save(store, setting, prefix, [keys[i] for i in missing], new)
        new["record_key"] = [keys[i] for i in missing]
        union = new if not cached else pd.concat([union, new], ignore_index=True)
    n_reused = sum(1 for k in keys if k in cached)
    if n_reused:
        logger.info("pre-edit metrics of %d of %d records reused from %s", n_reused, len(keys), store.folder)
    out = union.drop_duplicates("record_key").set_index("record_key").loc[keys].reset_index(drop=True)
    return out, n_reused
