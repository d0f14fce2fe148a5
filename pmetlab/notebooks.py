"""Run the numbered notebooks in ``<repo>/notebooks`` with papermill (``make figures``).

Every notebook has one cell tagged ``parameters`` (scalars: ``MODEL``, ``SEED``, ``SMOKE``,
``OUTPUT_DIR``, ...). :func:`run_notebooks` executes the chosen notebooks one after the other,
each in a fresh kernel, with ``OUTPUT_DIR`` set to ``out_dir``; the executed copies
(``out_dir/NAME.ipynb``), the figures (PNG + PDF + the CSV of their numbers) and tables land
there, with ``report.json`` describing the run. A failing notebook is logged with the cell
and the error line and does not stop the others.

papermill and ipykernel are optional dependencies (``pip install -e '.[notebooks]'``); they are
imported only when notebooks are run.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import platform
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .cache import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["EXPECTED_OUTPUTS", "NOTEBOOKS_DIR", "list_notebooks", "notebook_parameters", "run_notebooks"]

#: ``<repo>/notebooks`` (the package is installed editable, so the repo is its parent).
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"

#: Files each notebook writes into its ``OUTPUT_DIR`` (figures: PNG, PDF and the CSV of the
#: numbers drawn; tables: CSV; text: Markdown). Names carry the notebook's number, so all
#: notebooks can share one output folder.
EXPECTED_OUTPUTS: dict[str, list[str]] = {
    "01_component_similarity": [
        "01_similarity.png", "01_similarity.pdf", "01_similarity.csv",
        "01_similarity_residual.png", "01_similarity_residual.pdf", "01_similarity_residual.csv",
        "01_similarity_by_depth.csv", "01_reading.md",
    ],
    "02_edit_walkthrough": [
        "02_optimization_trace.png", "02_optimization_trace.pdf", "02_optimization_trace.csv",
        "02_update_norms.png", "02_update_norms.pdf", "02_update_norms.csv",
        "02_predictions.csv", "02_record_metrics.csv", "02_generations.csv", "02_checks.csv",
    ],
    "03_reliability_specificity": [
        "03_tradeoff.png", "03_tradeoff.pdf", "03_tradeoff.csv",
        "03_reliability_specificity.csv",
    ],
    "04_ablations": [
        "04_ablation.png", "04_ablation.pdf", "04_ablation.csv",
        "04_spread_sweep.png", "04_spread_sweep.pdf", "04_spread_sweep.csv",
        "04_lambda_sweep.png", "04_lambda_sweep.pdf", "04_lambda_sweep.csv",
        "04_ablations.csv",
    ],
}

_REPORT = "report.json"
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def _locate_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder holding the notebooks: ``path`` when given, else ``<repo>/notebooks``."""
    d = Path(path).expanduser() if path is not None else NOTEBOOKS_DIR
    if not d.is_dir():
        hint = ("" if path is not None else " (pmetlab must be installed editable from its repository, "
                "`pip install -e .`, for the notebooks to be found; or pass notebooks_dir=)")
        raise FileNotFoundError(f"notebook folder {str(d)!r} does not exist{hint}")
    return d


def list_notebooks(notebooks_dir: str | os.PathLike | None = None) -> list[str]:
    """Names (file stems, e.g. ``"01_component_similarity"``) of the notebooks, in order.

    Every ``*.ipynb`` of the folder except hidden files, names starting with ``_`` and
    checkpoint copies.
    """
    d = _locate_dir(notebooks_dir)
    return sorted(p.stem for p in d.glob("*.ipynb")
                  if not p.name.startswith((".", "_")) and not p.stem.endswith("-checkpoint"))


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
        name = name[:-len(".ipynb")] if name.endswith(".ipynb") else name
        if name in available:
            hits = [name]
        else:
            number = name.zfill(2) if name.isdigit() else None
            hits = [a for a in available
                    if (number is not None and a.split("_", 1)[0] == number)
                    or (a.split("_", 1)[-1] == name)]
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
        raise ValueError(f"parameter {name}={value!r} for notebook {notebook}: expected type {declared_type} "
                         f"(the type of its default), got {value!r}") from None
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


