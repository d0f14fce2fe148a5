"""Run the numbered notebooks in ``<repo>/notebooks`` with papermill (``make figures``).

Every notebook is a jupytext pair: ``NN_name.ipynb`` (what JupyterLab opens and papermill runs)
and ``NN_name.py`` in the percent format (what diffs and reviews read); both carry the jupytext
metadata ``formats: ipynb,py:percent``, so JupyterLab with jupytext saves both, and
``jupytext --sync notebooks/*.ipynb`` brings them together from the command line (it takes the
cells of the more recently modified file).

Every notebook has one cell tagged ``parameters`` (scalars: ``MODEL``, ``SEED``, ``SMOKE``,
``OUTPUT_DIR``, ...). :func:`run_notebooks` executes the chosen notebooks one after the other,
each in a fresh kernel, with ``OUTPUT_DIR`` set to ``out_dir``; the executed copies
(``out_dir/NAME.ipynb``), the figures (PNG + PDF + the CSV of their numbers) and tables land
there, with ``report.json`` describing the run. A failing notebook is logged with the cell
and the error line and does not stop the others.

A pair whose two files disagree (cell sources, types or tags) is never run: which side is right
is the researcher's call, not a timestamp's, and running the ``.ipynb`` could silently run stale
code. :func:`run_notebooks` refuses before running anything, with a one-line message naming the
pair, the first difference, the newer file and the ``jupytext --sync`` command that fixes it.
Nothing here rewrites a notebook.

papermill, ipykernel and jupytext are optional dependencies (``pip install -e '.[notebooks]'``);
they are imported only when notebooks are checked or run.
"""

from __future__ import annotations

import ast
import logging
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .cache import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "EXPECTED_OUTPUTS",
    "NOTEBOOKS_DIR",
    "PAIRED_FORMATS",
    "NotebookPairError",
    "list_notebooks",
    "notebook_parameters",
    "pair_differences",
    "check_pairs",
    "run_notebooks",
]

#: ``<repo>/notebooks`` (the package is installed editable, so the repo is its parent).
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"

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
    ],
}

#: jupytext's ``formats`` metadata of every notebook: the .ipynb paired with a percent-format .py.
PAIRED_FORMATS = "ipynb,py:percent"

