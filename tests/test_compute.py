"""compute_deltas end to end on tiny models: the model is never changed, the right weights are
edited, the ablation switches do what they say, the edit raises p(target), failures restore,
and the fast target optimisation agrees with the reference one."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

import pmetlab.editing.compute as compute_mod
from pmetlab import (
    EditRequest,
    MEMITHyperParams,
    PMETHyperParams,
    compute_deltas,
    edited,
    get_adapter,
    layer_covariances,
)
from pmetlab.editing.prefixes import context_templates
from pmetlab.editing.targets import optimize_targets, stop_decision
from pmetlab.tokens import target_ids
from tests.tiny_models import _TOKENIZER_WORDS, TINY_FAMILIES, assert_no_hooks, make_tiny_model, make_tiny_tokenizer

FAMILIES = ["LlamaForCausalLM", "GPTJForCausalLM", "GPT2LMHeadModel"]  # sequential, parallel, Conv1D
REQUESTS = [
    EditRequest(prompt="{} plays the sport of", subject="danny miles", target_new="jazz"),
    EditRequest(prompt="the capital of {} is", subject="france", target_new="rome"),
    EditRequest(prompt="{} was born in the city of", subject="miles davis", target_new="new tokyo"),
]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(0)
    words = [w for w in _TOKENIZER_WORDS if w.isalpha()]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"<doc>\n{' '.join(rng.choice(words) for _ in range(60))}\n</doc>\n" for _ in range(12)))
    return {"corpus": str(corpus), "tmp": tmp_path}


def _hp(env, cls=PMETHyperParams, **kw):
    base = dict(
        layers=(0, 1),
        cov_corpus=env["corpus"],
        cov_tokens=600,
        cov_seq_len=32,
        n_prefixes=2,
        prefix_tokens=4,
        v_num_grad_steps=5,
        clamp_norm_factor=4.0,
        mom2_update_weight=1.0,
    )
    return cls(**{**base, **kw})


def _model(family: str, **kw):
    # initializer_range 0.2: the default 0.02 gives near-uniform logits that no edit can move
    init = "init_std" if family == "OPTForCausalLM" else "initializer_range"
    return make_tiny_model(family, **{init: 0.2}, **kw)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, state) -> None:
    now = model.state_dict()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"compute_deltas changed {changed}"
    assert_no_hooks(model)
    adapter = get_adapter(model)
    assert all(type(l).__name__ != "_PassThrough" for l in adapter.layers())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cls", [PMETHyperParams, MEMITHyperParams], ids=["pmet", "memit"])
def test_model_is_left_bit_identical_and_only_critical_ffn_edited(env, family, cls):
    model, tok = _model(family), make_tiny_tokenizer()
    adapter = get_adapter(model)
    state = _state(model)
    d = compute_deltas(model, tok, REQUESTS[:2], _hp(env, cls), progress=False)
    _assert_untouched(model, state)
    want = sorted(adapter.weight_param_name(adapter.ffn_out_name(l)) for l in (0, 1))
    assert d.param_names() == want
    for n, t in d.tensors.items():  # stored in the parameter's own layout (transposed for Conv1D)
        assert t.shape == model.get_parameter(n).shape
        assert torch.isfinite(t).all() and t.abs().sum() > 0
    assert d.method == cls.method
    assert [x["layer"] for x in d.meta["diagnostics"]] == [0, 1]


def test_compute_leaves_no_gradients_on_the_model(env):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    compute_deltas(model, tok, REQUESTS[:1], _hp(env), progress=False)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_update_attn_weights_edits_mhsa_and_ffn_of_critical_layers_only(env, family):
    model, tok = _model(family), make_tiny_tokenizer()
    adapter = get_adapter(model)
    state = _state(model)
    d = compute_deltas(model, tok, REQUESTS[:2], _hp(env, update_attn_weights=True), progress=False)
    _assert_untouched(model, state)
    want = sorted(
        adapter.weight_param_name(m) for l in (0, 1) for m in (adapter.ffn_out_name(l), adapter.attn_out_name(l))
    )
    assert d.param_names() == want
    for n, t in d.tensors.items():
        assert t.shape == model.get_parameter(n).shape and t.abs().sum() > 0
    comps = [(x["layer"], x["component"]) for x in d.meta["diagnostics"]]
    assert comps == [(0, "attn"), (0, "ffn"), (1, "attn"), (1, "ffn")]  # the released order


def _ffn_residual_norm(model, tok, hp, attn_update: torch.Tensor | None) -> float:
    """‖v^m − m^L‖ with m^L read on the model (optionally with W_O of layer L updated)."""
    from pmetlab.editing.solve import keys_and_outputs
    from pmetlab.editing.targets import optimize_targets_cached

    adapter, L = get_adapter(model), hp.layers[-1]
    templates = context_templates(model, tok, hp)
    v = optimize_targets_cached(model, tok, REQUESTS[:2], hp, templates, progress=False).values["ffn"]
    w = model.get_parameter(adapter.weight_param_name(adapter.attn_out_name(L)))
    saved = w.detach().clone()
    with torch.no_grad():
        if attn_update is not None:
            w.add_(attn_update)
        _, cur = keys_and_outputs(
            model, tok, adapter, REQUESTS[:2], templates, [adapter.ffn_out_name(L)], [adapter.ffn_out_name(L)]
        )
        w.copy_(saved)
    return float((v - cur[adapter.ffn_out_name(L)]).norm())


def test_attn_update_order_released_reads_the_ffn_residual_after_the_attention_update(env):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    adapter = get_adapter(model)
    hp = _hp(env, layers=(1,), update_attn_weights=True)
    attn_param = adapter.weight_param_name(adapter.attn_out_name(1))
    ffn_param = adapter.weight_param_name(adapter.ffn_out_name(1))
    runs = {
        o: compute_deltas(model, tok, REQUESTS[:2], hp.replace(attn_update_order=o), progress=False)
        for o in ("attn_first", "simultaneous")
    }
    ffn_resid = {
        o: next(x["target_residual_norm"] for x in d.meta["diagnostics"] if x["component"] == "ffn")
        for o, d in runs.items()
    }
    # the attention updates agree (both read the unedited model); the FFN ones do not
    torch.testing.assert_close(runs["attn_first"].tensors[attn_param], runs["simultaneous"].tensors[attn_param])
    assert not torch.allclose(runs["attn_first"].tensors[ffn_param], runs["simultaneous"].tensors[ffn_param])
    assert ffn_resid["simultaneous"] == pytest.approx(_ffn_residual_norm(model, tok, hp, None), rel=1e-5)
    after = _ffn_residual_norm(model, tok, hp, runs["attn_first"].tensors[attn_param])
    assert ffn_resid["attn_first"] == pytest.approx(after, rel=1e-5)
    assert ffn_resid["attn_first"] != pytest.approx(ffn_resid["simultaneous"], rel=1e-3)


def test_critical_layers_beyond_the_model_are_refused(env):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    with pytest.raises(ValueError, match=r"exceed the 3 layers of LlamaForCausalLM \(valid: 0..2\)"):
        compute_deltas(model, tok, REQUESTS[:1], _hp(env, layers=(1, 3)), progress=False)
    with pytest.raises(TypeError, match="hparams"):
        compute_deltas(model, tok, REQUESTS[:1], {"layers": [0, 1]}, progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["LlamaForCausalLM", "GPTJForCausalLM"])
def test_without_delta_a_the_attention_target_stays_zero(env, family):
    model, tok = _model(family), make_tiny_tokenizer()
    hp = _hp(env, optimize_attn=False, v_num_grad_steps=6)
    res = optimize_targets(model, tok, REQUESTS, hp, context_templates(model, tok, hp), progress=False)
    assert torch.equal(res.deltas["attn"], torch.zeros_like(res.deltas["attn"]))
    assert torch.equal(res.values["attn"], res.inits["attn"])
    assert res.deltas["ffn"].abs().sum() > 0
    with_a = optimize_targets(
        model, tok, REQUESTS, hp.replace(optimize_attn=True), context_templates(model, tok, hp), progress=False
    )
    assert with_a.deltas["attn"].abs().sum() > 0
    assert res.values["ffn"].shape == (len(REQUESTS), get_adapter(model).d_model)


def test_memit_optimises_the_layer_output(env):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env, MEMITHyperParams)
    res = optimize_targets(model, tok, REQUESTS[:2], hp, context_templates(model, tok, hp), progress=False)
    assert set(res.values) == {"layer"} and res.deltas["layer"].abs().sum() > 0


@pytest.mark.parametrize("stop_rule", ["pmet", "loss"])
@pytest.mark.parametrize("cls", [PMETHyperParams, MEMITHyperParams], ids=["pmet", "memit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_targets_equal_reference_targets(env, family, cls, stop_rule):
    model, tok = _model(family), make_tiny_tokenizer()
    hp = _hp(env, cls, v_num_grad_steps=8, kl_factor=0.5, stop_rule=stop_rule)
    templates = context_templates(model, tok, hp)
    fast = optimize_targets(model, tok, REQUESTS, hp, templates, progress=False)
    ref = optimize_targets(model, tok, REQUESTS, hp, templates, progress=False, reference=True)
    assert fast.n_steps == ref.n_steps
    for k in ref.values:
        torch.testing.assert_close(fast.inits[k], ref.inits[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.values[k], ref.values[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.deltas[k], ref.deltas[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(fast.trace, ref.trace):
        assert a["request"] == b["request"] and a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def test_method_defaults_set_the_stop_rule():
    assert PMETHyperParams().stop_rule == "pmet" and MEMITHyperParams().stop_rule == "loss"
    assert PMETHyperParams.preset("smollm2-135m").stop_rule == "pmet"
    assert MEMITHyperParams.preset("smollm2-135m").stop_rule == "loss"
    with pytest.raises(ValueError, match=r"stop_rule must be one of \['loss', 'pmet'\], got 'early'"):
        PMETHyperParams(stop_rule="early")


@pytest.mark.parametrize(
    "rule,loss,kl,wrong,expected",
    [
        ("loss", 0.01, 9.0, 3, (True, 1.0)),  # both rules: loss < loss_stop
        ("pmet", 0.01, 9.0, 3, (True, 1.0)),
        ("loss", 1.0, 0.0, 0, (False, 1.0)),  # MEMIT: arg-max everywhere changes nothing
        ("pmet", 1.0, 0.005, 0, (True, 1.0)),  # PMET: arg-max + KL <= kl_stop stops
        ("pmet", 1.0, 0.5, 0, (False, 0.1)),  # PMET: arg-max, KL too large: NLL scaled by 0.1
        ("pmet", 1.0, 0.0, 2, (False, 1.0)),  # PMET: not yet the arg-max
    ],
)
def test_stop_decision_follows_each_released_rule(rule, loss, kl, wrong, expected):
    hp = PMETHyperParams(stop_rule=rule)
    assert stop_decision(hp, loss, kl, wrong) == expected


# the subject ends each prompt: a δ at its last token moves the next-token logits directly, so
# tiny random models reach the arg-max within a few steps
ARGMAX_REQUESTS = [
    EditRequest(prompt="the capital of {}", subject="france", target_new="rome"),
    EditRequest(prompt="the sport of {}", subject="danny miles", target_new="jazz"),
]


def _argmax_run(env, rule: str, **kw):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(
        env,
        MEMITHyperParams,
        **{"v_num_grad_steps": 12, "v_lr": 1.0, "loss_stop": 0.0, "kl_factor": 0.0, "stop_rule": rule, **kw},
    )
    res = optimize_targets(model, tok, ARGMAX_REQUESTS, hp, context_templates(model, tok, hp), progress=False)
    return res, pd.DataFrame(res.trace).sort_values(["request", "step"], ignore_index=True)


def test_loss_rule_keeps_optimising_after_the_target_is_the_argmax(env):
    res, tr = _argmax_run(env, "loss")
    assert tr.groupby("request")["argmax"].any().all(), "test setup: every target must become the arg-max"
    assert res.n_steps == [12] * len(ARGMAX_REQUESTS)  # no early stop: loss_stop=0 and no arg-max rule
    assert (tr["nll_weight"] == 1.0).all()
    first = tr[tr["argmax"]].groupby("request")["step"].min()
    assert (first < 11).all()  # it went on after the target became the arg-max
    p = tr.set_index(["request", "step"])["p_target"]
    assert all(p[(r, 11)] > p[(r, s)] for r, s in first.items())


def test_pmet_rule_stops_at_the_first_argmax_step_when_the_kl_test_passes(env):
    res, tr = _argmax_run(env, "pmet")  # kl_factor = 0: the KL term is 0 <= kl_stop
    first = tr[tr["argmax"]].groupby("request")["step"].min()
    assert len(first) == len(ARGMAX_REQUESTS)
    assert [res.n_steps[r] for r in first.index] == [s + 1 for s in first]


def test_pmet_rule_scales_the_nll_after_an_argmax_step_while_the_kl_test_fails(env):
    res, tr = _argmax_run(env, "pmet", kl_factor=0.5, kl_stop=0.0, argmax_nll_scale=0.1)
    prev = tr.groupby("request")[["argmax", "kl"]].shift(1)
    scaled = prev["argmax"].fillna(False).astype(bool) & (prev["kl"] > 0.0)
    assert scaled.any(), "test setup: some request must reach the arg-max with KL > 0"
    assert tr.loc[scaled, "nll_weight"].tolist() == pytest.approx([0.1] * int(scaled.sum()))
    assert (tr.loc[~scaled, "nll_weight"] == 1.0).all()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_auto_strategy_matches_reference_on_every_family(env, family, caplog):
    """The cached-prefix path (one forward per step, per-row splits) reproduces the reference
    on every architecture; where it cannot (tiny Gemma 3: a sliding window of 4 tokens, shorter
    than the prompts), the one-time check falls back to replay and results still agree."""
    model, tok = _model(family), make_tiny_tokenizer()
    hp = _hp(env, PMETHyperParams, v_num_grad_steps=4, kl_factor=0.5)
    templates = context_templates(model, tok, hp)
    with caplog.at_level("INFO", logger="pmetlab.editing.targets"):
        fast = optimize_targets(model, tok, REQUESTS, hp, templates, progress=False)
    ref = optimize_targets(model, tok, REQUESTS, hp, templates, progress=False, reference=True)
    fell_back = "using replay" in caplog.text
    window = getattr(model.config, "sliding_window", None)
    assert fell_back == bool(window and window < 8), caplog.text
    assert fast.n_steps == ref.n_steps
    for k in ref.values:
        torch.testing.assert_close(fast.values[k], ref.values[k], rtol=1e-4, atol=1e-5)


def test_kl_rows_end_at_the_subject(env):
    """KL rows are cut after the subject's last token; the logits read there are those of the
    full "{subject} is a" prompt (causal attention)."""
    from pmetlab.editing.targets import KL_TEMPLATE, build_rows

    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    rows = build_rows(tok, REQUESTS, ["{}"])
    for r, req in enumerate(rows.req.tolist()):
        if int(rows.kind[r]) != 2:
            continue
        n = int(rows.attention_mask[r].sum())
        look = int(rows.lookup[r])
        assert n == look + 1
        full = tok(KL_TEMPLATE.format(REQUESTS[req].subject), return_tensors="pt")["input_ids"]
        assert full.shape[1] > n and torch.equal(full[0, :n], rows.input_ids[r, :n])
        with torch.no_grad():
            a = model(input_ids=full).logits[0, look]
            b = model(input_ids=rows.input_ids[r : r + 1, :n]).logits[0, look]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # different shapes: float rounding only


@pytest.mark.parametrize("strategy", ["replay", "prefix"])
def test_chunked_and_strategies_match_one_batch(env, strategy):
    """Requests do not interact: chunks of one request (and each exact strategy) give the targets
    of one batch."""
    from pmetlab.editing.targets import optimize_targets_chunked

    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env, PMETHyperParams, v_num_grad_steps=6)
    templates = context_templates(model, tok, hp)
    one = optimize_targets(model, tok, REQUESTS, hp, templates, progress=False, strategy=strategy)
    chunked = optimize_targets_chunked(model, tok, REQUESTS, hp, templates, chunk_size=1, progress=False)
    assert chunked.n_steps == one.n_steps
    assert sorted({r["request"] for r in chunked.trace}) == list(range(len(REQUESTS)))
    for k in one.values:
        torch.testing.assert_close(chunked.values[k], one.values[k], rtol=1e-4, atol=1e-5)


def _p_target(model, tok, r: EditRequest) -> float:
    ids = tok(r.text, return_tensors="pt")["input_ids"]
    t = target_ids(tok, r.target_new)[0]
    with torch.no_grad():
        return float(torch.softmax(model(input_ids=ids).logits[0, -1], -1)[t])


@pytest.mark.parametrize(
    "family, cls",
    [
        ("LlamaForCausalLM", PMETHyperParams),
        ("LlamaForCausalLM", MEMITHyperParams),
        ("GPTJForCausalLM", PMETHyperParams),
        ("GPT2LMHeadModel", PMETHyperParams),
    ],
)
def test_edit_raises_p_target_on_the_rewrite_prompt(env, family, cls):
    """Behaviour: after applying the edit the model prefers the new target more than before."""
    model, tok = _model(family), make_tiny_tokenizer()
    r = REQUESTS[0]
    hp = _hp(
        env,
        cls,
        v_num_grad_steps=20,
        v_lr=0.5,
        clamp_norm_factor=10.0,
        kl_factor=0.0,
        v_weight_decay=0.0,
        mom2_update_weight=0.01,
    )
    before = _p_target(model, tok, r)
    d = compute_deltas(model, tok, [r], hp, progress=False)
    with edited(model, d):
        after = _p_target(model, tok, r)
    assert _p_target(model, tok, r) == before  # restored
    assert after > 2 * before, (before, after)
    assert d.meta["targets"]["final_p_target"][0] > before
    for x in d.meta["diagnostics"]:  # with a small λ each layer writes (almost) its whole share
        assert x["residual_norm_after"] < 0.05 * x["residual_norm_before"]


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_spread_exponent_sets_each_layers_share(env, p):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env, layers=(0, 1, 2), spread_exponent=p)
    d = compute_deltas(model, tok, REQUESTS[:2], hp, progress=False)
    n = 3
    for i, x in enumerate(d.meta["diagnostics"]):
        assert x["layer"] == i
        share = x["residual_norm_before"] / x["target_residual_norm"]
        assert share == pytest.approx(1 / (n - i) ** p, rel=1e-5)


def test_precomputed_covariances_are_used(env, monkeypatch):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env)
    covs = layer_covariances(model, tok, hp.layers, corpus=env["corpus"], n_tokens=600, seq_len=32, progress=False)
    ref = compute_deltas(model, tok, REQUESTS[:1], hp, progress=False)
    monkeypatch.setattr(
        compute_mod, "layer_covariances", lambda *a, **k: pytest.fail("layer_covariances called despite covariances=")
    )
    got = compute_deltas(model, tok, REQUESTS[:1], hp, progress=False, covariances=covs)
    for n in ref.tensors:
        torch.testing.assert_close(got.tensors[n], ref.tensors[n], rtol=1e-5, atol=1e-7)
    with pytest.raises(KeyError, match="critical layer 1"):
        compute_deltas(model, tok, REQUESTS[:1], hp, progress=False, covariances={0: covs[0]})


# --- failures in the middle of an edit restore the model ---------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_failure_in_second_layer_solve_restores_the_model(env, monkeypatch, exc):
    """The first layer's update is applied temporarily when the second solve fails."""
    model, tok = _model("GPT2LMHeadModel"), make_tiny_tokenizer()
    state = _state(model)
    real = compute_mod.solve_update
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise exc("injected")
        return real(*a, **k)

    monkeypatch.setattr(compute_mod, "solve_update", flaky)
    with pytest.raises(exc):
        compute_deltas(model, tok, REQUESTS[:2], _hp(env), progress=False)
    assert len(calls) == 2
    _assert_untouched(model, state)


