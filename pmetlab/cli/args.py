"""Argument types of the ``pmetlab`` command line: layer lists, KEY=VALUE pairs, positive ints."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["parse_layers", "parse_key_value", "positive", "pairs_to_dict"]


def parse_layers(text: str) -> list[int]:
    """'3-8' -> [3, 4, 5, 6, 7, 8]; '3,4,5' -> [3, 4, 5]; '2,5-7' -> [2, 5, 6, 7]."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out += list(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}; expected e.g. '3-8' or '3,4,5'") from None
    if not out:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}; expected e.g. '3-8' or '3,4,5'")
    return out


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


def pairs_to_dict(pairs: Sequence[tuple[str, Any]] | None) -> dict[str, Any]:
    return dict(pairs or [])
