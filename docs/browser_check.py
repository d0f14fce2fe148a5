"""Check the edit explorer (``notebooks/08_explore.ipynb``) in a real browser.

What it checks: JupyterLab, started from the venv on 127.0.0.1 (random port and token) over a
temporary copy of ``notebooks/``, opens the notebook in headless Chromium; the notebook's kernel
(the ``python3`` its metadata names) starts without a dialog and opening the notebook does not mark
it modified; all cells run through the UI (the menu "Run > Run All Cells") and finish without an
error output; the explorer's widgets render and show the demo edit ("edit applied"); then one edit
is made through the widgets themselves: "undo", then "run edit", until the status line reads "edit
applied" again. Any modal dialog on the way fails the check with one line naming its title and text.

Hermetic (``docs/lab_env.py``): JupyterLab, the kernel and the browser run with their own HOME,
Jupyter config, data, runtime, settings and workspaces folders, IPython folder and kernelspec
(``python3`` of the venv's Python, as ``make venv`` installs it, the only one the server sees), all
in one temporary folder; nothing is read from or written to the caller's home but pmetlab's own
cache (``PMETLAB_CACHE_DIR``, default ``~/.cache/pmetlab``; ``--fresh-cache`` moves it too).
Screenshots go to ``docs/screenshots/`` (``explore_after_run_all.png``, ``explore_edit.png``; on a
failure ``explore_failure.png``). JupyterLab, its kernel and the browser are stopped in every case.

Run it with ``make browser-check`` (not part of ``make test``), or
``.venv/bin/python docs/browser_check.py [--out DIR] [--run-timeout S] [--edit-timeout S]``.
On Debian it installs what is missing: ``chromium`` and ``chromium-driver`` with apt-get (as root,
or through sudo) and ``selenium`` into the running Python with pip. On a CPU it takes about a
minute once the model and its covariance statistics are cached (the notebook loads SmolLM2-135M
and runs two edits), longer on a cold cache. Exits 0 when everything passed, else 1 with a
one-line reason (``-v`` adds the traceback of an unexpected error).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lab_env

logger = logging.getLogger("browser_check")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "notebooks/08_explore.ipynb"
SCREENSHOTS = REPO / "docs" / "screenshots"
APT_PACKAGES = ("chromium", "chromium-driver")
WINDOW = (1400, 1000)
ERROR_MARKERS = ("Traceback", "Error")


class CheckFailed(Exception):
    """The check failed; the message is the one-line reason."""


# --- what the check needs ------------------------------------------------------------------------
def _as_root(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return cmd
    if shutil.which("sudo"):
        return ["sudo", "-n", *cmd]
    raise CheckFailed(f"{' '.join(APT_PACKAGES)} are missing: install them as root (apt-get install {cmd[-1]} ...)")


def _apt(*args: str) -> subprocess.CompletedProcess:
    cmd = _as_root(["apt-get", *args])
    logger.info("running %s", " ".join(cmd))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver when either is missing (apt-get update only
    when the first install fails)."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if not shutil.which("apt-get"):
        raise CheckFailed("chromium/chromedriver missing and no apt-get: install Chromium and its driver by hand")
    install = ("install", "-y", "--no-install-recommends", *APT_PACKAGES)
    done = _apt(*install)
    if done.returncode != 0:
        _apt("update")
        done = _apt(*install)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
        raise CheckFailed(f"apt-get install {' '.join(APT_PACKAGES)} failed: {' '.join(last)}")


def ensure_selenium() -> None:
    """pip-install selenium into the running Python when it is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        logger.info("installing selenium into %s", sys.prefix)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "selenium"], check=False)
        if done.returncode != 0:
            raise CheckFailed(f"pip install selenium failed (exit {done.returncode})") from None


