"""Locating facts: causal tracing (ROME, arXiv 2202.05262 §2.1 and Appendix B).

``noise`` (the corruption's scale ν), ``prompt`` (token ids and the subject's token span),
``restore`` (batched and reference restored runs), ``trace`` (one fact) and ``facts`` (many
facts, their summary and the best MLP window).
"""

from __future__ import annotations

from .facts import FactsTrace, LayerWindow, best_window, summarize_traces, trace_facts
from .known import known_facts_of
from .noise import embedding_noise_scale
from .reading import locate_reading
from .restore import KINDS, component_name, window_layers
from .trace import TOKEN_ROLES, CausalTrace, token_roles, trace_fact

__all__ = [
    "CausalTrace",
    "FactsTrace",
    "KINDS",
    "LayerWindow",
    "TOKEN_ROLES",
    "best_window",
    "component_name",
    "embedding_noise_scale",
    "known_facts_of",
    "locate_reading",
    "summarize_traces",
    "token_roles",
    "trace_fact",
    "trace_facts",
    "window_layers",
]
