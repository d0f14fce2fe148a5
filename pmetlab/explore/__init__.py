"""Try an edit by hand: the interactive edit explorer (ipywidgets) and the session behind it.

    import pmetlab
    pmetlab.explore("smollm2-135m")   # in JupyterLab: the form, the buttons, the tables

:class:`EditSession` is the logic (tested headless), :class:`Explorer` the widgets over it.
"""

from __future__ import annotations

from typing import Any

from .session import KNOBS, EditOutcome, EditSession, Fact, next_token_topk
from .widget import STATUS_APPLIED, Explorer

__all__ = ["explore", "Explorer", "EditSession", "EditOutcome", "Fact", "next_token_topk", "KNOBS", "STATUS_APPLIED"]


def explore(model: str = "smollm2-135m", *, device: str = "auto", n_records: int = 200, **session: Any) -> Explorer:
    """Load ``model`` and open the explorer with the first ``n_records`` records of the CounterFact
    and zsRE evaluation splits to pick from (a dataset that is not available is left out, with a
    log line). ``session`` goes to :class:`EditSession` (``n_gen_tokens``, ``top_k``, ``fixed``)."""
    import logging

    from ..datasets import DatasetNotFoundError, load_dataset, split_records
    from ..models.loading import load_model

    mdl, tok = load_model(model, device=device)
    records = {}
    for name in ("counterfact", "zsre"):
        try:
            records[name] = split_records(load_dataset(name), "eval")[0][:n_records]
        except DatasetNotFoundError as exc:
            logging.getLogger(__name__).info("explorer: %s not available (%s)", name, exc)
    return Explorer(EditSession(mdl, tok, model, **session), records)
