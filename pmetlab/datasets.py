"""Evaluation datasets: CounterFact, multi-CounterFact, zsRE and known facts (method.md §6).

Every loader returns a :class:`Records` list of validated dicts in the dataset's original schema,
with a :class:`DatasetInfo` (name, path, sha256, number of records) attached as ``.info`` for run
records. A file is looked for, in order:

1. an explicit ``path=`` (an error if it does not exist; nothing else is tried);
2. ``$PMETLAB_DATA_DIR`` (the shared layout, e.g. ``counterfact/counterfact_filtered.json``, or the
   canonical file names directly in the directory or in its ``counterfact/``, ``zsre/``,
   ``knowns/`` sub-directories);
3. the project's ``data/`` directory (next to the ``pmetlab`` package), same names;
4. a copy downloaded earlier into ``cache_dir("data")``;
5. a download of the canonical file from https://rome.baulab.info/data/dsets/ (mirror:
   memit.baulab.info), verified (JSON parses, record count and schema, sha256 where known) before
   it is renamed into the cache.

Nothing found and no download possible: one :class:`DatasetNotFoundError` naming the file and every
place looked. The TF-IDF consistency reference (``attribute_snippets.json``, ``idf.npy``,
``tfidf_vocab.json``) is looked for in the same places but is never downloaded unless asked
(926 MB); its loaders return ``None`` when it is not available, never a stand-in.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple, Sequence

import numpy as np

from .cache import atomic_path, cache_dir, file_sha256, stable_hash
from .requests import EditRequest

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetInfo", "Records", "Selection", "DatasetNotFoundError", "ConsistencyReference",
    "DATA_DIR_ENV", "OFFLINE_ENV", "REMOTE_ROOTS",
    "load_counterfact", "load_multi_counterfact", "load_zsre", "load_known_facts", "load_dataset",
    "locate_dataset_file", "select", "drop_conflicting",
    "counterfact_requests", "zsre_requests",
    "validate_counterfact_record", "validate_zsre_record", "validate_known_record",
    "load_attribute_snippets", "load_idf", "load_tfidf_vocab", "load_consistency_reference",
]

DATA_DIR_ENV = "PMETLAB_DATA_DIR"
OFFLINE_ENV = "PMETLAB_OFFLINE"
REMOTE_ROOTS = ("https://rome.baulab.info/data/dsets/", "https://memit.baulab.info/data/dsets/")
_PROJECT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
_DOWNLOAD_TIMEOUT_S = 60


class DatasetNotFoundError(FileNotFoundError, LookupError):
    """A dataset file is in none of the places looked and could not be downloaded."""


# ---------------------------------------------------------------------------------------------
# run-record metadata
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset came from, for run records.

    Attributes:
        name: "counterfact", "multi_counterfact", "zsre" or "known_facts".
        path: the file read.
        sha256: its content hash.
        n_records: number of records in the file.
        source: how it was found: "path", "env", "project", "cache" or "download".
        url: the URL it was downloaded from (source "download" or "cache"), else None.
        case_id_map: the ``<stem>.case_id_map.json`` applied (renumbered ids), else None.
        case_id_map_sha256: its content hash, else None.
    """

    name: str
    path: str
    sha256: str
    n_records: int
    source: str
    url: str | None = None
    case_id_map: str | None = None
    case_id_map_sha256: str | None = None

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
            raise ValueError(f"{where}: field {dotted!r} must be inside an object, got "
                             f"{type(cur).__name__}; expected {expected}")
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
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{where}: field {dotted!r} must be a list of strings, got {v!r:.200}")
    if len(v) < min_len:
        raise ValueError(f"{where}: field {dotted!r} must have at least {min_len} entries, got {len(v)}")


