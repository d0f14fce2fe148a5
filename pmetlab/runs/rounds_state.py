"""``rounds.json``, the record of an editing-over-time run (:mod:`pmetlab.runs.rounds`): read and
checked like ``run.json`` (a damaged file is one line naming it and ``resume=False``), and changed
only through :class:`RoundsState`'s transitions, each saved atomically."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import atomic_path
from .rundir import RunMismatchError, now

logger = logging.getLogger(__name__)

__all__ = ["ROUNDS_FILE", "RoundsState"]

ROUNDS_FILE = "rounds.json"


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1, default=str) + "\n")


@dataclass
class RoundsState:
    """The run's ``rounds.json`` and where it lives; the one owner of its transitions (open, begin,
    finish a round, redo from a round, fail, complete), each saved atomically."""

    root: Path
    data: dict[str, Any]

    @classmethod
    def open(cls, root: Path, params: dict[str, Any], resume: bool) -> RoundsState:
        path = root / ROUNDS_FILE
        if resume and path.is_file():
            data = cls._read(path, int(params["rounds"]))
            if data.get("params") != params:
                raise RunMismatchError(
                    f"{root} holds a rounds run with other parameters; use another out_dir or resume=False"
                )
            state = cls(root, data)
            state._drop_rounds_from(int(data["rounds_done"]))  # entries of rounds to be redone
            return state
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, {"params": params, "rounds_done": 0, "rounds": [], "created_at": now()})

    @staticmethod
    def _read(path: Path, rounds: int) -> dict[str, Any]:
        """``rounds.json``, checked like run.json: a damaged file is one line naming it and ``resume=False``."""
        again = "pass resume=False to start the rounds run over"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is unreadable ({type(exc).__name__}: {exc}); {again}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a rounds record (an object); {again}")
        done = data.get("rounds_done")
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= rounds:
            raise ValueError(f"{path}: 'rounds_done' must be an integer from 0 to {rounds}, got {done!r}; {again}")
        entries = data.get("rounds")
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("round"), int) and not isinstance(e.get("round"), bool)
            for e in entries
        ):
            raise ValueError(f"{path}: 'rounds' must be a list of round entries (objects with 'round'); {again}")
        return data

    def save(self) -> None:
        _write_json(self.root / ROUNDS_FILE, self.data)

    def round_dir(self, t: int) -> Path:
        return self.root / f"round_{t:02d}"

    @property
    def rounds_done(self) -> int:
        return int(self.data["rounds_done"])

    def _drop_rounds_from(self, t: int) -> None:
        self.data["rounds"] = [e for e in self.data["rounds"] if e["round"] < t]

    def begin(self, **info: Any) -> None:
        """Mark the run running in this process (pid and host); saves."""
        self.data.update(info, status="running", started_at=now(), pid=os.getpid(), host=socket.gethostname())
        self.data.pop("error", None)
        self.save()

    def finish_round(self, entry: dict[str, Any]) -> None:
        """Record round ``entry["round"]`` done (replacing an older entry of that round); saves."""
        t = int(entry["round"])
        self._drop_rounds_from(t)
        self.data["rounds"].append(entry)
        self.data["rounds_done"] = t + 1
        self.save()

    def redo_from(self, t: int, file: Path, problem: str) -> None:
        """Round ``t``'s saved update is damaged or foreign: rounds from ``t`` on are redone,
        recorded in ``repairs``; saves."""
        self.data["rounds_done"] = t
        self._drop_rounds_from(t)
        self.data.setdefault("repairs", []).append(
            {"at": now(), "file": str(file.relative_to(self.root)), "problem": problem, "redo_from_round": t}
        )
        self.save()
        logger.warning("%s: %s %s; rounds from %d on are redone (or pass resume=False)", self.root, file, problem, t)

    def note(self, **info: Any) -> None:
        """Record run-level findings (``collapse``: :func:`.round_diagnostics.collapse_point`); saves."""
        self.data.update(info)
        self.save()

    def fail(self, exc: BaseException) -> None:
        self.data.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000], failed_at=now())

    def complete(self) -> None:
        self.data["status"] = "complete"
