"""The keys of earlier edits kept by a sequential null-space experiment (K_p K_pᵀ per component and
layer, :mod:`.nullspace`): added explicitly by its owner, saved and loaded checksummed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..store import KeyedStore
from .deltas import Deltas

__all__ = ["PreservedKeys", "PRESERVED_FORMAT"]

#: Version of :meth:`PreservedKeys.save` files.
PRESERVED_FORMAT = 1


class PreservedKeys:
    """K_p K_pᵀ of the keys of earlier edits, per (component, layer), as a (d_in, d_in) float64
    sum and a count: the state of a sequential null-space experiment. Its owner decides what is
    added (:meth:`add`, :meth:`add_round`); nothing here is global or added implicitly.

    Args:
        device: where the Gram matrices live (the keys are moved there when added).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._gram: dict[tuple[str, int], torch.Tensor] = {}
        self._count: dict[tuple[str, int], int] = {}

    def add(self, layer: int, keys: torch.Tensor, component: str = "ffn") -> None:
        """Add the keys (N, d_in) used at ``layer`` (rows) to K_p K_pᵀ."""
        if keys.ndim != 2:
            raise ValueError(f"keys must be (N, d_in) rows, got shape {tuple(keys.shape)}")
        if not torch.isfinite(keys).all():
            raise ValueError(f"keys for layer {layer} ({component}) hold non-finite values")
        k = keys.detach().to(self.device, torch.float64)
        slot = (str(component), int(layer))
        old = self._gram.get(slot)
        if old is not None and old.shape[0] != k.shape[1]:
            raise ValueError(
                f"keys of size {k.shape[1]} for layer {layer} ({component}), which holds keys of size {old.shape[0]}"
            )
        self._gram[slot] = (old if old is not None else 0) + k.T @ k
        self._count[slot] = self._count.get(slot, 0) + int(k.shape[0])

    def add_round(self, deltas: Deltas) -> None:
        """Add every key the solves of one :func:`compute_deltas` call used (``deltas.keys``)."""
        if not deltas.keys:
            raise ValueError(
                "these deltas carry no solve keys: compute_deltas records them only with hparams.null_space=True "
                "(and they are not saved with the deltas)"
            )
        for (component, layer), keys in deltas.keys.items():
            self.add(layer, keys, component)

    def gram(self, layer: int, component: str = "ffn") -> torch.Tensor | None:
        """K_p K_pᵀ (d_in, d_in) float64 at ``layer``, or None when nothing was added there."""
        return self._gram.get((str(component), int(layer)))

    def count(self, layer: int, component: str = "ffn") -> int:
        return self._count.get((str(component), int(layer)), 0)

    def reset(self) -> None:
        """Forget every key (a new sequence of edits)."""
        self._gram.clear()
        self._count.clear()

    def __len__(self) -> int:
        """The number of (component, layer) entries held."""
        return len(self._gram)

    def to_dict(self) -> dict[str, Any]:
        """For run records: keys counted per component and layer, e.g. ``{"counts": {"ffn": {"3": 40}}}``."""
        counts: dict[str, dict[str, int]] = {}
        for (component, layer), n in sorted(self._count.items()):
            counts.setdefault(component, {})[str(layer)] = n
        return {"counts": counts}

    def save(self, path: str | Path) -> Path:
        """Write the state to a safetensors file (checksummed, atomic) for :meth:`load`."""
        tensors = {}
        for (component, layer), g in self._gram.items():
            tensors[f"{component}.L{layer:03d}.gram"] = g
            tensors[f"{component}.L{layer:03d}.count"] = torch.tensor(self._count[(component, layer)])
        return KeyedStore.write_tensors(path, _preserved_key(), tensors, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> PreservedKeys:
        """The state written by :meth:`save`; a missing or damaged file raises an error naming it."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no saved preserved keys at {path}")
        entry = KeyedStore.read_tensors(path, _preserved_key(), finite=True)
        out = cls(device)
        for name, t in entry.tensors.items():
            component, layer, what = name.split(".")
            slot = (component, int(layer[1:]))
            if what == "gram":
                out._gram[slot] = t.to(out.device, torch.float64)
            else:
                out._count[slot] = int(t)
        return out


def _preserved_key() -> dict[str, Any]:
    return {"kind": "preserved_keys", "format": PRESERVED_FORMAT}