_CF_EXPECTED = ("case_id, requested_rewrite{prompt, subject, relation_id, target_new{str,id}, "
                "target_true{str,id}}, paraphrase_prompts, neighborhood_prompts, attribute_prompts, "
                "generation_prompts")


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
        raise ValueError(f"{where}: field 'requested_rewrite.prompt' must contain exactly one '{{}}' for "
                         f"the subject, got {prompt!r}")
    for f in ("subject", "relation_id", "target_new.str", "target_true.str"):
        _check_str(_get(rec, f"requested_rewrite.{f}", where, _CF_EXPECTED), f"requested_rewrite.{f}", where)
    for f in ("target_new.id", "target_true.id"):
        _get(rec, f"requested_rewrite.{f}", where, _CF_EXPECTED)
    _check_str_list(_get(rec, "paraphrase_prompts", where, _CF_EXPECTED), "paraphrase_prompts", where)
    _check_str_list(_get(rec, "neighborhood_prompts", where, _CF_EXPECTED), "neighborhood_prompts", where)
    _check_str_list(_get(rec, "attribute_prompts", where, _CF_EXPECTED), "attribute_prompts", where)
    _check_str_list(_get(rec, "generation_prompts", where, _CF_EXPECTED), "generation_prompts", where)
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


# ---------------------------------------------------------------------------------------------
# dataset registry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    name: str
    remote: str                    # canonical file name under REMOTE_ROOTS
    local_names: tuple[str, ...]   # relative paths tried in a data directory, in order
    validate: Callable[[Any, int, str | None], dict]
    id_key: str
    expected_records: int | None = None   # exact count of the canonical file, when known
    min_records: int = 1                  # for a downloaded file whose count is not known
    sha256: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256 (SOURCES.md)


_SUBDIRS = {"counterfact": "counterfact", "multi_counterfact": "counterfact", "zsre": "zsre",
            "known_facts": "knowns"}


def _names(sub: str, canonical: Sequence[str], shared: Sequence[str] = ()) -> tuple[str, ...]:
    out: list[str] = []
    for c in canonical:  # the complete canonical file wins over a shared subset
        out += [c, f"{sub}/{c}"]
    out += list(shared)
    return tuple(out)


_SPECS: dict[str, _Spec] = {
    "counterfact": _Spec(
        "counterfact", "counterfact.json",
        _names("counterfact", ["counterfact.json"], ["counterfact/counterfact_filtered.json",
                                                     "counterfact_filtered.json"]),
        validate_counterfact_record, "case_id", expected_records=21919, min_records=1000,
        sha256={"counterfact.json": "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f",
                "counterfact_filtered.json": "7e93c8e6d162997dec97875c8a9a4f46816e691e8b613f952813bd6cbe1ba574"}),
    "multi_counterfact": _Spec(
        "multi_counterfact", "multi_counterfact.json", _names("counterfact", ["multi_counterfact.json"]),
        validate_counterfact_record, "case_id", min_records=1000),
    "zsre": _Spec(
        "zsre", "zsre_mend_eval.json",
        # zsre_mem_eval.json is the (mis)spelling in some write-ups; the file ROME loads is zsre_mend_eval.json
        _names("zsre", ["zsre_mend_eval.json", "zsre_mem_eval.json"],
               ["zsre/zsre_mend_eval_portability_gpt4.json", "zsre_mend_eval_portability_gpt4.json"]),
        validate_zsre_record, "case_id", min_records=1000,
        sha256={"zsre_mend_eval_portability_gpt4.json":
                "0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9"}),
    "known_facts": _Spec(
        "known_facts", "known_1000.json", _names("knowns", ["known_1000.json"]),
        validate_known_record, "known_id", expected_records=1209,
        sha256={"known_1000.json": "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a"}),
}

# reference files for the consistency metric (never downloaded unless asked)
_REFERENCE_SHA256 = {
    "attribute_snippets.json": "10b5c1cd105e54d5983c72de1b45bfc88bc7af786f7b99def2557886ff23385b",
    "idf.npy": "c073d642589d4ac6432f467230329b36364a01e72de63a77a3624b745b923dda",
    "tfidf_vocab.json": "8a78c4f20d8d85dadfd14e283d71af255482ff18aa0eb8a81716024c05ff888b",
}


