"""Progress bars written to a log (not a terminal) redraw rarely: a few lines, not thousands of frames."""

from __future__ import annotations

import io
import time

import pytest

from pmetlab.progress import INTERVAL_ENV, tqdm, writes_to_terminal


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _frames(stream: io.StringIO, n: int = 400) -> int:
    for _ in tqdm(range(n), file=stream, desc="work"):
        time.sleep(0.0005)
    return stream.getvalue().count("\r")


def test_a_bar_written_to_a_log_redraws_rarely(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    log = io.StringIO()
    assert not writes_to_terminal(log) and writes_to_terminal(_Terminal())
    assert _frames(log) <= 3  # the first frame and the final one
    assert "400/400" in log.getvalue()
    monkeypatch.setenv(INTERVAL_ENV, "0")  # tqdm's own interval
    assert _frames(io.StringIO(), 1500) > 3


def test_a_bar_on_a_terminal_is_tqdms_own(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert _frames(_Terminal(), 1500) > 3


@pytest.mark.parametrize("bad", ["soon", "-1", "inf", "nan"])
def test_a_bad_interval_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(INTERVAL_ENV, bad)
    with pytest.raises(ValueError, match=f"{INTERVAL_ENV} must be a"):
        tqdm(range(2), file=io.StringIO())
