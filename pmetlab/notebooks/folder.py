"""The notebook folder: where it is, which notebooks it holds, their parameters and outputs."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Where a wheel installs the notebook pairs inside the package (setup.py copies them there from
#: the repository's ``notebooks/``; an editable install has no such folder).
SHIPPED_DIR = "_notebooks"


def find_notebooks_dir(package: str = __name__.split(".")[0]) -> Path:
    """The folder of the numbered notebooks: ``<package>/_notebooks`` where a wheel installed them,
    else ``notebooks/`` next to the package's folder (a checkout installed editable, ``pip install -e .``).
    ``package`` is for tests; the folder returned may be missing (:func:`list_notebooks` says so)."""
    root = resources.files(package)
    shipped = root / SHIPPED_DIR
    if shipped.is_dir():
        return Path(str(shipped))
    return Path(str(root)).parent / "notebooks"


#: The notebooks' folder: the installed copy (a wheel) or ``<repo>/notebooks`` (an editable install).
NOTEBOOKS_DIR = find_notebooks_dir()

#: Files each notebook writes into its ``OUTPUT_DIR`` (figures: PNG, PDF and the CSV of the
#: numbers drawn; tables: CSV; text: Markdown). Names carry the notebook's number, so all
#: notebooks can share one output folder.
EXPECTED_OUTPUTS: dict[str, list[str]] = {
    "01_component_similarity": [
        "01_similarity.png",
        "01_similarity.pdf",
        "01_similarity.csv",
        "01_similarity_residual.png",
        "01_similarity_residual.pdf",
        "01_similarity_residual.csv",
        "01_similarity_by_depth.csv",
        "01_reading.md",
    ],
    "02_edit_walkthrough": [
        "02_optimization_trace.png",
        "02_optimization_trace.pdf",
        "02_optimization_trace.csv",
        "02_update_norms.png",
        "02_update_norms.pdf",
        "02_update_norms.csv",
        "02_predictions.csv",
        "02_record_metrics.csv",
        "02_generations.csv",
        "02_checks.csv",
    ],
    "03_reliability_specificity": [
        "03_tradeoff.png",
        "03_tradeoff.pdf",
        "03_tradeoff.csv",
        "03_reliability_specificity.csv",
        "03_records.csv.gz",
        "03_phase_times.csv",
        "03_reading.md",
    ],
    "04_ablations": [
        "04_ablation.png",
        "04_ablation.pdf",
        "04_ablation.csv",
        "04_spread_sweep.png",
        "04_spread_sweep.pdf",
        "04_spread_sweep.csv",
        "04_lambda_sweep.png",
        "04_lambda_sweep.pdf",
        "04_lambda_sweep.csv",
        "04_ablations.csv",
        "04_records.csv.gz",
        "04_phase_times.csv",
        "04_reading.md",
    ],
    "05_locate_facts": [
        "05_trace_heatmaps.png",
        "05_trace_heatmaps.pdf",
        "05_trace_heatmaps.csv",
        "05_trace_curves.png",
        "05_trace_curves.pdf",
        "05_trace_curves.csv",
        "05_facts.csv",
        "05_window.csv",
        "05_reading.md",
    ],
    "06_tuning": [
        "06_tuning.png",
        "06_tuning.pdf",
        "06_tuning.csv",
        "06_tuning.json",
    ],
    "07_editing_over_time": [
        "07_rounds.png",
        "07_rounds.pdf",
        "07_rounds.csv",
        "07_rounds_summary.csv",
        "07_diagnostics.png",
        "07_diagnostics.pdf",
        "07_diagnostics.csv",
        "07_collapse.csv",
        "07_nullspace_leakage.csv",
        "07_reading.md",
    ],
    "08_explore": [
        "08_outcome.csv",
    ],
    "09_why_pmet_trails": [
        "09_arms.png",
        "09_arms.pdf",
        "09_arms.csv",
        "09_arms_table.csv",
        "09_paired.csv",
        "09_records.csv.gz",
        "09_tuning.csv",
        "09_reading.md",
    ],
}

#: jupytext's ``formats`` metadata of every notebook: the .ipynb paired with a percent-format .py.
PAIRED_FORMATS = "ipynb,py:percent"

_REPORT = "report.json"
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def _locate_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder holding the notebooks: ``path`` when given, else :data:`NOTEBOOKS_DIR`."""
    d = Path(path).expanduser() if path is not None else NOTEBOOKS_DIR
    if not d.is_dir():
        hint = (
            ""
            if path is not None
            else f" (a wheel installs them in pmetlab/{SHIPPED_DIR}, an editable install reads the "
            "checkout's notebooks/: reinstall pmetlab, or pass notebooks_dir=)"
        )
        raise FileNotFoundError(f"notebook folder {str(d)!r} does not exist{hint}")
    return d


def list_notebooks(notebooks_dir: str | os.PathLike | None = None) -> list[str]:
    """Names (file stems, e.g. ``"01_component_similarity"``) of the notebooks, in order.

    Every ``*.ipynb`` of the folder except hidden files, names starting with ``_`` and
    checkpoint copies.
    """
    d = _locate_dir(notebooks_dir)
    return sorted(
        p.stem for p in d.glob("*.ipynb") if not p.name.startswith((".", "_")) and not p.stem.endswith("-checkpoint")
    )