def _spec(name: str) -> _Spec:
    key = name.lower().replace("-", "_")
    key = {"cf": "counterfact", "mcf": "multi_counterfact", "knowns": "known_facts", "known": "known_facts",
           "known_1000": "known_facts"}.get(key, key)
    if key not in _SPECS:
        raise KeyError(f"unknown dataset {name!r}; expected one of {sorted(_SPECS)}")
    return _SPECS[key]


# ---------------------------------------------------------------------------------------------
# finding and downloading files
# ---------------------------------------------------------------------------------------------
def _search_dirs() -> list[tuple[str, Path]]:
    dirs: list[tuple[str, Path]] = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        dirs.append(("env", Path(env).expanduser()))
    dirs.append(("project", _PROJECT_DATA_DIR))
    shared = _PROJECT_DATA_DIR.parent.parent / "shared" / "data"  # a checkout beside ../shared
    if shared.is_dir():
        dirs.append(("shared", shared))
    return dirs


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_local(local_names: Sequence[str], looked: list[str]) -> tuple[str, Path] | None:
    for source, d in _search_dirs():
        for rel in local_names:
            p = d / rel
            looked.append(f"{p} (${DATA_DIR_ENV})" if source == "env" else str(p))
            if p.is_file():
                return source, p
    return None


def _download(url: str, dest: Path, verify: Callable[[Path], None]) -> None:
    """Stream ``url`` to a temporary sibling of ``dest``, run ``verify`` on it, then rename."""
    from tqdm.auto import tqdm

    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:
            size = getattr(resp, "headers", {}).get("Content-Length")
            with tqdm(total=int(size) if size else None, unit="B", unit_scale=True, leave=False,
                      desc=f"downloading {dest.name}") as bar:
                while True:
                    block = resp.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
        verify(tmp)


def _check_sha(path: Path, expected: str | None, what: str) -> str:
    got = file_sha256(path)
    if expected is not None and got != expected:
        raise ValueError(f"{what}: sha256 {got} does not match the reference {expected} "
                         f"(SOURCES.md); the file is corrupt or a different version")
    return got


def _fetch(remote: str, verify: Callable[[Path], None], looked: list[str], *, download: bool) -> tuple[str, Path, str]:
    """The cached copy of a remote file, downloading it when needed. Returns (source, path, url)."""
    dest = cache_dir("data") / remote
    looked.append(str(dest) + " (download cache)")
    meta = dest.with_name(dest.name + ".url")
    if dest.is_file():
        try:
            verify(dest)
            url = meta.read_text().strip() if meta.is_file() else REMOTE_ROOTS[0] + remote
            return "cache", dest, url
        except (ValueError, KeyError) as exc:
            logger.warning("cached %s failed verification (%s); removing it and downloading again", dest, exc)
            dest.unlink()
    if not download or _offline():
        reason = "download=False" if not download else f"${OFFLINE_ENV} is set"
        looked.append(f"no download attempted ({reason})")
        raise _NotFound
    for root in REMOTE_ROOTS:
        url = root + remote
        try:
            logger.info("downloading %s to %s", url, dest)
            _download(url, dest, verify)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            looked.append(f"{url} (download failed: {type(exc).__name__}: {exc})")
            logger.info("download of %s failed: %s", url, exc)
            continue
        except (ValueError, KeyError) as exc:
            raise ValueError(f"the file downloaded from {url} was rejected and not kept: {exc}") from exc
        meta.write_text(url + "\n")
        logger.info("downloaded %s (%d bytes) to %s", url, dest.stat().st_size, dest)
        return "download", dest, url
    raise _NotFound


class _NotFound(Exception):
    pass


