"""On-disk cache helpers: the cache directory, atomic writes, content fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "cache_dir",
    "atomic_path",
    "atomic_write_json",
    "weights_fingerprint",
    "stable_hash",
    "file_sha256",
    "tensor_digest",
    "legacy_names_bytes_digest",
]

CACHE_ENV = "PMETLAB_CACHE_DIR"


def cache_dir(*parts: str) -> Path:
    """``$PMETLAB_CACHE_DIR`` (default ``~/.cache/pmetlab``) joined with ``parts``, created."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pmetlab").expanduser()
    p = base.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextmanager
def atomic_path(path: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed onto ``path``.

    Readers never see a half-written file; a crash leaves only the temporary behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and path.exists():
            import shutil

            old = path.with_name(path.name + f".old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short hex digest of a JSON-serialisable object (key order does not matter)."""
    s = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.blake2b(s.encode(), digest_size=n).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview | None:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B") if t.numel() else None


def tensor_digest(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *, extra: str = "", digest_size: int = 16
) -> str:
    """The digest of named tensors: names, shapes, dtypes and every byte (in name order for a
    mapping, in the given order for an iterable of pairs), plus ``extra``. The one tensor digest
    of pmetlab: cache checksums, weight fingerprints and deltas checksums all use it."""
    items = sorted(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    h = hashlib.blake2b(extra.encode(), digest_size=digest_size)
    for name, t in items:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        b = _tensor_bytes(t)
        if b is not None:
            h.update(b)
    return h.hexdigest()


def legacy_names_bytes_digest(pairs: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The parameter fingerprint that deltas files saved before :func:`tensor_digest` replaced it
    carry: each name and the tensor's bytes, in the given order, without shapes or dtypes.
    Only for recognising those files (:meth:`pmetlab.Deltas.check_compatible`); never for new data."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in pairs:
        h.update(name.encode())
        b = _tensor_bytes(t)
        if b is not None:
            h.update(b)
    return h.hexdigest()


def weights_fingerprint(model: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> str:
    """A digest of the model's parameters (names, shapes, dtypes and every byte), by
    :func:`tensor_digest`.

    ``prefixes`` restricts it to parameters whose names start with one of them (e.g. the
    embedding and the layers a statistic depends on). Shared (tied) tensors count once.
    """
    seen: set[int] = set()
    pairs = []
    for name, p in model.named_parameters(remove_duplicate=True):
        if (prefixes is not None and not name.startswith(prefixes)) or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        pairs.append((name, p))
    return tensor_digest(pairs)