_REPORT = "report.json"
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def _locate_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder holding the notebooks: ``path`` when given, else ``<repo>/notebooks``."""
    d = Path(path).expanduser() if path is not None else NOTEBOOKS_DIR
    if not d.is_dir():
        hint = (
            ""
            if path is not None
            else " (pmetlab must be installed editable from its repository, "
            "`pip install -e .`, for the notebooks to be found; or pass notebooks_dir=)"
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


def run_notebooks(
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    smoke: bool = False,
    notebooks_dir: str | os.PathLike | None = None,
    timeout: int | None = None,
    *,
    kernel_name: str | None = None,
    threads: int | None = None,
) -> list[dict]:
    """Execute notebooks with papermill, one at a time, each in a fresh kernel.

    Args:
        out_dir: where the executed copies (``NAME.ipynb``), the figures/tables and
            ``report.json`` go; created when missing. It is passed as ``OUTPUT_DIR`` and is the
            kernels' working directory.
        names: notebooks to run (stems such as ``"02_edit_walkthrough"``, the number ``"02"`` or
            the title ``"edit_walkthrough"``); default: all of :func:`list_notebooks`.
        parameters: overrides of the notebooks' ``parameters`` cells. A notebook gets only the
            names it declares; strings are converted to the declared type (``"8"`` -> 8,
            ``"true"`` -> True). A name no selected notebook declares is an error.
        smoke: run with ``SMOKE=True`` (tiny sizes, every file still written), unless
            ``parameters`` sets ``SMOKE`` itself.
        notebooks_dir: folder of the notebooks (default ``<repo>/notebooks``).
        timeout: per-cell time limit in seconds (papermill's ``execution_timeout``); None: no limit.
        kernel_name: Jupyter kernel (default: the one each notebook names, ``python3``).
        threads: CPU threads of each kernel's torch/BLAS (``OMP_NUM_THREADS`` and
            ``MKL_NUM_THREADS`` for the kernels). None: ``$OMP_NUM_THREADS`` when set, else 1 —
            on a 2-core machine shared with other jobs, two spin-waiting threads per process made
            the model ~5x slower than one (the test suite runs single-threaded for the same
            reason). 0: leave it to torch (all cores).

    Returns:
        One dict per notebook, in run order: ``name``, ``status`` ("ok" or "failed"),
        ``seconds``, ``error`` (one line, None when ok), ``cell`` (index of the failing cell in
        the executed copy, or None), ``notebook`` (the executed copy), ``outputs`` (files written
        or updated during the run, relative to ``out_dir``), ``missing`` (expected files of
        :data:`EXPECTED_OUTPUTS` not written, or empty). A notebook that ran without error but
        left an expected file missing counts as failed.

    Raises:
        NotebookPairError: a chosen notebook's ``.ipynb`` and ``.py`` disagree (see
            :func:`check_pairs`; nothing is run or rewritten).
        ValueError: an unknown notebook name or parameter (nothing is run).
        ImportError: papermill (or, for paired notebooks, jupytext) is not installed.
    """
    papermill = _import_papermill()
    src_dir = _locate_dir(notebooks_dir)
    selected = _resolve_names(names, list_notebooks(src_dir))
    if not selected:
        raise ValueError(f"no notebooks to run in {src_dir}")
    threads = _kernel_threads(threads)
    check_pairs(src_dir, names)
    out = Path(out_dir).expanduser().resolve()
    given = dict(parameters or {})
    given.setdefault("SMOKE", bool(smoke))
    given["OUTPUT_DIR"] = str(out)
    plans = _plan_parameters(given, src_dir, selected)
    out.mkdir(parents=True, exist_ok=True)
    report = _new_report(out, src_dir, given, threads)
    with _thread_env(threads):
        return _run_all(papermill, src_dir, selected, plans, out, timeout, kernel_name, report)


def _import_papermill():
    try:
        import papermill
    except ImportError as exc:
        raise ImportError("running notebooks needs papermill and ipykernel: pip install -e '.[notebooks]'") from exc
    return papermill


def _new_report(out: Path, src_dir: Path, given: Mapping[str, Any], threads: int | None) -> dict[str, Any]:
    """The head of ``report.json``; :func:`_run_all` adds the notebooks as they finish."""
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "out_dir": str(out),
        "notebooks_dir": str(src_dir),
        "smoke": bool(given["SMOKE"]),
        "parameters": dict(given),
        "host": platform.node(),
        "threads": threads if threads is not None else os.environ.get("OMP_NUM_THREADS"),  # 0: torch's default
        "notebooks": [],
    }


def _kernel_threads(threads: int | None) -> int | None:
    """The kernels' thread count: ``threads`` checked; None -> 1 unless ``$OMP_NUM_THREADS`` is set."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ValueError(f"threads must be a non-negative integer (0: torch's default) or None, got {threads!r}")
    if threads is None:
        return None if os.environ.get("OMP_NUM_THREADS") else 1
    return threads


def _plan_parameters(given: Mapping[str, Any], src_dir: Path, selected: list[str]) -> dict[str, dict]:
    """The parameters each notebook gets: those of ``given`` it declares, typed as its defaults.

    Raises:
        ValueError: a name in ``given`` (other than SMOKE and OUTPUT_DIR) that no notebook declares,
            or a value that does not convert to the declared type.
    """
    declared = {n: notebook_parameters(src_dir / f"{n}.ipynb") for n in selected}
    unknown = sorted(
        k for k in given if k not in {"SMOKE", "OUTPUT_DIR"} and not any(k in d for d in declared.values())
    )
    if unknown:
        known = sorted(set().union(*(d.keys() for d in declared.values())))
        raise ValueError(
            f"parameter(s) {unknown} are declared by none of the notebooks {selected}; their parameters: {known}"
        )
    plans = {}
    for n in selected:
        params = {k: _coerce(k, v, declared[n][k]["type"], n) for k, v in given.items() if k in declared[n]}
        skipped = sorted(set(given) - set(params))
        if skipped:
            logger.info("%s does not declare %s; not passed to it", n, skipped)
        plans[n] = params
    return plans


