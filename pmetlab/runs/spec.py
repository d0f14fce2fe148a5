"""What one run is: a frozen :class:`RunSpec` holding every resolved setting, validated once.

:meth:`RunSpec.build` (keyword arguments only) checks every argument, resolves the method's
hyperparameters for the model (:func:`resolve_hparams`: the preset for the model plus the
overrides) and returns the spec that the phases, the run directory, the summaries and the sweeps
all read. Nothing here loads a model or a dataset, so a bad argument fails before any work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import stable_hash
from ..covspec import CovarianceSpec
from ..datasets.splits import SPLITS
from ..evaluation.beyond import beyond_families
from ..hparams import (
    EditHyperParams,
    MEMITHyperParams,
    PMETHyperParams,
    dataset_family,
    load_presets,
    tuned_entry,
)

logger = logging.getLogger(__name__)

__all__ = [
    "RunSpec",
    "resolve_hparams",
    "preset_name",
    "summary_columns",
    "safe_name",
    "METHODS",
    "DATASETS",
    "MODES",
    "SUBSETS",
    "SPLITS",
    "DEFAULT_MODEL",
]

METHODS = ("pmet", "memit", "none")
DATASETS = ("counterfact", "multi_counterfact", "counterfact+conflict_filter", "zsre")
MODES = ("batch", "sequential")
SUBSETS = ("first", "sample")
DEFAULT_MODEL = "smollm2-135m"
_HP_CLASSES: dict[str, type[EditHyperParams]] = {"pmet": PMETHyperParams, "memit": MEMITHyperParams}


# ---------------------------------------------------------------------------------------------
# hyperparameters
# ---------------------------------------------------------------------------------------------
def resolve_hparams(
    model: str, method: str, overrides: Mapping[str, Any] | None = None, *, dataset: str | None = None
) -> EditHyperParams | None:
    """The hyperparameters a run uses: the method's preset for ``model`` (class defaults when there
    is none; with ``dataset``, the preset's tuned fields for that dataset, see
    :meth:`EditHyperParams.preset`) with ``overrides`` applied. None for method "none" (overrides
    are still checked).

    Raises:
        KeyError: an override names no hyperparameter (the message lists the valid ones).
        ValueError: unknown method, or an override value the hyperparameters reject.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    overrides = dict(overrides or {})
    cls = _HP_CLASSES.get(method, PMETHyperParams)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise KeyError(f"unknown hyperparameter(s) {unknown} for method {method!r}; valid keys: {sorted(valid)}")
    if method == "none":
        if overrides:
            logger.info("method 'none' edits nothing; hyperparameter overrides %s are ignored", sorted(overrides))
        return None
    try:
        base = cls.preset(str(model), dataset)
    except KeyError:
        logger.info("no %s preset for %r; using the %s defaults", method, model, cls.__name__)
        base = cls()
    if "layers" in overrides and not isinstance(overrides["layers"], (list, tuple)):
        raise ValueError(f"hyperparameter 'layers' must be a list of layer indices, got {overrides['layers']!r}")
    try:
        return base.replace(**overrides)
    except TypeError as exc:
        raise ValueError(f"bad hyperparameter value in {overrides}: {exc}") from None


def preset_name(model: str, method: str, dataset: str | None = None) -> str | None:
    """The preset ``resolve_hparams`` starts from: the lower-cased model name, followed by
    ``/<dataset family>`` when the preset holds tuned fields for ``dataset``; None when there is none."""
    if method not in _HP_CLASSES:
        return None
    try:
        _HP_CLASSES[method].preset(str(model))
    except KeyError:
        return None
    name = str(model).lower()
    tuned = tuned_entry(load_presets(method)[name], dataset)
    return f"{name}/{dataset_family(dataset)}" if tuned and dataset is not None else name