def run_notebooks(out_dir: str | os.PathLike, names: Sequence[str] | None = None,
                  parameters: Mapping[str, Any] | None = None, smoke: bool = False,
                  notebooks_dir: str | os.PathLike | None = None, timeout: int | None = None, *,
                  kernel_name: str | None = None, threads: int | None = None) -> list[dict]:
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
        the executed copy, or None), ``notebook`` (the executed copy), ``outputs`` (files written or updated during the
        run, relative to ``out_dir``), ``missing`` (expected files of :data:`EXPECTED_OUTPUTS`
        not written, or empty). A notebook that ran without error but left an expected file
        missing counts as failed.

    Raises:
        ValueError: an unknown notebook name or parameter (nothing is run).
        ImportError: papermill is not installed.
    """
    try:
        import papermill
    except ImportError as exc:
        raise ImportError("running notebooks needs papermill and ipykernel: pip install -e '.[notebooks]'") from exc

    src_dir = _locate_dir(notebooks_dir)
    selected = _resolve_names(names, list_notebooks(src_dir))
    if not selected:
        raise ValueError(f"no notebooks to run in {src_dir}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    given = dict(parameters or {})
    if "SMOKE" not in given:
        given["SMOKE"] = bool(smoke)
    given["OUTPUT_DIR"] = str(out)

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ValueError(f"threads must be a non-negative integer (0: torch's default) or None, got {threads!r}")
    if threads is None:
        threads = None if os.environ.get("OMP_NUM_THREADS") else 1
    declared = {n: notebook_parameters(src_dir / f"{n}.ipynb") for n in selected}
    unknown = sorted(k for k in given if k not in {"SMOKE", "OUTPUT_DIR"}
                     and not any(k in d for d in declared.values()))
    if unknown:
        known = sorted(set().union(*(d.keys() for d in declared.values())))
        raise ValueError(f"parameter(s) {unknown} are declared by none of the notebooks {selected}; "
                         f"their parameters: {known}")
    plans = {}
    for n in selected:
        params = {k: _coerce(k, v, declared[n][k]["type"], n) for k, v in given.items() if k in declared[n]}
        skipped = sorted(set(given) - set(params))
        if skipped:
            logger.info("%s does not declare %s; not passed to it", n, skipped)
        plans[n] = params

    report: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "out_dir": str(out), "notebooks_dir": str(src_dir), "smoke": bool(given["SMOKE"]),
        "parameters": {k: v for k, v in given.items()}, "host": platform.node(),
        "threads": threads if threads is not None else os.environ.get("OMP_NUM_THREADS"),  # 0: torch's default
        "notebooks": [],
    }
    with _thread_env(threads):
        return _run_all(papermill, src_dir, selected, plans, out, timeout, kernel_name, report)


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


def _run_all(papermill, src_dir: Path, selected: list[str], plans: dict[str, dict], out: Path,
             timeout: int | None, kernel_name: str | None, report: dict) -> list[dict]:
    results: list[dict] = []
    for i, name in enumerate(selected, 1):
        executed = out / f"{name}.ipynb"
        logger.info("[%d/%d] running %s (parameters %s)", i, len(selected), name, plans[name])
        before = _files(out)
        t0 = time.perf_counter()
        error, cell = None, None
        try:
            papermill.execute_notebook(
                str(src_dir / f"{name}.ipynb"), str(executed), parameters=plans[name],
                kernel_name=kernel_name, cwd=str(out), execution_timeout=timeout,
                progress_bar=False, log_output=False, report_mode=False)
        except Exception as exc:  # noqa: BLE001 - one failing notebook must not stop the others
            error, cell = _error_of(exc)
            if type(exc).__name__ == "NoSuchKernel":
                error += (" (register the kernel: python -m ipykernel install --sys-prefix --name python3)")
        seconds = time.perf_counter() - t0
        after = _files(out)
        skip = {f"{n}.ipynb" for n in selected} | {_REPORT}
        written = sorted(f for f, st in after.items() if f not in skip and before.get(f) != st)
        expected = EXPECTED_OUTPUTS.get(name, [])
        missing = [f for f in expected if f not in written or after[f][1] == 0]
        if error is None and missing:
            error = f"missing expected output(s): {', '.join(missing)}"
        status = "ok" if error is None else "failed"
        if status == "ok":
            logger.info("[%d/%d] %s ok in %.1fs (%d files)", i, len(selected), name, seconds, len(written))
        else:
            where = f" in cell {cell}" if cell is not None else ""
            logger.error("[%d/%d] %s FAILED%s after %.1fs: %s (executed copy: %s)", i, len(selected), name,
                         where, seconds, error, executed)
        res = {"name": name, "status": status, "seconds": round(seconds, 2), "error": error, "cell": cell,
               "notebook": str(executed) if executed.is_file() else None, "parameters": plans[name],
               "outputs": written, "missing": missing}
        results.append(res)
        report["notebooks"] = results
        report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(out / _REPORT, report)  # after each notebook: a partial run leaves a report
    return results