def notebook_titles(
    names: Sequence[str] | str | None = None, notebooks_dir: str | os.PathLike | None = None
) -> dict[str, str]:
    """``{name: title}`` of the notebooks (``names`` as :func:`run_notebooks` takes them; default:
    all), in order: the first line of each one's first cell without the Markdown ``#``. Reads the
    ``.ipynb`` as JSON (no Jupyter package needed)."""
    d = _locate_dir(notebooks_dir)
    out = {}
    for name in _resolve_names(names, list_notebooks(d)):
        cells = json.loads((d / f"{name}.ipynb").read_text(encoding="utf-8")).get("cells") or [{}]
        source = cells[0].get("source", "")
        text = "".join(source) if isinstance(source, list) else str(source)
        out[name] = next((l.lstrip("#").strip() for l in text.splitlines() if l.strip()), "")
    return out


def copy_notebooks(
    dest: str | os.PathLike,
    names: Sequence[str] | str | None = None,
    *,
    overwrite: bool = False,
    notebooks_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Copy the notebooks (both files of each jupytext pair) into ``dest``, to edit and run there.

    Args:
        dest: the folder to write into; created when missing.
        names: which notebooks (as :func:`run_notebooks` takes them); default: all.
        overwrite: replace files that exist in ``dest``. Without it nothing is written when one does.
        notebooks_dir: where to copy from (default :data:`NOTEBOOKS_DIR`).

    Returns:
        The files written, in order. The two files of a pair get the same modification time, so
        jupytext in JupyterLab opens the pair as in sync.

    Raises:
        NotADirectoryError: ``dest``, or a folder above it, is a file.
        FileExistsError: files exist in ``dest`` and ``overwrite`` is False (the message names them).
        ValueError: an unknown notebook name, or ``dest`` is the folder copied from.
    """
    src = _locate_dir(notebooks_dir)
    files = [p for n in _resolve_names(names, list_notebooks(src)) for p in (src / f"{n}.ipynb", src / f"{n}.py")]
    files = [p for p in files if p.is_file()]
    out = Path(dest).expanduser()
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(
            f"cannot copy the notebooks into {str(out)!r}: {str(blocker)!r} is a file, not a directory; "
            "give a folder (it is created when missing)"
        )
    if out.is_dir() and out.resolve() == src.resolve():
        raise ValueError(f"{str(out)!r} is the folder the notebooks are copied from; give another folder")
    existing = [p.name for p in files if (out / p.name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} notebook file(s) already exist in {str(out)!r}: {', '.join(existing)}; nothing "
            "was copied. Replace them with overwrite=True (command line: --force) or give another folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    now = time.time()
    written = []
    for p in files:
        shutil.copyfile(p, out / p.name)
        os.utime(out / p.name, (now, now))
        written.append(out / p.name)
    logger.debug("copied %d notebook file(s) from %s to %s", len(written), src, out)
    return written


def _resolve_names(names: Sequence[str] | str | None, available: list[str]) -> list[str]:
    """Accept full stems, file names (``.ipynb``), the number prefix ("01", "1") or the title part
    ("edit_walkthrough"); unknown or ambiguous names are an error naming the choices."""
    if names is None:
        return list(available)
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for raw in names:
        name = Path(str(raw)).name
        name = name[: -len(".ipynb")] if name.endswith(".ipynb") else name
        if name in available:
            hits = [name]
        else:
            number = name.zfill(2) if name.isdigit() else None
            hits = [
                a
                for a in available
                if (number is not None and a.split("_", 1)[0] == number) or (a.split("_", 1)[-1] == name)
            ]
        if len(hits) != 1:
            what = "matches several notebooks: " + ", ".join(hits) if hits else "is not a notebook"
            raise ValueError(f"notebook {raw!r} {what}; available: {', '.join(available) or '(none)'}")
        if hits[0] not in out:
            out.append(hits[0])
    return out


def notebook_parameters(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The parameters a notebook declares in its ``parameters`` cell:
    ``{name: {"default": source text, "type": the default's type name ("int", "str", ...) or None}}``."""
    import papermill

    out = {}
    for k, v in papermill.inspect_notebook(str(path)).items():
        declared = v.get("inferred_type_name")  # papermill infers it from annotations only
        try:
            declared = type(ast.literal_eval(v.get("default") or "")).__name__
        except (ValueError, SyntaxError):
            pass
        out[k] = {"default": v.get("default"), "type": declared if declared not in ("None", "NoneType") else None}
    return out


def _coerce(name: str, value: Any, declared_type: str | None, notebook: str) -> Any:
    """Turn a string given on the command line into the declared parameter's type."""
    if not isinstance(value, str) or declared_type in (None, "None", "str"):
        return value
    v = value.strip()
    try:
        if declared_type == "bool":
            if v.lower() in _TRUE:
                return True
            if v.lower() in _FALSE:
                return False
            raise ValueError(v)
        if declared_type == "int":
            return int(v)
        if declared_type == "float":
            return float(v)
    except ValueError:
        raise ValueError(
            f"parameter {name}={value!r} for notebook {notebook}: expected type {declared_type} "
            f"(the type of its default), got {value!r}"
        ) from None
    return value


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (mtime_ns, size)}`` of the plain files under ``out``."""
    res = {}
    for p in out.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            res[p.relative_to(out).as_posix()] = (st.st_mtime_ns, st.st_size)
    return res


def _error_of(exc: BaseException) -> tuple[str, int | None]:
    """One line naming the error, and the failing cell's index when known."""
    ename = getattr(exc, "ename", None)
    if ename is not None:  # papermill.PapermillExecutionError
        evalue = str(getattr(exc, "evalue", "")).strip().splitlines()
        return f"{ename}: {evalue[-1] if evalue else ''}".strip().rstrip(":"), getattr(exc, "cell_index", None)
    lines = [l for l in str(exc).strip().splitlines() if l.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".strip().rstrip(":"), None
