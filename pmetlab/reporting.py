"""Generated sections of Markdown documents: tables and findings written from result files.

A document marks each generated section with a pair of HTML comments, which Markdown does not
render::

    <!-- pmetlab:begin NAME -->
    ... generated, never edited by hand ...
    <!-- pmetlab:end NAME -->

:func:`render_sections` replaces the body of every named section with freshly generated text;
:func:`stale_sections` tells which sections differ from what would be generated (a test runs
it, so a README whose tables were typed by hand, or not regenerated after new results were
committed, fails).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence

import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["markdown_table", "format_ci", "render_sections", "stale_sections", "section_names"]

_SECTION = re.compile(
    r"(<!-- pmetlab:begin (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- pmetlab:end (?P=name) -->)", re.S
)


def format_ci(mean: float, low: float, high: float, digits: int = 1) -> str:
    """``"81.5 [77.8, 84.8]"``; NaN bounds give the mean alone, a NaN mean gives ``"–"``."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (low, high)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(
    df: pd.DataFrame, *, floatfmt: str = ".3f", bold: Mapping[tuple[int, str], bool] | None = None
) -> str:
    """A GitHub Markdown table of ``df`` (columns as headers, index dropped); floats with
    ``floatfmt``, NaN as "–". ``bold[(row, column)]`` marks cells to set in bold."""
    if df.columns.empty:
        raise ValueError("cannot render a table without columns")
    cols = [str(c) for c in df.columns]

    def cell(i: int, c: str, v) -> str:
        if isinstance(v, float):
            text = "–" if math.isnan(v) else format(v, floatfmt)
        else:
            text = str(v)
        text = text.replace("|", "\\|")
        return f"**{text}**" if bold and bold.get((i, c)) else text

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for i, row in enumerate(df.itertuples(index=False)):
        lines.append("| " + " | ".join(cell(i, c, v) for c, v in zip(cols, row)) + " |")
    return "\n".join(lines)


def section_names(text: str) -> list[str]:
    """Names of the generated sections of ``text``, in order."""
    return [m.group("name") for m in _SECTION.finditer(text)]


def _generate(builders: Mapping[str, Callable[[], str]], names: Sequence[str]) -> dict[str, str]:
    missing = sorted(set(builders) - set(names))
    if missing:
        raise KeyError(
            f"the document has no section(s) {missing}; add a '<!-- pmetlab:begin NAME -->' / "
            f"'<!-- pmetlab:end NAME -->' pair for each (sections found: {list(names)})"
        )
    return {n: builders[n]().rstrip("\n") + "\n" for n in builders}


def render_sections(text: str, builders: Mapping[str, Callable[[], str]]) -> str:
    """``text`` with the body of each section named in ``builders`` replaced by ``builders[name]()``.

    Sections without a builder are left as they are; a builder without a section is an error.
    """
    bodies = _generate(builders, section_names(text))
    return _SECTION.sub(lambda m: m.group(1) + bodies.get(m.group("name"), m.group("body")) + m.group(4), text)


def stale_sections(text: str, builders: Mapping[str, Callable[[], str]]) -> list[str]:
    """Names of the sections whose body differs from what ``builders`` generate now."""
    bodies = _generate(builders, section_names(text))
    return [
        m.group("name")
        for m in _SECTION.finditer(text)
        if m.group("name") in bodies and m.group("body") != bodies[m.group("name")]
    ]
