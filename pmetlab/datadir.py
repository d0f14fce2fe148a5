"""Where the evaluation data and the corpus live: ``$PMETLAB_DATA_DIR`` (checked, never ignored)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_DIR_ENV", "env_data_dir"]

DATA_DIR_ENV = "PMETLAB_DATA_DIR"


def env_data_dir() -> Path | None:
    """``$PMETLAB_DATA_DIR`` as a directory; None when it is unset or empty.

    Raises:
        ValueError: it is set to a path that is not a directory (a typo would otherwise make the
            dataset and the corpus fall back to other copies silently).
    """
    raw = os.environ.get(DATA_DIR_ENV, "")
    if not raw.strip():
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ValueError(
            f"${DATA_DIR_ENV}={raw!r} {what}; expected the folder holding the data (e.g. the shared data "
            f"folder with counterfact/, zsre/, knowns/, corpus/). Fix the path or unset ${DATA_DIR_ENV}."
        )
    return path
