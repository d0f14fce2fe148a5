"""Figures in one consistent style, from tidy DataFrames.

Every ``plot_*`` function takes a tidy DataFrame (its expected columns are in its docstring),
returns a :class:`matplotlib.figure.Figure` and touches no global state: the seaborn theme is
applied inside :func:`plot_style` only while the figure is built, and figures are created
without pyplot (no figure manager, nothing to close, safe under Agg and in tests). In a
notebook, leave the figure as the cell's last expression (or ``display(fig)``) to show it, and
write it with :func:`save_figure`, which stores the numbers behind it next to the PNG and PDF.

Where a function needs means and confidence intervals it accepts either a summary
(``mean`` with optional ``ci_low``/``ci_high``) or raw values (``value``), which it averages
per group with a Student-t 95% interval (:func:`pmetlab.analysis.mean_ci`).

Modules: ``style`` (colours, labels, the theme, figures without pyplot), ``data`` (reading tidy
or wide frames into means and intervals), ``similarity`` (method.md §5), ``tradeoff``
(reliability/specificity against the number of edits, ablation bars), ``editing`` (optimisation
trace, update norms), ``tuning`` (the tuning grid) and ``save`` (:func:`save_figure`).
"""

from __future__ import annotations

from .editing import plot_optimization_trace, plot_update_norms
from .locate import plot_trace_curves, plot_trace_heatmaps
from .rounds import plot_round_diagnostics, plot_rounds
from .save import SavedFigure, save_figure, save_table, save_text
from .similarity import plot_similarity
from .style import color_for, plot_style
from .tradeoff import plot_ablation, plot_tradeoff
from .tuning import plot_tuning_grid

__all__ = [
    "plot_rounds",
    "plot_round_diagnostics",
    "plot_tuning_grid",
    "plot_style",
    "color_for",
    "plot_similarity",
    "plot_tradeoff",
    "plot_ablation",
    "plot_optimization_trace",
    "plot_update_norms",
    "plot_trace_heatmaps",
    "plot_trace_curves",
    "save_figure",
    "save_table",
    "save_text",
    "SavedFigure",
]
