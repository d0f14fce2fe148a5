"""Sweeps: one run per grid entry, each in its own sub-directory, every entry validated (as a
:class:`RunSpec`) before anything runs; the rows carry the grid keys and every run's resolved
settings and hyperparameters."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..cache import stable_hash
from .context import GivenModel, ModelSource
from .experiment import execute, needs_edit
from .load import with_run_columns
from .phases import default_model_pool
from .rundir import check_out_dir
from .spec import RunSpec, safe_name
from .workers import launch_target_workers

logger = logging.getLogger(__name__)

__all__ = ["run_sweep", "SPEC_KEYS", "OPTION_KEYS", "SWEEP_KEYS"]

#: Keys that make up a run (the arguments of :meth:`RunSpec.build`).
SPEC_KEYS = (
    "model",
    "method",
    "dataset",
    "n_edits",
    "batch_size",
    "mode",
    "hparams",
    "seed",
    "subset",
    "split",
    "generation",
    "n_gen_tokens",
    "eval_batch_size",
    "label",
    "beyond",
)
#: How runs execute, not what they are (defaults: True).
OPTION_KEYS = ("resume", "progress", "reuse_pre_eval")
#: An already loaded (model, tokenizer) for the runs (not part of slugs or columns).
MODEL_KEY = "model_and_tokenizer"
SWEEP_KEYS = SPEC_KEYS + OPTION_KEYS + (MODEL_KEY,)


@dataclass(frozen=True)
class _Planned:
    """One validated grid entry."""

    entry: dict
    slug: str
    spec: RunSpec
    options: dict
    given: GivenModel | None


def _grid_slug(entry: Mapping[str, Any]) -> str:
    parts = []
    for k, v in entry.items():
        if k == MODEL_KEY:
            continue
        if isinstance(v, Mapping):
            parts += [
                f"{safe_name(sk)}-{safe_name(json.dumps(sv) if isinstance(sv, (list, tuple)) else sv)}"
                for sk, sv in v.items()
            ]
        else:
            parts.append(f"{safe_name(k)}-{safe_name(v)}")
    slug = "__".join(parts) or "default"
    if len(slug) > 100:
        slug = slug[:80] + "__" + stable_hash({k: v for k, v in entry.items() if k != MODEL_KEY}, 6)
    return slug


def _grid_columns(entry: Mapping[str, Any], taken: set[str]) -> dict[str, Any]:
    """Grid keys as summary columns; a dict value (hparams) contributes one column per key
    (prefixed ``hparams.`` when the name is taken by another column)."""
    cols: dict[str, Any] = {}
    for k, v in entry.items():
        if k == MODEL_KEY:
            continue
        if isinstance(v, Mapping):
            for sk, sv in v.items():
                name = sk if sk not in taken and sk not in entry else f"{k}.{sk}"
                cols[name] = tuple(sv) if isinstance(sv, list) else sv
        else:
            cols[k] = v
    return cols


def _check_keys(grid: list, common: Mapping[str, Any]) -> None:
    for i, g in enumerate(grid):
        if not isinstance(g, Mapping):
            raise ValueError(f"grid entry {i} must be a dict of run arguments, got {type(g).__name__}: {g!r}")
    bad = sorted({str(k) for g in [common, *grid] for k in g if k not in SWEEP_KEYS})
    if bad:
        raise KeyError(
            f"unknown run_experiment argument(s) {bad} in the sweep (out_dir is the sweep's); valid: {list(SWEEP_KEYS)}"
        )


def _plan(grid: Sequence[Mapping], common: Mapping[str, Any]) -> list[_Planned]:
    """Merge, name and validate every entry (nothing runs before all are valid)."""
    plans: list[_Planned] = []
    for g in grid:
        kw = {**common, **g}
        if isinstance(common.get("hparams"), Mapping) and isinstance(g.get("hparams"), Mapping):
            kw["hparams"] = {**common["hparams"], **g["hparams"]}
        slug = _grid_slug(g)
        if any(p.slug == slug for p in plans):
            raise ValueError(f"two grid entries map to the same run directory {slug!r}: {g}")
        kw.setdefault("label", slug)
        spec = RunSpec.build(**{k: kw[k] for k in SPEC_KEYS if k in kw})
        options = {k: kw.get(k, True) for k in OPTION_KEYS}
        given = GivenModel(kw[MODEL_KEY]) if kw.get(MODEL_KEY) is not None else None
        plans.append(_Planned(dict(g), slug, spec, options, given))
    return plans


def run_sweep(grid: Sequence[Mapping], *, out_dir: str | Path, workers: int = 1, **common: Any) -> pd.DataFrame:
    """Run :func:`pmetlab.runs.run_experiment` for each grid entry (``**common`` updated by the
    entry; an ``hparams`` dict in both is merged) in ``out_dir/<slug of the entry>``.

    Keys (in entries and ``common``): :data:`SPEC_KEYS`, :data:`OPTION_KEYS` and
    ``model_and_tokenizer``. Every entry is validated (keys, arguments, hyperparameters) before
    anything runs; models are loaded once per name (lazily) unless ``model_and_tokenizer`` is given.
    The label defaults to the entry's slug. ``workers`` > 1: the targets of every run that still
    has to edit are first optimised by that many processes (:mod:`pmetlab.runs.workers`).

    Returns:
        The runs' summaries concatenated, with the grid keys as columns (a dict value such as
        ``{"hparams": {"spread_exponent": 1.0}}`` gives a ``spread_exponent`` column, empty where an
        entry does not set it), every run's settings and resolved hyperparameters (``hp_*``, see
        :func:`pmetlab.runs.load.with_run_columns`), ``target_*`` on post rows, and ``run_dir``.

    Raises:
        KeyError: an unknown key or hyperparameter. ValueError: a bad value, an empty grid, an
            empty ``out_dir``, or two entries with the same slug.
    """
    root = check_out_dir(out_dir)
    if root is None:
        raise ValueError("out_dir must be a directory path for the sweep's runs, got None")
    grid = list(grid)
    if not grid:
        raise ValueError("grid is empty; expected a list of dicts of run_experiment arguments")
    _check_keys(grid, common)
    plans = _plan(grid, common)
    if workers != 1:
        todo = [p.spec for p in plans if needs_edit(p.spec, root / p.slug, bool(p.options["resume"]))]
        launch_target_workers(todo, workers)
    pool = default_model_pool()
    frames = []
    for i, p in enumerate(plans):
        models: ModelSource = p.given if p.given is not None else pool
        logger.info("sweep: run %d/%d %s", i + 1, len(plans), p.slug)
        res = execute(p.spec, out_dir=root / p.slug, models=models, **p.options)
        s = res.summary.copy()
        for col, val in _grid_columns(p.entry, set(s.columns)).items():
            s[col] = [val] * len(s)
        s = with_run_columns(s, res.run, res.run_dir)
        s["run_dir"] = str(res.run_dir)
        frames.append(s)
    return pd.concat(frames, ignore_index=True)
