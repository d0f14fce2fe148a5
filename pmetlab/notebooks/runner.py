"""Executing notebooks with papermill, one fresh kernel each, with a report of what ran."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..cache import atomic_write_json
from .folder import (
    _REPORT,
    EXPECTED_OUTPUTS,
    _coerce,
    _error_of,
    _files,
    _locate_dir,
    _resolve_names,
    list_notebooks,
    notebook_parameters,
)
from .pairs import check_pairs

logger = logging.getLogger(__name__)


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
        notebooks_dir: folder of the notebooks (default :data:`NOTEBOOKS_DIR`: the copy a wheel
            installs, or the checkout's ``notebooks/`` for an editable install).
        timeout: per-cell time limit in seconds (papermill's ``execution_timeout``); None: no limit.
        kernel_name: a Jupyter kernelspec to run the notebooks in, as it is. Default: the runner's own
            kernel (:func:`kernel_spec`: IPython on the Python running this function, text progress
            bars), standing in for ``python3``, the kernel the notebooks name, whatever kernelspecs
            are installed.
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
    report["kernel"] = kernel_name or f"python3: {sys.executable}"
    report["earlier"] = _earlier_entries(out / _REPORT, selected)
    with _thread_env(threads), _runner_kernel(kernel_name is None):
        return _run_all(papermill, src_dir, selected, plans, out, timeout, kernel_name, report)


def _earlier_entries(path: Path, selected: list[str]) -> list[dict]:
    """The entries of an existing ``report.json`` (and its own ``earlier``) for notebooks this run
    does not run, each with the run it came from: running notebooks one at a time into one folder
    keeps every notebook's report. An unreadable report contributes nothing (it is replaced)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        entries = [
            {**nb, "run_started": old.get("started"), "run_parameters": old.get("parameters")}
            for nb in old.get("notebooks", [])
        ] + list(old.get("earlier", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    kept: dict[str, dict] = {}
    for nb in entries:
        if isinstance(nb, dict) and nb.get("name") not in selected and nb.get("name") not in kept:
            kept[nb["name"]] = nb
    return list(kept.values())


def _import_papermill():
    try:
        import ipykernel  # noqa: F401 - the kernels run it
        import papermill
    except ImportError as exc:
        raise ImportError(
            f"running notebooks needs papermill and ipykernel ({exc}): pip install 'pmetlab[notebooks]'"
        ) from exc
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
def _environ(changes: Mapping[str, str | None]) -> Iterator[None]:
    """Set (a value) or unset (None) environment variables, which the kernels inherit, and put the
    old values back."""
    old = {k: os.environ.get(k) for k in changes}
    try:
        for k, v in changes.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _thread_env(threads: int | None) -> AbstractContextManager[None]:
    """Set the thread variables the kernels inherit (0: unset, torch's default; None: as they are)."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    if threads is None:
        return _environ({})
    return _environ({k: (str(threads) if threads else None) for k in keys})


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
        with _quiet_kernel_env():
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
                config=_kernel_config(),
            )
    except Exception as exc:  # noqa: BLE001 - one failing notebook must not stop the others
        error, cell = _error_of(exc)
        if type(exc).__name__ == "NoSuchKernel":
            error += " (register the kernel: python -m ipykernel install --sys-prefix --name python3)"
        return error, cell
    return None, None


#: Warnings the kernels need not print into every executed notebook: tqdm's "IProgress not found"
#: (ipywidgets is not installed; the text bars work; a kernelspec given by name may import tqdm.auto
#: in a cell). A ``PYTHONWARNINGS`` filter: the message start.
_KERNEL_WARNING_FILTERS = ("ignore:IProgress not found",)


def _kernel_config() -> Any:
    """The kernels' traitlets config: CurveZMQ transport encryption when pyzmq and jupyter_client
    support it. A kernel whose spec declares it (ipykernel does) then runs encrypted, and stops
    warning "Kernel is running over TCP without encryption" into the run's output."""
    import zmq
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    config = Config()
    if zmq.has("curve") and KernelManager.class_traits().get("transport_encryption") is not None:
        config.KernelManager.transport_encryption = "auto"
    return config


def _quiet_kernel_env() -> AbstractContextManager[None]:
    """Add :data:`_KERNEL_WARNING_FILTERS` to the ``PYTHONWARNINGS`` the kernel inherits (the
    user's filters kept), and put the old value back."""
    old = os.environ.get("PYTHONWARNINGS")
    return _environ({"PYTHONWARNINGS": ",".join(([old] if old else []) + list(_KERNEL_WARNING_FILTERS))})


#: Run first in every kernel of :func:`kernel_spec`: ``tqdm.auto`` is made the text bar, the class it
#: picks outside Jupyter. With ipywidgets installed it would pick the notebook widget, which renders
#: in JupyterLab but leaves widget views and their state (JSON) in an executed copy and nothing
#: readable in logs. Names are deleted: the notebook's namespace stays as the notebook makes it.
TEXT_PROGRESS_LINES = (
    "import tqdm.asyncio, tqdm.auto",
    "tqdm.auto.tqdm = tqdm.asyncio.tqdm",
    "del tqdm",
)


def kernel_spec() -> dict[str, Any]:
    """The ``kernel.json`` of the runner's kernel: ipykernel's own spec for the Python running
    pmetlab (``sys.executable``, not a kernelspec found on the machine, which may be another
    environment's), with progress bars as text (:data:`TEXT_PROGRESS_LINES`)."""
    from ipykernel.kernelspec import get_kernel_dict

    spec = get_kernel_dict(extra_arguments=[f"--IPKernelApp.exec_lines={line}" for line in TEXT_PROGRESS_LINES])
    if platform.python_implementation() == "CPython":  # as `ipykernel install` does: no debugger warning
        spec["argv"][1:1] = ["-Xfrozen_modules=off"]
    return spec


@contextmanager
def _runner_kernel(enabled: bool = True, name: str = "python3") -> Iterator[None]:
    """While open, the kernelspec ``name`` is :func:`kernel_spec`: written to a temporary folder put
    first on ``JUPYTER_PATH`` (Jupyter looks there before the user's and the environment's kernels)."""
    if not enabled:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="pmetlab-kernel-") as tmp:
        spec_dir = Path(tmp, "kernels", name)
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps(kernel_spec(), indent=1), encoding="utf-8")
        with _environ({"JUPYTER_PATH": os.pathsep.join(filter(None, (tmp, os.environ.get("JUPYTER_PATH"))))}):
            yield
