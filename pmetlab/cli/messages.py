"""How the ``pmetlab`` command line words an error: one line, in its own terms (the library's
keyword arguments become the flags that set them), and for an operating-system error the path,
the reason and what to do instead of a traceback."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

__all__ = ["error_line", "cli_words", "os_error_text"]


def _hparam_words(field: str, flag: str) -> tuple[tuple[str, str], ...]:
    """``field=N`` / ``field >= N`` of the covariance spec, as the ``cov_*`` hyperparameter that sets it."""
    return ((rf"\b{field}=(\d+)", rf"--hparams {flag}=\1"), (rf"\b{field} >= (\d+)", rf"--hparams {flag}=\1 or more"))


#: The library's spellings -> the command line's, per sub-command: (pattern, replacement), in order.
_CLI_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "run": (
        (r"\bresume=False\b", "--no-resume"),
        (r"\bout_dir\b", "--out"),
        (r"\bn=(\d+) records\b", r"\1 records (--n-edits \1)"),
        (r"\bn <= (\d+)", r"--n-edits \1 or less"),
        (r",? or n=None\b", ""),
        (r"\bn=None\b", "all records"),
        *_hparam_words("n_tokens", "cov_tokens"),
        *_hparam_words("seq_len", "cov_seq_len"),
    ),
    "stats": (
        (r"\bn_tokens=(\d+)", r"--tokens \1"),
        (r"\bn_tokens >= (\d+)", r"--tokens \1 or more"),
        (r"\bn_tokens\b", "--tokens"),
        (r"\bseq_len=(\d+)", r"--seq-len \1"),
        (r"\bseq_len >= (\d+)", r"--seq-len \1 or more"),
        (r"\bseq_len\b", "--seq-len"),
        (r"^device '", "--device '"),
    ),
    "demo": (*_hparam_words("n_tokens", "cov_tokens"), *_hparam_words("seq_len", "cov_seq_len")),
    "notebooks": ((r"\bout_dir\b", "--out"),),
}

#: Commands whose --out names what they write (a directory, or summarize's CSV file).
_OUT_OPTION = {"run": "--out", "notebooks": "--out", "summarize": "--out"}


def cli_words(text: str, command: str | None) -> str:
    """``text`` with the library's keyword spellings (``resume=False``, ``n_tokens=…``) replaced by
    the flags of ``command`` that set them."""
    for pattern, replacement in _CLI_WORDS.get(command or "", ()):
        text = re.sub(pattern, replacement, text)
    return text


def _in_cache(where: str) -> bool:
    from ..cache import CACHE_ENV  # the error path only: keeps --help free of torch

    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pmetlab").expanduser()
    try:
        return Path(where).expanduser().resolve().is_relative_to(base.resolve())
    except (OSError, ValueError):
        return False


def _os_hint(exc: OSError, where: str | None, command: str | None) -> str:
    """What to do about ``exc`` (raised at ``where``) in ``command``."""
    out = _OUT_OPTION.get(command or "")
    elsewhere = f"choose another {out}" if out else "use another path"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        if where is not None and _in_cache(where):
            return "point PMETLAB_CACHE_DIR at a directory you can write to (pmetlab's cache), or fix the permissions"
        return f"{elsewhere} (one you can write to), or fix the permissions"
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"free some space, or {elsewhere} on another disk"
    if exc.errno == errno.EISDIR:
        return f"a file path is expected there, not a directory; {elsewhere} (a file path)"
    if exc.errno == errno.ENOTDIR:
        return f"a part of that path is a file, not a directory; {elsewhere}"
    if exc.errno == errno.EEXIST:
        return f"something is in the way there; remove it or {elsewhere}"
    return "check the path"


def os_error_text(exc: OSError, command: str | None = None) -> str:
    """One line for an operating-system error: the reason, the path, the error's type and what to
    do. An OSError that carries its own message (no errno) is returned as it is."""
    if exc.errno is None or not exc.strerror:
        return str(exc)
    where = exc.filename2 if exc.filename2 is not None else exc.filename  # a rename: its target
    where = os.fsdecode(where) if isinstance(where, (str, bytes, os.PathLike)) else None
    what = exc.strerror[:1].lower() + exc.strerror[1:]
    text = f"{what}: {where!r}" if where is not None else what
    return f"{text} ({type(exc).__name__}); {_os_hint(exc, where, command)}"


def error_line(exc: BaseException, command: str | None = None) -> str:
    """The one line (no newlines, flags for keyword arguments) that stands for ``exc``."""
    if isinstance(exc, OSError):
        msg = os_error_text(exc, command)
    else:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return cli_words(" ".join(str(msg).split()), command) or type(exc).__name__