@contextmanager
def _thread_env(threads: int | None) -> Iterator[None]:
    """Set the thread variables the kernels inherit, and put the old values back."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    try:
        if threads == 0:
            for k in keys:
                os.environ.pop(k, None)
        elif threads is not None:
            os.environ.update({k: str(threads) for k in keys})
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_all(
    papermill,
    src_dir: Path,
    selected: list[str],
    plans: dict[str, dict],
    out: Path,
    timeout: int | None,
    kernel_name: str | None,
    report: dict,
) -> list[dict]:
    """Run the notebooks in order; ``report.json`` is rewritten after each one."""
    results: list[dict] = []
    skip = {f"{n}.ipynb" for n in selected} | {_REPORT}  # not outputs of the notebooks
    for i, name in enumerate(selected, 1):
        step = f"[{i}/{len(selected)}]"
        logger.info("%s running %s (parameters %s)", step, name, plans[name])
        res = _run_one(papermill, src_dir / f"{name}.ipynb", out, plans[name], timeout, kernel_name, skip)
        if res["status"] == "ok":
            logger.info("%s %s ok in %.1fs (%d files)", step, name, res["seconds"], len(res["outputs"]))
        else:
            where = f" in cell {res['cell']}" if res["cell"] is not None else ""
            logger.error(
                "%s %s FAILED%s after %.1fs: %s (executed copy: %s)",
                step,
                name,
                where,
                res["seconds"],
                res["error"],
                out / f"{name}.ipynb",
            )
        results.append(res)
        report["notebooks"] = results
        report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(out / _REPORT, report)  # after each notebook: a partial run leaves a report
    return results


def _run_one(
    papermill, source: Path, out: Path, params: dict, timeout: int | None, kernel_name: str | None, skip: set[str]
) -> dict:
    """Execute one notebook into ``out`` and say what it wrote (the dicts of :func:`run_notebooks`)."""
    name = source.stem
    executed = out / f"{name}.ipynb"
    before = _files(out)
    t0 = time.perf_counter()
    error, cell = _execute(papermill, source, executed, params, out, timeout, kernel_name)
    seconds = time.perf_counter() - t0
    after = _files(out)
    written = sorted(f for f, st in after.items() if f not in skip and before.get(f) != st)
    missing = [f for f in EXPECTED_OUTPUTS.get(name, []) if f not in written or after[f][1] == 0]
    if error is None and missing:
        error = f"missing expected output(s): {', '.join(missing)}"
    return {
        "name": name,
        "status": "ok" if error is None else "failed",
        "seconds": round(seconds, 2),
        "error": error,
        "cell": cell,
        "notebook": str(executed) if executed.is_file() else None,
        "parameters": params,
        "outputs": written,
        "missing": missing,
    }


def _execute(
    papermill, source: Path, executed: Path, params: dict, cwd: Path, timeout: int | None, kernel_name: str | None
) -> tuple[str | None, int | None]:
    """Run ``source`` with papermill into ``executed``: (None, None), or the error line and failing cell."""
    try:
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters=params,
            kernel_name=kernel_name,
            cwd=str(cwd),
            execution_timeout=timeout,
            progress_bar=False,
            log_output=False,
            report_mode=False,
        )
    except Exception as exc:  # noqa: BLE001 - one failing notebook must not stop the others
        error, cell = _error_of(exc)
        if type(exc).__name__ == "NoSuchKernel":
            error += " (register the kernel: python -m ipykernel install --sys-prefix --name python3)"
        return error, cell
    return None, None
