"""The datasets pmetlab knows: file names (canonical and shared layouts), record validators and
reference checksums (SOURCES.md), and the one derived dataset (:data:`CONFLICT_FILTERED`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .records import validate_counterfact_record, validate_known_record, validate_zsre_record

REMOTE_ROOTS = ("https://rome.baulab.info/data/dsets/", "https://memit.baulab.info/data/dsets/")


@dataclass(frozen=True)
class _Spec:
    name: str
    remote: str  # canonical file name under REMOTE_ROOTS
    local_names: tuple[str, ...]  # relative paths tried in a data directory, in order
    validate: Callable[[Any, int, str | None], dict]
    id_key: str
    expected_records: int | None = None  # exact count of the canonical file, when known
    min_records: int = 1  # for a downloaded file whose count is not known
    sha256: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256 (SOURCES.md)


def _names(sub: str, canonical: Sequence[str], shared: Sequence[str] = ()) -> tuple[str, ...]:
    out: list[str] = []
    for c in canonical:  # the complete canonical file wins over a shared subset
        out += [c, f"{sub}/{c}"]
    out += list(shared)
    return tuple(out)


_SPECS: dict[str, _Spec] = {
    "counterfact": _Spec(
        "counterfact",
        "counterfact.json",
        _names(
            "counterfact", ["counterfact.json"], ["counterfact/counterfact_filtered.json", "counterfact_filtered.json"]
        ),
        validate_counterfact_record,
        "case_id",
        expected_records=21919,
        min_records=1000,
        sha256={
            "counterfact.json": "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f",
            "counterfact_filtered.json": "7e93c8e6d162997dec97875c8a9a4f46816e691e8b613f952813bd6cbe1ba574",
        },
    ),
    "multi_counterfact": _Spec(
        "multi_counterfact",
        "multi_counterfact.json",
        _names("counterfact", ["multi_counterfact.json"]),
        validate_counterfact_record,
        "case_id",
        min_records=1000,
    ),
    "zsre": _Spec(
        "zsre",
        "zsre_mend_eval.json",
        # zsre_mem_eval.json is the (mis)spelling in some write-ups; the file ROME loads is zsre_mend_eval.json
        _names(
            "zsre",
            ["zsre_mend_eval.json", "zsre_mem_eval.json"],
            ["zsre/zsre_mend_eval_portability_gpt4.json", "zsre_mend_eval_portability_gpt4.json"],
        ),
        validate_zsre_record,
        "case_id",
        min_records=1000,
        sha256={
            "zsre_mend_eval_portability_gpt4.json": "0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9"
        },
    ),
    "known_facts": _Spec(
        "known_facts",
        "known_1000.json",
        _names("knowns", ["known_1000.json"]),
        validate_known_record,
        "known_id",
        expected_records=1209,
        sha256={"known_1000.json": "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a"},
    ),
}

# reference files for the consistency metric (never downloaded unless asked)
_REFERENCE_SHA256 = {
    "attribute_snippets.json": "10b5c1cd105e54d5983c72de1b45bfc88bc7af786f7b99def2557886ff23385b",
    "idf.npy": "c073d642589d4ac6432f467230329b36364a01e72de63a77a3624b745b923dda",
    "tfidf_vocab.json": "8a78c4f20d8d85dadfd14e283d71af255482ff18aa0eb8a81716024c05ff888b",
}


#: CounterFact with the multi-CounterFact rule applied to the whole file (the first record for each
#: (subject, relation_id)): an explicit derivation, recorded under this name, never a stand-in.
CONFLICT_FILTERED = "counterfact+conflict_filter"

_ALIASES = {
    "cf": "counterfact",
    "mcf": "multi_counterfact",
    "knowns": "known_facts",
    "known": "known_facts",
    "known_1000": "known_facts",
}


def dataset_key(name: str) -> str:
    """The registry name of ``name`` (case, "-" for "_" and short aliases such as "cf" allowed).

    Raises:
        TypeError: ``name`` is not a string. KeyError: no such dataset (lists the known ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {name!r} ({type(name).__name__})")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _SPECS and key != CONFLICT_FILTERED:
        raise KeyError(f"unknown dataset {name!r}; expected one of {sorted(_SPECS) + [CONFLICT_FILTERED]}")
    return key


def file_spec(name: str) -> _Spec:
    """The registry entry of a dataset that is a file (not a derivation)."""
    key = dataset_key(name)
    if key not in _SPECS:
        raise KeyError(f"dataset {name!r} is derived from another one, not a file of its own")
    return _SPECS[key]
