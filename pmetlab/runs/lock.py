"""One process per run directory: ``run.lock`` names the process working in it.

Two invocations in one directory would overwrite each other's files (``resume=False`` even deletes
them mid-edit) or repeat each other's work. :func:`hold_run_dir` creates ``<dir>/run.lock`` (pid,
host, start time, command line) atomically and removes it when the block ends; a directory whose
lock names a live process is refused with :class:`RunDirInUseError`, naming that pid and host. A
lock left by a process that died without removing it (killed with SIGKILL, a power cut) is taken
over with a warning. A lock written on another host cannot be checked from here and is refused;
its message says to delete the file when that process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "RunDirInUseError", "hold_run_dir", "pid_alive"]

LOCK_FILE = "run.lock"


class RunDirInUseError(ValueError):
    """Another live process works in the run directory."""


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` may exist on this host (True when it cannot be checked:
    a process is only declared gone when the system says so)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's content; None when it is unreadable or not a lock (a half-written file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or not isinstance(data.get("host"), str):
        return None
    return data


def _try_create(path: Path, content: dict[str, Any]) -> bool:
    """Create ``path`` holding ``content`` unless it exists (atomic: written aside, then linked)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    try:
        os.link(tmp, path)  # fails when path exists, so that exactly one of two racing processes wins
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _describe(holder: dict[str, Any]) -> str:
    cmd = holder.get("command")
    return (
        f"pid {holder['pid']} on host {holder['host']!r} (since {holder.get('started_at', '?')}"
        f"{f', running {cmd!r}' if cmd else ''})"
    )


@contextmanager
def hold_run_dir(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold ``folder`` (created when missing) for this process while the block runs.

    Raises:
        RunDirInUseError: a live process (or one on another host) holds it; the message names its
            pid, host and start time.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    host = socket.gethostname()
    mine = {
        "pid": os.getpid(),
        "host": host,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
        "token": uuid.uuid4().hex,
    }
    for _ in range(5):
        if _try_create(path, mine):
            break
        holder = _read(path)
        if holder is None:  # unreadable: a process died while writing it (the write is atomic) or junk
            logger.warning("%s: the lock file is unreadable; taking it over", path)
        elif holder["host"] != host:
            raise RunDirInUseError(
                f"{folder} is in use by another {what}: {_describe(holder)}. Use another out_dir, or, when "
                f"that process is gone, delete {path}"
            )
        elif holder["pid"] == os.getpid():
            logger.debug("%s: taking over a lock this process left", path)
        elif pid_alive(holder["pid"]):
            raise RunDirInUseError(
                f"{folder} is in use by another {what}: {_describe(holder)}. Wait for it to finish or stop it, "
                f"or use another out_dir (if pid {holder['pid']} is not a pmetlab {what}, delete {path})"
            )
        else:
            logger.warning("%s: taking over the lock of %s, which is no longer running", path, _describe(holder))
        # set the stale lock aside under a unique name, so that a racing process cannot remove ours
        aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.stale")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            continue
        if _read(aside) != holder:  # another process replaced it in between: put it back, look again
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
    else:
        raise RunDirInUseError(f"{folder}: could not take its lock {path} (other processes keep taking it)")
    try:
        yield path
    finally:
        if _read(path) == mine:  # never remove a lock someone else took over
            path.unlink(missing_ok=True)
