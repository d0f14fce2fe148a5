"""The notebooks: jupytext pairs in sync, their conventions and the public API they may use (fast),
run_notebooks' behaviour (a few seconds per kernel), and every notebook executed end to end in
smoke mode on the real SmolLM2 (slow)."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")

import pmetlab  # noqa: E402
from pmetlab.notebooks import (  # noqa: E402
    EXPECTED_OUTPUTS,
    NOTEBOOKS_DIR,
    PAIRED_FORMATS,
    NotebookPairError,
    check_pairs,
    list_notebooks,
    pair_differences,
    run_notebooks,
)

REPO = Path(__file__).resolve().parents[1]
NAMES = [
    "01_component_similarity",
    "02_edit_walkthrough",
    "03_reliability_specificity",
    "04_ablations",
    "05_locate_facts",
    "06_tuning",
    "07_editing_over_time",
    "08_explore",
    "09_why_pmet_trails",
]
REQUIRED_PARAMETERS = {"MODEL", "SEED", "SMOKE", "OUTPUT_DIR"}
OTHER_IMPORTS = ("pandas", "IPython.display")  # besides pmetlab's exports, all a notebook imports
MAX_CELL_LINES = 15


def _read(name: str):
    return nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _code(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def _api_violations(source: str) -> list[str]:
    """What a code cell takes from pmetlab other than its exports (``pmetlab.__all__``, each
    checked to exist with getattr), and imports of anything but pmetlab, pandas and IPython.display."""
    exported = {n for n in pmetlab.__all__ if getattr(pmetlab, n, None) is not None}
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "pmetlab" and a.asname is None:
                    continue
                if a.name.split(".")[0] == "pmetlab" or not a.name.startswith(OTHER_IMPORTS):
                    out.append(f"import {a.name}" + (f" as {a.asname}" if a.asname else ""))
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if module == "pmetlab":
                out += [f"from pmetlab import {a.name}" for a in node.names if a.name not in exported]
            elif module.split(".")[0] == "pmetlab" or not module.startswith(OTHER_IMPORTS):
                out.append(f"from {module} import {', '.join(a.name for a in node.names)}")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "pmetlab"
            and node.attr not in exported
        ):
            out.append(f"pmetlab.{node.attr}")
    return out


def _write_pair(d: Path, name: str = "01_pair") -> tuple[Path, Path]:
    """A small paired notebook written the way jupytext writes one: (ipynb, py)."""
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    params = new_code_cell('SMOKE = False\nOUTPUT_DIR = "out"')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(
        cells=[new_markdown_cell("# A pair\n\ntakes 1 min"), params, new_code_cell("x = 1\nx")],
        metadata={
            "jupytext": {"formats": PAIRED_FORMATS},
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        },
    )
    ipynb, py = d / f"{name}.ipynb", d / f"{name}.py"
    nbformat.write(nb, ipynb)
    jupytext.write(nb, py, fmt="py:percent")
    return ipynb, py


# --- the pairs (fast) --------------------------------------------------------------------------------


def test_the_numbered_notebooks_are_listed_and_have_expected_outputs():
    assert list_notebooks() == NAMES
    assert sorted(EXPECTED_OUTPUTS) == NAMES
    for name, files in EXPECTED_OUTPUTS.items():
        assert files and len(set(files)) == len(files), name
        assert all(f.startswith(name[:2] + "_") for f in files), f"{name}: outputs carry the notebook's number"


def test_the_folder_holds_the_pairs_only():
    files = sorted(p.name for p in NOTEBOOKS_DIR.iterdir() if p.is_file() and not p.name.startswith("."))
    assert files == sorted(f"{n}{ext}" for n in NAMES for ext in (".ipynb", ".py"))


@pytest.mark.parametrize("name", NAMES)
def test_pair_is_declared_and_in_sync(name):
    ipynb, py = NOTEBOOKS_DIR / f"{name}.ipynb", NOTEBOOKS_DIR / f"{name}.py"
    assert _read(name).metadata.get("jupytext", {}).get("formats") == PAIRED_FORMATS, (
        f"{ipynb.name} declares the pairing: jupytext --set-formats {PAIRED_FORMATS} {ipynb}"
    )
    text = jupytext.read(py)
    assert text.metadata.get("jupytext", {}).get("formats") == PAIRED_FORMATS, f"{py.name} declares the pairing"
    assert text.metadata["jupytext"]["text_representation"]["format_name"] == "percent"
    assert pair_differences(ipynb, py) == [], f"out of sync: jupytext --sync {ipynb}"


def test_check_pairs_accepts_the_repository():
    check_pairs()


def test_pair_differences_name_sources_types_and_tags(tmp_path):
    ipynb, py = _write_pair(tmp_path)
    assert pair_differences(ipynb, py) == []
    text = py.read_text()
    py.write_text(text.replace("x = 1", "x = 2"))
    assert pair_differences(ipynb, py) == ["cell 2: source differs"]
    py.write_text(text.replace('# %% tags=["parameters"]', "# %%"))
    assert pair_differences(ipynb, py) == ["cell 1: tags differ"]
    py.write_text(text.replace("# %%\nx = 1", "# %% [markdown]\n# x = 1"))
    assert pair_differences(ipynb, py)[0] == "cell 2: type differs"
    py.write_text(text + "\n# %%\ny = 2\n")
    assert pair_differences(ipynb, py) == ["4 cells in the .py, 3 in the .ipynb"]


def test_pair_differences_ignore_what_jupyter_and_jupytext_write_differently(tmp_path):
    ipynb, py = _write_pair(tmp_path)
    nb = nbformat.read(ipynb, as_version=4)
    nb.cells[2].source += "  \n"
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[2].execution_count = 3
    nbformat.write(nb, ipynb)
    assert pair_differences(ipynb, py) == []


def test_check_pairs_says_which_file_is_newer_and_how_to_sync(tmp_path):
    ipynb, py = _write_pair(tmp_path, "01_pair")
    _write_pair(tmp_path, "02_other")
    py.write_text(py.read_text().replace("x = 1", "x = 2"))
    os.utime(ipynb, ns=(1_000_000_000, 1_000_000_000))
    with pytest.raises(NotebookPairError) as err:
        check_pairs(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "02_other" not in msg
    assert f"{py} and 01_pair.ipynb disagree (cell 2: source differs)" in msg
    assert "the .py is newer" in msg and f"jupytext --sync {ipynb}" in msg
    check_pairs(tmp_path, ["02"])  # only the chosen notebooks are compared
    os.utime(py, ns=(1_000_000_000, 1_000_000_000))
    os.utime(ipynb, ns=(2_000_000_000, 2_000_000_000))
    with pytest.raises(NotebookPairError, match=r"the \.ipynb is newer"):
        check_pairs(tmp_path, ["01"])


def test_check_pairs_flags_a_source_without_its_notebook(tmp_path):
    _write_pair(tmp_path, "01_pair")
    (tmp_path / "02_new.py").write_text("# %%\nx = 1\n")
    (tmp_path / "_helper.py").write_text("x = 1\n")  # not a notebook: leading underscore
    with pytest.raises(
        NotebookPairError,
        match=r"02_new\.py has no \.ipynb: create it with `jupytext --set-formats "
        r"ipynb,py:percent .*02_new\.py`$",
    ):
        check_pairs(tmp_path)
    check_pairs(tmp_path, ["01"])


def test_run_notebooks_refuses_an_out_of_sync_pair_before_running(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    _, py = _write_pair(d)
    py.write_text(py.read_text().replace("x = 1", "x = 2"))
    out = tmp_path / "never"
    with pytest.raises(NotebookPairError, match=r"01_pair\.py and 01_pair\.ipynb disagree.*jupytext --sync"):
        run_notebooks(str(out), notebooks_dir=str(d))
    assert not out.exists(), "nothing runs and nothing is written"
    assert "x = 1" in nbformat.read(d / "01_pair.ipynb", as_version=4).cells[2].source, "nothing is rewritten"


# --- conventions (fast) ------------------------------------------------------------------------------


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
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), (
            f"only `NAME = value` lines in the parameters cell, got {ast.unparse(stmt)!r}"
        )
        value = stmt.value
        if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.USub):
            value = value.operand
        assert isinstance(value, ast.Constant) and isinstance(value.value, (bool, int, float, str, type(None))), (
            f"parameters are scalars: {ast.unparse(stmt)!r}"
        )
        names.append(stmt.targets[0].id)
    assert len(names) == len(set(names)), f"a parameter is assigned twice: {names}"
    assert REQUIRED_PARAMETERS <= set(names), f"missing {REQUIRED_PARAMETERS - set(names)}"
    assert all(n.isupper() for n in names), "parameters are UPPER_CASE"
    defaults = {s.targets[0].id: s.value.value for s in tree.body if isinstance(s.value, ast.Constant)}
    assert defaults["SMOKE"] is False and defaults["OUTPUT_DIR"] == "figures" and defaults["SEED"] == 0
    assert defaults["MODEL"] == "smollm2-135m"
    papermill = pytest.importorskip("papermill")
    assert list(papermill.inspect_notebook(str(NOTEBOOKS_DIR / f"{name}.ipynb"))) == names, (
        "papermill parses every parameter (a comment containing '=' hides one from it)"
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = _read(name)
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            assert c.get("outputs") == [] and c.get("execution_count") is None, (
                f"cell {i} carries outputs or an execution count: jupyter nbconvert --clear-output --inplace"
            )


@pytest.mark.parametrize("name", NAMES)
def test_cells_are_short(name):
    for i, c in enumerate(_read(name).cells):
        n = len(c.source.splitlines())
        assert c.cell_type != "code" or n <= MAX_CELL_LINES, f"cell {i} has {n} lines (at most {MAX_CELL_LINES})"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_uses_only_what_pmetlab_exports(name):
    for i, c in enumerate(_read(name).cells):
        if c.cell_type != "code":
            continue
        lines = c.source.splitlines()
        assert not any(l.lstrip().startswith(("!", "%")) for l in lines), f"cell {i}: no shell commands or magics"
        assert "sys.path" not in c.source and "pip install" not in c.source, f"cell {i}"
        bad = _api_violations(c.source)
        assert not bad, (
            f"cell {i} reaches past pmetlab's exports: {bad} (use `import pmetlab` / "
            f"`from pmetlab import NAME`; export what is missing in pmetlab/__init__.py)"
        )


def test_every_export_exists():
    missing = [n for n in pmetlab.__all__ if getattr(pmetlab, n, None) is None]
    assert missing == [] and len(set(pmetlab.__all__)) == len(pmetlab.__all__)


def test_the_api_check_catches_what_reaches_past_the_exports():
    ok = (
        "import pandas as pd\nfrom IPython.display import Markdown\nimport pmetlab\n"
        "from pmetlab import save_figure, run_sweep as rs\nm, t = pmetlab.load_model('x')\npmetlab.EditRequest.x"
    )
    assert _api_violations(ok) == []
    bad = {
        "from pmetlab.plots import save_figure": "from pmetlab.plots import save_figure",
        "from pmetlab.runs import resolve_hparams": "from pmetlab.runs import resolve_hparams",
        "import pmetlab.analysis": "import pmetlab.analysis",
        "import pmetlab as pm": "import pmetlab as pm",
        "from pmetlab import *": "from pmetlab import *",
        "from pmetlab import with_run_columns": "from pmetlab import with_run_columns",
        "from pmetlab import datasets": "from pmetlab import datasets",
        "pmetlab.analysis.component_similarity(m)": "pmetlab.analysis",
        "f = pmetlab.not_a_name": "pmetlab.not_a_name",
        "from . import x": "from . import x",
        "import os": "import os",
        "from pathlib import Path": "from pathlib import Path",
    }
    for source, expected in bad.items():
        assert _api_violations(source) == [expected], source


@pytest.mark.parametrize("name", NAMES)
def test_files_written_match_expected_outputs(name):
    """Every figure/table the notebook writes is listed in EXPECTED_OUTPUTS, and vice versa."""
    src = _code(_read(name))
    written = set()
    for stem in re.findall(r"save_figure\([^,]+,\s*OUTPUT_DIR,\s*\"([^\"]+)\"", src):
        written |= {f"{stem}.png", f"{stem}.pdf", f"{stem}.csv"}
    written |= set(re.findall(r"\{OUTPUT_DIR\}/([^\"]+\.(?:csv|csv\.gz|md))\"", src))
    written |= set(re.findall(r"save_(?:table|text)\([^,]+,\s*OUTPUT_DIR,\s*\"([^\"]+)\"", src))
    for stem in re.findall(r"\.save\(OUTPUT_DIR,\s*\"([^\"]+)\"\)", src):  # TuningResult.save: table + choice
        written |= {f"{stem}.csv", f"{stem}.json"}
    assert written == set(EXPECTED_OUTPUTS[name])


@pytest.mark.parametrize("name", NAMES)
def test_every_file_goes_through_a_helper_that_creates_the_folder(name):
    """Plain papermill into a new folder must work: no table or text written by hand into OUTPUT_DIR
    (``to_csv``/``open`` neither create the folder nor write atomically); pmetlab's savers do both."""
    src = _code(_read(name))
    by_hand = re.findall(r"(?:to_csv|to_parquet|open|write_text)\(f?\"\{OUTPUT_DIR\}[^\n]*", src)
    assert by_hand == [], f"{name} writes by hand: {by_hand}; use pmetlab.save_table / save_text / save_figure"


