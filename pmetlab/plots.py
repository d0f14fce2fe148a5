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
"""
from __future__ import annotations

import logging
import os
import re
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .analysis import COMPONENTS, mean_ci
from .cache import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["plot_style", "color_for", "plot_similarity", "plot_tradeoff", "plot_ablation",
           "plot_optimization_trace", "plot_update_norms", "save_figure", "SavedFigure"]

#: Fixed colours for names that recur across figures, so a method or component keeps its colour.
_FIXED_COLORS: dict[str, str] = {
    "MHSA": "#0173b2", "FFN": "#de8f05",                        # seaborn "colorblind" 0, 1
    "PMET": "#029e73", "MEMIT": "#d55e00", "ROME": "#cc78bc",   # colorblind 2, 3, 4
    "unedited": "#7f7f7f", "baseline": "#7f7f7f",
}
_FALLBACK = ["#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4",
             "#949494", "#ece133", "#56b4e9"]

_LABELS: dict[str, str] = {
    "cosine": "cosine similarity (in, out)",
    "jaccard": "Jaccard of top-k tokens (in, out)",
    "efficacy": "efficacy", "paraphrase": "paraphrase", "neighborhood": "neighborhood",
    "efficacy_score": "efficacy (ES)", "paraphrase_score": "paraphrase (PS)",
    "neighborhood_score": "neighborhood (NS)", "score": "score (S)",
    "n_edits": "number of edits", "p_target": "p(target)", "loss": "loss", "norm": "update norm",
}
_RELIABILITY = {"efficacy", "paraphrase", "es", "ps", "efficacy_score", "paraphrase_score",
                "generalization", "generalisation", "reliability"}
_SPECIFICITY = {"neighborhood", "ns", "neighborhood_score", "specificity", "locality"}


def _label(name: object) -> str:
    return _LABELS.get(str(name), str(name).replace("_", " "))


def color_for(name: object, order: Sequence[object] = ()) -> str:
    """The colour of ``name``: fixed for recurring names (MHSA, FFN, PMET, MEMIT, unedited),
    else taken from the colour-blind palette by ``name``'s position in ``order``."""
    key = str(name)
    if key in _FIXED_COLORS:
        return _FIXED_COLORS[key]
    others = [str(o) for o in order if str(o) not in _FIXED_COLORS]
    i = others.index(key) if key in others else zlib.crc32(key.encode())  # stable across runs
    free = [c for c in _FALLBACK if c not in _FIXED_COLORS.values()] or _FALLBACK
    return free[i % len(free)]


@contextmanager
def plot_style(context: str = "notebook", font_scale: float = 1.0) -> Iterator[None]:
    """Apply the pmetlab theme (seaborn ``whitegrid`` + ``context``) only inside the block."""
    import seaborn as sns

    with ExitStack() as stack:
        stack.enter_context(mpl.rc_context())
        stack.enter_context(sns.axes_style("whitegrid"))
        stack.enter_context(sns.plotting_context(context, font_scale=font_scale))
        mpl.rcParams.update({"axes.spines.top": False, "axes.spines.right": False,
                             "legend.frameon": False, "savefig.bbox": "tight", "figure.dpi": 100})
        yield


def _new_figure(n_panels: int, *, panel_size: tuple[float, float] = (4.2, 3.2),
                sharex: bool = False, sharey: bool = False) -> tuple[Figure, list]:
    fig = Figure(figsize=(panel_size[0] * n_panels, panel_size[1]), layout="constrained")
    FigureCanvasAgg(fig)  # a canvas without pyplot: savefig and notebook display work
    axes = fig.subplots(1, n_panels, sharex=sharex, sharey=sharey, squeeze=False)[0]
    return fig, list(axes)


def _finish(fig: Figure) -> Figure:
    # Ticks are created lazily at draw time; drawing once inside plot_style makes them take the
    # theme's sizes (later ticks copy the first one's properties).
    fig.canvas.draw()
    return fig


def _require(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} needs a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise KeyError(f"{what}: DataFrame lacks column(s) {missing}; it has {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{what}: the DataFrame is empty")


