"""Text corpora for the covariance statistics: files, JSONL, a hub dataset, or model samples,
and their cutting into token chunks (:func:`tokenize_corpus`)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import file_sha256
from .datadir import env_data_dir
from .devices import model_device

logger = logging.getLogger(__name__)

__all__ = ["Corpus", "resolve_corpus", "data_dir", "tokenize_corpus"]

_TEXT_SUFFIXES = {".txt", ".raw", ".utf8", ".text", ".md"}
_DOC_TAG = re.compile(r"</?doc[^>]*>")


def data_dir() -> Path | None:
    """``$PMETLAB_DATA_DIR`` if set (an error when it is not a directory), else the project's
    ``data/`` if it has content, else ``../shared/data`` beside the checkout."""
    env = env_data_dir()  # a set but missing $PMETLAB_DATA_DIR is an error, as for the datasets
    if env is not None:
        return env
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
            return {"name": self.name, "files": [{"file": p.name, "sha256": file_sha256(p)} for p in self.files]}
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
                                raise ValueError(
                                    f"{p}:{i + 1}: expected a JSON object with a 'text' field ({exc})"
                                ) from None
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


def _hub_documents(hub_id: str) -> Iterator[str]:
    try:
        import datasets  # optional; only for users who are online
    except ImportError:
        raise ValueError(
            f"corpus 'hf:{hub_id}' needs the optional 'datasets' package (pip install "
            f"datasets) and network access; offline, use 'default' or a local path"
        ) from None
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
                "wikitext-103-raw-v1' when online."
            )
        path = root
    else:
        path = Path(s).expanduser()
    if path.is_file():
        files = (path,)
    elif path.is_dir():
        files = tuple(
            sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in _TEXT_SUFFIXES or p.suffix == ".jsonl"))
        )
    else:
        raise FileNotFoundError(f"corpus {s!r} is not 'default', 'hf:<id>', 'model:<n>' or an existing file/folder")
    if not files:
        raise FileNotFoundError(f"corpus folder {path} has no .txt/.raw/.utf8/.jsonl files")
    return Corpus(name=s, files=files)


def tokenize_corpus(
    tok: Any, corpus: Corpus, n_tokens: int, seq_len: int, *, model: torch.nn.Module | None = None, seed: int = 0
) -> list[list[int]]:
    """Chunks of at most ``seq_len`` token ids (documents split, never joined; each chunk starts
    with the tokenizer's BOS if it adds one; pieces under 8 tokens skipped) totalling ``n_tokens``.

    ``model`` and ``seed`` are only used by ``model:<n>`` corpora, which sample the documents."""
    bos = _bos_prefix(tok)
    chunks: list[list[int]] = []
    total = 0
    body = seq_len - len(bos)
    for doc in _documents(corpus, model, tok, seed):
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), body):
            piece = ids[i : i + body]
            if len(piece) < 8:
                continue
            room = n_tokens - total - len(bos)
            piece = bos + piece[: max(room, 1)]
            chunks.append(piece)
            total += len(piece)
            if total >= n_tokens:
                return chunks
    if total < n_tokens:
        logger.warning("corpus %s has only %d tokens (asked for %d); using all of it", corpus.name, total, n_tokens)
    return chunks


def _bos_prefix(tok: Any) -> list[int]:
    """The ids the tokenizer puts before a text when it adds special tokens (e.g. [BOS])."""
    with_sp = tok("a")["input_ids"]
    without = tok("a", add_special_tokens=False)["input_ids"]
    if len(with_sp) > len(without) and with_sp[-len(without) :] == without:
        return list(with_sp[: len(with_sp) - len(without)])
    return []


def _documents(corpus: Corpus, model: torch.nn.Module | None, tok: Any, seed: int) -> Iterator[str]:
    if corpus.model_samples:
        if model is None:
            raise ValueError("a 'model:<n>' corpus needs the model to sample from")
        yield from _sample_documents(model, tok, corpus.model_samples, seed)
    else:
        yield from corpus.documents()


@torch.no_grad()
def _sample_documents(model: torch.nn.Module, tok: Any, n: int, seed: int, length: int = 128) -> Iterator[str]:
    """``n`` texts of ``length`` tokens sampled (top-40, seeded) from the model itself."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = model_device(model)
    starts = ["The", "In", "A", "It", "He", "She", "This", "On"]
    for i in range(n):
        ids = tok(starts[i % len(starts)], return_tensors="pt")["input_ids"].to(dev)
        for _ in range(length):
            logits = model(input_ids=ids).logits[0, -1].float().cpu()
            top = torch.topk(logits, 40)
            probs = torch.softmax(top.values, -1)
            nxt = top.indices[torch.multinomial(probs, 1, generator=g)]
            ids = torch.cat([ids, nxt.view(1, 1).to(dev)], 1)
        yield tok.decode(ids[0], skip_special_tokens=True)
