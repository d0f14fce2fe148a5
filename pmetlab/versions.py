"""Versions of everything that changes a result, recorded with every run and saved edit."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

__all__ = ["versions"]


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("pmetlab", "torch", "transformers", "safetensors", "numpy", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
