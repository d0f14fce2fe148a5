"""Dataset records: their info, the list type carrying it, and schema validation (method.md §6)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError, LookupError):
    """A dataset file is in none of the places looked and could not be downloaded."""


# ---------------------------------------------------------------------------------------------
# run-record metadata
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset came from, for run records.

    Attributes:
        name: "counterfact", "multi_counterfact", "zsre", "known_facts" or the derived
            "counterfact+conflict_filter".
        path: the file read.
        sha256: its content hash.
        n_records: number of records (in the file; for a derived dataset, after the derivation).
        source: how it was found: "path", "env", "project", "cache" or "download".
        url: the URL it was downloaded from (source "download" or "cache"), else None.
        case_id_map: the ``<stem>.case_id_map.json`` applied (renumbered ids), else None.
        case_id_map_sha256: its content hash, else None.
        derived_from: for a derived dataset, the dataset it was derived from, else None.
        derivation: for a derived dataset, how (the rule and the record counts), else None.
    """

    name: str
    path: str
    sha256: str
    n_records: int
    source: str
    url: str | None = None
    case_id_map: str | None = None
    case_id_map_sha256: str | None = None
    derived_from: str | None = None
    derivation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Records(list):
    """A list of record dicts with the :class:`DatasetInfo` of the file they came from (``.info``).

    Slicing returns a plain list; use :func:`select` for subsets that are described for run records.
    """

    info: DatasetInfo | None

    def __init__(self, records: Iterable[dict] = (), info: DatasetInfo | None = None) -> None:
        super().__init__(records)
        self.info = info


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _where(kind: str, index: int, rec: Any, id_key: str, source: str | None) -> str:
    rid = rec.get(id_key) if isinstance(rec, Mapping) else None
    s = f"{kind} record {index}" + (f" ({id_key}={rid!r})" if rid is not None else "")
    return s + (f" in {source}" if source else "")


def _get(rec: Any, dotted: str, where: str, expected: str) -> Any:
    cur = rec
    for part in dotted.split("."):
        if not isinstance(cur, Mapping):
            raise ValueError(
                f"{where}: field {dotted!r} must be inside an object, got {type(cur).__name__}; expected {expected}"
            )
        if part not in cur:
            raise KeyError(f"{where}: missing field {dotted!r}; expected {expected}")
        cur = cur[part]
    return cur


def _check_str(v: Any, dotted: str, where: str, *, non_empty: bool = True) -> None:
    if not isinstance(v, str):
        raise ValueError(f"{where}: field {dotted!r} must be a string, got {type(v).__name__}: {v!r}")
    if non_empty and not v.strip():
        raise ValueError(f"{where}: field {dotted!r} must be a non-empty string, got {v!r}")


def _check_str_list(v: Any, dotted: str, where: str, *, min_len: int = 0) -> None:
    """A list of at least ``min_len`` strings, none of them empty or blank (an empty prompt or
    answer cannot be scored; an empty list would leave its metric undefined for this record)."""
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{where}: field {dotted!r} must be a list of strings, got {v!r:.200}")
    if len(v) < min_len:
        what = "a non-empty list" if min_len == 1 else f"a list of at least {min_len} entries"
        raise ValueError(f"{where}: field {dotted!r} must be {what} (its metric needs it), got {v!r:.200}")
    blank = [i for i, x in enumerate(v) if not x.strip()]
    if blank:
        raise ValueError(
            f"{where}: field {dotted!r} has an empty string at position {blank[0]}"
            f"{f' (and {len(blank) - 1} more)' if len(blank) > 1 else ''}: {v[blank[0]]!r}; remove it or fill it in"
        )


_CF_EXPECTED = (
    "case_id, requested_rewrite{prompt, subject, relation_id, target_new{str,id}, "
    "target_true{str,id}}, paraphrase_prompts, neighborhood_prompts, attribute_prompts, "
    "generation_prompts"
)


