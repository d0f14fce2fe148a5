"""pmetlab: a workbench for precise model editing (PMET, MEMIT) of transformer language models.

Everything a notebook may use is exported here (``__all__``); the notebooks import nothing else
from pmetlab (``tests/test_notebooks.py`` checks it).
"""

from __future__ import annotations

import logging

from .analysis import (
    ablation_reading,
    collapse_reading,
    collapse_table,
    component_similarity,
    component_similarity_values,
    jaccard_chance,
    rounds_reading,
    similarity_by_depth,
    similarity_reading,
    summarize_similarity,
    tradeoff_reading,
)
from .analysis.arms_reading import arms_reading
from .datasets import (
    DatasetInfo,
    counterfact_requests,
    drop_conflicting,
    load_counterfact,
    load_known_facts,
    load_multi_counterfact,
    load_zsre,
    select,
    zsre_requests,
)
from .editing.compute import compute_deltas
from .editing.deltas import Deltas, EditMismatchError, apply_deltas_, edited, restore_
from .editing.nullspace import leakage_table
from .evaluation import (
    evaluate_beyond,
    evaluate_counterfact,
    evaluate_zsre,
    generate_texts,
    relative_specificity,
    score_pairs,
    summarize,
    summarize_beyond,
)
from .explore import EditSession, explore
from .hparams import EditHyperParams, MEMITHyperParams, PMETHyperParams, hparams_from_dict, layers_from_text
from .locate import best_window, embedding_noise_scale, known_facts_of, locate_reading, trace_fact, trace_facts
from .models import get_adapter, load_model, model_identity, supported_architectures
from .notebooks import list_notebooks, run_notebooks
from .plots import (
    plot_ablation,
    plot_optimization_trace,
    plot_round_diagnostics,
    plot_rounds,
    plot_similarity,
    plot_trace_curves,
    plot_trace_heatmaps,
    plot_tradeoff,
    plot_tuning_grid,
    plot_update_norms,
    save_figure,
    save_table,
    save_text,
)
from .plots.arms import plot_arms
from .requests import EditRequest
from .runs import (
    ExperimentResult,
    load_run,
    phase_times,
    resolve_hparams,
    run_experiment,
    run_sweep,
    save_records,
    summarize_runs,
    sweep_records,
)
from .runs.arms import run_arm_sweep
from .runs.beyond_eval import evaluate_beyond_run
from .runs.rounds import run_rounds
from .runs.tune import TuningGrid, tune
from .stats import layer_covariances
from .tracing import Trace, TraceDict

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    # models and tracing
    "load_model",
    "get_adapter",
    "model_identity",
    "supported_architectures",
    "Trace",
    "TraceDict",
    # edits
    "EditRequest",
    "EditHyperParams",
    "PMETHyperParams",
    "MEMITHyperParams",
    "hparams_from_dict",
    "resolve_hparams",
    "trace_fact",
    "plot_trace_heatmaps",
    "plot_trace_curves",
    "trace_facts",
    "best_window",
    "embedding_noise_scale",
    "locate_reading",
    "known_facts_of",
    "layers_from_text",
    "compute_deltas",
    "Deltas",
    "EditMismatchError",
    "apply_deltas_",
    "restore_",
    "edited",
    "layer_covariances",
    "leakage_table",
    # data
    "DatasetInfo",
    "load_counterfact",
    "load_multi_counterfact",
    "load_zsre",
    "load_known_facts",
    "select",
    "drop_conflicting",
    "counterfact_requests",
    "zsre_requests",
    # evaluation
    "evaluate_counterfact",
    "evaluate_zsre",
    "summarize",
    "relative_specificity",
    "score_pairs",
    "generate_texts",
    "evaluate_beyond",
    "summarize_beyond",
    "evaluate_beyond_run",
    # runs
    "ExperimentResult",
    "run_experiment",
    "run_sweep",
    "tune",
    "TuningGrid",
    "run_arm_sweep",
    "load_run",
    "summarize_runs",
    "sweep_records",
    "save_records",
    # analysis and figures
    "component_similarity",
    "component_similarity_values",
    "summarize_similarity",
    "jaccard_chance",
    "similarity_by_depth",
    "similarity_reading",
    "tradeoff_reading",
    "ablation_reading",
    "arms_reading",
    "rounds_reading",
    "phase_times",
    "plot_similarity",
    "plot_tradeoff",
    "plot_ablation",
    "plot_arms",
    "plot_optimization_trace",
    "plot_update_norms",
    "plot_tuning_grid",
    "plot_rounds",
    "plot_round_diagnostics",
    "collapse_reading",
    "collapse_table",
    "run_rounds",
    "explore",
    "EditSession",
    "save_figure",
    "save_table",
    "save_text",
    # notebooks
    "run_notebooks",
    "list_notebooks",
]
