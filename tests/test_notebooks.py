"""The notebooks: their conventions (fast), run_notebooks' behaviour (a few seconds per kernel),
and every notebook executed end to end in smoke mode on the real SmolLM2 (slow)."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

from pmetlab.notebooks import EXPECTED_OUTPUTS, NOTEBOOKS_DIR, list_notebooks, run_notebooks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAMES = ["01_component_similarity", "02_edit_walkthrough", "03_reliability_specificity", "04_ablations"]
REQUIRED_PARAMETERS = {"MODEL", "SEED", "SMOKE", "OUTPUT_DIR"}
ALLOWED_IMPORTS = ("pmetlab", "pandas", "IPython.display")
MAX_CELL_LINES = 15


def _read(name: str):
    return nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _code(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


# --- conventions (fast) ------------------------------------------------------------------------------

def test_the_four_notebooks_are_listed_and_have_expected_outputs():
    assert list_notebooks() == NAMES
    assert sorted(EXPECTED_OUTPUTS) == NAMES
    for name, files in EXPECTED_OUTPUTS.items():
        assert files and len(set(files)) == len(files), name
        assert all(f.startswith(name[:2] + "_") for f in files), f"{name}: outputs carry the notebook's number"


@pytest.mark.parametrize("name", NAMES)
def test_first_cell_is_markdown_saying_what_and_how_long(name):
    nb = _read(name)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    text = first.source
    assert text.startswith("# "), "the first cell starts with a title"
    assert "Reproduces" in text and "paper" in text.lower(), "it says which paper claim it reproduces"
    assert re.search(r"\bmin\b", text) and "SMOKE" in text, "it says how long it takes, with and without SMOKE"


@pytest.mark.parametrize("name", NAMES)
def test_one_parameters_cell_second_with_scalars_only(name):
    nb = _read(name)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in _tags(c)]
    assert tagged == [1], f"exactly one cell tagged 'parameters', the second; found at {tagged}"
    cell = nb.cells[1]
    assert cell.cell_type == "code"
    tree = ast.parse(cell.source)
    names = []
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), \
            f"only `NAME = value` lines in the parameters cell, got {ast.unparse(stmt)!r}"
        value = stmt.value
        if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.USub):
            value = value.operand
        assert isinstance(value, ast.Constant) and isinstance(value.value, (bool, int, float, str, type(None))), \
            f"parameters are scalars: {ast.unparse(stmt)!r}"
        names.append(stmt.targets[0].id)
    assert len(names) == len(set(names)), f"a parameter is assigned twice: {names}"
    assert REQUIRED_PARAMETERS <= set(names), f"missing {REQUIRED_PARAMETERS - set(names)}"
    assert all(n.isupper() for n in names), "parameters are UPPER_CASE"
    defaults = {s.targets[0].id: s.value.value for s in tree.body if isinstance(s.value, ast.Constant)}
    assert defaults["SMOKE"] is False and defaults["OUTPUT_DIR"] == "figures" and defaults["SEED"] == 0
    assert defaults["MODEL"] == "smollm2-135m"
    papermill = pytest.importorskip("papermill")
    assert list(papermill.inspect_notebook(str(NOTEBOOKS_DIR / f"{name}.ipynb"))) == names, \
        "papermill parses every parameter (a comment containing '=' hides one from it)"


@pytest.mark.parametrize("name", NAMES)
def test_cells_are_short_and_committed_without_outputs(name):
    nb = _read(name)
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        assert c.get("outputs") == [] and c.get("execution_count") is None, f"cell {i} has outputs"
        n = len(c.source.splitlines())
        assert n <= MAX_CELL_LINES, f"cell {i} has {n} lines (at most {MAX_CELL_LINES})"


@pytest.mark.parametrize("name", NAMES)
def test_only_the_public_api_is_imported(name):
    nb = _read(name)
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        lines = c.source.splitlines()
        assert not any(l.lstrip().startswith(("!", "%")) for l in lines), f"cell {i}: no shell commands or magics"
        assert "sys.path" not in c.source and "pip install" not in c.source, f"cell {i}"
        for node in ast.walk(ast.parse(c.source)):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                assert m.startswith(ALLOWED_IMPORTS) and not m.split(".")[-1].startswith("_"), \
                    f"cell {i} imports {m!r}; notebooks import only pmetlab (plus pandas, IPython.display)"


@pytest.mark.parametrize("name", NAMES)
def test_files_written_match_expected_outputs(name):
    """Every figure/table the notebook writes is listed in EXPECTED_OUTPUTS, and vice versa."""
    src = _code(_read(name))
    written = set()
    for stem in re.findall(r"save_figure\([^,]+,\s*OUTPUT_DIR,\s*\"([^\"]+)\"", src):
        written |= {f"{stem}.png", f"{stem}.pdf", f"{stem}.csv"}
    written |= set(re.findall(r"\{OUTPUT_DIR\}/([^\"]+\.(?:csv|md))\"", src))
    assert written == set(EXPECTED_OUTPUTS[name])


def test_notebooks_match_their_generator():
    res = subprocess.run([sys.executable, str(NOTEBOOKS_DIR / "_build.py"), "--check"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# --- run_notebooks (a kernel per notebook, no model) ------------------------------------------------

def _write_nb(path: Path, params: str, *cells: str) -> None:
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    p = new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell("# test"), p, *[new_code_cell(c) for c in cells]],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)


@pytest.fixture
def tiny_notebooks(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    params = 'SMOKE = False\nOUTPUT_DIR = "out"\nN = 1'
    _write_nb(d / "01_bad.ipynb", params, "x = 1", 'raise ValueError("boom: the second line")')
    _write_nb(d / "02_good.ipynb", params,
              'import json, os, pathlib\n'
              'pathlib.Path(OUTPUT_DIR, "good.json").write_text(json.dumps(\n'
              '    {"N": N, "SMOKE": SMOKE, "threads": os.environ.get("OMP_NUM_THREADS")}))')
    _write_nb(d / "_helper.ipynb", params)  # not listed: leading underscore
    return d


@pytest.mark.notebooks
def test_run_notebooks_reports_a_failure_and_runs_the_rest(tiny_notebooks, tmp_path, caplog):
    out = tmp_path / "out"
    assert list_notebooks(tiny_notebooks) == ["01_bad", "02_good"]
    threads_before = os.environ.get("OMP_NUM_THREADS")
    with caplog.at_level("ERROR", logger="pmetlab.notebooks"):
        res = run_notebooks(str(out), parameters={"N": "3"}, smoke=True, notebooks_dir=str(tiny_notebooks),
                            timeout=120, threads=1)
    assert [r["name"] for r in res] == ["01_bad", "02_good"]
    bad, good = res
    assert bad["status"] == "failed" and bad["error"] == "ValueError: boom: the second line"
    assert bad["cell"] is not None and bad["outputs"] == [] and bad["missing"] == []
    assert (out / "01_bad.ipynb").is_file(), "the executed copy shows where it failed"
    assert "01_bad" in caplog.text and "boom" in caplog.text
    assert good["status"] == "ok" and good["error"] is None and good["outputs"] == ["good.json"]
    assert json.loads((out / "good.json").read_text()) == {"N": 3, "SMOKE": True, "threads": "1"}, \
        "parameters typed and passed, the thread count set for the kernel"
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report["notebooks"]] == ["failed", "ok"] and report["smoke"] is True
    assert all(r["seconds"] > 0 for r in res)
    assert os.environ.get("OMP_NUM_THREADS") == threads_before, "the caller's environment is restored"


@pytest.mark.notebooks
def test_run_notebooks_marks_missing_expected_outputs(tiny_notebooks, tmp_path, monkeypatch):
    import pmetlab.notebooks as nbmod

    monkeypatch.setitem(nbmod.EXPECTED_OUTPUTS, "02_good", ["good.json", "figure.png"])
    (res,) = run_notebooks(str(tmp_path / "o"), names=["2"], notebooks_dir=str(tiny_notebooks), timeout=120)
    assert res["name"] == "02_good" and res["status"] == "failed"
    assert res["missing"] == ["figure.png"] and "figure.png" in res["error"]


def test_run_notebooks_rejects_bad_names_and_parameters_before_running(tiny_notebooks, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="available: 01_bad, 02_good"):
        run_notebooks(str(out), names=["03"], notebooks_dir=str(tiny_notebooks))
    with pytest.raises(ValueError, match=r"\['M'\].*declared by none"):
        run_notebooks(str(out), parameters={"M": 1}, notebooks_dir=str(tiny_notebooks))
    with pytest.raises(ValueError, match="expected type int"):
        run_notebooks(str(out), parameters={"N": "three"}, notebooks_dir=str(tiny_notebooks))
    assert not (out / "report.json").exists()


# --- every notebook end to end on the real model, smoke sizes (slow) ---------------------------------

def _shared_data() -> Path | None:
    for cand in (os.environ.get("PMETLAB_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "counterfact").is_dir():
            return Path(cand)
    return None


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.skipif(_shared_data() is None, reason="the shared data (known facts, CounterFact, corpus) is absent; "
                                                   "set PMETLAB_DATA_DIR")
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_smoke_mode(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PMETLAB_DATA_DIR", str(_shared_data()))  # inherited by the kernel
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # one thread, as conftest sets for the suite: on a busy 2-core machine two spin-waiting threads
    # per kernel make the model several times slower
    threads = int(os.environ.get("PMETLAB_TEST_THREADS", "1"))
    (res,) = run_notebooks(str(tmp_path), names=[name], smoke=True, timeout=600, threads=threads)
    assert res["status"] == "ok", f"{name} failed in cell {res['cell']}: {res['error']} (see {res['notebook']})"
    for f in EXPECTED_OUTPUTS[name]:
        p = tmp_path / f
        assert p.is_file() and p.stat().st_size > 0, f"{name} did not write {f}"
    executed = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in _tags(c)]
    assert injected and "SMOKE = True" in injected[0].source