def _not_found(what: str, looked: list[str], hint: str = "") -> DatasetNotFoundError:
    places = "\n  ".join(looked)
    return DatasetNotFoundError(
        f"{what} was not found. Looked in:\n  {places}\n"
        f"Set ${DATA_DIR_ENV} to a directory holding it (e.g. the shared data folder), pass path=..., "
        f"or allow the download from {REMOTE_ROOTS[0]}.{hint}")


def _parse_json_list(path: Path, what: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} at {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"{what} at {path} must hold a JSON list of records, got {type(data).__name__}")
    return data


def _verify_remote_copy(spec: _Spec, path: Path) -> None:
    """Checks for a downloaded (or cached) canonical file: JSON list, record count, schema, sha256."""
    data = _parse_json_list(path, spec.name)
    if spec.expected_records is not None and len(data) != spec.expected_records:
        raise ValueError(f"{spec.name} at {path} has {len(data)} records, expected {spec.expected_records}")
    if len(data) < spec.min_records:
        raise ValueError(f"{spec.name} at {path} has {len(data)} records, expected at least {spec.min_records}")
    for i, rec in enumerate(data):
        spec.validate(rec, i, str(path))
    _check_sha(path, spec.sha256.get(spec.remote), f"{spec.name} at {path}")


def locate_dataset_file(name: str, path: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The file :func:`load_dataset` would read for ``name`` (downloading it if needed)."""
    return Path(load_dataset(name, path, download=download).info.path)  # type: ignore[union-attr]


def load_dataset(name: str, path: str | os.PathLike | None = None, *, download: bool = True) -> Records:
    """Load and validate a dataset by name ("counterfact", "multi_counterfact", "zsre", "known_facts").

    See the module docstring for where the file is looked for. ``download=False`` (or
    ``$PMETLAB_OFFLINE=1``) never touches the network.

    Returns:
        :class:`Records` (a list of dicts in the original schema, ``.info`` a :class:`DatasetInfo`).
        zsRE records get ``case_id`` = their index in the file (as ROME numbers them); CounterFact
        records from a renumbered subset get ``orig_case_id`` from ``<stem>.case_id_map.json``.

    Raises:
        DatasetNotFoundError: the file is nowhere and could not be downloaded (lists every place).
        KeyError / ValueError: a record is malformed (names the record and the field).
    """
    spec = _spec(name)
    looked: list[str] = []
    url: str | None = None
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DatasetNotFoundError(f"{spec.name}: path={str(path)!r} does not exist or is not a file")
        source, found = "path", p
    else:
        hit = _find_local(spec.local_names, looked)
        if hit is not None:
            source, found = hit
        else:
            try:
                source, found, url = _fetch(spec.remote, lambda p: _verify_remote_copy(spec, p), looked,
                                            download=download)
            except _NotFound:
                hint = ""
                if spec.name == "multi_counterfact":
                    hint = (" Offline, load_counterfact() (the shared 1,400-record subset) followed by "
                            "drop_conflicting() gives a conflict-free set for batch edits.")
                raise _not_found(f"{spec.name} file {spec.remote!r}", looked, hint) from None
    data = _parse_json_list(found, spec.name)
    if not data:
        raise ValueError(f"{spec.name} at {found} holds no records")
    for i, rec in enumerate(data):
        spec.validate(rec, i, str(found))
    sha = file_sha256(found)
    ref = spec.sha256.get(found.name)
    if ref is not None and sha != ref:
        logger.warning("%s: sha256 of %s is %s, not the reference %s from SOURCES.md (a different version?)",
                       spec.name, found, sha, ref)
    map_path, map_sha = None, None
    if spec.name == "zsre":
        data = [dict(rec, case_id=rec.get("case_id", i)) for i, rec in enumerate(data)]
    elif spec.name in ("counterfact", "multi_counterfact"):
        cand = found.with_name(found.stem + ".case_id_map.json")
        if cand.is_file():
            data = _apply_case_id_map(data, cand)
            map_path, map_sha = str(cand), file_sha256(cand)
    ids = [rec[spec.id_key] for rec in data]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{spec.name} at {found}: {spec.id_key} values are not unique")
    info = DatasetInfo(spec.name, str(found), sha, len(data), source, url, map_path, map_sha)
    logger.info("loaded %s: %d records from %s (%s)", spec.name, len(data), found, source)
    return Records(data, info)


def _apply_case_id_map(data: list[dict], map_path: Path) -> list[dict]:
    try:
        mapping = json.loads(map_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"case-id map {map_path} is not valid JSON: {exc}") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"case-id map {map_path} must be an object {{renumbered id: original id}}")
    out = []
    for i, rec in enumerate(data):
        key = str(rec["case_id"])
        if key not in mapping:
            raise KeyError(f"CounterFact record {i} (case_id={rec['case_id']}): no entry {key!r} in the "
                           f"case-id map {map_path}")
        out.append(dict(rec, orig_case_id=int(mapping[key])))
    return out


def load_counterfact(path: str | os.PathLike | None = None, *, download: bool = True) -> Records:
    """CounterFact records (the full ``counterfact.json`` or the shared 1,400-record subset)."""
    return load_dataset("counterfact", path, download=download)


def load_multi_counterfact(path: str | os.PathLike | None = None, *, download: bool = True) -> Records:
    """multi-CounterFact records (``multi_counterfact.json``; no offline copy is shared)."""
    return load_dataset("multi_counterfact", path, download=download)


def load_zsre(path: str | os.PathLike | None = None, *, download: bool = True) -> Records:
    """zsRE eval records (``zsre_mend_eval.json`` or the shared 1,037-record portability subset)."""
    return load_dataset("zsre", path, download=download)


def load_known_facts(path: str | os.PathLike | None = None, *, download: bool = True) -> Records:
    """The 1,209 known facts of ``known_1000.json``."""
    return load_dataset("known_facts", path, download=download)


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


def select(records: Sequence[dict], n: int | None = None, mode: Literal["first", "sample"] = "first",
           seed: int = 0) -> Selection:
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
        "n_total": total, "n": int(n), "mode": mode, "seed": int(seed) if mode == "sample" else None,
        "ids": ids, "ids_hash": stable_hash(ids),
    }
    return Selection(chosen, desc)


def drop_conflicting(records: Sequence[dict]) -> list[dict]:
    """Keep the first CounterFact record for each (subject, relation_id), as multi-CounterFact does,
    so that a batch of edits never asks for two objects of the same subject and relation."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in records:
        key = (r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def counterfact_requests(records: Iterable[Mapping[str, Any]]) -> list[EditRequest]:
    """One :class:`EditRequest` per CounterFact record (target_new, with target_true kept)."""
    return [EditRequest.from_counterfact(r) for r in records]


def zsre_requests(records: Iterable[Mapping[str, Any]]) -> list[EditRequest]:
    """One :class:`EditRequest` per zsRE record: the question with ``{}`` for the subject, answers[0]."""
    return [EditRequest.from_zsre(r) for r in records]


# ---------------------------------------------------------------------------------------------
# consistency reference (attribute snippets + TF-IDF statistics)
# ---------------------------------------------------------------------------------------------
def _locate_reference(fname: str, path: str | os.PathLike | None, download: bool,
                      verify: Callable[[Path], None]) -> Path | None:
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{fname}: path={str(path)!r} does not exist or is not a file")
        return p
    looked: list[str] = []
    names = (fname, f"counterfact/{fname}", f"tfidf/{fname}", f"reference/{fname}")
    hit = _find_local(names, looked)
    if hit is not None:
        return hit[1]
    try:
        return _fetch(fname, verify, looked, download=download)[1]
    except _NotFound:
        logger.info("%s is not available (looked in %s); the consistency metric will be missing",
                    fname, "; ".join(looked))
        return None


def _ref_verify(fname: str) -> Callable[[Path], None]:
    def verify(p: Path) -> None:
        _check_sha(p, _REFERENCE_SHA256[fname], f"{fname} at {p}")
    return verify


def load_attribute_snippets(path: str | os.PathLike | None = None, *,
                            download: bool = False) -> dict[str, dict[str, list[dict]]] | None:
    """ROME's attribute snippets as ``{relation_id: {target_id: [sample, ...]}}`` (each sample has
    ``name`` and ``text``), or None when ``attribute_snippets.json`` is not available.

    ``download=True`` fetches the 926 MB file into the cache (verified by sha256)."""
    p = _locate_reference("attribute_snippets.json", path, download, _ref_verify("attribute_snippets.json"))
    if p is None:
        return None
    data = _parse_json_list(p, "attribute_snippets.json")
    snips: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for i, el in enumerate(data):
        try:
            rid, tid, samples = el["relation_id"], el["target_id"], el["samples"]
        except (KeyError, TypeError):
            raise KeyError(f"attribute_snippets.json entry {i} in {p}: expected keys relation_id, "
                           f"target_id, samples") from None
        snips[rid][tid].extend(samples)
    return {r: dict(t) for r, t in snips.items()}


def load_idf(path: str | os.PathLike | None = None, *, download: bool = False) -> np.ndarray | None:
    """The TF-IDF inverse document frequencies ``(vocab,)`` (``idf.npy``), or None if unavailable."""
    p = _locate_reference("idf.npy", path, download, _ref_verify("idf.npy"))
    if p is None:
        return None
    idf = np.load(p, allow_pickle=False)
    if idf.ndim != 1:
        raise ValueError(f"idf.npy at {p} must be 1-D, got shape {idf.shape}")
    return idf.astype(np.float64)


def load_tfidf_vocab(path: str | os.PathLike | None = None, *, download: bool = False) -> dict[str, int] | None:
    """The TF-IDF vocabulary ``{word: column}`` (``tfidf_vocab.json``), or None if unavailable."""
    p = _locate_reference("tfidf_vocab.json", path, download, _ref_verify("tfidf_vocab.json"))
    if p is None:
        return None
    vocab = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(vocab, dict):
        raise ValueError(f"tfidf_vocab.json at {p} must be an object {{word: index}}")
    return {str(k): int(v) for k, v in vocab.items()}


@dataclass(frozen=True)
class ConsistencyReference:
    """What the consistency metric (RS) needs: snippets by (relation, target) and TF-IDF statistics.

    Attributes:
        snippets: ``{relation_id: {target_id: [{"name": subject, "text": ...}, ...]}}``.
        idf: ``(vocab,)`` inverse document frequencies.
        vocab: ``{word: column index into idf}``.
    """

    snippets: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]
    idf: np.ndarray
    vocab: Mapping[str, int]

    def __post_init__(self) -> None:
        if self.vocab and max(self.vocab.values()) >= len(self.idf):
            raise ValueError(f"tfidf vocabulary indexes up to {max(self.vocab.values())} but idf has "
                             f"only {len(self.idf)} entries")

    def texts(self, relation_id: str, target_id: str) -> list[str]:
        """Snippet texts about subjects with relation ``relation_id`` and object ``target_id``."""
        return [s["text"] for s in self.snippets.get(relation_id, {}).get(target_id, [])]


def load_consistency_reference(*, snippets_path: str | os.PathLike | None = None,
                               idf_path: str | os.PathLike | None = None,
                               vocab_path: str | os.PathLike | None = None,
                               download: bool = False) -> ConsistencyReference | None:
    """All three reference files, or None (logged) when any of them is unavailable."""
    idf = load_idf(idf_path, download=download)
    vocab = load_tfidf_vocab(vocab_path, download=download) if idf is not None else None
    snippets = load_attribute_snippets(snippets_path, download=download) if vocab is not None else None
    if idf is None or vocab is None or snippets is None:
        logger.info("consistency reference unavailable; consistency (RS) will be NaN")
        return None
    return ConsistencyReference(snippets, idf, vocab)
