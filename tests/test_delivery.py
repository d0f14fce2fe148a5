"""PMET's switches of issue #21 on tiny models: what the FFN target writes (``ffn_target``), the
norm bound's reference (``clamp_reference``), and the delivery diagnostics (p(o*) optimised vs
written, δ on its bound)."""

from __future__ import annotations

import pytest
import torch

from pmetlab import MEMITHyperParams, PMETHyperParams, compute_deltas, get_adapter
from pmetlab.editing.prefixes import context_templates
from pmetlab.editing.rows import KIND_BARE, build_rows
from pmetlab.editing.target_cache import target_keys
from pmetlab.editing.targets import optimize_targets
from pmetlab.runs.edits import delivery_frame, target_summary
from pmetlab.tracing import TraceDict, hidden_of, replace_hidden
from tests import test_compute
from tests.test_compute import REQUESTS, _counting, _hp, _model
from tests.tiny_models import make_tiny_tokenizer

env = test_compute.env  # the same fixture: an isolated cache and a tiny corpus

SEQUENTIAL = ["LlamaForCausalLM", "GPT2LMHeadModel", "Qwen2ForCausalLM"]
PARALLEL = ["GPTJForCausalLM", "GPTNeoXForCausalLM"]
#: Post-norm blocks (Gemma 2/3) normalise a^L and m^L before the residual add, so no vector written
#: into m^L reproduces h^L exactly there (method.md §9; the write through the norm is a later switch).


@torch.no_grad()
def _h_at_layer(model, tok, requests, adds: dict[str, torch.Tensor], L: int) -> torch.Tensor:
    """(N, d_model): h^L at each request's subject token on its bare prompt, with ``adds[module]``
    (N, d_model) added to that module's output there."""
    rows = build_rows(tok, requests, ["{}"])
    bare = rows.subset((rows.kind == KIND_BARE).nonzero().squeeze(1))
    ad, B = get_adapter(model), len(bare.req)

    def edit(output, name):
        if name not in adds:
            return output
        h = hidden_of(output)
        h3 = ad.unflatten(h, B).clone()
        h3[torch.arange(B), bare.lookup] += adds[name][bare.req].to(h.dtype)
        return replace_hidden(output, h3.reshape(h.shape))

    layer = ad.layer_name(L)
    with TraceDict(model, [*adds, layer], edit_output=edit, stop=True) as td:
        model(input_ids=bare.input_ids, attention_mask=bare.attention_mask, use_cache=False)
    h = ad.unflatten(hidden_of(td[layer].output), B)
    return h[torch.arange(B), bare.lookup][torch.argsort(bare.req)]


def _optimise(env, family: str, **hp_kw):
    model, tok = _model(family), make_tiny_tokenizer()
    hp = _hp(env, PMETHyperParams, v_num_grad_steps=6, kl_factor=0.5, **hp_kw)
    res = optimize_targets(model, tok, REQUESTS, hp, context_templates(model, tok, hp), progress=False)
    return model, tok, hp, res


@pytest.mark.parametrize("family", SEQUENTIAL + PARALLEL)
def test_block_target_reproduces_the_optimised_layer_output(env, family):
    model, tok, hp, res = _optimise(env, family)
    ad, L = get_adapter(model), hp.layers[-1]
    optimised = _h_at_layer(
        model, tok, REQUESTS, {ad.attn_out_name(L): res.deltas["attn"], ad.ffn_out_name(L): res.deltas["ffn"]}, L
    )
    block = res.written("ffn", "block") - res.inits["ffn"]
    torch.testing.assert_close(_h_at_layer(model, tok, REQUESTS, {ad.ffn_out_name(L): block}, L), optimised)
    assert res.deltas["attn"].norm() > 0  # δ^a was optimised, so the check is not vacuous


@pytest.mark.parametrize("family", [*SEQUENTIAL, "Gemma3ForCausalLM"])
def test_on_sequential_blocks_the_released_target_drops_the_ffn_response_to_delta_a(env, family):
    model, tok, hp, res = _optimise(env, family)
    released, observed = res.written("ffn", "released"), res.written("ffn", "observed")
    gap = (observed - released).norm(dim=1)
    assert (gap > 1e-4 * released.norm(dim=1)).all(), "the FFN at L reads δ^a on sequential blocks"


@pytest.mark.parametrize("family", PARALLEL)
def test_on_parallel_blocks_the_observed_target_equals_the_released_one(env, family):
    model, tok, hp, res = _optimise(env, family)
    assert get_adapter(model).parallel
    torch.testing.assert_close(res.written("ffn", "observed"), res.values["ffn"], rtol=1e-5, atol=1e-5)


