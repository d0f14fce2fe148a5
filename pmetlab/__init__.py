"""pmetlab: a workbench for precise model editing (PMET, MEMIT) of transformer language models."""
from __future__ import annotations

import logging

from .models import get_adapter, load_model, model_identity, supported_architectures
from .tracing import Trace, TraceDict

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__", "load_model", "get_adapter", "model_identity", "supported_architectures",
           "Trace", "TraceDict"]