def test_interrupt_in_key_reading_restores_the_model(env, monkeypatch):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    state = _state(model)
    real = compute_mod.keys_and_outputs
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # layer 0 is already (temporarily) updated
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(compute_mod, "keys_and_outputs", flaky)
    with pytest.raises(KeyboardInterrupt):
        compute_deltas(model, tok, REQUESTS[:2], _hp(env, update_attn_weights=True), progress=False)
    _assert_untouched(model, state)


@pytest.mark.parametrize("family", ["LlamaForCausalLM", "GPTJForCausalLM"])
def test_interrupt_during_target_optimisation_restores_the_model(env, family):
    """A KeyboardInterrupt from inside an optimisation forward pass (our own hook on the final
    norm, in the second forward that runs with gradients, i.e. after one Adam step, while the
    lower layers may be swapped out): layers, hooks and weights are all back."""
    model, tok = _model(family), make_tiny_tokenizer()
    adapter = get_adapter(model)
    hp = _hp(env, v_num_grad_steps=10)
    context_templates(model, tok, hp)  # prefixes generated (and cached) before the hook counts
    layer_covariances(model, tok, hp.layers, corpus=env["corpus"], n_tokens=600, seq_len=32, progress=False)
    state = _state(model)
    seen = []

    def hook(mod, args, out):
        if torch.is_grad_enabled():
            seen.append(1)
            if len(seen) == 2:
                raise KeyboardInterrupt

    h = adapter.module(adapter.final_norm_name).register_forward_hook(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            compute_deltas(model, tok, REQUESTS[:2], hp, progress=False, cache_targets=False)
    finally:
        h.remove()
    assert len(seen) == 2
    _assert_untouched(model, state)
    d = compute_deltas(model, tok, REQUESTS[:2], hp, progress=False)  # and it still works afterwards
    assert d.param_names()


def test_tokenizer_without_pad_token(env):
    """Stock GPT-2/GPT-J/LLaMA tokenizers define no pad token; batching must not depend on one."""
    model = _model("GPT2LMHeadModel")
    state = _state(model)
    hp = _hp(env)
    with_pad = compute_deltas(model, make_tiny_tokenizer(), REQUESTS[:2], hp, progress=False, use_cache=False)
    no_pad_tok = make_tiny_tokenizer(pad=False)
    assert no_pad_tok.pad_token_id is None
    no_pad = compute_deltas(model, no_pad_tok, REQUESTS[:2], hp, progress=False, use_cache=False)
    _assert_untouched(model, state)
    assert no_pad_tok.pad_token_id is None  # not modified behind the caller's back
    for n in with_pad.tensors:
        torch.testing.assert_close(no_pad.tensors[n], with_pad.tensors[n], rtol=1e-4, atol=1e-6)


def test_context_prefixes_are_seeded_cached_and_well_formed(env, monkeypatch):
    import pmetlab.editing.prefixes as prefixes_mod

    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env, n_prefixes=4, prefix_tokens=5)
    first = context_templates(model, tok, hp)
    assert first[0] == "{}" and len(first) == 5
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in first[1:])
    assert context_templates(model, tok, hp, use_cache=False) == first  # same seed, same prefixes
    with monkeypatch.context() as mp:
        mp.setattr(prefixes_mod, "generate_prefixes", lambda *a, **k: pytest.fail("cache not used"))
        assert context_templates(model, tok, hp) == first
    assert context_templates(model, tok, hp.replace(seed=1)) != first
    assert context_templates(model, tok, hp.replace(n_prefixes=0)) == ["{}"]


