"""Progress bars that suit where they are written.

:func:`tqdm` is ``tqdm.auto.tqdm`` (a widget in Jupyter, a text bar in a terminal) with one
difference: when the bar writes to a stream that is not a terminal (``pmetlab run ... 2> run.log``,
a batch job's log), it redraws at most every :data:`LOG_INTERVAL_S` seconds instead of ten times a
second, so a log holds a few lines per bar rather than thousands of carriage-return frames.
``PMETLAB_PROGRESS_INTERVAL`` (seconds) sets that interval; ``0`` keeps tqdm's own.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import tqdm.auto as _auto

__all__ = ["tqdm", "LOG_INTERVAL_S", "INTERVAL_ENV", "writes_to_terminal"]

#: Seconds between redraws of a bar written to a file or pipe.
LOG_INTERVAL_S = 30.0
INTERVAL_ENV = "PMETLAB_PROGRESS_INTERVAL"


def writes_to_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``, where bars go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed, or not a real stream
        return False


def _log_interval() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None:
        return LOG_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds, got {raw!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{INTERVAL_ENV} must be a finite number of seconds >= 0, got {raw!r}")
    return value


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(*args, **kwargs)``, redrawn at most every :data:`LOG_INTERVAL_S` seconds
    when it is a text bar whose stream is not a terminal (see the module docstring). The class is
    looked up on every call: the notebook runner's kernels make ``tqdm.auto`` the text bar, whose
    frames would otherwise fill the executed notebook and papermill's log."""
    cls = _auto.tqdm
    widget = cls.__module__.startswith("tqdm.notebook")
    interval = _log_interval()
    if interval > 0 and not widget and not writes_to_terminal(kwargs.get("file")):
        kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), interval)
        kwargs["maxinterval"] = max(float(kwargs.get("maxinterval", 10.0)), kwargs["mininterval"])
        kwargs.setdefault("miniters", 1)  # time-based only: tqdm's adaptive miniters would skip more
    return cls(*args, **kwargs)
