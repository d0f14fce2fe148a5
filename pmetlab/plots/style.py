"""The pmetlab figure style: fixed colours for recurring names, axis labels, a theme applied only
while a figure is built, and figures made without pyplot."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_style", "color_for", "label_for", "new_figure", "finish_figure", "band", "FALLBACK_COLORS"]

#: Fixed colours for names that recur across figures, so a method or component keeps its colour.
_FIXED_COLORS: dict[str, str] = {
    "MHSA": "#0173b2",
    "FFN": "#de8f05",  # seaborn "colorblind" 0, 1
    "PMET": "#029e73",
    "MEMIT": "#d55e00",
    "ROME": "#cc78bc",  # colorblind 2, 3, 4
    "unedited": "#7f7f7f",
    "baseline": "#7f7f7f",
}
#: The colour-blind palette names without a fixed colour draw from (by position or a stable hash).
FALLBACK_COLORS = [
    "#0173b2",
    "#de8f05",
    "#029e73",
    "#d55e00",
    "#cc78bc",
    "#ca9161",
    "#fbafe4",
    "#949494",
    "#ece133",
    "#56b4e9",
]

_LABELS: dict[str, str] = {
    "cosine": "cosine similarity (in, out)",
    "jaccard": "Jaccard of top-k tokens (in, out)",
    "efficacy": "efficacy",
    "paraphrase": "paraphrase",
    "neighborhood": "neighborhood",
    "efficacy_score": "efficacy (ES)",
    "paraphrase_score": "paraphrase (PS)",
    "neighborhood_score": "neighborhood (NS)",
    "score": "score (S)",
    "n_edits": "number of edits",
    "p_target": "p(target)",
    "loss": "loss",
    "norm": "update norm",
}


def label_for(name: object) -> str:
    """The axis label of a column or metric name (``n_edits`` -> "number of edits")."""
    return _LABELS.get(str(name), str(name).replace("_", " "))


def color_for(name: object, order: Sequence[object] = ()) -> str:
    """The colour of ``name``: fixed for recurring names (MHSA, FFN, PMET, MEMIT, unedited),
    else taken from the colour-blind palette by ``name``'s position in ``order``."""
    key = str(name)
    if key in _FIXED_COLORS:
        return _FIXED_COLORS[key]
    others = [str(o) for o in order if str(o) not in _FIXED_COLORS]
    i = others.index(key) if key in others else zlib.crc32(key.encode())  # stable across runs
    free = [c for c in FALLBACK_COLORS if c not in _FIXED_COLORS.values()] or FALLBACK_COLORS
    return free[i % len(free)]


@contextmanager
def plot_style(context: str = "notebook", font_scale: float = 1.0) -> Iterator[None]:
    """Apply the pmetlab theme (seaborn ``whitegrid`` + ``context``) only inside the block."""
    import seaborn as sns

    with ExitStack() as stack:
        stack.enter_context(mpl.rc_context())
        stack.enter_context(sns.axes_style("whitegrid"))
        stack.enter_context(sns.plotting_context(context, font_scale=font_scale))
        mpl.rcParams.update(
            {
                "axes.spines.top": False,
                "axes.spines.right": False,
                "legend.frameon": False,
                "savefig.bbox": "tight",
                "figure.dpi": 100,
            }
        )
        yield


def new_figure(
    n_panels: int, *, panel_size: tuple[float, float] = (4.2, 3.2), sharex: bool = False, sharey: bool = False
) -> tuple[Figure, list]:
    fig = Figure(figsize=(panel_size[0] * n_panels, panel_size[1]), layout="constrained")
    FigureCanvasAgg(fig)  # a canvas without pyplot: savefig and notebook display work
    axes = fig.subplots(1, n_panels, sharex=sharex, sharey=sharey, squeeze=False)[0]
    return fig, list(axes)


def finish_figure(fig: Figure) -> Figure:
    # Ticks are created lazily at draw time; drawing once inside plot_style makes them take the
    # theme's sizes (later ticks copy the first one's properties).
    fig.canvas.draw()
    return fig


def band(ax, x, mean, lo, hi, color: str, label: str, **line_kw) -> None:
    ax.plot(x, mean, color=color, label=label, **line_kw)
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    if np.isfinite(lo).any() and np.isfinite(hi).any():
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