def test_prefix_cache_is_keyed_by_the_tokenizer(env, monkeypatch):
    from tokenizers import normalizers

    import pmetlab.editing.prefixes as prefixes_mod

    model = _model("LlamaForCausalLM")
    hp = _hp(env, n_prefixes=3, prefix_tokens=5)
    a = context_templates(model, make_tiny_tokenizer(), hp)
    tok2 = make_tiny_tokenizer()
    tok2.backend_tokenizer.normalizer = normalizers.Sequence([])  # same vocabulary size, not lower-cased
    calls = []
    real = prefixes_mod.generate_prefixes
    with monkeypatch.context() as mp:
        mp.setattr(prefixes_mod, "generate_prefixes", lambda *x, **k: calls.append(1) or real(*x, **k))
        context_templates(model, tok2, hp)
    assert calls == [1]  # not served from the first tokenizer's cache entry
    assert context_templates(model, make_tiny_tokenizer(), hp) == a


def _counting(monkeypatch, fail_on: int | None = None) -> list:
    """Patch the per-chunk optimiser of the target cache; returns the list of chunk sizes run."""
    import pmetlab.editing.targets as targets_mod

    real, calls = optimize_targets, []  # the unpatched function (imported at the top)

    def wrapped(model, tok, requests, *a, **k):
        calls.append(len(requests))
        if fail_on is not None and len(calls) >= fail_on:
            raise KeyboardInterrupt("injected")
        return real(model, tok, requests, *a, **k)

    monkeypatch.setattr(targets_mod, "optimize_targets", wrapped)
    return calls