def validate_counterfact_record(rec: Any, index: int = 0, source: str | None = None) -> dict:
    """Check one CounterFact / multi-CounterFact record (method.md §6); returns it unchanged.

    Raises:
        KeyError: a required field is missing (the message names the record and the field).
        ValueError: a field has the wrong type or value (e.g. a prompt without exactly one ``{}``).
    """
    where = _where("CounterFact", index, rec, "case_id", source)
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: expected an object with {_CF_EXPECTED}, got {type(rec).__name__}")
    cid = _get(rec, "case_id", where, _CF_EXPECTED)
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise ValueError(f"{where}: field 'case_id' must be an integer, got {cid!r}")
    prompt = _get(rec, "requested_rewrite.prompt", where, _CF_EXPECTED)
    _check_str(prompt, "requested_rewrite.prompt", where)
    if prompt.count("{}") != 1:
        raise ValueError(
            f"{where}: field 'requested_rewrite.prompt' must contain exactly one '{{}}' for the subject, got {prompt!r}"
        )
    for f in ("subject", "relation_id", "target_new.str", "target_true.str"):
        _check_str(_get(rec, f"requested_rewrite.{f}", where, _CF_EXPECTED), f"requested_rewrite.{f}", where)
    for f in ("target_new.id", "target_true.id"):
        _get(rec, f"requested_rewrite.{f}", where, _CF_EXPECTED)
    # the paraphrase and neighbourhood prompts are scored on every record (PS, NS): none may be empty
    for f, min_len in (
        ("paraphrase_prompts", 1),
        ("neighborhood_prompts", 1),
        ("attribute_prompts", 0),
        ("generation_prompts", 0),
    ):
        _check_str_list(_get(rec, f, where, _CF_EXPECTED), f, where, min_len=min_len)
    return rec  # type: ignore[return-value]


def validate_records(records: Any, validate: Callable[[Any, int], Any]) -> list:
    """A non-empty list of records, each checked by ``validate(record, index)``."""
    records = list(records)
    if not records:
        raise ValueError("no records to evaluate")
    for i, rec in enumerate(records):
        validate(rec, i)
    return records


_ZSRE_EXPECTED = "subject, src, rephrase, answers[], loc ('nq question: ...'), loc_ans (alt, pred, cond optional)"


def validate_zsre_record(rec: Any, index: int = 0, source: str | None = None) -> dict:
    """Check one zsRE eval record (MEND/ROME schema, method.md §6); returns it unchanged."""
    where = _where("zsRE", index, rec, "case_id", source)
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: expected an object with {_ZSRE_EXPECTED}, got {type(rec).__name__}")
    for f in ("subject", "src", "rephrase", "loc", "loc_ans"):
        _check_str(_get(rec, f, where, _ZSRE_EXPECTED), f, where)
    _check_str_list(_get(rec, "answers", where, _ZSRE_EXPECTED), "answers", where, min_len=1)
    if not rec["answers"][0].strip():
        raise ValueError(f"{where}: field 'answers' starts with an empty answer: {rec['answers']!r}")
    return rec  # type: ignore[return-value]


_KNOWN_EXPECTED = "known_id, subject, attribute, template, prediction, prompt, relation_id"


def validate_known_record(rec: Any, index: int = 0, source: str | None = None) -> dict:
    """Check one known-facts record (known_1000.json); returns it unchanged."""
    where = _where("known-facts", index, rec, "known_id", source)
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: expected an object with {_KNOWN_EXPECTED}, got {type(rec).__name__}")
    kid = _get(rec, "known_id", where, _KNOWN_EXPECTED)
    if not isinstance(kid, int) or isinstance(kid, bool):
        raise ValueError(f"{where}: field 'known_id' must be an integer, got {kid!r}")
    for f in ("subject", "attribute", "template", "prompt", "relation_id"):
        _check_str(_get(rec, f, where, _KNOWN_EXPECTED), f, where)
    _check_str(_get(rec, "prediction", where, _KNOWN_EXPECTED), "prediction", where, non_empty=False)
    if rec["template"].count("{}") != 1:
        raise ValueError(f"{where}: field 'template' must contain exactly one '{{}}', got {rec['template']!r}")
    return rec  # type: ignore[return-value]
