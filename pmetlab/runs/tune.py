"""Tuning with an equal budget for every method, on records that are never evaluated.

:func:`tune` edits the first ``n_edits`` records of a dataset's **tuning split**
(:mod:`pmetlab.datasets.splits`) in one batch, once per point of a declared grid (λ =
``mom2_update_weight`` × ``v_lr``, the same points for every method), and chooses each method's
point by :data:`SELECTION_RULE`. It returns (and writes) the full table the choice was made from
and the preset entries; :func:`write_presets` puts them into ``pmetlab/presets/<method>.json``
under the model's ``by_dataset`` entry, from where runs on that dataset pick them up
(:meth:`pmetlab.hparams.EditHyperParams.preset`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..cache import atomic_path
from ..evaluation.summary import harmonic_mean
from ..hparams import dataset_family
from ..versions import versions
from .spec import safe_name
from .sweep import run_sweep

logger = logging.getLogger(__name__)

__all__ = ["TuningGrid", "TuningResult", "tune", "select_points", "write_presets", "SELECTION_RULE", "GRID_FIELDS"]

#: How a grid point is chosen, per method (stated in every table and preset entry).
SELECTION_RULE = (
    "per method, the grid point with the highest Score on the tuning records (CounterFact: the harmonic "
    "mean of ES, PS and NS; zsRE: of the three token accuracies); ties go to the higher NS, then to the "
    "grid's order"
)
#: Hyperparameter fields a grid point sets.
GRID_FIELDS = ("mom2_update_weight", "v_lr")
_METRICS = {
    "counterfact": ("efficacy_score", "paraphrase_score", "neighborhood_score"),
    "zsre": ("efficacy_token_acc", "paraphrase_token_acc", "neighborhood_token_acc"),
}


@dataclass(frozen=True)
class TuningGrid:
    """The declared grid: every (λ, v_lr) pair, the same for every method."""

    lambdas: tuple[float, ...]
    v_lrs: tuple[float, ...]

    def __post_init__(self) -> None:
        for name, values in (("lambdas", self.lambdas), ("v_lrs", self.v_lrs)):
            if not values or any(not isinstance(v, (int, float)) or not v > 0 for v in values):
                raise ValueError(f"{name} must be a non-empty list of positive numbers, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} holds a value twice: {values!r}")

    def points(self) -> list[dict[str, float]]:
        """The grid's points in order (λ outer, v_lr inner)."""
        return [{"mom2_update_weight": float(lam), "v_lr": float(lr)} for lam in self.lambdas for lr in self.v_lrs]


