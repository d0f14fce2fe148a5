"""Argument types of the ``pmetlab`` command line: layer lists, KEY=VALUE pairs, positive ints,
chunk lengths, and paths checked before any work (an output directory that is a file, a CSV path
that is a directory, a run directory that is a file)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..covspec import MIN_SEQ_LEN
from ..hparams import layers_from_text

__all__ = [
    "parse_layers",
    "parse_key_value",
    "positive",
    "chunk_length",
    "output_dir",
    "output_file",
    "run_dir",
    "pairs_to_dict",
]


def parse_layers(text: str) -> list[int]:
    """'3-8' -> [3, 4, 5, 6, 7, 8]; '3,4,5' -> [3, 4, 5]; '2,5-7' -> [2, 5, 6, 7]."""
    try:
        return list(layers_from_text(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_key_value(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' with VALUE parsed as JSON when it parses ('0.5', '[3,4]', 'true'), else a string."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    if key == "layers" and isinstance(value, str):
        value = parse_layers(value)
    return key, value


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def chunk_length(text: str) -> int:
    """A corpus chunk length of at least :data:`pmetlab.covspec.MIN_SEQ_LEN` tokens."""
    v = positive(text)
    if v < MIN_SEQ_LEN:
        raise argparse.ArgumentTypeError(
            f"expected a chunk length of at least {MIN_SEQ_LEN} tokens, got {text!r}: the corpus is cut into "
            f"chunks of this many tokens and pieces under 8 tokens are dropped, so shorter chunks keep little "
            f"or none of it (the presets use 256)"
        )
    return v


def _path(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~name" of an unknown user
        raise argparse.ArgumentTypeError(f"cannot expand the '~' in {text!r}: no such user; give a full path") from None


def _file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s parent folders (from the top) that exists but is not a directory."""
    return next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)


def output_dir(text: str) -> str:
    """A directory to write into: missing (it is created) or a directory, not a file. A blank value
    is passed on (the command refuses it with its own message)."""
    if not text.strip():
        return text
    path = _path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r} is a file, not a directory; give a directory (it is created when missing)"
        )
    if (blocker := _file_in_the_way(path)) is not None:
        raise argparse.ArgumentTypeError(
            f"{text!r} cannot be created: {str(blocker)!r} is a file, not a directory; give another directory"
        )
    return text


def output_file(text: str) -> str:
    """A file to write: missing or a file, not a directory (a blank value is passed on)."""
    if not text.strip():
        return text
    path = _path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r} is a directory; give a file path, e.g. {str(path / 'summary.csv')!r}"
        )
    if (blocker := _file_in_the_way(path)) is not None:
        raise argparse.ArgumentTypeError(
            f"{text!r} cannot be written: {str(blocker)!r} is a file, not a directory; give another path"
        )
    return text


def run_dir(text: str) -> str:
    """A run directory (or a sweep directory); a file is refused with what to give instead (a
    missing path is left to the command, which says so)."""
    path = _path(text)
    if path.exists() and not path.is_dir():
        fix = (
            f"give its directory {str(path.parent)!r}"
            if path.name == "run.json"
            else "give a run directory (one holding run.json) or a sweep directory"
        )
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a run directory; {fix}")
    return text


def pairs_to_dict(pairs: Sequence[tuple[str, Any]] | None) -> dict[str, Any]:
    return dict(pairs or [])
