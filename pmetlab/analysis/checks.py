"""Argument checks and batching shared by the state collectors and the similarity values."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .labels import DEFAULT_PROJECTION, PROJECTIONS, PROTOCOLS

__all__ = ["check_prompts", "check_positive_int", "check_protocol", "batches", "progress_bar"]


def check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, got a single string; wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(
            "prompts is empty; pass at least one prompt string (e.g. record['prompt'] of each known-facts record)"
        )
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{i}] must be a non-empty string, got {p!r}")
    return prompts


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_protocol(protocol: Any, projection: Any) -> tuple[str, str]:
    """Validated ``(protocol, projection)``; ``projection=None`` picks the protocol's default."""
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        raise ValueError(
            f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}: 'paper' compares "
            f"each component's normed input with its output (method.md §5), 'residual' the "
            f"residual stream before and after the component"
        )
    if projection is None:
        return protocol, DEFAULT_PROJECTION[protocol]
    if not isinstance(projection, str) or projection not in PROJECTIONS:
        raise ValueError(
            f"projection must be one of {list(PROJECTIONS)} or None (the protocol's default, "
            f"{DEFAULT_PROJECTION}), got {projection!r}"
        )
    return protocol, projection


def batches(prompts: list[str], batch_size: int) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(prompts), batch_size):
        yield start, prompts[start : start + batch_size]


def progress_bar(total: int, enabled: bool, desc: str):
    from ..progress import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="prompt")
