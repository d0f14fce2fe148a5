"""Reversible, saveable weight edits.

A :class:`Deltas` maps parameter names to additive updates (in the parameter's own layout).
Computing them never touches the model; :func:`apply_deltas_` adds them in place and returns
what :func:`restore_` needs to undo it bit-exactly; :func:`edited` applies and always restores.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..cache import atomic_path, legacy_names_bytes_digest, tensor_digest
from ..models.loading import model_identity
from ..tracing import get_parameter
from ..versions import versions

logger = logging.getLogger(__name__)

__all__ = ["Deltas", "apply_deltas_", "restore_", "edited", "param_fingerprint", "EditMismatchError"]

FORMAT = 1
#: 2: ``base_fingerprint`` is :func:`param_fingerprint` (by tensor_digest: names, shapes, dtypes,
#: bytes). Deltas without this marker (saved before) may carry the legacy digest of names and bytes.
FINGERPRINT_VERSION = 2


def _checksum_matches(tensors: dict[str, torch.Tensor], stored: str) -> bool:
    """Whether ``stored`` is the :func:`tensor_digest` of ``tensors`` (files written before it
    existed hashed bfloat16 tensors under the name int16, same bytes: accepted too)."""
    if stored == tensor_digest(tensors):
        return True
    if any(t.dtype == torch.bfloat16 for t in tensors.values()):
        as_int16 = {n: t.view(torch.int16) if t.dtype == torch.bfloat16 else t for n, t in tensors.items()}
        return stored == tensor_digest(as_int16)
    return False


def _save_error(path: Path, exc: Exception) -> OSError:
    """An OSError (of ``exc``'s type when it is one) naming ``path``, not the temporary file the
    write failed on, with the reason and what to do."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    why = re.sub(r'\s*at path "[^"]*"', "", why)  # safetensors names the temporary file
    return (type(exc) if isinstance(exc, OSError) else OSError)(
        f"cannot save the deltas to {str(path)!r}: {why}; choose a path in a writable directory (or free some space)"
    )


class EditMismatchError(ValueError):
    """The deltas were computed for another model (or the model is already edited)."""


def param_fingerprint(model: torch.nn.Module, names: list[str]) -> str:
    """A digest of the named parameters' current values (to recognise the unedited model), by
    :func:`pmetlab.cache.tensor_digest`: names, shapes, dtypes and bytes, in name order."""
    return tensor_digest({n: get_parameter(model, n) for n in names})


def _legacy_param_fingerprint(model: torch.nn.Module, names: list[str]) -> str:
    """The fingerprint deltas saved before :data:`FINGERPRINT_VERSION` 2 carry."""
    return legacy_names_bytes_digest((n, get_parameter(model, n)) for n in sorted(names))


@dataclass
class Deltas:
    """Additive parameter updates plus everything needed to reproduce and check them.

    Attributes:
        tensors: parameter name -> update, shaped like the parameter (float32).
        meta: method, resolved hyperparameters, requests, model identity, the fingerprint of the
            unedited parameters, versions, per-layer solve diagnostics.
        trace: per (request, step) optimisation records (not needed to apply the edit).
        keys: (component, layer) -> the (N, d_in) keys the solve used there, recorded with
            ``hparams.null_space`` for :meth:`PreservedKeys.add_round`; in memory only, not saved.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    trace: list[dict] = field(default_factory=list)
    keys: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def method(self) -> str:
        return self.meta.get("method", "unknown")

    def param_names(self) -> list[str]:
        return sorted(self.tensors)

    def norms(self) -> dict[str, float]:
        """Frobenius norm of each parameter's update."""
        return {n: float(t.float().norm()) for n, t in sorted(self.tensors.items())}

    def require_finite(self) -> None:
        """Raise ValueError naming the first parameter whose update holds NaN or inf (an edit with
        absurd settings, e.g. a huge learning rate or clamp factor), before it is saved or applied."""
        for n, t in sorted(self.tensors.items()):
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"the update of {n!r} has non-finite values (norm {float(t.float().norm())}); the edit's "
                    f"settings are probably absurd (learning rate, clamp factor): nothing was saved or applied"
                )

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (tensors) with the metadata as JSON in its header; atomic.

        Raises:
            IsADirectoryError: ``path`` is a directory. OSError: the file cannot be written there
                (the message names ``path``, the reason and what to do).
        """
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(
                f"cannot save the deltas to {str(path)!r}: it is a directory; pass a file path such as "
                f"{str(path / 'deltas.safetensors')!r}"
            )
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        meta = {
            "pmetlab_format": str(FORMAT),
            "meta": json.dumps(self.meta, default=str),
            "trace": json.dumps(self.trace),
            "checksum": tensor_digest(tensors),
        }
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
        except (OSError, SafetensorError) as exc:
            raise _save_error(path, exc) from exc
        return path

    @classmethod
    def load(cls, path: str | Path) -> Deltas:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved edit at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types on damaged files
            raise ValueError(f"{path} is not a readable pmetlab edit file ({type(exc).__name__}: {exc})") from None
        if header.get("pmetlab_format") != str(FORMAT):
            raise ValueError(
                f"{path} is not a pmetlab edit file of format {FORMAT} (found {header.get('pmetlab_format')!r})"
            )
        # flipped bytes in the tensor data would otherwise load silently as a different edit
        if "checksum" in header and not _checksum_matches(tensors, header["checksum"]):
            raise ValueError(f"{path} is damaged: its tensors do not match the stored checksum")
        try:
            meta = json.loads(header["meta"])
            trace = json.loads(header.get("trace", "[]"))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path} has a damaged header ({type(exc).__name__}: {exc})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path} has a damaged header (meta is a {type(meta).__name__})")
        return cls(tensors, meta, trace)

    def check_compatible(self, model: torch.nn.Module) -> None:
        """Raise :class:`EditMismatchError` unless ``model`` is the unedited model these deltas
        were computed for (same class, shapes and original values of the edited parameters)."""
        ident = self.meta.get("model", {})
        if ident.get("class") and ident["class"] != type(model).__name__:
            raise EditMismatchError(
                f"these deltas were computed for a {ident['class']} "
                f"({ident.get('source')}), not a {type(model).__name__}"
            )
        for n, t in self.tensors.items():
            try:
                p = get_parameter(model, n)
            except LookupError as exc:
                raise EditMismatchError(f"the model has no parameter {n!r} edited by these deltas: {exc}") from None
            if tuple(p.shape) != tuple(t.shape):
                raise EditMismatchError(
                    f"parameter {n!r} has shape {tuple(p.shape)} but the delta has {tuple(t.shape)}: a different model"
                )
        want = self.meta.get("base_fingerprint")
        if want and not self._base_matches(model, want):
            raise EditMismatchError(
                f"the model's edited parameters differ from those the deltas were computed on "
                f"(model {ident.get('source')!r}); it is a different model or already edited. "
                f"Restore it first, or pass check=False to apply anyway."
            )

    def _base_matches(self, model: torch.nn.Module, want: str) -> bool:
        """Whether the model's edited parameters have the fingerprint ``want``; deltas without the
        fingerprint version (saved before version 2) may also carry the legacy digest."""
        names = list(self.tensors)
        if param_fingerprint(model, names) == want:
            return True
        legacy = self.meta.get("fingerprint_version", 1) < FINGERPRINT_VERSION
        return legacy and _legacy_param_fingerprint(model, names) == want


#: An update whose norm exceeds this multiple of the weight it changes is almost surely a wrecked
#: solve (absurd learning rate or clamp); :func:`apply_deltas_` warns.
LARGE_UPDATE_RATIO = 10.0


def _scaled(t: torch.Tensor, scale: float, p: torch.Tensor) -> torch.Tensor:
    """``scale * t`` in ``p``'s device and dtype. The product is taken in float32 (or t's wider
    dtype) before the cast: a scale beyond a half-precision range must not overflow on its own."""
    if scale == 1:
        return t.to(p.device, p.dtype)
    wide = torch.promote_types(t.dtype, torch.float32)
    return (t.to(p.device, wide) * float(scale)).to(p.dtype)


def apply_deltas_(
    model: torch.nn.Module, deltas: Deltas, *, check: bool = True, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Add ``scale`` times ``deltas`` to the model's parameters in place. Returns the undo record
    (copies of the original values) for :func:`restore_`.

    Nothing is changed when a check fails: ``scale`` must be a finite number, every update and
    every edited weight (in the parameter's dtype) finite. An update whose norm is more than
    :data:`LARGE_UPDATE_RATIO` times the weight's norm is applied with a warning.
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}; pass e.g. scale=1.0 for the full edit")
    if check:
        deltas.check_compatible(model)
    params = {n: get_parameter(model, n) for n in deltas.tensors}
    for n, t in deltas.tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"delta for {n!r} has non-finite values; refusing to apply")
    new: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for n, p in params.items():
            new[n] = p.detach().clone().add_(_scaled(deltas.tensors[n], scale, p))
            if not torch.isfinite(new[n]).all():
                raise ValueError(
                    f"applying the delta for {n!r} (scale {scale}) gives non-finite weights in {p.dtype} "
                    f"(update norm {float(deltas.tensors[n].float().norm()) * abs(scale):.3g}); refusing to apply. "
                    "The edit's settings are probably absurd (learning rate, clamp factor)."
                )
        for n, p in params.items():
            upd = float(deltas.tensors[n].float().norm()) * abs(scale)
            base = float(p.detach().float().norm())
            if upd > LARGE_UPDATE_RATIO * base:
                logger.warning(
                    "the update to %r has norm %.3g, %.3g times the weight's (%.3g): the edit will likely "
                    "wreck the model; check the hyperparameters (learning rate, clamp factor, scale)",
                    n,
                    upd,
                    upd / base if base else float("inf"),
                    base,
                )
        undo = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(new[n])
    return undo


def restore_(model: torch.nn.Module, undo: dict[str, torch.Tensor]) -> None:
    """Put back the exact original values saved by :func:`apply_deltas_`."""
    with torch.no_grad():
        for n, orig in undo.items():
            get_parameter(model, n).copy_(orig)


@contextmanager
def edited(model: torch.nn.Module, deltas: Deltas, *, check: bool = True) -> Iterator[torch.nn.Module]:
    """``with edited(model, deltas): ...``: the edit is applied inside and always undone."""
    undo = apply_deltas_(model, deltas, check=check)
    try:
        yield model
    finally:
        restore_(model, undo)


def deltas_meta(
    model: torch.nn.Module, method: str, hparams: dict, requests: list[dict], base_fp: str, **extra: Any
) -> dict:
    """The ``meta`` of freshly computed deltas; ``base_fp`` is :func:`param_fingerprint` of the
    unedited parameters."""
    return {
        "method": method,
        "hparams": hparams,
        "requests": requests,
        "model": model_identity(model),
        "base_fingerprint": base_fp,
        "fingerprint_version": FINGERPRINT_VERSION,
        "versions": versions(),
        "format": FORMAT,
        **extra,
    }
