"""One keyed on-disk store for every cache pmetlab keeps (statistics, prefixes, targets,
pre-edit metrics): key → file, the key written in the file and checked on load, a checksum of
the content, atomic writes, and one tensor digest.

Usage::

    store = KeyedStore("targets", type(model).__name__)          # $PMETLAB_CACHE_DIR/targets/<class>/
    key = {"format": 2, "weights": weights_fingerprint(model), ...}  # every input that changes the value
    entry = store.load_tensors(key)                              # None when missing or damaged
    if entry is None:
        store.save_tensors(key, {"v": v}, meta={"n_steps": 7})
    entry.tensors["v"], entry.meta["n_steps"]

A damaged, truncated or foreign file (another key hashed to the same name, a checksum mismatch,
non-finite values where they are refused) is logged with its path and treated as missing, so
the caller recomputes and overwrites it. A cache write that fails (a full disk, a read-only
cache directory) is one warning naming the file and ``$PMETLAB_CACHE_DIR``; the caller goes on
with the values it computed (kept in memory only), since a cache is never needed for a result.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cache import CACHE_ENV, atomic_path, cache_dir, stable_hash, tensor_digest

logger = logging.getLogger(__name__)

__all__ = ["KeyedStore", "StoreEntry", "tensor_digest", "DamagedEntryError"]

STORE_FORMAT = 1


class DamagedEntryError(ValueError):
    """A stored file exists but cannot be trusted (unreadable, other key, checksum mismatch)."""


@dataclass
class StoreEntry:
    """What a store holds under one key: tensors (CPU) and JSON-able metadata."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


