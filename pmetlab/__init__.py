"""pmetlab: a workbench for precise model editing (PMET, MEMIT) of transformer language models."""
from __future__ import annotations

import logging

from .datasets import (DatasetInfo, counterfact_requests, drop_conflicting, load_counterfact, load_known_facts,
                       load_multi_counterfact, load_zsre, select, zsre_requests)
from .editing.compute import compute_deltas
from .editing.deltas import Deltas, EditMismatchError, apply_deltas_, edited, restore_
from .evaluation import evaluate_counterfact, evaluate_zsre, relative_specificity, summarize
from .experiments import ExperimentResult, load_run, run_experiment, run_sweep, summarize_runs
from .hparams import EditHyperParams, MEMITHyperParams, PMETHyperParams, hparams_from_dict
from .models import get_adapter, load_model, model_identity, supported_architectures
from .notebooks import list_notebooks, run_notebooks
from .requests import EditRequest
from .stats import layer_covariances
from .tracing import Trace, TraceDict

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__", "load_model", "get_adapter", "model_identity", "supported_architectures",
           "Trace", "TraceDict", "EditRequest", "EditHyperParams", "PMETHyperParams", "MEMITHyperParams",
           "hparams_from_dict", "compute_deltas", "Deltas", "EditMismatchError", "apply_deltas_", "restore_",
           "edited", "layer_covariances",
           "DatasetInfo", "load_counterfact", "load_multi_counterfact", "load_zsre", "load_known_facts", "select",
           "drop_conflicting", "counterfact_requests", "zsre_requests",
           "evaluate_counterfact", "evaluate_zsre", "summarize", "relative_specificity",
           "ExperimentResult", "run_experiment", "run_sweep", "load_run", "summarize_runs",
           "run_notebooks", "list_notebooks"]