# --- processes -----------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the kernel runs in a session of its own, so killing the
    server's process group alone would leave it running)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        for kill, target in ((os.killpg, _pgid(pid)), (os.kill, pid)):
            if target is not None and target != os.getpgrp():
                try:
                    kill(target, sig)
                except ProcessLookupError:
                    pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def stop_tree(root: int, stop: Callable[[], None] | None = None, grace: float = 10.0) -> None:
    """Stop ``root`` and every descendant: ``stop`` (a polite shutdown) or SIGTERM, then SIGKILL for
    whatever is left after ``grace`` seconds."""
    pids = _tree(root)
    try:
        if stop is None:
            raise ProcessLookupError("no polite shutdown")
        stop()
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the processes still go
        logger.info("stopping with SIGTERM (%s)", exc)
        _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    _signal_all([p for p in pids if _alive(p)], signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":  # a zombie of ours: reap it
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


# --- JupyterLab ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_root(tmp: Path) -> Path:
    """A copy of ``notebooks/`` (the browser saves what it runs; the committed notebooks stay
    without outputs) with the ``figures`` folder the notebook writes to."""
    root = tmp / "root"
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("*.py", "figures"))
    (root / "notebooks" / "figures").mkdir()
    return root


def prepare_env(tmp: Path, keep_cache: bool = True) -> dict[str, str]:
    """The hermetic environment (:func:`lab_env.hermetic_env`) with the server config, the Lab
    settings and the ``python3`` kernelspec written into it."""
    env = lab_env.hermetic_env(tmp, os.environ, keep_cache=keep_cache)
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    shared = REPO.parent / "shared" / "data"
    if "PMETLAB_DATA_DIR" not in env and shared.is_dir():
        env["PMETLAB_DATA_DIR"] = str(shared)
    lab_env.write_lab_config(tmp)
    spec = lab_env.install_kernelspec(tmp, env)
    logger.info("hermetic Jupyter folders and kernelspec %s under %s", spec.name, tmp)
    return env


def start_lab(env: dict[str, str], root: Path, port: int, token: str, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",  # jupyter_server 2's name for --ServerApp.token
        f"--ServerApp.root_dir={root}",
        "--ServerApp.open_browser=False",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: the session's kernel and the dirty flag
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    logger.info("starting JupyterLab on 127.0.0.1:%d (log %s)", port, log)
    with log.open("w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def wait_for_lab(base: str, token: str, lab: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.poll() is not None:
            raise CheckFailed(f"JupyterLab exited with {lab.returncode} before answering")
        try:
            _get(f"{base}/api/status?token={token}")
            return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise CheckFailed(f"JupyterLab did not answer within {timeout:.0f}s")


def shutdown_kernels(base: str, token: str) -> None:
    """Ask the server to shut its kernels down (the SIGKILL fallback in :func:`stop_tree` follows)."""
    try:
        kernels = _get(f"{base}/api/kernels?token={token}")
        for k in kernels:
            req = urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}", method="DELETE")
            urllib.request.urlopen(req, timeout=30).close()
    except (urllib.error.URLError, OSError) as exc:
        logger.warning("could not shut the kernels down through the server: %s", exc)


@contextmanager
def jupyterlab(tmp: Path, env: dict[str, str]) -> Iterator[str]:
    """Run JupyterLab for the check; yields the notebook's URL. Stops the server and its kernels."""
    root, port, token = prepare_root(tmp), free_port(), secrets.token_hex(24)
    base, log = f"http://127.0.0.1:{port}", tmp / "jupyterlab.log"
    lab = start_lab(env, root, port, token, log)
    try:
        wait_for_lab(base, token, lab)
        yield f"{base}/lab/tree/{NOTEBOOK}?token={token}"
    except Exception:
        logger.info("JupyterLab log, last lines:\n%s", "\n".join(log.read_text().splitlines()[-30:]))
        raise
    finally:
        logger.info("stopping JupyterLab and its kernels")
        stop_tree(lab.pid, stop=lambda: _stop_lab(base, token, lab))
        lab.wait(timeout=5)


def _stop_lab(base: str, token: str, lab: subprocess.Popen) -> None:
    if lab.poll() is not None:
        return
    shutdown_kernels(base, token)
    lab.send_signal(signal.SIGTERM)


# --- the browser ---------------------------------------------------------------------------------
@contextmanager
def chromium(tmp: Path, env: dict[str, str]) -> Iterator[Any]:
    """Headless Chromium driven by Debian's chromedriver; quit and killed on the way out."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-breakpad",
    ):
        opts.add_argument(arg)
    opts.add_argument("--window-size={},{}".format(*WINDOW))
    opts.add_argument(f"--user-data-dir={tmp / 'profile'}")
    driver_path = shutil.which("chromedriver") or "chromedriver"
    service = Service(driver_path, env=env, popen_kw={"start_new_session": True})
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        yield driver
    finally:
        logger.info("stopping the browser")
        stop_tree(service.process.pid, stop=driver.quit)


# the first modal dialog on the page: [title, text (a <select> as its chosen option), button labels]
DIALOG = """
const d = [...document.querySelectorAll('.jp-Dialog')].find(e => e.isConnected && e.getClientRects().length);
if (!d) return null;
const text = sel => { const e = d.querySelector(sel); if (!e) return '';
  const c = e.cloneNode(true), chosen = [...e.querySelectorAll('select')].map(s => s.selectedOptions[0]);
  [...c.querySelectorAll('select')].forEach((s, i) => s.replaceWith(` [${chosen[i] ? chosen[i].text : ''}] `));
  return c.textContent; };
return [text('.jp-Dialog-header'), text('.jp-Dialog-body'),
        [...d.querySelectorAll('.jp-Dialog-footer button')].map(b => b.textContent.trim())];
"""


def fail_on_dialog(driver: Any) -> None:
    """A :class:`CheckFailed` naming the modal dialog on the page, if there is one."""
    found = driver.execute_script(DIALOG)
    if found:
        raise CheckFailed(lab_env.dialog_failure(*found))


def wait_until(driver: Any, what: str, condition: Callable[[Any], Any], timeout: float) -> Any:
    """``condition(driver)`` once truthy, polled every half second; a :class:`CheckFailed` naming
    ``what`` after ``timeout`` seconds, or naming a modal dialog as soon as one shows."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def polled(d: Any) -> Any:
        fail_on_dialog(d)
        return condition(d)

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(polled)
    except TimeoutException:
        fail_on_dialog(driver)
        raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}") from None