@dataclass
class TuningResult:
    """The table every point was scored in (``table``: one row per method and point, plus the
    unedited model), the chosen point per method (``chosen``) and how it was run (``record``)."""

    table: pd.DataFrame
    chosen: dict[str, dict[str, Any]]
    record: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
        """``<stem>.csv`` (the table) and ``<stem>.json`` (chosen points and the record), atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv, js = out / f"{stem}.csv", out / f"{stem}.json"
        with atomic_path(csv) as tmp:
            self.table.to_csv(tmp, index=False)
        with atomic_path(js) as tmp:
            Path(tmp).write_text(json.dumps({"chosen": self.chosen, **self.record}, indent=1, default=str) + "\n")
        return csv, js


def _score(row: Mapping[str, Any], parts: Sequence[str]) -> float:
    values = [row.get(p) for p in parts]
    if any(v is None or not np.isfinite(v) for v in values):
        return float("nan")
    return harmonic_mean([float(v) for v in values])


def select_points(table: pd.DataFrame, parts: Sequence[str], by: str = "method") -> pd.DataFrame:
    """``table`` (post-edit rows, one per method — or per value of ``by``, e.g. an arm — and grid
    point, in grid order) with ``tuning_score`` (the harmonic mean of ``parts``) and ``selected``
    (True on each group's choice by :data:`SELECTION_RULE`)."""
    out = table.copy()
    out["tuning_score"] = [_score(r, parts) for r in out.to_dict("records")]
    out["selected"] = False
    for _, rows in out.groupby(by, sort=False):
        order = sorted(
            rows.index,
            key=lambda i: (-np.nan_to_num(out.at[i, "tuning_score"], nan=-1.0), -out.at[i, parts[-1]], i),
        )
        out.at[order[0], "selected"] = True
    return out


def _grid_entries(methods: Sequence[str], grid: TuningGrid) -> list[dict]:
    return [
        {"method": m, "label": f"{m} λ={p['mom2_update_weight']:g} v_lr={p['v_lr']:g}", "hparams": p}
        for m in methods
        for p in grid.points()
    ]


def tune(
    *,
    model: str,
    dataset: str,
    grid: TuningGrid,
    n_edits: int,
    out_dir: str | Path,
    methods: Sequence[str] = ("pmet", "memit"),
    seed: int = 0,
    hparams: Mapping[str, Any] | None = None,
    workers: int = 1,
    **run_options: Any,
) -> TuningResult:
    """Edit the first ``n_edits`` tuning-split records of ``dataset`` in one batch at every grid
    point for every method; score each run; choose one point per method.

    Args:
        grid: the declared (λ, v_lr) grid; every method runs every point (an equal budget).
        out_dir: where the runs go (``<out_dir>/runs_<dataset>/<slug>``; finished runs are reused).
        hparams: overrides applied at every point (e.g. fewer steps for a smoke test); the grid's
            fields may not be among them.
        workers: processes for the target optimisation (see :func:`pmetlab.runs.run_sweep`).
        run_options: passed to :func:`pmetlab.runs.run_sweep` (``model_and_tokenizer``, ``progress``...).
    """
    fixed = dict(hparams or {})
    clash = sorted(set(fixed) & set(GRID_FIELDS))
    if clash:
        raise ValueError(f"hparams {clash} are the grid's fields; declare them in the grid instead")
    family = dataset_family(dataset)
    if family not in _METRICS:
        raise ValueError(f"tuning needs an editing dataset (CounterFact or zsRE), got {dataset!r}")
    sweep = run_sweep(
        _grid_entries(methods, grid),
        out_dir=Path(out_dir) / f"runs_{safe_name(dataset)}",
        model=model,
        dataset=dataset,
        n_edits=n_edits,
        split="tune",
        seed=seed,
        generation=False,
        hparams=fixed,
        workers=workers,
        **run_options,
    )
    return _result(sweep, grid, methods, family, model=model, dataset=dataset, n_edits=n_edits, fixed=fixed)


def _result(sweep: pd.DataFrame, grid: TuningGrid, methods: Sequence[str], family: str, **run: Any) -> TuningResult:
    parts = _METRICS[family]
    post = sweep[sweep["phase"] == "post"].reset_index(drop=True)
    scored = select_points(post, parts)
    unedited = sweep[(sweep["phase"] == "pre")].head(1).assign(method="unedited", label="unedited")
    unedited = unedited.assign(**{f: float("nan") for f in GRID_FIELDS})  # no grid point: the model as loaded
    unedited["tuning_score"] = [_score(r, parts) for r in unedited.to_dict("records")]
    table = pd.concat([scored, unedited], ignore_index=True)
    chosen = {
        str(r["method"]): {
            **{f: float(r[f]) for f in GRID_FIELDS},
            "tuning_score": float(r["tuning_score"]),
            "run_dir": str(r["run_dir"]),
        }
        for r in scored[scored["selected"]].to_dict("records")
    }
    record = {
        "rule": SELECTION_RULE,
        "grid": asdict(grid),
        "methods": list(methods),
        "split": "tune",
        "metrics": list(parts),
        "fixed_hparams": run.pop("fixed"),
        **run,
        "versions": versions(),
    }
    return TuningResult(table, chosen, record)


def write_presets(
    result: TuningResult, *, model: str, dataset: str, source: str, presets_dir: str | Path
) -> list[Path]:
    """Write each method's chosen point into ``<presets_dir>/<method>.json`` under
    ``[model]["by_dataset"][<dataset family>]`` (atomically; the rest of the file is kept), with
    the table it came from (``_source``) and the rule."""
    written = []
    for method, point in result.chosen.items():
        path = Path(presets_dir) / f"{method}.json"
        table = json.loads(path.read_text())
        key = str(model).lower()
        if key not in table:
            raise KeyError(f"{path} has no {method} preset for {model!r}; add the model's entry first")
        entry = {f: point[f] for f in GRID_FIELDS}
        entry.update(_source=source, _rule=SELECTION_RULE, _tuning_score=round(point["tuning_score"], 2))
        table[key].setdefault("by_dataset", {})[dataset_family(dataset)] = entry
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written