def _summarize(df: pd.DataFrame, keys: Sequence[str], what: str, value: str = "value") -> pd.DataFrame:
    """Return ``keys + [mean, ci_low, ci_high]``: as given when ``mean`` is present (intervals
    NaN when absent), else averaged from ``value`` per group with a Student-t 95% interval."""
    if "mean" in df.columns:
        out = df.copy()
        for c in ("ci_low", "ci_high"):
            if c not in out.columns:
                out[c] = np.nan
        dup = out.duplicated(list(keys))
        if dup.any():
            raise ValueError(f"{what}: several rows share the same {list(keys)} "
                             f"(e.g. {out.loc[dup, list(keys)].iloc[0].to_dict()}); pass one summary "
                             f"row per group, or raw values in a 'value' column")
        return out
    if value not in df.columns:
        raise KeyError(f"{what}: expected a 'mean' column (a summary) or a {value!r} column (raw "
                       f"values); got {list(df.columns)}")
    rows = []
    for k, grp in df.groupby(list(keys), sort=False, observed=True, dropna=False):
        k = k if isinstance(k, tuple) else (k,)
        m, lo, hi = mean_ci(grp[value].to_numpy())
        rows.append(dict(zip(keys, k), mean=m, ci_low=lo, ci_high=hi, n=len(grp)))
    return pd.DataFrame(rows)


def _ordered(values: Sequence[object], preferred: Sequence[object] = ()) -> list:
    seen = list(dict.fromkeys(values))
    return [p for p in preferred if p in seen] + [v for v in seen if v not in preferred]


#: Metrics drawn by default by plot_tradeoff / plot_ablation when present (others on request).
_HEADLINE = ("efficacy", "paraphrase", "neighborhood", "efficacy_score", "paraphrase_score",
             "neighborhood_score")


def _long_metrics(df: pd.DataFrame, id_cols: Sequence[str], what: str) -> pd.DataFrame:
    """Accept a wide summary (``<metric>``, ``<metric>_ci_low``, ``<metric>_ci_high`` columns, as
    :func:`pmetlab.evaluation.summary.summarize` writes it) and return the tidy long form with
    ``metric``, ``mean``, ``ci_low``, ``ci_high``; a frame that has a ``metric`` column is returned as is."""
    if "metric" in df.columns:
        return df
    metrics = [c[: -len("_ci_low")] for c in df.columns
               if c.endswith("_ci_low") and c[: -len("_ci_low")] in df.columns]
    if not metrics:
        raise KeyError(f"{what}: expected a tidy frame with a 'metric' column, or a wide summary with "
                       f"'<metric>' and '<metric>_ci_low'/'<metric>_ci_high' columns; got {list(df.columns)}")
    parts = []
    for m in metrics:
        cols = {m: "mean", f"{m}_ci_low": "ci_low", f"{m}_ci_high": "ci_high"}
        part = df[list(id_cols) + [c for c in cols if c in df.columns]].rename(columns=cols)
        parts.append(part.assign(metric=m))
    return pd.concat(parts, ignore_index=True)


def _default_metrics(present: Sequence[str], preferred: Sequence[str]) -> list:
    headline = [m for m in _HEADLINE if m in set(present)]
    return _ordered(present, preferred) if not headline else \
        [m for m in _ordered(present, preferred) if m in headline]


def _band(ax, x, mean, lo, hi, color: str, label: str, **line_kw) -> None:
    ax.plot(x, mean, color=color, label=label, **line_kw)
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    if np.isfinite(lo).any() and np.isfinite(hi).any():
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)


# --- figures -----------------------------------------------------------------------------------

def _similarity_title(metric: str, projection: str | None) -> str:
    head = _label(metric).split(" (")[0]
    if metric == "jaccard" and projection:
        return f"{head} ({projection.replace('_', ' ')})"
    return head