def _js(script: str) -> Callable[[Any], Any]:
    return lambda d: d.execute_script(script)


KERNEL_IDLE = "return document.querySelector('.jp-Notebook-ExecutionIndicator[data-status=\"idle\"]') !== null;"
# the notebook panel's state (window.jupyterapp, exposed for the check); null before the panel exists.
# (The execution indicator alone reads "idle" before any kernel exists.)
PANEL = """
const app = window.jupyterapp, w = app && app.shell.currentWidget;
if (!w || !w.context || !w.sessionContext || !w.context.isReady) return null;
const sc = w.sessionContext, k = sc.session && sc.session.kernel;
return {path: w.context.path, kernel: k ? k.name : null, status: k ? k.status : null,
        display: sc.kernelDisplayName, dirty: w.context.model.dirty,
        metadata: w.context.model.sharedModel.getMetadata()};
"""
# every code cell executed (a number in its prompt), none queued or running ("[*]")
ALL_EXECUTED = """
const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
"""
# a cell queued, running or run, or the kernel busy
STARTED = """
const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
return prompts.some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))
  || document.querySelector('.jp-Notebook-ExecutionIndicator[data-status="busy"]') !== null;
"""
ACTIVE_CELL = "return document.querySelector('.jp-Notebook .jp-Cell.jp-mod-active') !== null;"
LEFT_TAB = ".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current"
STDERR_TEXTS = """
return [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
  .map(e => e.textContent);
"""


def _xpath_text(tag: str, cls: str, text: str) -> str:
    return f"//{tag}[contains(concat(' ', normalize-space(@class), ' '), ' {cls} ') and normalize-space(.)='{text}']"


def click_text(driver: Any, tag: str, cls: str, text: str, timeout: float = 30) -> None:
    """Click the visible element ``tag.cls`` whose text is ``text`` (a dialog in the way fails the
    check naming the dialog)."""
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.by import By

    xpath = _xpath_text(tag, cls, text)
    visible = lambda d: next((e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed()), None)
    element = wait_until(driver, f'"{text}"', visible, timeout)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    try:
        element.click()
    except ElementClickInterceptedException as exc:
        fail_on_dialog(driver)
        raise CheckFailed(f'"{text}" could not be clicked: {_first_line(exc)}') from None


