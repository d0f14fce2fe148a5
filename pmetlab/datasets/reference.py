"""The CounterFact consistency reference: attribute snippets and TF-IDF statistics (method.md §6)."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .files import _check_sha, _fetch, _find_local, _NotFound, _parse_json_list
from .registry import _REFERENCE_SHA256

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# consistency reference (attribute snippets + TF-IDF statistics)
# ---------------------------------------------------------------------------------------------
def _locate_reference(
    fname: str, path: str | os.PathLike | None, download: bool, verify: Callable[[Path], None]
) -> Path | None:
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
        logger.debug("%s not found; looked in: %s", fname, "; ".join(looked))
        _say_unavailable_once(fname, looked[-1] if looked else "it could not be fetched")
        return None


#: Messages already said at INFO in this process (repeats go to DEBUG): evaluation loads the
#: reference once per run and each notebook cell may load it again; saying why it is missing
#: once is enough.
_SAID: set[str] = set()


def _say_unavailable_once(fname: str, why: str) -> None:
    """One short line, once per process, saying that consistency is unavailable and why."""
    from .files import DATA_DIR_ENV

    why = why.replace("no download attempted", "no download was attempted")
    msg = (
        f"consistency (RS) is unavailable and will be NaN: {fname} is not in the data folders and {why}. "
        f"To compute it, put the reference files in ${DATA_DIR_ENV}, or call "
        f"load_consistency_reference(download=True) once with network access and no offline switch "
        f"set (about 1 GB); DEBUG logging lists where pmetlab looked."
    )
    logger.log(logging.DEBUG if msg in _SAID else logging.INFO, msg)
    _SAID.add(msg)


def _ref_verify(fname: str) -> Callable[[Path], None]:
    def verify(p: Path) -> None:
        _check_sha(p, _REFERENCE_SHA256[fname], f"{fname} at {p}")

    return verify


def load_attribute_snippets(
    path: str | os.PathLike | None = None, *, download: bool = False
) -> dict[str, dict[str, list[dict]]] | None:
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
            raise KeyError(
                f"attribute_snippets.json entry {i} in {p}: expected keys relation_id, target_id, samples"
            ) from None
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
            raise ValueError(
                f"tfidf vocabulary indexes up to {max(self.vocab.values())} but idf has only {len(self.idf)} entries"
            )

    def texts(self, relation_id: str, target_id: str) -> list[str]:
        """Snippet texts about subjects with relation ``relation_id`` and object ``target_id``."""
        return [s["text"] for s in self.snippets.get(relation_id, {}).get(target_id, [])]


def load_consistency_reference(
    *,
    snippets_path: str | os.PathLike | None = None,
    idf_path: str | os.PathLike | None = None,
    vocab_path: str | os.PathLike | None = None,
    download: bool = False,
) -> ConsistencyReference | None:
    """All three reference files, or None (logged) when any of them is unavailable."""
    idf = load_idf(idf_path, download=download)
    vocab = load_tfidf_vocab(vocab_path, download=download) if idf is not None else None
    snippets = load_attribute_snippets(snippets_path, download=download) if vocab is not None else None
    if idf is None or vocab is None or snippets is None:
        logger.debug("consistency reference unavailable; consistency (RS) will be NaN")
        return None
    return ConsistencyReference(snippets, idf, vocab)
