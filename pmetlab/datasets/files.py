"""Finding, downloading and loading the dataset files (see :mod:`pmetlab.datasets` for the search
order, the offline switches and the derived dataset)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from ..cache import atomic_path, cache_dir, file_sha256
from ..datadir import DATA_DIR_ENV, env_data_dir
from .records import DatasetInfo, DatasetNotFoundError, Records
from .registry import CONFLICT_FILTERED, REMOTE_ROOTS, _Spec, dataset_key, file_spec
from .selection import drop_conflicting

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_DIR_ENV",
    "OFFLINE_ENV",
    "OFFLINE_ENVS",
    "REMOTE_ROOTS",
    "CONFLICT_FILTERED",
    "env_data_dir",
    "offline_switch",
    "load_dataset",
    "load_conflict_filtered",
    "locate_dataset_file",
]

OFFLINE_ENV = "PMETLAB_OFFLINE"
#: Any of these set to 1/true/yes/on: no download is attempted (the Hugging Face switches count too).
OFFLINE_ENVS = (OFFLINE_ENV, "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROJECT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "data"
_DOWNLOAD_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------
# the environment: data directory and offline switches
# ---------------------------------------------------------------------------------------------
def offline_switch() -> str | None:
    """The first of :data:`OFFLINE_ENVS` that is set to 1/true/yes/on, or None (downloads allowed)."""
    for name in OFFLINE_ENVS:
        if os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}:
            return name
    return None


def _search_dirs() -> list[tuple[str, Path]]:
    dirs: list[tuple[str, Path]] = []
    env = env_data_dir()
    if env is not None:
        dirs.append(("env", env))
    dirs.append(("project", _PROJECT_DATA_DIR))
    shared = _PROJECT_DATA_DIR.parent.parent / "shared" / "data"  # a checkout beside ../shared
    if shared.is_dir():
        dirs.append(("shared", shared))
    return dirs


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
    from ..progress import tqdm

    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:
            size = getattr(resp, "headers", {}).get("Content-Length")
            with tqdm(
                total=int(size) if size else None,
                unit="B",
                unit_scale=True,
                leave=False,
                desc=f"downloading {dest.name}",
            ) as bar:
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
        raise ValueError(
            f"{what}: sha256 {got} does not match the reference {expected} "
            f"(SOURCES.md); the file is corrupt or a different version"
        )
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
    switch = offline_switch()
    if not download or switch is not None:
        reason = "download=False" if not download else f"${switch} is set"
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
        with atomic_path(meta) as tmp:  # where the file came from; never half-written
            tmp.write_text(url + "\n")
        logger.info("downloaded %s (%d bytes) to %s", url, dest.stat().st_size, dest)
        return "download", dest, url
    raise _NotFound


class _NotFound(Exception):
    pass


def _not_found(what: str, looked: list[str], hint: str = "") -> DatasetNotFoundError:
    places = "\n  ".join(looked)
    switch = offline_switch()
    allow = f"unset ${switch} to allow" if switch else "allow"
    return DatasetNotFoundError(
        f"{what} was not found. Looked in:\n  {places}\n"
        f"Set ${DATA_DIR_ENV} to a directory holding it (e.g. the shared data folder), pass path=..., "
        f"or {allow} the download from {REMOTE_ROOTS[0]}.{hint}"
    )


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


def _locate(spec: _Spec, path: str | os.PathLike | None, download: bool) -> tuple[str, Path, str | None]:
    """(how it was found, the file, the URL it was downloaded from or None); see the module docstring."""
    looked: list[str] = []
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DatasetNotFoundError(f"{spec.name}: path={str(path)!r} does not exist or is not a file")
        return "path", p, None
    hit = _find_local(spec.local_names, looked)
    if hit is not None:
        return hit[0], hit[1], None
    try:
        return _fetch(spec.remote, lambda p: _verify_remote_copy(spec, p), looked, download=download)
    except _NotFound:
        hint = ""
        if spec.name == "multi_counterfact":
            hint = (
                f" No offline copy is shared. For a conflict-free CounterFact set, use the derived dataset "
                f"{CONFLICT_FILTERED!r} (load_dataset({CONFLICT_FILTERED!r}), run_experiment(dataset="
                f"{CONFLICT_FILTERED!r}), --dataset {CONFLICT_FILTERED}): CounterFact after drop_conflicting(), "
                f"recorded under that name."
            )
        raise _not_found(f"{spec.name} file {spec.remote!r}", looked, hint) from None


def load_dataset(name: str, path: str | os.PathLike | None = None, *, download: bool = True) -> Records:
    """Load and validate a dataset by name ("counterfact", "multi_counterfact", "zsre", "known_facts",
    or the derived "counterfact+conflict_filter": see :func:`load_conflict_filtered`).

    See the module docstring for where the file is looked for. ``download=False`` (or any of the
    offline switches :data:`OFFLINE_ENVS`) never touches the network. A missing file is an error:
    no other dataset ever stands in for it.

    Returns:
        :class:`Records` (a list of dicts in the original schema, ``.info`` a :class:`DatasetInfo`).
        zsRE records get ``case_id`` = their index in the file (as ROME numbers them); CounterFact
        records from a renumbered subset get ``orig_case_id`` from ``<stem>.case_id_map.json``.

    Raises:
        DatasetNotFoundError: the file is nowhere and could not be downloaded (lists every place).
        KeyError / ValueError: a record is malformed (names the record and the field), or
            ``$PMETLAB_DATA_DIR`` is not a directory.
    """
    if dataset_key(name) == CONFLICT_FILTERED:
        return load_conflict_filtered(path, download=download)
    spec = file_spec(name)
    source, found, url = _locate(spec, path, download)
    data = _parse_json_list(found, spec.name)
    if not data:
        raise ValueError(f"{spec.name} at {found} holds no records")
    for i, rec in enumerate(data):
        spec.validate(rec, i, str(found))
    sha = file_sha256(found)
    ref = spec.sha256.get(found.name)
    if ref is not None and sha != ref:
        logger.warning(
            "%s: sha256 of %s is %s, not the reference %s from SOURCES.md (a different version?)",
            spec.name,
            found,
            sha,
            ref,
        )
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
            raise KeyError(
                f"CounterFact record {i} (case_id={rec['case_id']}): no entry {key!r} in the case-id map {map_path}"
            )
        out.append(dict(rec, orig_case_id=int(mapping[key])))
    return out


def load_conflict_filtered(path: str | os.PathLike | None = None, *, download: bool = True) -> Records:
    """CounterFact keeping the first record for each (subject, relation_id) (:func:`drop_conflicting`,
    the multi-CounterFact rule), as the dataset "counterfact+conflict_filter": its
    :class:`DatasetInfo` carries that name, ``derived_from="counterfact"`` and the derivation."""
    cf = load_dataset("counterfact", path, download=download)
    kept = drop_conflicting(cf)
    assert cf.info is not None
    derivation = (
        f"drop_conflicting: first record per (subject, relation_id) of {cf.info.path}, {len(cf)} -> {len(kept)} records"
    )
    logger.info("%s: %s", CONFLICT_FILTERED, derivation)
    info = dataclasses.replace(
        cf.info, name=CONFLICT_FILTERED, n_records=len(kept), derived_from="counterfact", derivation=derivation
    )
    return Records(kept, info)


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
