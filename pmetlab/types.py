"""Type aliases for the model and tokenizer in public signatures.

pmetlab edits decoder-only causal LMs loaded with transformers (any ``PreTrainedModel`` whose
class has an adapter, see :mod:`pmetlab.models.adapters`); some helpers also accept a bare
``torch.nn.Module`` built from a config, so the model alias is the module type.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["Model", "Tokenizer"]

#: A causal language model (a transformers ``PreTrainedModel`` with a pmetlab adapter).
Model: TypeAlias = torch.nn.Module
#: Its tokenizer (a transformers tokenizer: fast or slow).
Tokenizer: TypeAlias = PreTrainedTokenizerBase