def test_target_cache_hits_resumes_after_an_interrupt_and_follows_the_hparams(env, monkeypatch):
    from pmetlab.editing.targets import optimize_targets_cached

    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env, PMETHyperParams, v_num_grad_steps=3)
    templates = context_templates(model, tok, hp)
    calls = _counting(monkeypatch, fail_on=2)
    with pytest.raises(KeyboardInterrupt):  # interrupted in the second chunk
        optimize_targets_cached(model, tok, REQUESTS, hp, templates, progress=False, chunk_size=1)
    calls = _counting(monkeypatch)
    first = optimize_targets_cached(model, tok, REQUESTS, hp, templates, progress=False, chunk_size=1)
    assert calls == [1, 1]  # the first chunk's targets were kept
    calls = _counting(monkeypatch)
    again = optimize_targets_cached(model, tok, REQUESTS, hp, templates, progress=False, chunk_size=1)
    assert calls == []
    for k in first.values:
        assert torch.equal(first.values[k], again.values[k])
    assert first.n_steps == again.n_steps
    files = sorted((env["tmp"] / "cache" / "targets" / "LlamaForCausalLM").glob("*.safetensors"))
    assert len(files) == len(REQUESTS)
    files[0].write_bytes(b"not a safetensors file")  # damaged: recomputed, not trusted
    calls = _counting(monkeypatch)
    optimize_targets_cached(model, tok, REQUESTS, hp, templates, progress=False, chunk_size=8)
    assert calls == [1]
    calls = _counting(monkeypatch)
    optimize_targets_cached(model, tok, REQUESTS, hp.replace(v_lr=hp.v_lr / 2), templates, progress=False)
    assert calls == [len(REQUESTS)]  # another setting: a miss


