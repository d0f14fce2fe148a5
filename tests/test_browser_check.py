"""The browser check's pieces that need no browser (docs/lab_env.py, docs/browser_check.py): the
hermetic environment, the one-line reasons, and the shipped notebooks' kernel metadata."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def lab_env():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        yield importlib.import_module("lab_env")
    finally:
        sys.path.remove(str(REPO / "docs"))


@pytest.fixture(scope="module")
def browser_check(lab_env):
    sys.path.insert(0, str(REPO / "docs"))
    try:
        yield importlib.import_module("browser_check")
    finally:
        sys.path.remove(str(REPO / "docs"))


CALLER = {
    "HOME": "/home/someone",
    "PATH": "/usr/bin",
    "PMETLAB_DATA_DIR": "/data",
    "JUPYTER_PATH": "/home/someone/jupyter-extra",
    "JUPYTER_CONFIG_DIR": "/home/someone/.jupyter",
    "JUPYTER_PREFER_ENV_PATH": "0",
    "JUPYTERLAB_DIR": "/home/someone/lab-app",
    "JUPYTERLAB_SETTINGS_DIR": "/home/someone/.jupyter/lab/user-settings",
    "IPYTHONDIR": "/home/someone/.ipython",
    "PYTHONPATH": "/home/someone/lib",
    "PYTHONSTARTUP": "/home/someone/.pythonrc",
    "XDG_CONFIG_HOME": "/home/someone/.config",
}


def test_hermetic_env_puts_every_jupyter_path_under_the_temporary_folder(lab_env, tmp_path):
    env = lab_env.hermetic_env(tmp_path, CALLER)
    for name in (
        "HOME",
        "JUPYTER_CONFIG_DIR",
        "JUPYTER_DATA_DIR",
        "JUPYTER_RUNTIME_DIR",
        "JUPYTERLAB_SETTINGS_DIR",
        "JUPYTERLAB_WORKSPACES_DIR",
        "IPYTHONDIR",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_CACHE_HOME",
        "XDG_RUNTIME_DIR",
        "MPLCONFIGDIR",
    ):
        assert Path(env[name]).is_relative_to(tmp_path) and Path(env[name]).is_dir(), name
    for dropped in ("JUPYTER_PATH", "JUPYTER_PREFER_ENV_PATH", "JUPYTERLAB_DIR", "PYTHONPATH", "PYTHONSTARTUP"):
        assert dropped not in env, dropped
    assert not [v for k, v in env.items() if "/home/someone" in v and k != "PMETLAB_CACHE_DIR"]
    assert env["PMETLAB_CACHE_DIR"] == "/home/someone/.cache/pmetlab"  # pmetlab's own cache stays warm
    assert env["PMETLAB_DATA_DIR"] == "/data" and env["PATH"] == "/usr/bin" and env["PYTHONNOUSERSITE"] == "1"
    cold = lab_env.hermetic_env(tmp_path, CALLER, keep_cache=False)
    assert Path(cold["PMETLAB_CACHE_DIR"]).is_relative_to(tmp_path)


def test_jupyter_resolves_every_user_folder_under_the_temporary_folder(lab_env, tmp_path):
    """What jupyter_core itself makes of the environment: no folder of the caller's home searched."""
    fake_home = tmp_path / "caller-home"
    env = lab_env.hermetic_env(tmp_path / "check", {**CALLER, "HOME": str(fake_home)})
    script = (
        "import json; from jupyter_core import paths as p; "
        "print(json.dumps([p.jupyter_config_dir(), p.jupyter_data_dir(), p.jupyter_runtime_dir(), "
        "*p.jupyter_config_path(), *p.jupyter_path()]))"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    config, data, runtime, *searched = json.loads(out.stdout)
    for path in (config, data, runtime):
        assert Path(path).is_relative_to(tmp_path / "check"), path
    assert not [p for p in searched if Path(p).is_relative_to(fake_home)]


def test_the_check_server_sees_only_its_own_kernelspec_and_starts_it_without_asking(lab_env, tmp_path):
    pytest.importorskip("ipykernel")
    lab_env.write_lab_config(tmp_path)
    paths = lab_env.hermetic_paths(tmp_path)
    config = json.loads((paths["JUPYTER_CONFIG_DIR"] / "jupyter_server_config.json").read_text())
    assert config["KernelSpecManager"]["kernel_dirs"] == [str(lab_env.kernel_dir(tmp_path))]
    tracker = paths["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    assert json.loads(tracker.read_text())["autoStartDefaultKernel"] is True
    env = lab_env.hermetic_env(tmp_path, {**CALLER, "PATH": os.environ["PATH"]})
    spec_dir = lab_env.install_kernelspec(tmp_path, env)
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec_dir == lab_env.kernel_dir(tmp_path) / "python3"
    assert spec["argv"][0] == sys.executable and "ipykernel_launcher" in spec["argv"]
    assert (spec["display_name"], spec["language"]) == ("Python 3 (ipykernel)", "python")
    assert not (Path(env["HOME"]) / ".ipython").exists()  # IPython's folder is IPYTHONDIR, under tmp


def test_the_setting_exists_in_the_installed_jupyterlab(lab_env):
    schemas = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas"
    tracker = schemas / "@jupyterlab" / "notebook-extension" / "tracker.json"
    if not tracker.exists():
        pytest.skip("JupyterLab is not installed in this Python")
    properties = json.loads(tracker.read_text())["properties"]
    for plugin, values in lab_env.merge_settings(lab_env.LAB_OVERRIDES, lab_env.CHECK_SETTINGS).items():
        package, name = plugin.rsplit(":", 1)
        schema = json.loads((schemas / package / f"{name}.json").read_text())["properties"]
        assert set(values) <= set(schema), plugin
    assert properties["autoStartDefaultKernel"]["type"] == "boolean"


def test_write_overrides_merges_into_what_is_there(lab_env, tmp_path):
    path = tmp_path / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    assert lab_env.write_overrides(path) == lab_env.LAB_OVERRIDES
    path.write_text(json.dumps({"@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"}}))
    merged = lab_env.write_overrides(path)
    assert merged["@jupyterlab/apputils-extension:themes"] == {"theme": "JupyterLab Dark"}
    assert merged["@jupyterlab/notebook-extension:tracker"] == {"autoStartDefaultKernel": True}
    assert json.loads(path.read_text()) == merged


def test_the_makefile_installs_the_kernel_the_notebooks_name_and_ships_the_setting(lab_env):
    pytest.importorskip("ipykernel")
    makefile = (REPO / "Makefile").read_text()
    installed = re.findall(r"ipykernel install --sys-prefix --name (\S+)", makefile)
    assert installed == [lab_env.KERNEL_NAME]
    assert "LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json" in makefile
    assert "docs/lab_env.py --write-overrides $(LAB_OVERRIDES)" in makefile
    from ipykernel.kernelspec import get_kernel_dict

    spec = get_kernel_dict()
    assert (spec["display_name"], spec["language"]) == (lab_env.KERNEL_DISPLAY_NAME, lab_env.KERNEL_LANGUAGE)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_shipped_notebook_names_the_installed_kernel_and_its_language_info(lab_env, path):
    """Lab starts the kernel the metadata names and writes the kernel's language_info into it: a
    notebook that lacks either shows as modified (or asks for a kernel) right after opening."""
    pytest.importorskip("ipykernel")
    metadata = json.loads(path.read_text(encoding="utf-8"))["metadata"]
    fix = f".venv/bin/python docs/lab_env.py --notebook-metadata {path.relative_to(REPO)}"
    assert metadata.get("kernelspec") == {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }, fix
    info, kernel = dict(metadata.get("language_info", {})), lab_env.kernel_language_info()
    version = info.pop("version", None)
    kernel.pop("version")
    assert info == kernel, fix
    assert version and re.fullmatch(r"3\.\d+\.\d+", version), fix


def test_shipped_notebooks_record_one_python_version():
    infos = [json.loads(p.read_text())["metadata"].get("language_info", {}) for p in NOTEBOOKS]
    versions = {info["version"] for info in infos if "version" in info}  # (a missing one: the test above)
    assert len(versions) <= 1, versions


def test_dialog_failure_is_one_line_naming_title_text_and_buttons(lab_env):
    line = lab_env.dialog_failure(
        "Select Kernel\n",
        'Select kernel for: "08_explore.ipynb"\n  [Python 3 (ipykernel)] ',
        ["No Kernel", "Select", " "],
    )
    assert line == (
        'unexpected dialog "Select Kernel": Select kernel for: "08_explore.ipynb" [Python 3 (ipykernel)]'
        " (buttons: No Kernel, Select)"
    )
    long = lab_env.dialog_failure("Error Starting Kernel", "x\n" * 500)
    assert "\n" not in long and len(long) < 300 and long.endswith("...")
    assert lab_env.dialog_failure("Kernel Restarting", "") == 'unexpected dialog "Kernel Restarting": (no text)'


class _Page:
    """A stand-in for the Selenium driver: ``execute_script`` answers the dialog query."""

    def __init__(self, dialog):
        self.dialog = dialog

    def execute_script(self, script, *args):
        return self.dialog


def test_a_modal_dialog_fails_the_check_in_one_line(browser_check, lab_env):
    browser_check.fail_on_dialog(_Page(None))
    with pytest.raises(browser_check.CheckFailed) as failed:
        browser_check.fail_on_dialog(_Page(["Select Kernel", "Select kernel for: [Python 3 (ipykernel)]", ["Select"]]))
    assert str(failed.value) == lab_env.dialog_failure(
        "Select Kernel", "Select kernel for: [Python 3 (ipykernel)]", ["Select"]
    )


def test_an_unexpected_error_is_reported_by_its_first_line(browser_check):
    class SeleniumLike(Exception):
        msg = "element click intercepted: Element <li> is not clickable\n  (Session info: chrome=156)\n#0 0x55"

    assert browser_check._first_line(SeleniumLike()) == "element click intercepted: Element <li> is not clickable"


def test_opening_changes_name_what_lab_changed(lab_env):
    on_disk = {"kernelspec": {"name": "python3"}, "language_info": {"name": "python", "version": "3.11.7"}}
    assert lab_env.opening_changes(on_disk, on_disk) == []
    newer = {**on_disk, "language_info": {"name": "python", "version": "3.12.1"}}
    changes = lab_env.opening_changes(on_disk, newer)
    assert changes == ['language_info.version: "3.11.7" -> "3.12.1"'] and lab_env.only_version_differs(changes)
    bare = {"kernelspec": {"name": "python3"}}
    changes = lab_env.opening_changes(bare, newer)
    assert changes == ['language_info: "(missing)" -> {"name": "python", "version": "3.12.1"}']
    assert not lab_env.only_version_differs(changes)


def test_check_not_modified(browser_check, tmp_path):
    nb = tmp_path / "nb.ipynb"
    nb.write_text(json.dumps({"metadata": {"language_info": {"name": "python", "version": "3.11.7"}}}))
    browser_check.check_not_modified({"dirty": False, "metadata": {}}, nb)
    browser_check.check_not_modified(
        {"dirty": True, "metadata": {"language_info": {"name": "python", "version": "3.9.0"}}}, nb
    )
    with pytest.raises(browser_check.CheckFailed, match="marked it modified: language_info.name"):
        browser_check.check_not_modified({"dirty": True, "metadata": {"language_info": {"name": ""}}}, nb)
    with pytest.raises(browser_check.CheckFailed, match="its cells"):
        meta = json.loads(nb.read_text())["metadata"]
        browser_check.check_not_modified({"dirty": True, "metadata": meta}, nb)