def status_text(driver: Any) -> str:
    """The explorer's status line: the HTML widget right after the row of its buttons."""
    from selenium.webdriver.common.by import By

    row = driver.find_elements(By.XPATH, _xpath_text("button", "jupyter-button", "run edit") + "/..")
    if not row:
        return ""
    status = row[0].find_elements(By.XPATH, "following-sibling::*[1]")
    return status[0].text if status else ""


def open_notebook(driver: Any, url: str, on_disk: Path, timeout: float) -> None:
    """Open the notebook; its kernel (the one its metadata names) started and idle, no dialog on the
    way, the notebook not marked modified; fold the file browser away (room for the explorer)."""
    logger.info("opening %s", NOTEBOOK)
    driver.get(url)
    wanted = json.loads(on_disk.read_text(encoding="utf-8"))["metadata"]["kernelspec"]["name"]

    def kernel_idle(d: Any) -> Any:
        state = d.execute_script(PANEL)
        return state if state and state["kernel"] == wanted and state["status"] == "idle" else None

    state = wait_until(driver, f"the notebook's kernel ({wanted}) to be idle", kernel_idle, timeout)
    logger.info("kernel %s (%s) idle", state["kernel"], state["display"])
    wait_until(driver, "the notebook's active cell", _js(ACTIVE_CELL), 30)
    time.sleep(2)  # the kernel's info reply (language_info) lands in the metadata
    fail_on_dialog(driver)
    check_not_modified(driver.execute_script(PANEL), on_disk)
    driver.find_element("css selector", LEFT_TAB).click()


def check_not_modified(state: dict[str, Any], on_disk: Path) -> None:
    """Opening the notebook (and starting its kernel) left it unmodified: else a :class:`CheckFailed`
    naming what changed; a different Python version in ``language_info`` only is a warning (Lab
    records the kernel's, and this venv's Python is not the one the notebooks were saved with)."""
    if not state["dirty"]:
        return
    changes = lab_env.opening_changes(json.loads(on_disk.read_text(encoding="utf-8"))["metadata"], state["metadata"])
    if lab_env.only_version_differs(changes):
        logger.warning("opening %s marked it modified, the Python version only: %s", NOTEBOOK, changes[0])
        return
    what = "; ".join(changes) if changes else "its cells (the metadata is unchanged)"
    raise CheckFailed(f"opening {NOTEBOOK} marked it modified: {what}")


def run_all_cells(driver: Any, timeout: float, tries: int = 3) -> None:
    """Run > Run All Cells, then wait for every cell to finish and the kernel to be idle. A click
    that starts nothing (the lab still settling) is tried again."""
    from selenium.webdriver.common.keys import Keys

    logger.info("Run > Run All Cells (up to %.0fs)", timeout)
    for attempt in range(1, tries + 1):
        click_text(driver, "li", "lm-MenuBar-item", "Run")
        click_text(driver, "li", "lm-Menu-item", "Run All Cells")
        try:
            wait_until(driver, "the cells to start", _js(STARTED), 30)
            break
        except CheckFailed:
            if attempt == tries:
                raise
            logger.info("Run All Cells started nothing, trying again")
            driver.find_element("css selector", "body").send_keys(Keys.ESCAPE)  # close a menu left open
    executed, idle = _js(ALL_EXECUTED), _js(KERNEL_IDLE)
    wait_until(driver, "all cells to finish", lambda d: _no_errors(d) and executed(d) and idle(d), timeout)


def _no_errors(driver: Any) -> bool:
    for text in driver.execute_script(STDERR_TEXTS):
        if any(m in text for m in ERROR_MARKERS):
            raise CheckFailed(f"a cell printed an error: {text.strip().splitlines()[-1][:200]}")
    return True


def check_explorer(driver: Any) -> None:
    """The widgets rendered and show the notebook's demo edit."""
    if "Error displaying widget" in driver.find_element("css selector", ".jp-Notebook").text:
        raise CheckFailed("the explorer's widgets did not render (Error displaying widget)")
    wait_until(driver, "the explorer's status after the demo edit", lambda d: "edit applied" in status_text(d), 60)