def test_plan_chunks_bounds_requests_and_recomputed_positions(env):
    from pmetlab.editing.targets import build_rows, plan_chunks

    tok = make_tiny_tokenizer()
    reqs = REQUESTS * 3
    sizes = [int((r.attention_mask.sum(1) - r.lookup).sum()) for r in (build_rows(tok, [q], ["{}"]) for q in reqs)]
    for chunk_size, max_tokens in [(8, 10_000), (2, 10_000), (8, max(sizes)), (8, 1)]:
        chunks = plan_chunks(tok, reqs, ["{}"], chunk_size=chunk_size, max_tokens=max_tokens)
        assert [i for c in chunks for i in c] == list(range(len(reqs)))  # consecutive, each once
        for c in chunks:
            assert len(c) <= chunk_size
            assert len(c) == 1 or sum(sizes[i] for i in c) <= max_tokens
    assert len(plan_chunks(tok, reqs, ["{}"], chunk_size=8, max_tokens=1)) == len(reqs)
    with pytest.raises(ValueError, match="chunk_size and max_tokens"):
        plan_chunks(tok, reqs, ["{}"], chunk_size=0)


# --- prompt + target length against the model's context (tiny models read 64 positions) -------


def _long_request(n_words: int) -> EditRequest:
    words = [w for w in _TOKENIZER_WORDS if w.isalpha()]
    text = " ".join(words[i % len(words)] for i in range(n_words))
    return EditRequest(prompt=text + " {} plays the sport of", subject="danny miles", target_new="jazz")


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(env):
    model, tok = _model("GPT2LMHeadModel"), make_tiny_tokenizer()  # learned positions: 64 at most
    state = _state(model)
    with pytest.raises(
        ValueError, match=r"request 1: .*is \d+ tokens, more than the 64 positions GPT2LMHeadModel"
    ) as ei:
        compute_deltas(model, tok, [REQUESTS[0], _long_request(70)], _hp(env), progress=False)
    assert "config.n_positions" in str(ei.value) or "config.max_position_embeddings" in str(ei.value)
    assert "shorten the prompt" in str(ei.value)
    _assert_untouched(model, state)
    assert not (env["tmp"] / "cache").exists()  # failed before any cache was written


def test_context_prefixes_count_toward_the_context(env):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    req = _long_request(50)  # ~57 tokens: fits alone, not behind a 10-token prefix
    compute_mod._check_inputs(model, tok, [req], _hp(env, n_prefixes=0))
    with pytest.raises(ValueError, match="lower prefix_tokens=10"):
        compute_mod._check_inputs(model, tok, [req], _hp(env, n_prefixes=2, prefix_tokens=10))


def test_a_long_prompt_warns_with_the_expected_cost(env, caplog):
    model, tok = make_tiny_model("LlamaForCausalLM", max_position_embeddings=1024), make_tiny_tokenizer()
    hp = _hp(env)
    with caplog.at_level("WARNING", logger="pmetlab.editing.compute"):
        compute_mod._check_inputs(model, tok, REQUESTS, hp)
    assert not caplog.records  # ordinary prompts: no warning
    with caplog.at_level("WARNING", logger="pmetlab.editing.compute"):
        compute_mod._check_inputs(model, tok, [_long_request(300)], hp)
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert "request 0" in msg and "over 256" in msg and "s per optimisation step" in msg and "GB" in msg