def plot_similarity(df: pd.DataFrame, *, metrics: Sequence[str] | None = None,
                    components: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Input/output similarity of each component against layer depth (method.md §5).

    Args:
        df: the output of :func:`pmetlab.analysis.component_similarity`: columns ``layer``,
            ``component``, ``metric``, ``mean``, and optionally ``ci_low``/``ci_high`` (drawn as
            a band); or per-prompt values (``value`` instead of ``mean``). When it has
            ``protocol``/``projection`` columns they must hold one value each; the Jaccard panel's
            title names the projection.
        metrics / components: which to draw and in which order (default: all present).

    Returns:
        One panel per metric, one line (with its CI band) per component.
    """
    _require(df, ["layer", "component", "metric"], "plot_similarity")
    how = {}
    for col in ("protocol", "projection"):
        if col in df.columns:
            if df[col].nunique() > 1:
                raise ValueError(f"plot_similarity: the data mixes {col}s {sorted(df[col].unique())}; "
                                 f"plot one at a time, e.g. df[df[{col!r}] == {df[col].iloc[0]!r}]")
            how[col] = str(df[col].iloc[0])
    s = _summarize(df, ["layer", "component", "metric"], "plot_similarity")
    s = s.assign(component=s["component"].astype(str), metric=s["metric"].astype(str))
    metrics = list(metrics) if metrics is not None else _ordered(s["metric"], ("cosine", "jaccard"))
    comps = list(components) if components is not None else _ordered(s["component"], COMPONENTS)
    with plot_style():
        fig, axes = _new_figure(len(metrics), sharex=True)
        for ax, metric in zip(axes, metrics):
            for comp in comps:
                g = s[(s["metric"] == metric) & (s["component"] == comp)].sort_values("layer")
                if g.empty:
                    continue
                _band(ax, g["layer"].to_numpy(), g["mean"], g["ci_low"], g["ci_high"],
                      color_for(comp, comps), comp, marker="o", markersize=3)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "2.5" layers
            ax.set_ylabel(_label(metric))
            ax.set_title(_similarity_title(metric, how.get("projection")))
        axes[0].legend(title="component")
        if title:
            fig.suptitle(title)
        return _finish(fig)


def plot_tradeoff(summary_df: pd.DataFrame, x: str = "n_edits", methods: Sequence[str] | None = None, *,
                  metrics: Sequence[str] | None = None, baseline: str = "unedited",
                  log_x: bool | None = None, title: str | None = None) -> Figure:
    """Reliability and specificity against the number of edits, one line per method.

    Args:
        summary_df: tidy rows with columns ``method``, ``x`` (e.g. ``n_edits``), ``metric``
            (e.g. "efficacy", "paraphrase", "neighborhood") and ``mean`` (optional ``ci_low``,
            ``ci_high``), or raw ``value`` per record; or the wide output of
            ``pmetlab.evaluation.summary.summarize(df, by=("method", "n_edits"))`` (columns
            ``efficacy_score``, ``efficacy_score_ci_low``, ...). Rows whose method is ``baseline``
            are the unedited model: drawn as a dashed grey line (horizontal when it has one x).
        methods: methods to draw, in legend order (default: all but the baseline).
        metrics: panels, in order (default: the efficacy/paraphrase/neighborhood metrics
            present, else all).
        log_x: logarithmic x axis (default: when x spans a factor of 10 or more).

    Returns:
        One panel per metric (titled as reliability or specificity), one line per method.
    """
    _require(summary_df, ["method", x], "plot_tradeoff")
    s = _summarize(_long_metrics(summary_df, ["method", x], "plot_tradeoff"), ["method", x, "metric"],
                   "plot_tradeoff")
    s = s.assign(method=s["method"].astype(str), metric=s["metric"].astype(str))
    metrics = list(metrics) if metrics is not None else _default_metrics(s["metric"], _HEADLINE)
    present = _ordered(s["method"])
    if methods is None:
        methods = [m for m in present if m != baseline]
    else:
        unknown = [m for m in methods if m not in present]
        if unknown:
            raise ValueError(f"plot_tradeoff: method(s) {unknown} not in the data; present: {present}")
    if log_x is None:  # the baseline is often recorded at x = 0; it does not decide the scale
        xs = pd.to_numeric(s.loc[s["method"].isin(methods), x], errors="coerce")
        log_x = bool(len(xs)) and bool((xs > 0).all()) and bool(xs.max() / xs.min() >= 10)
    with plot_style():
        fig, axes = _new_figure(len(metrics), sharex=True)
        for ax, metric in zip(axes, metrics):
            sm = s[s["metric"] == metric]
            for m in methods:
                g = sm[sm["method"] == m].sort_values(x)
                if not g.empty:
                    _band(ax, g[x].to_numpy(), g["mean"], g["ci_low"], g["ci_high"],
                          color_for(m, methods), m, marker="o", markersize=4)
            b = sm[sm["method"] == baseline].sort_values(x)
            if len(b) == 1:
                ax.axhline(float(b["mean"].iloc[0]), color=color_for(baseline), linestyle="--",
                           linewidth=1.2, label=baseline)
            elif len(b) > 1:
                ax.plot(b[x].to_numpy(), b["mean"], color=color_for(baseline), linestyle="--",
                        linewidth=1.2, label=baseline)
            kind = ("reliability" if metric.lower() in _RELIABILITY
                    else "specificity" if metric.lower() in _SPECIFICITY else None)
            ax.set_title(f"{_label(metric)} ({kind})" if kind else _label(metric))
            ax.set_xlabel(_label(x))
            ax.set_ylabel(_label(metric))
            if log_x:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes[-1].legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            fig.suptitle(title)
        return _finish(fig)


def plot_ablation(df: pd.DataFrame, *, variants: Sequence[str] | None = None,
                  metrics: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Grouped bars with confidence intervals: one group per metric, one bar per ablation variant.

    Args:
        df: tidy rows with columns ``variant`` (e.g. "PMET", "w/o δ^a", "even spread",
            "update MHSA"), ``metric`` and ``mean`` (optional ``ci_low``/``ci_high``), or raw
            ``value`` per record; or the wide output of ``summarize(df, by=("variant",))``.
        variants / metrics: which to draw and in which order (default: variants in order of
            appearance; the efficacy/paraphrase/neighborhood metrics present, else all).

    Returns:
        One panel; ``ax.containers`` holds one bar container per variant.
    """
    _require(df, ["variant"], "plot_ablation")
    s = _summarize(_long_metrics(df, ["variant"], "plot_ablation"), ["variant", "metric"], "plot_ablation")
    s = s.assign(variant=s["variant"].astype(str), metric=s["metric"].astype(str))
    variants = list(variants) if variants is not None else _ordered(s["variant"])
    metrics = list(metrics) if metrics is not None else _default_metrics(s["metric"], _HEADLINE)
    width = 0.8 / max(1, len(variants))
    with plot_style():
        fig, (ax,) = _new_figure(1, panel_size=(max(4.5, 1.2 * len(metrics) * max(1, len(variants)) ** 0.5), 3.4))
        pos = np.arange(len(metrics))
        for i, v in enumerate(variants):
            g = s[s["variant"] == v].set_index("metric").reindex(metrics)
            mean = g["mean"].to_numpy(dtype=float)
            lo, hi = g["ci_low"].to_numpy(dtype=float), g["ci_high"].to_numpy(dtype=float)
            err = np.vstack([mean - lo, hi - mean])
            err = None if not np.isfinite(err).any() else np.nan_to_num(err, nan=0.0)
            ax.bar(pos + (i - (len(variants) - 1) / 2) * width, mean, width=width * 0.95,
                   yerr=err, capsize=3, color=color_for(v, variants), label=v,
                   error_kw={"linewidth": 1})
        ax.set_xticks(pos, [_label(m) for m in metrics])
        ax.set_ylabel("score")
        ax.legend(title="variant", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            ax.set_title(title)
        return _finish(fig)


def plot_optimization_trace(trace_df: pd.DataFrame, *, quantities: Sequence[str] | None = None,
                            log_loss: bool = True, title: str | None = None) -> Figure:
    """Per-step optimisation of the hidden-state deltas (Step 1): loss and p(target).

    Args:
        trace_df: one row per optimisation step with columns ``step`` and the quantities
            (default ``loss`` and ``p_target``; any of ``nll``, ``kl``, ``weight_decay`` may be
            added and asked for with ``quantities``), optionally ``method`` (colour) and
            ``request`` (one line per request). A long form with ``quantity`` and ``value``
            columns is accepted too.
        log_loss: logarithmic y axis for loss-like quantities (all except ``p_target``).

    Returns:
        One panel per quantity, one line per (method, request).
    """
    _require(trace_df, ["step"], "plot_optimization_trace")
    df = trace_df
    if "quantity" in df.columns and "value" in df.columns:
        idx = [c for c in ("method", "request", "step") if c in df.columns]
        df = df.pivot_table(index=idx, columns="quantity", values="value", aggfunc="mean",
                            observed=True).reset_index()
        df.columns.name = None
    if quantities is None:
        quantities = [q for q in ("loss", "p_target") if q in df.columns]
        if not quantities:
            raise KeyError(f"plot_optimization_trace: no 'loss' or 'p_target' column; pass quantities= "
                           f"(columns: {list(df.columns)})")
    _require(df, list(quantities), "plot_optimization_trace")
    df = df.assign(method=df["method"].astype(str) if "method" in df.columns else "",
                   request=df["request"].astype(str) if "request" in df.columns else "")
    methods = _ordered(df["method"])
    with plot_style():
        fig, axes = _new_figure(len(quantities), sharex=True)
        for ax, q in zip(axes, quantities):
            for m in methods:
                dm = df[df["method"] == m]
                requests = _ordered(dm["request"])
                alpha = 1.0 if len(requests) == 1 else max(0.25, 1.0 / len(requests) ** 0.5)
                for j, r in enumerate(requests):
                    g = dm[dm["request"] == r].sort_values("step")
                    ax.plot(g["step"].to_numpy(), g[q].to_numpy(dtype=float),
                            color=color_for(m, methods) if m else _FALLBACK[j % len(_FALLBACK)],
                            alpha=alpha, linewidth=1.2,
                            label=(m or None) if j == 0 else None)
            ax.set_xlabel("optimisation step")
            ax.set_ylabel(_label(q))
            if q == "p_target":
                ax.set_ylim(-0.02, 1.02)
            elif log_loss and (df[q] > 0).all():
                ax.set_yscale("log")
        if any(methods):
            axes[-1].legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            fig.suptitle(title)
        return _finish(fig)


def plot_update_norms(df: pd.DataFrame, *, value: str = "norm", methods: Sequence[str] | None = None,
                      title: str | None = None) -> Figure:
    """Norm of the weight update at each edited layer, per method (grouped bars).

    Args:
        df: tidy rows with columns ``layer``, ``method`` and ``value`` (default ``norm``, e.g.
            ‖ΔW_l‖_F), optionally ``module`` ("FFN"/"MHSA": one panel each). Several rows per
            (module, layer, method) — e.g. one per run — are averaged with a 95% interval.
        methods: methods in legend order (default: order of appearance).

    Returns:
        One panel per module; each holds one bar container per method.
    """
    _require(df, ["layer", "method", value], "plot_update_norms")
    d = df.assign(method=df["method"].astype(str),
                  module=df["module"].astype(str) if "module" in df.columns else "")
    s = _summarize(d.drop(columns=[c for c in ("mean",) if c in d.columns]),
                   ["module", "layer", "method"], "plot_update_norms", value=value)
    modules = _ordered(s["module"], ("FFN", "MHSA"))
    methods = list(methods) if methods is not None else _ordered(s["method"])
    layers = sorted(s["layer"].unique())
    width = 0.8 / max(1, len(methods))
    with plot_style():
        fig, axes = _new_figure(len(modules), panel_size=(max(4.2, 0.5 * len(layers) * len(methods) ** 0.5), 3.2))
        for ax, mod in zip(axes, modules):
            sm = s[s["module"] == mod]
            pos = np.arange(len(layers))
            for i, m in enumerate(methods):
                g = sm[sm["method"] == m].set_index("layer").reindex(layers)
                mean = g["mean"].to_numpy(dtype=float)
                err = np.vstack([mean - g["ci_low"].to_numpy(dtype=float),
                                 g["ci_high"].to_numpy(dtype=float) - mean])
                err = None if not np.isfinite(err).any() else np.nan_to_num(err, nan=0.0)
                ax.bar(pos + (i - (len(methods) - 1) / 2) * width, mean, width=width * 0.95, yerr=err,
                       capsize=2, color=color_for(m, methods), label=m, error_kw={"linewidth": 1})
            ax.set_xticks(pos, [str(int(l)) for l in layers])
            ax.set_xlabel("layer")
            ax.set_ylabel(_label(value))
            if mod:
                ax.set_title(f"{mod} update")
        axes[-1].legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            fig.suptitle(title)
        return _finish(fig)


# --- saving --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SavedFigure:
    """Where :func:`save_figure` wrote a figure (``csv`` is None when no data was given)."""

    png: Path
    pdf: Path
    csv: Path | None

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.png, self.pdf, self.csv) if p is not None]


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _publish(tmp: Path) -> None:
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; figures are meant to be read by others


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str, data: pd.DataFrame | None = None, *,
                dpi: int = 200) -> SavedFigure:
    """Write ``name.png``, ``name.pdf`` and (when ``data`` is given) ``name.csv`` into ``out_dir``.

    Each file is written to a temporary sibling and renamed into place, so a reader never sees a
    half-written file. The PDF carries no creation date, so re-running gives the same bytes.

    Args:
        fig: the figure (from any ``plot_*`` function or elsewhere).
        out_dir: directory (created when missing).
        name: file stem: letters, digits, ``.``, ``_``, ``-`` (no directories, no extension).
        data: the numbers behind the figure (written without the index).

    Returns:
        :class:`SavedFigure` with the paths written.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.lower().endswith((".png", ".pdf", ".csv")):
        raise ValueError(f"name must be a plain file stem such as 'fig1_similarity' (letters, digits, "
                         f"'.', '_', '-'; no directory or extension), got {name!r}")
    if data is not None and not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame or None, got {type(data).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fig.canvas is None or not hasattr(fig.canvas, "print_figure"):
        FigureCanvasAgg(fig)
    paths = {}
    for fmt, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Creator": None,
                                                              "Producer": None})):
        target = out / f"{name}.{fmt}"
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", metadata=meta)
            _publish(tmp)
        paths[fmt] = target
    csv = None
    if data is not None:
        csv = out / f"{name}.csv"
        with atomic_path(csv) as tmp:
            data.to_csv(tmp, index=False)
            _publish(tmp)
    logger.info("saved figure %s to %s", name, out)
    return SavedFigure(png=paths["png"], pdf=paths["pdf"], csv=csv)
