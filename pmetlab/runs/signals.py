"""SIGTERM while a run executes: raised like Ctrl-C, so that the run records itself failed.

A job scheduler, ``kill`` or a closing terminal stop a process with SIGTERM, which by default ends
Python without unwinding, leaving ``run.json`` saying "running" for ever. While a run executes,
:func:`terminate_as_interrupt` turns SIGTERM into :class:`RunTerminated` (a ``KeyboardInterrupt``),
so the run's failure handler records it; the previous handler is restored afterwards.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)

__all__ = ["RunTerminated", "terminate_as_interrupt"]


class RunTerminated(KeyboardInterrupt):
    """The process received SIGTERM while a run executed."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise RunTerminated(f"received {signal.Signals(signum).name}")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`RunTerminated`; the previous handler is restored
    on exit. Nothing changes outside the main thread (only it may handle signals), where SIGTERM
    does not exist, or where it is ignored on purpose (``SIG_IGN``)."""
    term = getattr(signal, "SIGTERM", None)
    if term is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(term)
    if previous is signal.SIG_IGN:
        yield
        return
    signal.signal(term, _raise_terminated)
    try:
        yield
    finally:
        # None: a handler installed from C, which Python cannot reinstall; the default is closest
        signal.signal(term, previous if previous is not None else signal.SIG_DFL)