def edit_through_widget(driver: Any, timeout: float) -> str:
    """Click "undo", then "run edit"; returns the status line once it reads "edit applied"."""
    logger.info('clicking "undo"')
    click_text(driver, "button", "jupyter-button", "undo")
    wait_until(driver, 'the status "undone"', lambda d: status_text(d).startswith("undone"), 120)
    logger.info('clicking "run edit" (up to %.0fs)', timeout)
    click_text(driver, "button", "jupyter-button", "run edit")
    status = wait_until(driver, 'the status "edit applied"', lambda d: _applied(d), timeout)
    _no_errors(driver)
    return status


def _applied(driver: Any) -> str | None:
    text = status_text(driver)
    if text.startswith("error:"):
        raise CheckFailed(f"the edit failed in the widget: {text[:200]}")
    return text if text.startswith("edit applied") else None


def screenshot(driver: Any, path: Path, anchor: str | None = None) -> None:
    """Save the window, scrolled so that the element at XPath ``anchor`` is at the top."""
    from selenium.webdriver.common.by import By

    if anchor:
        element = driver.find_element(By.XPATH, anchor)
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", element)
        time.sleep(1)  # let the layout settle
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    logger.info("screenshot %s", path.relative_to(REPO) if path.is_relative_to(REPO) else path)


# --- the check -----------------------------------------------------------------------------------
EXPLORER_TOP = (
    _xpath_text("button", "jupyter-button", "load record") + "/ancestor::div[contains(@class,'jp-OutputArea')][1]"
)
EXPLORER_BUTTONS = _xpath_text("button", "jupyter-button", "run edit") + "/.."


def browse(driver: Any, url: str, on_disk: Path, out: Path, args: argparse.Namespace) -> str:
    try:
        open_notebook(driver, url, on_disk, timeout=120)
        run_all_cells(driver, args.run_timeout)
        check_explorer(driver)
        screenshot(driver, out / "explore_after_run_all.png", EXPLORER_TOP)
        status = edit_through_widget(driver, args.edit_timeout)
        screenshot(driver, out / "explore_edit.png", EXPLORER_BUTTONS)
        fail_on_dialog(driver)
        return status
    except Exception:
        driver.save_screenshot(str(out / "explore_failure.png"))
        logger.info("failure screenshot %s", out / "explore_failure.png")
        raise


def check(args: argparse.Namespace) -> str:
    ensure_chromium()
    ensure_selenium()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "explore_failure.png").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="pmetlab-browser-") as name:
        tmp = Path(name)
        env = prepare_env(tmp, keep_cache=not args.fresh_cache)
        with jupyterlab(tmp, env) as url, chromium(tmp, env) as driver:
            return browse(driver, url, tmp / "root" / NOTEBOOK, out, args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(SCREENSHOTS), help="folder for the screenshots")
    p.add_argument("--run-timeout", type=float, default=1200, help="seconds for Run All Cells")
    p.add_argument("--edit-timeout", type=float, default=900, help="seconds for the edit through the widget")
    p.add_argument("--fresh-cache", action="store_true", help="pmetlab's cache in the temporary folder too (cold)")
    p.add_argument("-v", "--verbose", action="store_true", help="the traceback of an unexpected error too")
    return p.parse_args(argv)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a Selenium message without its stack trace)."""
    text = getattr(exc, "msg", None) or str(exc)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return re.sub(r"\s+", " ", lines[0])[:300] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s browser-check: %(message)s", datefmt="%H:%M:%S")
    args, start = parse_args(argv), time.monotonic()
    # SIGTERM (make interrupted, a CI timeout) unwinds like Ctrl-C, so the clean-up still runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        status = check(args)
    except CheckFailed as exc:
        print(f"browser-check FAILED after {time.monotonic() - start:.0f}s: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - any other failure is reported in one line too
        if args.verbose:
            logger.exception("unexpected failure")
        print(f"browser-check FAILED after {time.monotonic() - start:.0f}s: {type(exc).__name__}: {_first_line(exc)}")
        return 1
    print(f"browser-check passed in {time.monotonic() - start:.0f}s: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