class KeyedStore:
    """Files of one kind under ``$PMETLAB_CACHE_DIR/<kind>/<sub>...``, named by the key's hash.

    Args:
        kind, *sub: the folder (e.g. ``"stats", "LlamaForCausalLM"``).
        root: a folder to use instead of the cache directory (tests, run directories).
    """

    def __init__(self, kind: str, *sub: str, root: str | Path | None = None) -> None:
        self.folder = Path(root).joinpath(kind, *sub) if root is not None else cache_dir(kind, *sub)
        self._write_failed = False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # unwritable or full: reads find nothing, writes warn
            self._cannot_write(self.folder, exc)

    def _cannot_write(self, path: Path, exc: BaseException) -> None:
        """One warning per store naming the file, the reason and what to do (later ones at debug)."""
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        why = re.sub(r'\s*at path "[^"]*"', "", why)  # safetensors names the temporary file
        log = logger.debug if self._write_failed else logger.warning
        self._write_failed = True
        log(
            "cannot write the cache file %s (%s); the computed values are used from memory for this run only. "
            "Free some space there, or point $%s at a writable directory with room",
            path,
            why,
            CACHE_ENV,
        )

    def _best_effort(self, path: Path, write: Callable[[], Path]) -> Path | None:
        """``write()``, or None with a warning when the disk refuses it (see the module docstring)."""
        from safetensors import SafetensorError

        try:
            return write()
        except (OSError, SafetensorError) as exc:
            self._cannot_write(path, exc)
            return None

    def path(self, key: Mapping[str, Any], *, prefix: str = "", suffix: str = ".safetensors") -> Path:
        """Where the entry for ``key`` lives (``prefix`` makes names readable, e.g. "ffn-L003-")."""
        return self.folder / f"{prefix}{stable_hash(dict(key))}{suffix}"

    # --- tensors -----------------------------------------------------------------------------
    def save_tensors(
        self,
        key: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
        *,
        prefix: str = "",
    ) -> Path | None:
        """Write ``tensors`` (moved to the CPU) with ``key``, ``meta`` and a checksum; atomic. None
        when the disk refuses the write (a warning names the file; nothing is left behind)."""
        path = self.path(key, prefix=prefix)
        return self._best_effort(path, lambda: self.write_tensors(path, key, tensors, meta))

    @staticmethod
    def write_tensors(
        path: str | Path,
        key: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write one file in the store's format at an explicit ``path`` (the counterpart of
        :meth:`read_tensors`, for files whose place the caller chooses); atomic."""
        from safetensors.torch import save_file

        cpu = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        header = {
            "store_format": str(STORE_FORMAT),
            "key": stable_hash(dict(key), 32),
            "key_json": json.dumps(dict(key), sort_keys=True, default=str),
            "meta": json.dumps(dict(meta or {}), sort_keys=True, default=str),
            "checksum": tensor_digest(cpu),
        }
        from safetensors import SafetensorError

        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                save_file(cpu, str(tmp), metadata=header)
        except (OSError, SafetensorError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            why = re.sub(r'\s*at path "[^"]*"', "", why)
            err = (type(exc) if isinstance(exc, OSError) else OSError)(f"cannot write {path}: {why}")
            err.errno = getattr(exc, "errno", None)  # kept: the CLI words its hint by it (ENOSPC, EACCES)
            raise err from exc
        return path

    def load_tensors(self, key: Mapping[str, Any], *, prefix: str = "", finite: bool = False) -> StoreEntry | None:
        """The entry for ``key``, or None when it is missing or damaged (logged with its path).
        ``finite=True`` also refuses entries holding NaN or inf."""
        path = self.path(key, prefix=prefix)
        if not path.is_file():
            return None
        try:
            return self.read_tensors(path, key, finite=finite)
        except DamagedEntryError as exc:
            logger.warning("ignoring cache entry (it will be recomputed): %s", exc)
            return None

    @staticmethod
    def read_tensors(path: str | Path, key: Mapping[str, Any] | None = None, *, finite: bool = False) -> StoreEntry:
        """Read and verify one file; raises :class:`DamagedEntryError` naming the file."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {n: f.get_tensor(n) for n in f.keys()}
        except Exception as exc:  # safetensors raises several types for damaged files
            raise DamagedEntryError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
        if header.get("store_format") != str(STORE_FORMAT):
            raise DamagedEntryError(f"{path} has no store header or an old one")
        if key is not None and header.get("key") != stable_hash(dict(key), 32):
            raise DamagedEntryError(f"{path} holds another key")
        if header.get("checksum") != tensor_digest(tensors):
            raise DamagedEntryError(f"{path} is damaged (checksum mismatch)")
        if finite and not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
            raise DamagedEntryError(f"{path} holds non-finite values")
        try:
            meta = json.loads(header.get("meta", "{}"))
        except json.JSONDecodeError:
            raise DamagedEntryError(f"{path} has a damaged header") from None
        return StoreEntry(tensors, meta, Path(path))

    # --- JSON --------------------------------------------------------------------------------
    def save_json(self, key: Mapping[str, Any], obj: Any, *, prefix: str = "") -> Path | None:
        """Write a JSON-able ``obj`` with ``key`` and a checksum of its text; atomic. None when the
        disk refuses the write (a warning names the file)."""
        body = json.dumps(obj, sort_keys=True, default=str)
        doc = {"store_format": STORE_FORMAT, "key": dict(key), "checksum": stable_hash(body, 32), "value": body}
        path = self.path(key, prefix=prefix, suffix=".json")

        def write() -> Path:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(doc, sort_keys=True, default=str))
            return path

        return self._best_effort(path, write)

    def load_json(self, key: Mapping[str, Any], *, prefix: str = "") -> Any | None:
        """The object stored for ``key``, or None when missing or damaged (logged)."""
        path = self.path(key, prefix=prefix, suffix=".json")
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            ok = (
                isinstance(doc, dict)
                and doc.get("store_format") == STORE_FORMAT
                and stable_hash(doc.get("key"), 32) == stable_hash(json.loads(json.dumps(dict(key), default=str)), 32)
                and doc.get("checksum") == stable_hash(doc.get("value"), 32)
            )
            if not ok:
                raise DamagedEntryError(f"{path} holds another key, an old format or a damaged value")
            return json.loads(doc["value"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, DamagedEntryError, TypeError) as exc:
            logger.warning("ignoring cache entry (it will be recomputed): %s (%s)", path, exc)
            return None
