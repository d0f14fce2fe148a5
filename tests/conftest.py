"""Shared fixtures: tiny random-weight models per adapter family, and the real embedded SmolLM2.

Tiny models come from :mod:`tests.tiny_models` (configs only, no download). The real model is
loaded once per session and only by tests marked ``slow``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.tiny_models import TINY_FAMILIES, make_tiny_model, random_input_ids

# Tiny models run ~100x slower with two intra-op threads on a busy 2-core machine (threads
# spin-wait on each other); one thread keeps the suite fast. PMETLAB_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("PMETLAB_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M (float32, CPU); loaded once per session."""
    import pmetlab

    return pmetlab.load_model("smollm2-135m", device="cpu")


@pytest.fixture
def tiny_model() -> Callable[..., nn.Module]:
    """A factory: ``tiny_model("LlamaForCausalLM", seed=0)`` builds a fresh tiny model."""
    return make_tiny_model


@pytest.fixture(params=TINY_FAMILIES)
def tiny_family_model(request) -> nn.Module:
    """One fresh tiny model per adapter family (parametrised over :data:`TINY_FAMILIES`)."""
    return make_tiny_model(request.param)


@pytest.fixture
def tiny_llama() -> nn.Module:
    return make_tiny_model("LlamaForCausalLM")


@pytest.fixture
def input_ids() -> Callable[..., torch.Tensor]:
    """A factory for random ``(batch, seq)`` token ids valid for a given model."""
    return random_input_ids
