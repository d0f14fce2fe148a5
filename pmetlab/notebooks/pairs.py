"""jupytext pairs: a notebook's .ipynb and its percent-format .py must hold the same cells."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .folder import PAIRED_FORMATS, _locate_dir, _resolve_names, list_notebooks

logger = logging.getLogger(__name__)


class NotebookPairError(ValueError):
    """The ``.py`` and the ``.ipynb`` of a notebook pair disagree, or a ``.py`` has no ``.ipynb``."""


def _normalized(source: str) -> str:
    # Trailing spaces and blank lines at either end mean nothing, and plain Jupyter and jupytext
    # write them differently: comparing them would flag pairs that jupytext considers in sync.
    return "\n".join(line.rstrip() for line in source.splitlines()).strip("\n")


def _cell_key(cell: Mapping[str, Any]) -> tuple[str, str, list[str]]:
    return cell["cell_type"], _normalized(cell["source"]), list(cell.get("metadata", {}).get("tags", []))


def pair_differences(ipynb: str | os.PathLike, py: str | os.PathLike) -> list[str]:
    """Where the two files of a jupytext pair disagree, one short phrase each (empty: in sync).

    Compares the cells, the ``py`` read by jupytext in the percent format: their number and, cell
    by cell, the type, the source (trailing spaces and blank lines at either end ignored) and
    the tags. Outputs, execution counts, cell ids and notebook metadata are not compared.
    """
    import jupytext
    import nbformat

    a = [_cell_key(c) for c in nbformat.read(str(ipynb), as_version=4).cells]
    b = [_cell_key(c) for c in jupytext.read(str(py), fmt="py:percent").cells]
    out = [
        f"cell {i}: {what}"
        for i, (x, y) in enumerate(zip(a, b))
        for what, u, v in zip(("type differs", "source differs", "tags differ"), x, y)
        if u != v
    ]
    if len(a) != len(b):
        out.append(f"{len(b)} cells in the .py, {len(a)} in the .ipynb")
    return out


def _pair_problem(ipynb: Path) -> str | None:
    """One line saying how ``ipynb`` and its ``.py`` disagree and how to sync them; None when they
    agree or the notebook has no ``.py`` (an unpaired notebook runs as it is)."""
    py = ipynb.with_suffix(".py")
    if not py.is_file():
        return None
    diffs = pair_differences(ipynb, py)
    if not diffs:
        return None
    more = f" and {len(diffs) - 1} more" if len(diffs) > 1 else ""
    t_py, t_nb = py.stat().st_mtime_ns, ipynb.stat().st_mtime_ns
    sync = f"`jupytext --sync {ipynb}`"
    if t_py == t_nb:
        how = f"both have the same time: touch the file that is right, then run {sync}"
    else:
        newer, older = (".py", ".ipynb") if t_py > t_nb else (".ipynb", ".py")
        how = f"the {newer} is newer, and {sync} copies its cells to the {older}"
    return f"{py} and {ipynb.name} disagree ({diffs[0]}{more}); {how}"


def check_pairs(notebooks_dir: str | os.PathLike | None = None, names: Sequence[str] | str | None = None) -> None:
    """Check that the chosen notebooks (default: all) agree with their jupytext ``.py``.

    With ``names=None`` a notebook source ``NN_name.py`` without its ``.ipynb`` is an error too
    (it would not run). Nothing is rewritten.

    Raises:
        NotebookPairError: one line per problem, joined with "; ", naming the file to sync and
            the command that does it.
        ValueError: an unknown notebook name.
        ImportError: a pair is to be compared and jupytext is not installed.
    """
    d = _locate_dir(notebooks_dir)
    available = list_notebooks(d)
    if any(d.glob("*.py")):
        try:
            import jupytext  # noqa: F401 - fail with the install hint before comparing
        except ImportError as exc:
            raise ImportError(
                "comparing the notebooks with their .py needs jupytext: pip install -e '.[notebooks]'"
            ) from exc
    problems = [_pair_problem(d / f"{n}.ipynb") for n in _resolve_names(names, available)]
    if names is None:
        problems += [
            f"{p} has no .ipynb: create it with `jupytext --set-formats {PAIRED_FORMATS} {p}`"
            for p in sorted(d.glob("*.py"))
            if not p.name.startswith((".", "_")) and p.stem not in available
        ]
    problems = [p for p in problems if p]
    if problems:
        raise NotebookPairError("; ".join(problems))
