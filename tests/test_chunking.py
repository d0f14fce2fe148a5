"""Chunking of the target optimisation by device (issue #22): the CPU keeps its measured budget bit
for bit; an accelerator's chunk grows with its free memory; any chunking gives the same targets."""

from __future__ import annotations

import pytest
import torch

from pmetlab.editing.chunking import CHUNK_SIZE, CHUNK_TOKENS, CPU_BUDGET, MAX_REQUESTS, ChunkBudget, chunk_budget
from pmetlab.editing.prefixes import context_templates
from pmetlab.editing.target_cache import run_chunked
from pmetlab.editing.targets import optimize_targets
from tests import test_compute
from tests.test_compute import REQUESTS, _hp, _model
from tests.tiny_models import make_tiny_tokenizer

env = test_compute.env


def test_the_cpu_keeps_its_measured_budget():
    model = _model("LlamaForCausalLM")
    assert chunk_budget(model) == CPU_BUDGET == ChunkBudget(CHUNK_SIZE, CHUNK_TOKENS)
    assert chunk_budget(model, 3) == ChunkBudget(3, CHUNK_TOKENS)  # an explicit size wins


def test_an_accelerator_budget_grows_with_free_memory_and_is_bounded():
    model = _model("LlamaForCausalLM")
    small, big = chunk_budget(model, free_bytes=10**6), chunk_budget(model, free_bytes=80 * 2**30)
    assert small == ChunkBudget(CHUNK_SIZE, CHUNK_TOKENS)  # never below the CPU's
    assert big.positions > 1000 * CHUNK_TOKENS and big.requests == MAX_REQUESTS
    mid = chunk_budget(model, free_bytes=2**30)
    assert CHUNK_SIZE <= mid.requests <= MAX_REQUESTS and mid.positions > CHUNK_TOKENS
    with pytest.raises(ValueError, match=">= 1 request"):
        ChunkBudget(0, 1)


def test_one_big_chunk_gives_the_targets_of_small_chunks(env, monkeypatch):
    import pmetlab.editing.target_cache as tc

    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env, v_num_grad_steps=4)
    templates = context_templates(model, tok, hp)
    small = run_chunked(optimize_targets, model, tok, REQUESTS, hp, templates, chunk_size=1, progress=False)
    monkeypatch.setattr(tc, "chunk_budget", lambda m, c: chunk_budget(m, c, free_bytes=2**34))
    big = run_chunked(optimize_targets, model, tok, REQUESTS, hp, templates, progress=False)
    assert big.n_steps == small.n_steps
    for k in small.values:
        torch.testing.assert_close(big.values[k], small.values[k], rtol=1e-4, atol=1e-5)