# ---------------------------------------------------------------------------------------------
# argument checks: each says what it received and what it expected
# ---------------------------------------------------------------------------------------------
def _received(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"


def _int(name: str, v: Any, *, minimum: int | None = 1, allow_none: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (minimum is not None and v < minimum):
        what = "a positive integer" if minimum == 1 else "an integer"
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, got {_received(v)}")
    return int(v)


def _choice(name: str, v: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"unknown {name} {v!r}; expected one of {list(choices)}")
    return v


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {_received(v)}")
    return bool(v)


def _dataset(v: Any) -> str:
    key = v.lower().replace("-", "_") if isinstance(v, str) else v
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {v!r}; expected one of {list(DATASETS)}")
    return key


def safe_name(s: Any) -> str:
    """``s`` as a file-name part: runs of other characters than ``A-Za-z0-9._=+-`` become "-"."""
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "-", str(s)).strip("-.")
    return s or "x"


def summary_columns(
    *, label: str | None, model: Any, method: Any, dataset: Any, n_edits: Any, mode: Any, batch_size: Any, seed: Any
) -> dict[str, Any]:
    """The run columns at the front of every ``summary.csv`` (``label`` only when given)."""
    cols = {
        "label": label,
        "model": model,
        "method": method,
        "dataset": dataset,
        "n_edits": n_edits,
        "mode": mode,
        "batch_size": batch_size,
        "seed": seed,
    }
    if label is None:
        cols.pop("label")
    return cols


# ---------------------------------------------------------------------------------------------
# the spec
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Every resolved setting of one run. Build it with :meth:`RunSpec.build`.

    Attributes:
        model: an embedded model name or a path; also names the hyperparameter preset.
        method: "pmet", "memit" or "none" (no edit: a baseline).
        dataset: "counterfact", "multi_counterfact", "counterfact+conflict_filter" (CounterFact
            keeping the first record per (subject, relation_id), recorded under that name) or "zsre".
        n_edits: records edited and evaluated.
        batch_size: requests per ``compute_deltas`` call (None: all in one batch).
        mode: "batch" or "sequential" (see :func:`pmetlab.runs.run_experiment`).
        seed: seeds the subset, the edit and generation (and ``hp.seed`` unless overridden).
        subset: "first" records or a seeded "sample" (of the split).
        split: the dataset split the records come from: "eval" (default), "tune" (never evaluated
            by the notebooks; see :mod:`pmetlab.datasets.splits`) or "all".
        generation: CounterFact fluency/consistency by generation.
        n_gen_tokens: tokens generated per prompt.
        eval_batch_size: prompt pairs per forward pass in evaluation.
        beyond: the evaluation families beyond teacher forcing computed in eval_post (issue #23;
            :data:`pmetlab.evaluation.beyond.BEYOND_FAMILIES`; () = off, the default). Recorded in
            run.json's spec, not part of the run's identity. Cost on SmolLM2 (CPU, 1 thread): about 15 s
            per record for all families plus about 55 s per run (:mod:`pmetlab.evaluation.beyond`).
        label: a free name carried into the summary (not part of the run's identity).
        hp: the resolved hyperparameters (None for method "none").
        overrides: the hyperparameter overrides as given (without the seed added from ``seed``).
        preset: the preset ``hp`` started from (None: class defaults, or method "none").
    """

    model: str
    method: str
    dataset: str
    n_edits: int
    batch_size: int | None
    mode: str
    seed: int
    subset: str
    split: str
    generation: bool
    n_gen_tokens: int
    eval_batch_size: int
    label: str | None
    hp: EditHyperParams | None
    beyond: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    preset: str | None = None

    @classmethod
    def build(
        cls,
        *,
        model: str = DEFAULT_MODEL,
        method: str = "pmet",
        dataset: str = "counterfact",
        n_edits: int = 10,
        batch_size: int | None = None,
        mode: str = "batch",
        hparams: Mapping[str, Any] | None = None,
        seed: int = 0,
        subset: str = "first",
        split: str = "eval",
        generation: bool = True,
        n_gen_tokens: int = 100,
        eval_batch_size: int = 32,
        label: str | None = None,
        beyond: bool | str | tuple[str, ...] = (),
    ) -> RunSpec:
        """Check every argument and resolve the hyperparameters (see :func:`run_experiment` for
        what each means). ``hparams`` overrides the method's preset for ``model``; its ``seed``
        defaults to ``seed``.

        Raises:
            ValueError: a bad argument (the message names it, what was received and what was
                expected). KeyError: an unknown hyperparameter.
        """
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a non-empty string (an embedded name or a path), got {_received(model)}")
        method = _choice("method", method, METHODS)
        dataset = _dataset(dataset)
        n_edits = _int("n_edits", n_edits)
        batch_size = _int("batch_size", batch_size, allow_none=True)
        mode = _choice("mode", mode, MODES)
        subset = _choice("subset", subset, SUBSETS)
        split = _choice("split", split, SPLITS)
        seed = _int("seed", seed, minimum=None)
        generation = _flag("generation", generation)
        n_gen_tokens = _int("n_gen_tokens", n_gen_tokens)
        eval_batch_size = _int("eval_batch_size", eval_batch_size)
        beyond = beyond_families(beyond)
        if label is not None and not isinstance(label, str):
            raise ValueError(f"label must be a string or None, got {_received(label)}")
        if hparams is not None and not isinstance(hparams, Mapping):
            raise ValueError(f"hparams must be a dict of hyperparameter overrides, got {type(hparams).__name__}")
        overrides = dict(hparams or {})
        # one seed for everything unless the hyperparameters set their own
        effective = overrides if method == "none" or "seed" in overrides else {**overrides, "seed": seed}
        hp = resolve_hparams(model, method, effective, dataset=dataset)
        return cls(
            model=model,
            method=method,
            dataset=dataset,
            n_edits=n_edits,
            batch_size=batch_size,
            mode=mode,
            seed=seed,
            subset=subset,
            split=split,
            generation=generation,
            n_gen_tokens=n_gen_tokens,
            eval_batch_size=eval_batch_size,
            label=label,
            hp=hp,
            beyond=beyond,
            overrides=overrides,
            preset=preset_name(model, method, dataset),
        )

    # --- derived settings ------------------------------------------------------------------
    @property
    def covariance(self) -> CovarianceSpec | None:
        """The covariance statistics the edit uses (``hp.covariance``; None for method "none")."""
        return self.hp.covariance if self.hp is not None else None

    @property
    def batches_of(self) -> int:
        """Requests per edit batch."""
        return int(self.batch_size or self.n_edits)

    @property
    def generates(self) -> bool:
        """Whether evaluation generates text (CounterFact with ``generation``; never zsRE)."""
        return self.generation and self.dataset != "zsre"

    @property
    def params(self) -> dict[str, Any]:
        """What identifies the run on disk (``run.json["params"]``): resuming with other params is
        refused. The label, the evaluation batch size and the run options are not part of it."""
        p = {
            "model": self.model,
            "method": self.method,
            "dataset": self.dataset,
            "n_edits": self.n_edits,
            "batch_size": self.batch_size,
            "mode": self.mode,
            "seed": self.seed,
            "subset": self.subset,
            "split": self.split,
            "generation": self.generation if self.dataset != "zsre" else None,
            "n_gen_tokens": self.n_gen_tokens if self.generates else None,
            "hparams": self.hp.to_dict() if self.hp is not None else None,
        }
        return json.loads(json.dumps(p))  # tuples -> lists, as they come back from run.json

    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-able (``run.json["spec"]``): the params plus the evaluation batch
        size, the label, the overrides as given, the preset and the covariance spec."""
        cov = self.covariance
        d = {
            **self.params,
            "eval_batch_size": self.eval_batch_size,
            "beyond": list(self.beyond),
            "label": self.label,
            "hparams_overrides": self.overrides,
            "hparams_preset": self.preset,
            "covariance": cov.to_dict() if cov is not None else None,
        }
        return json.loads(json.dumps(d, default=str))

    def summary_columns(self) -> dict[str, Any]:
        """The run columns of this run's ``summary.csv`` rows."""
        return summary_columns(
            label=self.label,
            model=self.model,
            method=self.method,
            dataset=self.dataset,
            n_edits=self.n_edits,
            mode=self.mode,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def default_dir_name(self) -> str:
        """``<model>_<method>_<dataset>_n<n>[_bs<b>][_sequential][_sample]_seed<s>[_hp<hash>]``."""
        name = Path(self.model).name if ("/" in self.model or "\\" in self.model) else self.model
        parts = [safe_name(name), self.method, self.dataset, f"n{self.n_edits}"]
        if self.batch_size is not None:
            parts.append(f"bs{self.batch_size}")
        if self.mode != "batch":
            parts.append(self.mode)
        if self.subset != "first":
            parts.append(self.subset)
        if self.split != "eval":
            parts.append(self.split)
        parts.append(f"seed{self.seed}")
        if self.overrides:
            parts.append("hp" + stable_hash(self.overrides, 4))
        return "_".join(parts)
