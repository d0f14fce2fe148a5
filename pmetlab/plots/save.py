"""Writing what a notebook produces, atomically and into a folder created when missing: a figure
as PNG and PDF with the numbers behind it as CSV (:func:`save_figure`), a table (:func:`save_table`)
and a text such as a generated reading (:func:`save_text`)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..cache import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["save_figure", "SavedFigure", "save_table", "save_text"]


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


def save_figure(
    fig: Figure, out_dir: str | os.PathLike, name: str, data: pd.DataFrame | None = None, *, dpi: int = 200
) -> SavedFigure:
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
        raise ValueError(
            f"name must be a plain file stem such as 'fig1_similarity' (letters, digits, "
            f"'.', '_', '-'; no directory or extension), got {name!r}"
        )
    if data is not None and not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame or None, got {type(data).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fig.canvas is None or not hasattr(fig.canvas, "print_figure"):
        FigureCanvasAgg(fig)
    paths = {}
    for fmt, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Creator": None, "Producer": None})):
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


_TABLE_SUFFIXES = (".csv", ".csv.gz")
_TEXT_SUFFIXES = (".md", ".txt", ".json")


def _target(out_dir: str | os.PathLike, name: str, suffixes: tuple[str, ...], what: str) -> Path:
    """``out_dir / name`` with ``out_dir`` created; ``name`` a plain file name ending in a suffix."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or not name.endswith(suffixes):
        raise ValueError(
            f"name must be a plain file name of a {what} ending in {' or '.join(suffixes)} (letters, digits, "
            f"'.', '_', '-'; no directory), got {name!r}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / name


def save_table(table: pd.DataFrame, out_dir: str | os.PathLike, name: str, **to_csv: object) -> Path:
    """Write ``table`` as CSV to ``out_dir/name`` (``.csv``, or ``.csv.gz`` compressed), without
    its index unless ``to_csv`` says otherwise; the folder is created, the write atomic."""
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    path = _target(out_dir, name, _TABLE_SUFFIXES, "table")
    to_csv.setdefault("index", False)
    if name.endswith(".gz"):
        to_csv.setdefault("compression", "gzip")
    with atomic_path(path) as tmp:
        table.to_csv(tmp, **to_csv)
        _publish(tmp)
    return path


def save_text(text: str, out_dir: str | os.PathLike, name: str) -> Path:
    """Write ``text`` (UTF-8, ending in a newline) to ``out_dir/name`` (``.md``, ``.txt`` or
    ``.json``); the folder is created, the write atomic."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    path = _target(out_dir, name, _TEXT_SUFFIXES, "text")
    with atomic_path(path) as tmp:
        tmp.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        _publish(tmp)
    return path
