"""pmetlab installed from a wheel: the notebooks ship inside it (both files of each jupytext pair),
are found, listed and copied out from the installed copy, and run there in a fresh environment, in
the kernel of the Python running pmetlab. Also how progress bars render: widgets in a plain
Jupyter kernel (JupyterLab), text in the runner's kernels.

The wheel is built offline from a copy of the sources (``pip wheel --no-build-isolation``: the
venv's setuptools), so the checkout gets no ``build/`` folder. The fresh environment is a
``venv --without-pip`` that sees this venv's dependencies through a ``.pth`` path line (which does
not run this venv's own ``.pth`` files, so the editable pmetlab stays out of it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from pmetlab.cli import main
from pmetlab.notebooks import (
    EXPECTED_OUTPUTS,
    NOTEBOOKS_DIR,
    copy_notebooks,
    find_notebooks_dir,
    kernel_spec,
    list_notebooks,
    notebook_titles,
)
from pmetlab.notebooks.runner import TEXT_PROGRESS_LINES

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "notebooks", "pmetlab")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _shared_data() -> Path | None:
    for cand in (os.environ.get("PMETLAB_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "counterfact").is_dir():
            return Path(cand)
    return None


def _pairs(d: Path) -> list[str]:
    """File names of the notebook pairs in ``d`` (what a wheel ships and --copy writes)."""
    return sorted(f"{n}{ext}" for n in list_notebooks(d) for ext in (".ipynb", ".py") if (d / f"{n}{ext}").is_file())


def _run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``cmd`` with this environment minus PYTHONPATH (the checkout must not leak in), plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        cmd, cwd=cwd, env={**base, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


# --- finding and copying the notebooks (fast) -----------------------------------------------------


def test_find_notebooks_dir_prefers_the_installed_copy_else_the_checkout(tmp_path, monkeypatch):
    for where in ("site", "checkout"):
        (tmp_path / where / f"fake_{where}").mkdir(parents=True)
        (tmp_path / where / f"fake_{where}" / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path / where))
    (tmp_path / "site" / "fake_site" / "_notebooks").mkdir()
    assert find_notebooks_dir("fake_site") == tmp_path / "site" / "fake_site" / "_notebooks"
    assert find_notebooks_dir("fake_checkout") == tmp_path / "checkout" / "notebooks", "next to the package"
    assert find_notebooks_dir() == NOTEBOOKS_DIR == REPO / "notebooks", "this editable install reads the checkout"


def test_copy_notebooks_writes_the_pairs_and_refuses_to_overwrite(tmp_path):
    dest = tmp_path / "mine" / "nbs"
    written = copy_notebooks(dest)
    assert [p.name for p in written] == _pairs(NOTEBOOKS_DIR) and all(p.parent == dest for p in written)
    for p in written:
        assert p.read_bytes() == (NOTEBOOKS_DIR / p.name).read_bytes()
        assert p.stat().st_mtime_ns == written[0].stat().st_mtime_ns, "a pair opens in sync in JupyterLab"
    edited = dest / written[0].name
    edited.write_text("my edits")
    with pytest.raises(FileExistsError, match=r"already exist in .*--force") as err:
        copy_notebooks(dest, names=["02", "1"])
    assert "01_component_similarity.ipynb" in str(err.value) and "\n" not in str(err.value)
    assert edited.read_text() == "my edits", "nothing is overwritten without overwrite=True"
    assert [p.name for p in copy_notebooks(tmp_path / "two", names=["02"])] == [
        "02_edit_walkthrough.ipynb",
        "02_edit_walkthrough.py",
    ]
    copy_notebooks(dest, overwrite=True)
    assert edited.read_bytes() == (NOTEBOOKS_DIR / edited.name).read_bytes()


def test_copy_notebooks_refuses_a_file_and_its_own_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    for dest in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(NotADirectoryError, match=r"'.*f' is a file, not a directory; give a folder"):
            copy_notebooks(dest)
    with pytest.raises(ValueError, match="the folder the notebooks are copied from"):
        copy_notebooks(NOTEBOOKS_DIR, overwrite=True)


def test_notebook_titles_are_the_first_lines():
    titles = notebook_titles()
    assert list(titles) == list_notebooks()
    assert titles["02_edit_walkthrough"].startswith("02 ") and not titles["02_edit_walkthrough"].startswith("#")
    assert list(notebook_titles(["5"])) == ["05_locate_facts"]


def test_cli_lists_and_copies_without_running(tmp_path, capsys):
    assert main(["notebooks", "--list", "--only", "02"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("02_edit_walkthrough  02 ") and "1 notebooks in" in out and "--copy DIR" in out
    dest = tmp_path / "nbs"
    assert main(["notebooks", "--copy", str(dest), "--only", "02"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {dest / '02_edit_walkthrough.py'}" in out and f"jupyter lab {dest}" in out
    assert sorted(p.name for p in dest.iterdir()) == ["02_edit_walkthrough.ipynb", "02_edit_walkthrough.py"]
    assert main(["notebooks", "--copy", str(dest), "--only", "02"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(["notebooks", "--copy", str(dest), "--only", "02", "--force"]) == 0
    (tmp_path / "file").write_text("x")
    assert main(["notebooks", "--copy", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["notebooks", "--copy", str(dest), "--smoke"]) == 2
    assert "run no notebook: leave out --smoke" in capsys.readouterr().err
    assert main(["notebooks", "--force"]) == 2


# --- the wheel and a fresh environment with it installed ------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the sources (the checkout gets no build/ folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    _run([*pip, "-w", str(tmp / "dist"), "."], cwd=src)
    (whl,) = (tmp / "dist").glob("pmetlab-*.whl")
    return whl


def test_the_wheel_ships_the_notebook_pairs_and_the_presets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("pmetlab/_notebooks/"))
    assert shipped == _pairs(NOTEBOOKS_DIR) and len(shipped) >= 2 * len(EXPECTED_OUTPUTS)
    for n in ("pmetlab/presets/pmet.json", "pmetlab/presets/memit.json", "pmetlab/notebooks/runner.py"):
        assert n in names
    assert not any(n.startswith(("notebooks/", "tests/")) for n in names), "only the package is installed"


def test_the_sdist_carries_the_notebooks_into_its_wheel(wheel, tmp_path):
    """pip install from an sdist builds the wheel from it: the sdist must hold the notebooks."""
    src = wheel.parent.parent / "src"
    hook = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    name = _run([sys.executable, "-c", hook, str(tmp_path / "sdist")], cwd=src).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "sdist" / name) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (root,) = (tmp_path / "unpacked").iterdir()
    assert _pairs(root / "notebooks") == _pairs(NOTEBOOKS_DIR)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    _run([*pip, "-w", str(tmp_path / "dist"), "."], cwd=root)
    (whl,) = (tmp_path / "dist").glob("pmetlab-*.whl")
    assert sum(n.startswith("pmetlab/_notebooks/") for n in zipfile.ZipFile(whl).namelist()) == len(
        _pairs(NOTEBOOKS_DIR)
    )


@pytest.fixture(scope="module")
def fresh_python(wheel, tmp_path_factory) -> Path:
    """The python of a fresh venv with the wheel installed (not editable) and this venv's
    dependencies visible through a ``.pth`` path line."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=venv).stdout.strip()
    )
    (site / "_pmetlab_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        cwd=venv,
    )
    return python


