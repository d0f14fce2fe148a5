"""The JupyterLab environment pieces of ``make browser-check`` and ``make venv`` (stdlib only at import).

- :func:`hermetic_env`: the environment JupyterLab, its kernel and the browser run in for the check —
  every Jupyter, IPython, XDG and browser path under one temporary folder, nothing taken from or
  written to the caller's home (pmetlab's own cache excepted, see there).
- :func:`server_config` / :func:`install_kernelspec`: the server's configuration (the temporary
  folder's kernelspec only) and that kernelspec, written as ``make venv`` writes the venv's.
- :data:`LAB_OVERRIDES` / :func:`write_overrides`: the JupyterLab setting the venv ships
  (``$(VENV)/share/jupyter/lab/settings/overrides.json``): start the notebook's kernel without asking.
- :func:`dialog_failure`, :func:`opening_changes`: the check's one-line reasons.

- :func:`fix_notebook_metadata`: a notebook's kernelspec and ``language_info`` as the venv's kernel
  reports them (what Lab writes on opening; a notebook without them shows as modified at once).

``python docs/lab_env.py --write-overrides PATH`` merges :data:`LAB_OVERRIDES` into ``PATH`` (the
Makefile's venv step); ``python docs/lab_env.py --notebook-metadata notebooks/NN_name.ipynb ...``
sets the metadata (run it with the venv's Python on a new notebook; ``jupytext --sync`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The kernelspec the Makefile installs (``ipykernel install --sys-prefix --name python3``; the display
#: name and language are ipykernel's) and that every shipped notebook names in its metadata.
KERNEL_NAME = "python3"
KERNEL_DISPLAY_NAME = "Python 3 (ipykernel)"
KERNEL_LANGUAGE = "python"

#: JupyterLab settings, by plugin id. ``autoStartDefaultKernel``: when a notebook is run before its
#: session has taken the kernel its metadata names (a click on "Run All Cells" while the notebook is
#: still being set up — the checkpoint round trip after loading it), Lab starts the server's default
#: kernel (``python3``) instead of opening the modal "Select Kernel" dialog.
LAB_OVERRIDES = {"@jupyterlab/notebook-extension:tracker": {"autoStartDefaultKernel": True}}

#: Settings of the check's own Lab on top of :data:`LAB_OVERRIDES`: no news or update toasts over the
#: screenshots, every cell attached to the page (windowing would leave off-screen outputs out of the DOM).
CHECK_SETTINGS = {
    "@jupyterlab/apputils-extension:notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
}

#: Caller variables that point Jupyter, IPython or Python at the caller's files: dropped.
DROPPED_PREFIXES = ("JUPYTER", "IPYTHON")
DROPPED = ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONUSERBASE")


def hermetic_paths(tmp: Path) -> dict[str, Path]:
    """Every folder of the check's environment, by variable name (all under ``tmp``)."""
    home = tmp / "home"
    return {
        "HOME": home,
        "JUPYTER_CONFIG_DIR": tmp / "jupyter" / "config",
        "JUPYTER_DATA_DIR": tmp / "jupyter" / "data",
        "JUPYTER_RUNTIME_DIR": tmp / "jupyter" / "runtime",
        "JUPYTERLAB_SETTINGS_DIR": tmp / "jupyter" / "lab" / "user-settings",
        "JUPYTERLAB_WORKSPACES_DIR": tmp / "jupyter" / "lab" / "workspaces",
        "IPYTHONDIR": tmp / "ipython",
        "MPLCONFIGDIR": tmp / "matplotlib",
        "XDG_CONFIG_HOME": home / ".config",
        "XDG_DATA_HOME": home / ".local" / "share",
        "XDG_CACHE_HOME": home / ".cache",
        "XDG_STATE_HOME": home / ".local" / "state",
        "XDG_RUNTIME_DIR": tmp / "xdg-runtime",
        "SE_CACHE_PATH": tmp / "selenium",
    }


def kernel_dir(tmp: Path) -> Path:
    """The only folder the check's server looks for kernelspecs in."""
    return tmp / "kernels"


def hermetic_env(tmp: Path, base: Mapping[str, str], keep_cache: bool = True) -> dict[str, str]:
    """``base`` (the caller's environment) with every Jupyter/IPython/XDG path under ``tmp``.

    Dropped: ``JUPYTER*``/``IPYTHON*`` variables (``JUPYTER_PATH``, ``JUPYTER_PREFER_ENV_PATH``,
    ``JUPYTERLAB_DIR``, ...), ``PYTHONPATH``, ``PYTHONSTARTUP``, ``PYTHONUSERBASE``; set: the folders of
    :func:`hermetic_paths` (created), ``PYTHONNOUSERSITE``. Kept from the caller: pmetlab's cache
    (``PMETLAB_CACHE_DIR``, default the caller's ``~/.cache/pmetlab``: the model conversion and the
    covariance statistics are not redone on every run) unless ``keep_cache`` is false, when it moves
    under ``tmp`` too; ``PMETLAB_DATA_DIR`` and everything else unrelated to Jupyter."""
    env = {
        k: v for k, v in base.items() if not (k.startswith(DROPPED_PREFIXES) or k in DROPPED or k.startswith("XDG_"))
    }
    if keep_cache:
        home = Path(base.get("HOME") or Path.home())
        env["PMETLAB_CACHE_DIR"] = base.get("PMETLAB_CACHE_DIR") or str(home / ".cache" / "pmetlab")
    else:
        env["PMETLAB_CACHE_DIR"] = str(tmp / "pmetlab-cache")
    for name, path in hermetic_paths(tmp).items():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        env[name] = str(path)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def server_config(tmp: Path) -> dict[str, Any]:
    """``jupyter_server_config.json`` of the check: kernelspecs from :func:`kernel_dir` only (no user,
    venv or system kernelspec can shadow or add to the one the check installs)."""
    return {
        "KernelSpecManager": {"kernel_dirs": [str(kernel_dir(tmp))], "ensure_native_kernel": False},
        "MappingKernelManager": {"default_kernel_name": KERNEL_NAME},
    }


