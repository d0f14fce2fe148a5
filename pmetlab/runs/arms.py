"""The paired sweep of issue #21: arms (a method and the switches it sets), each tuned with the same
λ × v_lr budget on the tuning split, then all edited on the same evaluation records and compared
paired.

An arm is a method plus hyperparameter overrides (:class:`Arm`); :data:`WHY_PMET_TRAILS` is the set
that separates PMET's method from its port to sequential blocks. :func:`plan_optimisations` counts
the target optimisations a sweep needs: arms that differ only in what is written or how it is solved
(``ffn_target``, the spread, λ) share one optimisation through the per-request target cache, and the
plan says how many that saves. :func:`tune_arms` and :func:`evaluate_arms` run the sweep (resumable:
finished runs and cached targets are reused); :func:`arm_tables` builds the committed tables.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..cache import atomic_path
from ..editing.target_cache import optimisation_fields
from ..evaluation.paired import PAIRED_RULE, SCORE_PARTS, paired_table
from ..hparams import MEMITHyperParams, PMETHyperParams, dataset_family
from ..versions import versions
from .rundir import read_records
from .spec import safe_name
from .sweep import run_sweep
from .tune import GRID_FIELDS, SELECTION_RULE, TuningGrid, select_points

logger = logging.getLogger(__name__)

__all__ = [
    "Arm",
    "ArmSweep",
    "run_arm_sweep",
    "WHY_PMET_TRAILS",
    "arms_by_name",
    "plan_optimisations",
    "tune_arms",
    "evaluate_arms",
    "arm_tables",
    "write_arm_tables",
]

_CLASSES = {"pmet": PMETHyperParams, "memit": MEMITHyperParams}


@dataclass(frozen=True)
class Arm:
    """One arm of a paired sweep: ``method`` with ``hparams`` overrides (never the grid's fields)."""

    name: str
    method: str
    hparams: Mapping[str, Any] = field(default_factory=dict)
    why: str = ""

    def __post_init__(self) -> None:
        if self.method not in _CLASSES:
            raise ValueError(f"arm {self.name!r}: method must be one of {sorted(_CLASSES)}, got {self.method!r}")
        clash = sorted(set(self.hparams) & set(GRID_FIELDS))
        if clash:
            raise ValueError(f"arm {self.name!r} sets the tuning grid's fields {clash}; the grid sets them")
        _CLASSES[self.method]().replace(**dict(self.hparams))  # unknown keys / bad values fail here


#: Issue #21's arms: MEMIT; PMET as released; each port question as a switch; and PMET without δ^a
#: with MEMIT's bound, whose δ acts on sequential blocks like MEMIT's δ at h^L (so beside MEMIT it
#: isolates the spread, the stop rule and the decay normaliser).
WHY_PMET_TRAILS: tuple[Arm, ...] = (
    Arm("memit", "memit", {}, "the baseline"),
    Arm("pmet", "pmet", {}, "PMET as released"),
    Arm("pmet_observed", "pmet", {"ffn_target": "observed"}, "writes the FFN output of the optimised pass"),
    Arm("pmet_block", "pmet", {"ffn_target": "block"}, "writes the whole change of the block at L"),
    Arm("pmet_residual_bound", "pmet", {"clamp_reference": "residual"}, "δ bounded by ‖h^L‖ (MEMIT's)"),
    Arm(
        "pmet_block_residual_bound",
        "pmet",
        {"ffn_target": "block", "clamp_reference": "residual"},
        "both port fixes",
    ),
    Arm("pmet_even_spread", "pmet", {"spread_exponent": 1.0}, "MEMIT's even spread"),
    Arm(
        "pmet_no_attn_residual_bound",
        "pmet",
        {"optimize_attn": False, "clamp_reference": "residual"},
        "δ^m alone with MEMIT's bound: MEMIT's δ, PMET's stop rule, decay and spread",
    ),
)


def arms_by_name(names: Sequence[str] | None, arms: Sequence[Arm] = WHY_PMET_TRAILS) -> list[Arm]:
    """The arms called ``names`` (all of ``arms`` for None); an unknown name is refused."""
    if names is None:
        return list(arms)
    known = {a.name: a for a in arms}
    bad = [n for n in names if n not in known]
    if bad:
        raise KeyError(f"unknown arm(s) {bad}; known: {list(known)}")
    return [known[n] for n in names]


def _hp(arm: Arm, model: str, dataset: str, point: Mapping[str, float] | None = None):
    cls = _CLASSES[arm.method]
    return cls.preset(model, dataset).replace(**dict(arm.hparams), **dict(point or {}))


def plan_optimisations(
    arms: Sequence[Arm],
    points: Sequence[Mapping[str, float]] | Mapping[str, Sequence[Mapping[str, float]]],
    *,
    model: str,
    dataset: str,
) -> dict[str, Any]:
    """How many target optimisations a sweep needs per record set: ``runs`` (each arm at each of
    ``points``, or at ``points[arm name]``, all editing the same records), ``optimisations``
    (distinct target settings among them: only the fields the targets depend on count,
    :func:`~pmetlab.editing.target_cache.optimisation_fields`) and ``saved`` (runs whose targets
    another run of the sweep already optimised)."""
    keys: dict[str, list[str]] = {}
    runs = 0
    for arm in arms:
        for point in points[arm.name] if isinstance(points, Mapping) else points:
            runs += 1
            hp = _hp(arm, model, dataset, point)
            keys.setdefault(json.dumps(optimisation_fields(hp), sort_keys=True), []).append(
                f"{arm.name} {json.dumps(dict(point), sort_keys=True)}"
            )
    return {"runs": runs, "optimisations": len(keys), "saved": runs - len(keys), "shared": list(keys.values())}


def _label(arm: Arm, point: Mapping[str, float]) -> str:
    return f"{arm.name} λ={point['mom2_update_weight']:g} v_lr={point['v_lr']:g}"


def _arm_column(frame: pd.DataFrame, arms: Sequence[Arm], points_of: Mapping[str, Sequence[Mapping]]) -> pd.Series:
    label_to_arm = {_label(a, p): a.name for a in arms for p in points_of[a.name]}
    return frame["label"].map(label_to_arm)


def _sweep(
    arms: Sequence[Arm],
    points_of: Mapping[str, Sequence[Mapping[str, float]]],
    out_dir: Path,
    model: str,
    dataset: str,
    n_edits: int,
    split: str,
    seed: int,
    run_options: Mapping[str, Any],
) -> pd.DataFrame:
    """One run per arm and point on the first ``n_edits`` records of ``split`` (one batch each)."""
    entries = [
        {"method": a.method, "label": _label(a, p), "hparams": {**dict(a.hparams), **p}}
        for a in arms
        for p in points_of[a.name]
    ]
    common = dict(model=model, dataset=dataset, n_edits=n_edits, split=split, seed=seed, generation=False)
    return run_sweep(entries, out_dir=out_dir, **common, **run_options)


def tune_arms(
    arms: Sequence[Arm],
    grid: TuningGrid,
    *,
    model: str,
    dataset: str,
    n_edits: int,
    out_dir: str | Path,
    seed: int = 0,
    **run_options: Any,
) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Every arm at every grid point on the first ``n_edits`` tuning-split records (one batch), the
    same records and points for every arm; each arm's point chosen by :data:`SELECTION_RULE`.

    Returns the post-edit table (``arm``, ``tuning_score``, ``selected``) and arm → chosen point."""
    points_of = {a.name: grid.points() for a in arms}
    where = Path(out_dir) / f"tune_{safe_name(dataset)}"
    sweep = _sweep(arms, points_of, where, model, dataset, n_edits, "tune", seed, run_options)
    post = sweep[sweep["phase"] == "post"].reset_index(drop=True)
    post.insert(0, "arm", _arm_column(post, arms, points_of))
    scored = select_points(post, SCORE_PARTS[dataset_family(dataset)], by="arm")
    chosen = {
        str(r["arm"]): {f: float(r[f]) for f in GRID_FIELDS} for r in scored[scored["selected"]].to_dict("records")
    }
    return scored, chosen


def evaluate_arms(
    arms: Sequence[Arm],
    chosen: Mapping[str, Mapping[str, float]],
    *,
    model: str,
    dataset: str,
    n_edits: int,
    out_dir: str | Path,
    seed: int = 0,
    **run_options: Any,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Every arm at its chosen point on the same first ``n_edits`` evaluation-split records, one
    batch each. Returns the runs' summaries (with ``arm``) and arm → per-record post frame (plus
    ``"unedited"``: the pre-edit records)."""
    missing = [a.name for a in arms if a.name not in chosen]
    if missing:
        raise KeyError(f"no tuned point for arm(s) {missing}; run tune_arms first")
    points_of = {a.name: [dict(chosen[a.name])] for a in arms}
    where = Path(out_dir) / f"eval_{safe_name(dataset)}_{n_edits}"
    sweep = _sweep(arms, points_of, where, model, dataset, n_edits, "eval", seed, run_options)
    sweep.insert(0, "arm", _arm_column(sweep, arms, points_of))
    frames: dict[str, pd.DataFrame] = {}
    for r in sweep[sweep["phase"] == "post"].to_dict("records"):
        rec = read_records(Path(r["run_dir"]))
        frames[str(r["arm"])] = rec[rec["phase"] == "post"].reset_index(drop=True)
        frames.setdefault("unedited", rec[rec["phase"] == "pre"].reset_index(drop=True))
    return sweep, frames


def arm_tables(
    summary: pd.DataFrame, frames: Mapping[str, pd.DataFrame], baselines: Sequence[str] = ("memit", "pmet")
) -> dict[str, pd.DataFrame]:
    """``arms``: one row per arm (and the unedited model) with the metrics, their intervals and the
    delivery columns; ``paired``: every arm against each baseline present, paired over records
    (:func:`~pmetlab.evaluation.paired.paired_table`, rule :data:`PAIRED_RULE`); ``records``: the
    per-record metrics of every arm, from which both are re-derived."""
    post = summary[summary["phase"] == "post"]
    pre = summary[summary["phase"] == "pre"].head(1).assign(arm="unedited")
    arms = pd.concat([post, pre], ignore_index=True)
    keep = [c for c in arms.columns if not c.startswith("hp_") or c in ("hp_mom2_update_weight", "hp_v_lr")]
    paired = [paired_table(dict(frames), b) for b in baselines if b in frames and len(frames) > 1]
    records = pd.concat([f.assign(arm=a) for a, f in frames.items()], ignore_index=True)
    records = records[["arm", *[c for c in records.columns if c != "arm"]]]
    return {
        "arms": arms[keep],
        "paired": pd.concat(paired, ignore_index=True) if paired else pd.DataFrame(),
        "records": records,
    }


def write_arm_tables(tables: Mapping[str, pd.DataFrame], out_dir: str | Path, stem: str, **record: Any) -> list[Path]:
    """``<stem>_arms.csv``, ``<stem>_paired.csv``, ``<stem>_records.csv.gz`` (floats to 6 digits) and
    ``<stem>.json`` (the rules, versions and ``record``), each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, suffix in (("arms", "_arms.csv"), ("paired", "_paired.csv"), ("records", "_records.csv.gz")):
        path = out / f"{stem}{suffix}"
        with atomic_path(path) as tmp:
            kw = {"compression": "gzip"} if suffix.endswith(".gz") else {}
            tables[name].to_csv(tmp, index=False, float_format="%.6g", **kw)
        written.append(path)
    path = out / f"{stem}.json"
    meta = {"selection_rule": SELECTION_RULE, "paired_rule": PAIRED_RULE, **record, "versions": versions()}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return [*written, path]


@dataclass
class ArmSweep:
    """A finished paired sweep: the tuning table and each arm's chosen point, the plans (tuning and
    evaluation optimisations, and how many the shared cache saved), the evaluation runs' summaries
    and the tables of :func:`arm_tables`."""

    tuning: pd.DataFrame
    chosen: dict[str, dict[str, float]]
    plans: dict[str, dict[str, Any]]
    summary: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    record: dict[str, Any]

    def save(self, out_dir: str | Path, stem: str) -> list[Path]:
        """The tables (:func:`write_arm_tables`) and ``<stem>_tuning.csv``, atomically."""
        paths = write_arm_tables(self.tables, out_dir, stem, **self.record)
        path = Path(out_dir) / f"{stem}_tuning.csv"
        with atomic_path(path) as tmp:
            self.tuning.to_csv(tmp, index=False, float_format="%.6g")
        return [*paths, path]


def run_arm_sweep(
    *,
    model: str,
    dataset: str,
    n_edits: int,
    tune_n: int,
    grid: TuningGrid,
    out_dir: str | Path,
    arms: Sequence[str] | None = None,
    seed: int = 0,
    **run_options: Any,
) -> ArmSweep:
    """The whole paired sweep: tune every arm (:func:`tune_arms`, ``tune_n`` tuning records), edit the
    first ``n_edits`` evaluation records with each arm's choice (:func:`evaluate_arms`) and build the
    tables. ``arms``: names from :data:`WHY_PMET_TRAILS` (all by default). Resumable: finished runs
    under ``out_dir`` and cached targets are reused. ``run_options`` go to :func:`pmetlab.runs.run_sweep`
    (``hparams`` overrides for every run, ``progress``, ``workers``, ``model_and_tokenizer``...)."""
    chosen_arms = arms_by_name(arms)
    common = dict(model=model, dataset=dataset, seed=seed, out_dir=out_dir, **run_options)
    fixed = dict(run_options.get("hparams") or {})
    plans = {"tuning": plan_optimisations(chosen_arms, grid.points(), model=model, dataset=dataset)}
    logger.info("tuning: %(runs)d runs need %(optimisations)d optimisations (%(saved)d saved)", plans["tuning"])
    tuning, chosen = tune_arms(chosen_arms, grid, n_edits=tune_n, **common)
    at_chosen = {a.name: [{**fixed, **chosen[a.name]}] for a in chosen_arms}
    plans["evaluation"] = plan_optimisations(chosen_arms, at_chosen, model=model, dataset=dataset)
    logger.info("evaluation: %(runs)d runs need %(optimisations)d optimisations", plans["evaluation"])
    summary, frames = evaluate_arms(chosen_arms, chosen, n_edits=n_edits, **common)
    record = {
        "model": model,
        "dataset": dataset,
        "n_edits": n_edits,
        "tune_n": tune_n,
        "seed": seed,
        "grid": {"lambdas": list(grid.lambdas), "v_lrs": list(grid.v_lrs)},
        "fixed_hparams": fixed,
        "chosen": chosen,
        "plans": {k: {kk: vv for kk, vv in v.items() if kk != "shared"} for k, v in plans.items()},
        "shared_optimisations": plans["evaluation"]["shared"],
        "arms": [{"name": a.name, "method": a.method, "hparams": dict(a.hparams), "why": a.why} for a in chosen_arms],
    }
    return ArmSweep(tuning, chosen, plans, summary, arm_tables(summary, frames), record)