def test_the_fresh_environment_runs_the_wheel_and_finds_its_notebooks(fresh_python, tmp_path):
    code = "import json, pmetlab, pmetlab.notebooks as n; print(json.dumps([pmetlab.__file__, str(n.NOTEBOOKS_DIR)]))"
    pkg, nbs = json.loads(_run([str(fresh_python), "-c", code], cwd=tmp_path).stdout)
    site = fresh_python.parent.parent / "lib"
    assert Path(pkg).is_relative_to(site) and not Path(pkg).is_relative_to(REPO), f"pmetlab imported from {pkg}"
    assert Path(nbs) == Path(pkg).parent / "_notebooks"
    assert _pairs(Path(nbs)) == _pairs(NOTEBOOKS_DIR)


def test_the_installed_cli_lists_and_copies_its_notebooks(fresh_python, tmp_path):
    listed = _run([str(fresh_python), "-m", "pmetlab", "notebooks", "--list"], cwd=tmp_path).stdout
    assert f"{len(list_notebooks())} notebooks in {fresh_python.parent.parent / 'lib'}" in listed
    _run([str(fresh_python), "-m", "pmetlab", "notebooks", "--copy", "mine"], cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == _pairs(NOTEBOOKS_DIR)
    from pmetlab.notebooks import check_pairs

    check_pairs(tmp_path / "mine")  # the copies are pairs in sync, ready for JupyterLab + jupytext


def _tiny_notebook(path: Path) -> None:
    """A notebook that records which Python ran it, which pmetlab it imported, and its bar class."""
    nbformat = pytest.importorskip("nbformat")
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    params = new_code_cell('SMOKE = False\nOUTPUT_DIR = "out"')
    params.metadata["tags"] = ["parameters"]
    code = (
        "import json, sys, pathlib, pmetlab, tqdm.auto\n"
        "for _ in tqdm.auto.tqdm(range(3), desc='useful bar'):\n    pass\n"
        "bar = tqdm.auto.tqdm\n"
        'pathlib.Path(OUTPUT_DIR, "kernel.json").write_text(json.dumps({"python": sys.executable,\n'
        '    "pmetlab": pmetlab.__file__, "bar": f"{bar.__module__}.{bar.__name__}"}))'
    )
    nb = new_notebook(
        cells=[new_markdown_cell("# which kernel"), params, new_code_cell(code)],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(nb, path)


@pytest.mark.notebooks
def test_the_runner_kernel_is_the_python_running_pmetlab_with_text_bars(fresh_python, tmp_path):
    pytest.importorskip("papermill")
    pytest.importorskip("ipywidgets")
    nbformat = pytest.importorskip("nbformat")
    (tmp_path / "nbs").mkdir()
    _tiny_notebook(tmp_path / "nbs" / "01_which.ipynb")
    decoy = tmp_path / "jupyter" / "kernels" / "python3"  # a python3 kernelspec of another environment
    decoy.mkdir(parents=True)
    (decoy / "kernel.json").write_text(json.dumps({**kernel_spec(), "argv": ["/nonexistent/python", "-m", "x"]}))
    code = "import sys; from pmetlab.notebooks import run_notebooks as r; print(r('out', notebooks_dir='nbs')[0])"
    _run([str(fresh_python), "-c", code], cwd=tmp_path, JUPYTER_PATH=str(tmp_path / "jupyter"))
    ran = json.loads((tmp_path / "out" / "kernel.json").read_text())
    assert ran["python"] == str(fresh_python), "the kernel runs the Python that runs pmetlab, not a kernelspec's"
    assert Path(ran["pmetlab"]).is_relative_to(fresh_python.parent.parent), ran
    assert ran["bar"] == "tqdm.asyncio.tqdm_asyncio", "text bars (tqdm.auto's console choice), not widgets"
    executed = nbformat.read(tmp_path / "out" / "01_which.ipynb", as_version=4)
    outputs = executed.cells[-1].outputs
    assert "widgets" not in executed.metadata and not any(WIDGET_VIEW in o.get("data", {}) for o in outputs)
    assert "useful bar" in "".join(o.get("text", "") for o in outputs) and "IProgress" not in json.dumps(outputs)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kernel"] == f"python3: {fresh_python}"


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.skipif(
    _shared_data() is None, reason="the shared data (CounterFact, corpus) is absent; set PMETLAB_DATA_DIR"
)
def test_a_notebook_runs_in_smoke_mode_from_the_installed_wheel(fresh_python, tmp_path):
    name = "02_edit_walkthrough"
    cmd = [str(fresh_python), "-m", "pmetlab", "notebooks", "--only", name, "--smoke", "--out", "out"]
    res = _run(cmd, cwd=tmp_path, timeout=1200, PMETLAB_DATA_DIR=str(_shared_data()), HF_HUB_OFFLINE="1")
    assert "1/1 notebooks ok" in res.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (nb,) = report["notebooks"]
    assert nb["status"] == "ok" and nb["missing"] == [] and report["kernel"] == f"python3: {fresh_python}"
    assert Path(report["notebooks_dir"]).is_relative_to(fresh_python.parent.parent), "the installed copy ran"
    for f in EXPECTED_OUTPUTS[name]:
        assert (tmp_path / "out" / f).stat().st_size > 0, f
    executed = (tmp_path / "out" / f"{name}.ipynb").read_text()
    assert WIDGET_VIEW not in executed and "widget-state" not in executed


# --- progress bars: widgets in JupyterLab, text in the runner's kernels ----------------------------


def test_the_runner_kernel_spec_is_this_python_with_text_bars():
    spec = kernel_spec()
    assert spec["argv"][0] == sys.executable and "ipykernel_launcher" in spec["argv"]
    assert [a for a in spec["argv"] if a.startswith("--IPKernelApp.exec_lines=")] == [
        f"--IPKernelApp.exec_lines={line}" for line in TEXT_PROGRESS_LINES
    ]


def _bar_class_in_kernel(kernel_name: str) -> str:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=120)
    try:
        said: list[str] = []
        code = "import tqdm.auto; print(*(c.__module__ for c in tqdm.auto.tqdm.__mro__[:2]))"
        hook = lambda msg: said.append(msg["content"].get("text", ""))
        reply = kc.execute_interactive(code, output_hook=hook, timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(said).strip()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.notebooks
def test_bars_are_widgets_in_a_plain_kernel_and_text_in_the_runner_kernel(tmp_path, monkeypatch):
    pytest.importorskip("ipywidgets")
    from ipykernel.kernelspec import get_kernel_dict

    for name, spec in (("plain", get_kernel_dict()), ("runner", kernel_spec())):
        (tmp_path / "kernels" / name).mkdir(parents=True)
        (tmp_path / "kernels" / name / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    assert _bar_class_in_kernel("plain") == "tqdm.auto tqdm.notebook", "JupyterLab (ipywidgets): widget bars"
    assert _bar_class_in_kernel("runner") == "tqdm.asyncio tqdm.std", "runner kernels: text bars"
