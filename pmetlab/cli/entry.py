"""The ``pmetlab`` entry point: parse, configure logging, run the command, turn user errors
(bad values, missing or unwritable files, an unavailable device) into one line on stderr and exit
status 2; the traceback only with ``-v``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .messages import error_line
from .parser import PROG, build_parser

logger = logging.getLogger("pmetlab.cli")

__all__ = ["main"]

#: OSError: a path that cannot be read or written (permissions, a directory where a file belongs,
#: a full disk) is the user's to fix, like a bad value.
_USER_ERRORS = (ValueError, KeyError, LookupError, OSError)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(verbose: int, quiet: bool) -> None:
    """pmetlab logs at INFO (-v: DEBUG with error tracebacks; -vv: every library at DEBUG; -q: warnings)."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    logging.getLogger("pmetlab").setLevel(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pmetlab`` command line; returns the exit status (0 ok, 1 a notebook failed,
    2 a user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or an argparse error (2, message printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    _configure_logging(getattr(args, "verbose", 0) or 0, getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as exc:
        logger.debug("error details", exc_info=True)
        sys.stderr.write(f"{PROG}: error: {error_line(exc, getattr(args, 'command', None))}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