def test_released_target_is_the_value_itself_bit_for_bit(env):
    _, _, _, res = _optimise(env, "LlamaForCausalLM")
    assert res.written("ffn", "released") is res.values["ffn"]
    assert res.written("attn", "block") is res.values["attn"]


@pytest.mark.parametrize("reference", ["component", "residual"])
def test_clamp_reference_sets_each_deltas_ball(env, reference):
    model, tok, hp, res = _optimise(env, "LlamaForCausalLM", clamp_norm_factor=0.05, clamp_reference=reference)
    h_init = _h_at_layer(model, tok, REQUESTS, {}, hp.layers[-1]).norm(dim=1)
    for s in ("ffn", "attn"):
        ref = h_init if reference == "residual" else res.inits[s].norm(dim=1)
        torch.testing.assert_close(res.delivery[f"radius_{s}"], 0.05 * ref.float(), rtol=1e-5, atol=1e-6)
        assert (res.deltas[s].norm(dim=1) <= res.delivery[f"radius_{s}"] * (1 + 1e-5)).all()
        assert res.delivery[f"on_bound_{s}"].tolist() == [1.0] * len(REQUESTS)  # a tight ball is reached


def test_delivery_reports_written_p_for_every_ffn_target(env):
    _, _, _, res = _optimise(env, "LlamaForCausalLM")
    for k in ("p_optimised", "p_written_released", "p_written_observed", "p_written_block"):
        assert res.delivery[k].shape == (len(REQUESTS),)
        assert ((res.delivery[k] >= 0) & (res.delivery[k] <= 1)).all()
    last = {row["request"]: row["p_target"] for row in res.trace}
    assert res.delivery["p_optimised"].tolist() == pytest.approx([last[i] for i in range(len(REQUESTS))])


def test_memit_writes_what_it_optimised(env):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env, MEMITHyperParams, v_num_grad_steps=4)
    d = compute_deltas(model, tok, REQUESTS, hp, progress=False)
    frame = delivery_frame(d, hp)
    assert frame["p_written"].tolist() == frame["p_optimised"].tolist()
    assert "p_written_mean" in target_summary(d, hp)


def test_ffn_target_arms_share_the_optimisation_and_change_only_the_write(env, monkeypatch):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env, PMETHyperParams, v_num_grad_steps=4)
    calls = _counting(monkeypatch)
    released = compute_deltas(model, tok, REQUESTS, hp, progress=False)
    assert sum(calls) == len(REQUESTS)
    calls.clear()
    block = compute_deltas(model, tok, REQUESTS, hp.replace(ffn_target="block"), progress=False)
    again = compute_deltas(model, tok, REQUESTS, hp.replace(ffn_target="released"), progress=False)
    assert calls == []  # both read the cached optimisation
    assert all(torch.equal(released.tensors[n], again.tensors[n]) for n in released.tensors)
    assert any(not torch.allclose(released.tensors[n], block.tensors[n]) for n in released.tensors)
    frame = delivery_frame(block, hp.replace(ffn_target="block"))
    assert frame["p_written"].tolist() == pytest.approx(block.meta["targets"]["delivery"]["p_written_block"])


def test_default_switches_keep_the_target_cache_key(env):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env, PMETHyperParams)
    key = target_keys(model, tok, REQUESTS[:1], hp, ["{}"])[0]
    assert "clamp_reference" not in key and "ffn_target" not in key  # caches from before the switches hold
    assert target_keys(model, tok, REQUESTS[:1], hp.replace(ffn_target="block"), ["{}"])[0] == key
    assert target_keys(model, tok, REQUESTS[:1], hp.replace(clamp_reference="residual"), ["{}"])[0] != key


@pytest.mark.parametrize(
    ("kw", "cls", "needle"),
    [
        ({"ffn_target": "both"}, PMETHyperParams, "ffn_target must be one of ['released', 'observed', 'block']"),
        ({"clamp_reference": "h"}, PMETHyperParams, "clamp_reference must be one of ['component', 'residual']"),
        ({"ffn_target": "block"}, MEMITHyperParams, "PMET switches"),
        ({"clamp_reference": "residual"}, MEMITHyperParams, "PMET switches"),
    ],
)
def test_invalid_switch_values_are_refused_in_one_line(kw, cls, needle):
    with pytest.raises(ValueError) as exc:
        cls(**kw)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