def test_the_savers_create_the_folder_and_refuse_paths(tmp_path):
    import pandas as pd

    out = tmp_path / "new" / "figures"
    p = pmetlab.save_table(pd.DataFrame({"a": [1, 2]}), out, "t.csv")
    assert p.read_text() == "a\n1\n2\n"
    assert pd.read_csv(pmetlab.save_table(pd.DataFrame({"a": [3]}), out, "t.csv.gz"))["a"].tolist() == [3]
    assert pmetlab.save_text("# reading", out, "r.md").read_text() == "# reading\n"
    for bad in ("../t.csv", "t.xlsx", "sub/t.csv"):
        with pytest.raises(ValueError, match="plain file name"):
            pmetlab.save_table(pd.DataFrame(), out, bad)
    assert sorted(x.name for x in out.iterdir()) == ["r.md", "t.csv", "t.csv.gz"]  # no temporary left


# --- run_notebooks (a kernel per notebook, no model) ------------------------------------------------


def _write_nb(path: Path, params: str, *cells: str) -> None:
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    p = new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb = new_notebook(
        cells=[new_markdown_cell("# test"), p, *[new_code_cell(c) for c in cells]],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(nb, path)


@pytest.fixture
def tiny_notebooks(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    params = 'SMOKE = False\nOUTPUT_DIR = "out"\nN = 1'
    _write_nb(d / "01_bad.ipynb", params, "x = 1", 'raise ValueError("boom: the second line")')
    _write_nb(
        d / "02_good.ipynb",
        params,
        "import json, os, pathlib\n"
        'pathlib.Path(OUTPUT_DIR, "good.json").write_text(json.dumps(\n'
        '    {"N": N, "SMOKE": SMOKE, "threads": os.environ.get("OMP_NUM_THREADS")}))',
    )
    _write_nb(d / "_helper.ipynb", params)  # not listed: leading underscore
    return d


@pytest.mark.notebooks
def test_run_notebooks_reports_a_failure_and_runs_the_rest(tiny_notebooks, tmp_path, caplog):
    out = tmp_path / "out"
    assert list_notebooks(tiny_notebooks) == ["01_bad", "02_good"]
    threads_before = os.environ.get("OMP_NUM_THREADS")
    with caplog.at_level("ERROR", logger="pmetlab.notebooks"):
        res = run_notebooks(
            str(out), parameters={"N": "3"}, smoke=True, notebooks_dir=str(tiny_notebooks), timeout=120, threads=1
        )
    assert [r["name"] for r in res] == ["01_bad", "02_good"]
    bad, good = res
    assert bad["status"] == "failed" and bad["error"] == "ValueError: boom: the second line"
    assert bad["cell"] is not None and bad["outputs"] == [] and bad["missing"] == []
    assert (out / "01_bad.ipynb").is_file(), "the executed copy shows where it failed"
    assert "01_bad" in caplog.text and "boom" in caplog.text
    assert good["status"] == "ok" and good["error"] is None and good["outputs"] == ["good.json"]
    assert json.loads((out / "good.json").read_text()) == {"N": 3, "SMOKE": True, "threads": "1"}, (
        "parameters typed and passed, the thread count set for the kernel"
    )
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report["notebooks"]] == ["failed", "ok"] and report["smoke"] is True
    assert all(r["seconds"] > 0 for r in res)
    assert os.environ.get("OMP_NUM_THREADS") == threads_before, "the caller's environment is restored"


@pytest.mark.notebooks
def test_report_keeps_the_notebooks_an_earlier_run_wrote_into_the_same_folder(tiny_notebooks, tmp_path):
    out = tmp_path / "out"
    run_notebooks(str(out), names=["2"], parameters={"N": "5"}, notebooks_dir=str(tiny_notebooks), timeout=120)
    first = json.loads((out / "report.json").read_text())
    run_notebooks(str(out), names=["1"], notebooks_dir=str(tiny_notebooks), timeout=120)
    report = json.loads((out / "report.json").read_text())
    assert [nb["name"] for nb in report["notebooks"]] == ["01_bad"]
    (earlier,) = report["earlier"]
    assert earlier["name"] == "02_good" and earlier["status"] == "ok"
    assert earlier["run_started"] == first["started"] and earlier["run_parameters"]["N"] == "5"
    run_notebooks(str(out), names=["2"], notebooks_dir=str(tiny_notebooks), timeout=120)
    report = json.loads((out / "report.json").read_text())
    assert [nb["name"] for nb in report["earlier"]] == ["01_bad"], "a rerun replaces its own entry"
    (out / "report.json").write_text("{not json")
    run_notebooks(str(out), names=["2"], notebooks_dir=str(tiny_notebooks), timeout=120)
    assert json.loads((out / "report.json").read_text())["earlier"] == []


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
@pytest.mark.skipif(
    _shared_data() is None, reason="the shared data (known facts, CounterFact, corpus) is absent; set PMETLAB_DATA_DIR"
)
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


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.skipif(
    _shared_data() is None, reason="the shared data (known facts, CounterFact, corpus) is absent; set PMETLAB_DATA_DIR"
)
def test_plain_papermill_writes_into_a_new_folder(tmp_path, monkeypatch):
    """As the README runs a notebook: plain papermill, OUTPUT_DIR a folder nobody created (every
    notebook's writes go through savers that create it: test_every_file_goes_through_a_helper...)."""
    import papermill

    from pmetlab.notebooks.runner import _runner_kernel

    monkeypatch.setenv("PMETLAB_DATA_DIR", str(_shared_data()))
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    new = tmp_path / "new" / "figures"
    name = "08_explore"  # quick, and its only file is a table (no figure saved first)
    with _runner_kernel():
        papermill.execute_notebook(
            str(REPO / "notebooks" / f"{name}.ipynb"),
            str(tmp_path / "out.ipynb"),
            parameters={"SMOKE": True, "OUTPUT_DIR": str(new)},
            progress_bar=False,
            execution_timeout=600,
        )
    assert sorted(p.name for p in new.iterdir()) == sorted(EXPECTED_OUTPUTS[name])
