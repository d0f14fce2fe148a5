"""Text corpora for the covariance statistics: files, JSONL, a hub dataset, or model samples."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

__all__ = ["Corpus", "resolve_corpus", "data_dir"]

_TEXT_SUFFIXES = {".txt", ".raw", ".utf8", ".text", ".md"}
_DOC_TAG = re.compile(r"</?doc[^>]*>")


def data_dir() -> Path | None:
    """``$PMETLAB_DATA_DIR`` if set and present, else the project's ``data/`` if it has content."""
    env = os.environ.get("PMETLAB_DATA_DIR")
    if env and Path(env).expanduser().is_dir():
        return Path(env).expanduser()
    local = Path(__file__).resolve().parent.parent / "data"
    if local.is_dir() and any(p.name != "README.md" for p in local.iterdir()):
        return local
    shared = local.parent.parent / "shared" / "data"  # a checkout with ../shared beside it
    if shared.is_dir():
        return shared
    return None


@dataclass(frozen=True)
class Corpus:
    """A named source of documents. ``identity`` (name + file hashes) goes into cache keys."""

    name: str
    files: tuple[Path, ...] = ()
    hub_id: str | None = None
    model_samples: int = 0

    @property
    def identity(self) -> dict:
        if self.files:
            return {"name": self.name, "files": [
                {"file": p.name, "sha256": _sha256(p)} for p in self.files]}
        return {"name": self.name, "hub_id": self.hub_id, "model_samples": self.model_samples}

    def documents(self) -> Iterator[str]:
        """Documents in a fixed order (files sorted; ``<doc>`` and blank-line separated)."""
        if self.hub_id is not None:
            yield from _hub_documents(self.hub_id)
            return
        for p in self.files:
            if p.suffix == ".jsonl":
                with open(p, encoding="utf-8") as f:
                    for i, line in enumerate(f):
                        if line.strip():
                            try:
                                yield json.loads(line)["text"]
                            except (ValueError, KeyError, TypeError) as exc:
                                raise ValueError(f"{p}:{i + 1}: expected a JSON object with a 'text' "
                                                 f"field ({exc})") from None
                continue
            text = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
            if "<doc" in text:
                parts = _DOC_TAG.split(text)
            else:  # WikiText: articles start with ' = Title = ' lines
                parts = re.split(r"\n(?= = [^=].* = \n)", text)
            for part in parts:
                part = part.strip()
                if len(part) > 20:
                    yield part


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hub_documents(hub_id: str) -> Iterator[str]:
    try:
        import datasets  # optional; only for users who are online
    except ImportError:
        raise ValueError(f"corpus 'hf:{hub_id}' needs the optional 'datasets' package (pip install "
                         f"datasets) and network access; offline, use 'default' or a local path") from None
    name, _, config = hub_id.partition(":")
    ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    for row in ds:
        text = row.get("text", "")
        if text and text.strip():
            yield text


def resolve_corpus(spec: str | os.PathLike) -> Corpus:
    """Resolve a corpus spec.

    * ``"default"``: every text file under ``<data dir>/corpus`` (the shared WikiText-2 and
      Wikipedia sample), sorted;
    * a path to a text/JSONL file or a directory of them;
    * ``"hf:<dataset>[:<config>]"``: a Hugging Face dataset, streamed (online only), e.g.
      ``"hf:wikitext:wikitext-103-raw-v1"``;
    * ``"model:<n>"``: n sequences sampled from the model itself (seeded).
    """
    s = str(spec)
    if s.startswith("hf:"):
        return Corpus(name=s, hub_id=s[3:])
    if s.startswith("model:"):
        try:
            n = int(s.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"corpus {s!r}: expected 'model:<number of samples>'") from None
        return Corpus(name=s, model_samples=n)
    if s == "default":
        base = data_dir()
        root = base / "corpus" if base is not None else None
        if root is None or not root.is_dir():
            raise FileNotFoundError(
                "the default covariance corpus is <data dir>/corpus, but no data dir with a corpus/ "
                f"folder was found (PMETLAB_DATA_DIR={os.environ.get('PMETLAB_DATA_DIR')!r}, project "
                "data/). Set PMETLAB_DATA_DIR, pass a text file or folder, or use 'hf:wikitext:"
                "wikitext-103-raw-v1' when online.")
        path = root
    else:
        path = Path(s).expanduser()
    if path.is_file():
        files = (path,)
    elif path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file()
                             and (p.suffix in _TEXT_SUFFIXES or p.suffix == ".jsonl")))
    else:
        raise FileNotFoundError(f"corpus {s!r} is not 'default', 'hf:<id>', 'model:<n>' or an existing "
                                f"file/folder")
    if not files:
        raise FileNotFoundError(f"corpus folder {path} has no .txt/.raw/.utf8/.jsonl files")
    return Corpus(name=s, files=files)
