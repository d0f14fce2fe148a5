"""The forward machinery of the target optimisation: transformers cache shims, layer replay,
the per-call strategy check, and the per-request target cache's round trip."""

from __future__ import annotations

import pytest
import torch

import pmetlab.editing.stepper as stepper_mod
from pmetlab import EditRequest, PMETHyperParams, get_adapter
from pmetlab.editing.prefixes import context_templates
from pmetlab.editing.targets import optimize_targets, optimize_targets_cached
from pmetlab.forward import cache_from_layers, cache_kwarg, cache_layers, cache_of, replay_from_layer
from pmetlab.tracing import Trace
from tests.tiny_models import assert_no_hooks, make_tiny_model, make_tiny_tokenizer, random_input_ids

FAMILIES = ["LlamaForCausalLM", "GPTJForCausalLM", "GPT2LMHeadModel"]
REQUESTS = [
    EditRequest(prompt="{} plays the sport of", subject="danny miles", target_new="jazz"),
    EditRequest(prompt="the capital of {} is", subject="france", target_new="rome"),
    EditRequest(prompt="{} was born in the city of", subject="miles davis", target_new="new tokyo"),
]


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_rebuilt_from_its_layers_continues_like_the_full_forward(family):
    model = make_tiny_model(family)
    ids = random_input_ids(model, batch=2, seq=6)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        first = model(input_ids=ids[:, :-1], use_cache=True)
        kv = [(k.clone(), v.clone()) for k, v in cache_layers(cache_of(first))]
        assert len(kv) == get_adapter(model).n_layers
        rebuilt = cache_from_layers(model, kv)
        step = model(input_ids=ids[:, -1:], use_cache=True, **{cache_kwarg(model): rebuilt}).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_cache_of_names_what_is_missing():
    with pytest.raises(TypeError, match="carries no KV cache"):
        cache_of(object())


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_from_layer_reproduces_the_model_and_restores_it(family):
    model = make_tiny_model(family)
    adapter = get_adapter(model)
    ids = random_input_ids(model, batch=2, seq=5)
    layers_before = list(adapter.layers())
    with torch.no_grad(), Trace(model, adapter.layer_name(2), retain_input=True) as tr:
        full = model(input_ids=ids).logits
    as_tuple = isinstance(tr.output, tuple)  # what the model's decoder layers return
    with torch.no_grad(), replay_from_layer(adapter, 2, tr.input, as_tuple):
        replayed = model(input_ids=ids).logits
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="injected"), replay_from_layer(adapter, 2, tr.input, as_tuple):
        raise RuntimeError("injected")
    assert list(adapter.layers()) == layers_before  # the very same modules, also after an exception
    assert_no_hooks(model)


def test_prefix_check_runs_once_per_call_owner(cache_env, monkeypatch):
    """The "does the cached prefix reproduce the uncached logits" verdict is owned by the call:
    one check for all chunks of an optimize_targets_cached call, a new one for the next call."""
    model, tok = make_tiny_model("LlamaForCausalLM", initializer_range=0.2), make_tiny_tokenizer()
    hp = PMETHyperParams(layers=(0, 1), n_prefixes=2, prefix_tokens=4, v_num_grad_steps=3)
    templates = context_templates(model, tok, hp)
    calls = []
    real = stepper_mod.prefix_reproduces
    monkeypatch.setattr(stepper_mod, "prefix_reproduces", lambda *a, **k: calls.append(1) or real(*a, **k))
    optimize_targets_cached(model, tok, REQUESTS, hp, templates, progress=False, chunk_size=1, use_cache=False)
    assert calls == [1]
    optimize_targets(model, tok, REQUESTS[:1], hp, templates, progress=False)
    assert calls == [1, 1]
    optimize_targets(model, tok, REQUESTS[:1], hp, templates, progress=False, strategy="replay")
    assert calls == [1, 1]  # an explicit strategy needs no check


def test_cached_targets_round_trip_exactly(cache_env):
    """A cache hit returns the stored tensors bit-exactly and the trace with its columns in order."""
    model, tok = make_tiny_model("GPT2LMHeadModel", initializer_range=0.2), make_tiny_tokenizer()
    hp = PMETHyperParams(layers=(0, 1), n_prefixes=1, prefix_tokens=4, v_num_grad_steps=3)
    templates = context_templates(model, tok, hp)
    first = optimize_targets_cached(model, tok, REQUESTS, hp, templates, progress=False, chunk_size=2)
    again = optimize_targets_cached(model, tok, REQUESTS, hp, templates, progress=False, chunk_size=2)
    assert list(again.values) == list(first.values) == list(hp.value_spaces)
    for group in ("values", "inits", "deltas"):
        for k, t in getattr(first, group).items():
            assert torch.equal(getattr(again, group)[k], t)
    assert again.trace == first.trace and [list(r) for r in again.trace] == [list(r) for r in first.trace]
    assert again.n_steps == first.n_steps
