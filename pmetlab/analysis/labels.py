"""The labels every DataFrame of the MHSA-vs-FFN study uses (method.md §5)."""

from __future__ import annotations

import pandas as pd

__all__ = ["COMPONENTS", "METRICS", "PROTOCOLS", "PROJECTIONS", "DEFAULT_PROJECTION", "label_keys"]

#: Component labels used in every DataFrame the analysis returns, in plotting order.
COMPONENTS: tuple[str, ...] = ("MHSA", "FFN")
#: Metric labels used in every DataFrame the analysis returns.
METRICS: tuple[str, ...] = ("cosine", "jaccard")
#: "paper": normed module input vs module output (method.md §5); "residual": residual stream
#: before vs after the component's contribution.
PROTOCOLS: tuple[str, ...] = ("paper", "residual")
#: How a vector becomes top-k tokens for the Jaccard similarity.
PROJECTIONS: tuple[str, ...] = ("input_embeddings", "logit_lens")
#: The projection each protocol uses unless one is passed explicitly.
DEFAULT_PROJECTION: dict[str, str] = {"paper": "input_embeddings", "residual": "logit_lens"}


def label_keys(df: pd.DataFrame) -> list[str]:
    """The ``protocol``/``projection`` columns present in ``df`` (older frames lack them)."""
    return [c for c in ("protocol", "projection") if c in df.columns]
