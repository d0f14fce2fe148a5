"""The preset tables shipped in ``pmetlab/presets/<method>.json``: reading them, and the entries
``pmetlab tune`` writes per dataset family (``by_dataset``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

__all__ = ["dataset_family", "tuned_entry", "fields_of", "load_presets", "list_presets"]


def dataset_family(name: str) -> str:
    """The family a dataset's tuned presets are kept under: "counterfact" for CounterFact and the
    datasets derived from it, else the dataset's own name ("zsre")."""
    key = str(name).lower().replace("-", "_")
    return "counterfact" if key in ("counterfact", "multi_counterfact", "counterfact+conflict_filter") else key


def tuned_entry(entry: Mapping[str, Any], dataset: str | None) -> dict | None:
    """The ``by_dataset`` entry of a preset for ``dataset``'s family, or None."""
    if dataset is None:
        return None
    return (entry.get("by_dataset") or {}).get(dataset_family(dataset))


def fields_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.startswith("_") and k != "by_dataset"}


def load_presets(method: str) -> dict[str, dict]:
    text = resources.files("pmetlab.presets").joinpath(f"{method}.json").read_text()
    return json.loads(text)


def list_presets(method: str = "pmet") -> list[str]:
    return sorted(load_presets(method))