def write_lab_config(tmp: Path) -> None:
    """The server config and the Lab user settings of the check, into the folders of :func:`hermetic_paths`."""
    paths = hermetic_paths(tmp)
    paths["JUPYTER_CONFIG_DIR"].mkdir(parents=True, exist_ok=True)
    (paths["JUPYTER_CONFIG_DIR"] / "jupyter_server_config.json").write_text(json.dumps(server_config(tmp), indent=1))
    settings = merge_settings(LAB_OVERRIDES, CHECK_SETTINGS)
    for plugin, values in settings.items():
        package, name = plugin.rsplit(":", 1)
        path = paths["JUPYTERLAB_SETTINGS_DIR"] / package / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=1), encoding="utf-8")


def install_kernelspec(tmp: Path, env: Mapping[str, str], python: str = sys.executable) -> Path:
    """The ``python3`` kernelspec of ``python``, installed the way ``make venv`` installs the venv's
    (``python -m ipykernel install --prefix ... --name python3``, run in the hermetic ``env``: no
    ``~/.ipython`` made on the way), moved into :func:`kernel_dir`."""
    prefix = tmp / "kernel-prefix"
    cmd = [python, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", KERNEL_NAME]
    subprocess.run(cmd, env=dict(env), check=True, capture_output=True, text=True)
    target = kernel_dir(tmp) / KERNEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    (prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME).rename(target)
    return target


def merge_settings(*layers: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Settings by plugin id, later layers winning key by key."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for plugin, values in layer.items():
            out.setdefault(plugin, {}).update(values)
    return out


def write_overrides(path: Path) -> dict[str, Any]:
    """Merge :data:`LAB_OVERRIDES` into the JupyterLab ``overrides.json`` at ``path`` (kept: what else it holds)."""
    current = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    merged = {**current, **merge_settings(current, LAB_OVERRIDES)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    return merged


def _squash(text: str, limit: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dialog_failure(title: str, body: str, buttons: list[str] | tuple[str, ...] = ()) -> str:
    """One line naming an unexpected modal dialog: its title, its text and its buttons."""
    line = f'unexpected dialog "{_squash(title, 80)}": {_squash(body, 240) or "(no text)"}'
    labels = [_squash(b, 40) for b in buttons if b.strip()]
    return line + (f" (buttons: {', '.join(labels)})" if labels else "")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def opening_changes(on_disk: Mapping[str, Any], in_lab: Mapping[str, Any]) -> list[str]:
    """What Lab changed in a notebook's metadata when opening it, one ``key: before -> after`` each
    (a key one side lacks as a whole, else each differing leaf as ``key.sub``)."""
    missing, out = "(missing)", []
    for key in sorted(set(on_disk) | set(in_lab)):
        if key not in on_disk or key not in in_lab:
            out.append(f"{key}: {json.dumps(on_disk.get(key, missing))} -> {json.dumps(in_lab.get(key, missing))}")
            continue
        before, after = _flatten(on_disk[key], key), _flatten(in_lab[key], key)
        out += [
            f"{k}: {json.dumps(before.get(k, missing))} -> {json.dumps(after.get(k, missing))}"
            for k in sorted(set(before) | set(after))
            if before.get(k, missing) != after.get(k, missing)
        ]
    return out


def only_version_differs(changes: list[str]) -> bool:
    """The changes are the Python version in ``language_info`` only (the venv's Python is not the one
    the notebooks were saved with: Lab records the kernel's)."""
    return bool(changes) and all(c.startswith("language_info.version:") for c in changes)


def kernel_language_info() -> dict[str, Any]:
    """The ``language_info`` the ``python3`` kernel (ipykernel, the running Python) reports; JupyterLab
    writes it into a notebook's metadata when the kernel starts, marking the notebook modified unless
    it is already there, equal."""
    from ipykernel.ipkernel import IPythonKernel

    return json.loads(json.dumps(IPythonKernel.language_info))


def expected_notebook_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` with the kernelspec the Makefile installs and the kernel's ``language_info``."""
    kernelspec = {"display_name": KERNEL_DISPLAY_NAME, "language": KERNEL_LANGUAGE, "name": KERNEL_NAME}
    return {**metadata, "kernelspec": kernelspec, "language_info": kernel_language_info()}


def fix_notebook_metadata(path: Path) -> bool:
    """Rewrite the notebook at ``path`` with :func:`expected_notebook_metadata` (cells untouched);
    whether it changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    wanted = expected_notebook_metadata(nb.metadata)
    if wanted == nb.metadata:
        return False
    nb.metadata = nbformat.from_dict(wanted)
    nbformat.write(nb, path)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--write-overrides", metavar="PATH", help="JupyterLab overrides.json to merge LAB_OVERRIDES into")
    what.add_argument(
        "--notebook-metadata", metavar="IPYNB", nargs="+", help="set the kernelspec and language_info of notebooks"
    )
    args = p.parse_args(argv)
    if args.write_overrides:
        write_overrides(Path(args.write_overrides))
        print(f"{args.write_overrides}: {json.dumps(LAB_OVERRIDES)}")
    for name in args.notebook_metadata or ():
        print(f"{name}: {'metadata set' if fix_notebook_metadata(Path(name)) else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
