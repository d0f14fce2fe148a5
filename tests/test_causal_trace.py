"""Causal tracing (pmetlab.locate) on tiny random models: restoring nothing changes nothing,
restoring the last layer's last token gives back the clean probability, the batched path equals
the one-restoration-per-forward reference, seeds repeat, and bad input fails clearly."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pmetlab.locate import (
    best_window,
    embedding_noise_scale,
    summarize_traces,
    token_roles,
    trace_fact,
    trace_facts,
    window_layers,
)
from pmetlab.locate.prompt import prepare_prompt
from pmetlab.locate.restore import TraceSetup, clean_run, component_name, embedding_name, run_batched
from pmetlab.models.adapters import get_adapter
from pmetlab.tokens import subject_last_index
from tests.tiny_models import TINY_FAMILIES, TINY_LAYERS, assert_no_hooks, make_tiny_model, make_tiny_tokenizer

FAMILIES = ["LlamaForCausalLM", "GPTJForCausalLM", "Gemma3ForCausalLM", "OPTForCausalLM", "GPT2LMHeadModel"]
PROMPT, SUBJECT = "danny miles davis plays the music of", "miles davis"
KW = dict(window=2, noise=0.5, n_samples=3, progress=False)


def _model(family: str):
    init = "init_std" if family == "OPTForCausalLM" else "initializer_range"
    return make_tiny_model(family, **{init: 0.2})


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_noise_gives_zero_indirect_effect(family, tok):
    tr = trace_fact(_model(family), tok, PROMPT, SUBJECT, **{**KW, "noise": 0.0})
    assert tr.p_corrupted == pytest.approx(tr.p_clean, abs=1e-6)
    for kind in ("hidden", "mlp", "attn"):
        assert tr.ie[kind].shape == (TINY_LAYERS, len(tr.tokens))
        assert tr.ie[kind].abs().max() < 1e-6, kind


@pytest.mark.parametrize("family", FAMILIES)
def test_restoring_the_last_layer_at_the_last_token_gives_the_clean_probability(family, tok):
    tr = trace_fact(_model(family), tok, PROMPT, SUBJECT, **KW)
    assert abs(tr.p_clean - tr.p_corrupted) > 1e-4  # the noise does something
    assert tr.p_corrupted + float(tr.ie["hidden"][-1, -1]) == pytest.approx(tr.p_clean, abs=1e-6)
    # before the subject nothing is corrupted, so restoring there changes nothing
    assert tr.ie["hidden"][:, : tr.subject_range[0]].abs().max() < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_restoring_every_token_of_the_first_layer_gives_the_clean_probability(family, tok):
    model = _model(family)
    adapter = get_adapter(model)
    tp = prepare_prompt(model, tok, PROMPT, SUBJECT, None)
    names = [adapter.layer_name(0), component_name(adapter, "mlp", 0), component_name(adapter, "attn", 0)]
    clean, probs = clean_run(model, adapter, tp.ids, names)
    tp = type(tp)(tp.ids, tp.tokens, tp.subject_range, int(probs.argmax()))
    noise = torch.randn(2, tp.subject_range[1] - tp.subject_range[0], clean[names[0]].shape[-1])
    setup = TraceSetup(model, adapter, tp, noise, clean, embedding_name(model))
    every = tuple((names[0], t) for t in range(tp.n_tokens))
    p = run_batched(setup, [(), every], batch_size=8)
    assert float(p[1]) == pytest.approx(float(probs.max()), abs=1e-6)
    assert abs(float(p[0]) - float(probs.max())) > 1e-4
    assert_no_hooks(model)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_path_equals_the_reference(family, tok):
    model = _model(family)
    fast = trace_fact(model, tok, PROMPT, SUBJECT, batch_size=7, **KW)  # chunks of 2 restorations
    ref = trace_fact(model, tok, PROMPT, SUBJECT, reference=True, **KW)
    assert fast.p_corrupted == pytest.approx(ref.p_corrupted, abs=1e-6)
    for kind in fast.ie:
        torch.testing.assert_close(fast.ie[kind], ref.ie[kind], atol=1e-6, rtol=0)
    assert_no_hooks(model)


def test_seeded_runs_repeat_and_seeds_differ(tok):
    model = _model("LlamaForCausalLM")
    a, b = (trace_fact(model, tok, PROMPT, SUBJECT, seed=3, **KW) for _ in range(2))
    c = trace_fact(model, tok, PROMPT, SUBJECT, seed=4, **KW)
    for kind in a.ie:
        assert torch.equal(a.ie[kind], b.ie[kind])
    assert a.p_corrupted == b.p_corrupted != c.p_corrupted


def test_target_fixes_the_traced_token_and_the_frame_is_tidy(tok):
    model = _model("LlamaForCausalLM")
    tr = trace_fact(model, tok, PROMPT, SUBJECT, "jazz", kinds=("mlp",), **KW)
    assert tr.target == "jazz" and set(tr.ie) == {"mlp"}
    assert tr.tokens[tr.subject_range[1] - 1] == "davis"
    assert tr.subject_range[1] - 1 == subject_last_index(tok, "danny {} plays the music of", SUBJECT)
    df = tr.to_frame()
    assert len(df) == TINY_LAYERS * len(tr.tokens)
    assert list(df.columns) == ["kind", "layer", "token", "token_text", "token_role", "ie", "p_restored"]
    assert df.loc[df.token_role == "last_subject", "token_text"].unique().tolist() == ["davis"]


def test_token_roles_follow_rome_groups():
    assert token_roles(8, (1, 4)) == [
        "before_subject",
        "first_subject",
        "middle_subject",
        "last_subject",
        "first_after",
        "further",
        "further",
        "last",
    ]
    assert token_roles(3, (0, 1)) == ["last_subject", "first_after", "last"]


def test_window_is_centred_and_clipped():
    assert list(window_layers(5, 10, 30)) == list(range(0, 10))
    assert list(window_layers(20, 10, 30)) == list(range(15, 25))
    assert list(window_layers(28, 10, 30)) == list(range(23, 30))
    assert list(window_layers(4, 1, 30)) == [4]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(subject="paris"), "does not occur"),
        (dict(window=0), "window"),
        (dict(noise=-1.0), "noise"),
        (dict(n_samples=0), "n_samples"),
        (dict(kinds=("mlp", "resid")), "kinds"),
        (dict(subject=""), "subject"),
    ],
)
def test_bad_input_is_a_clear_value_error(kw, match, tok):
    args = {"subject": SUBJECT, **KW, **kw}
    with pytest.raises(ValueError, match=match):
        trace_fact(_model("LlamaForCausalLM"), tok, PROMPT, **args)


def test_noise_scale_is_three_embedding_stds(tok):
    model = _model("LlamaForCausalLM")
    texts = ["miles davis", "paris france"]
    ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]]
    std = float(model.get_input_embeddings().weight[ids].detach().double().std())
    assert embedding_noise_scale(model, tok, texts) == pytest.approx(3 * std)
    assert embedding_noise_scale(model, tok, texts, factor=1.0) == pytest.approx(std)
    with pytest.raises(ValueError, match="factor"):
        embedding_noise_scale(model, tok, texts, factor=-1)


def test_trace_facts_summary_and_best_window(tok):
    model = _model("LlamaForCausalLM")
    recs = [
        {"prompt": PROMPT, "subject": SUBJECT, "attribute": "jazz"},
        {"prompt": "the capital of france is", "subject": "france", "attribute": "paris"},
        {"prompt": "apple was founded in the city of", "subject": "apple", "attribute": "london"},
    ]
    res = trace_facts(model, tok, recs, **KW)
    assert set(res.frame.columns) == {"fact", "kind", "layer", "token", "token_role", "ie"}
    assert res.facts["fact"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(summarize_traces(res.frame), res.summary)
    last = res.summary[(res.summary.kind == "mlp") & (res.summary.token_role == "last_subject")]
    assert last["layer"].tolist() == list(range(TINY_LAYERS)) and (last["n"] == 3).all()
    assert (last["ci_low"] <= last["mean"]).all() and (last["mean"] <= last["ci_high"]).all()
    direct = res.frame[(res.frame.kind == "mlp") & (res.frame.token_role == "last_subject") & (res.frame.layer == 1)]
    assert float(last.loc[last.layer == 1, "mean"].iloc[0]) == pytest.approx(direct["ie"].mean())
    win = best_window(res.summary, "mlp", width=2)
    means = last["mean"].tolist()
    assert win.mean_ie == pytest.approx(max((means[0] + means[1]) / 2, (means[1] + means[2]) / 2))
    assert len(win.layers) == 2
    with pytest.raises(ValueError, match="width"):
        best_window(res.summary, "mlp", width=TINY_LAYERS + 1)


def test_best_window_picks_the_largest_contiguous_mean():
    summary = pd.DataFrame(
        {"kind": "mlp", "token_role": "last_subject", "layer": range(6), "mean": [0.0, 0.1, 0.5, 0.4, 0.0, 0.9]}
    )
    w = best_window(summary, "mlp", width=2)
    assert (w.start, w.stop, w.layers) == (2, 4, (2, 3)) and w.mean_ie == pytest.approx(0.45)
    assert best_window(summary, "mlp", width=1).layers == (5,)


def test_last_subject_positions_equal_that_column_of_the_full_trace(tok):
    model = _model("LlamaForCausalLM")
    full = trace_fact(model, tok, PROMPT, SUBJECT, **KW)
    last = trace_fact(model, tok, PROMPT, SUBJECT, positions="last_subject", **KW)
    t = full.subject_range[1] - 1
    for kind in full.ie:
        torch.testing.assert_close(last.ie[kind][:, t], full.ie[kind][:, t], atol=1e-6, rtol=0)
        others = torch.cat([last.ie[kind][:, :t], last.ie[kind][:, t + 1 :]], 1)
        assert torch.isnan(others).all()
    assert set(last.to_frame()["token_role"]) == {"last_subject"}
    with pytest.raises(ValueError, match="positions must be one of"):
        trace_fact(model, tok, PROMPT, SUBJECT, positions="subject", **KW)


def _summary(attn_peak: float, attn_low: float) -> pd.DataFrame:
    rows = []
    for layer in range(6):
        mlp = 0.4 if layer in (1, 2) else 0.05
        attn = attn_peak if layer == 4 else 0.0
        rows += [("mlp", "last_subject", layer, mlp, mlp - 0.05, mlp + 0.05, 12)]
        rows += [("attn", "last_subject", layer, attn, attn_low if layer == 4 else -0.01, attn + 0.05, 12)]
    return pd.DataFrame(rows, columns=["kind", "token_role", "layer", "mean", "ci_low", "ci_high", "n"])


def test_locate_reading_names_the_window_and_judges_attention():
    from pmetlab.locate import locate_reading

    text, win = locate_reading(_summary(0.05, -0.02), width=2, preset_layers=[2, 3, 4], model_name="m")
    assert win.layers == (1, 2) and "layers 1–2" in text and "**little**" in text and "shares 1 of its 2" in text
    text, _ = locate_reading(_summary(0.35, 0.2), width=2)
    assert "does carry" in text
    weak = _summary(0.05, -0.02).assign(ci_low=lambda d: d["mean"] - 0.5)
    text, _ = locate_reading(weak, width=2)
    assert "its interval includes zero with 12 facts, so the window is a weak estimate" in text
    text, _ = locate_reading(_summary(0.1, 0.02), width=2)
    assert "**small**" in text


def test_trace_plots_draw_a_fact_and_the_curves(tok):
    from pmetlab import plot_trace_curves, plot_trace_heatmaps
    from pmetlab.locate import summarize_traces

    tr = trace_fact(_model("LlamaForCausalLM"), tok, PROMPT, SUBJECT, **KW)
    assert len(plot_trace_heatmaps(tr).axes) >= len(tr.ie)
    fig = plot_trace_curves(summarize_traces(tr.to_frame().assign(fact=0)))
    assert fig.axes[0].get_legend() is not None


def test_known_facts_keeps_the_records_whose_first_attribute_token_is_top1(tok):
    from pmetlab.locate import known_facts_of

    model = _model("LlamaForCausalLM")
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits[0, -1]
    order = logits.argsort(descending=True).tolist()
    words = [tok.decode([i]).strip() for i in order]
    top, other = next(w for w in words if w.isalpha()), next(w for w in words[5:] if w.isalpha())
    if top != tok.decode([order[0]]).strip():
        pytest.skip("the tiny model's top-1 is not a word")
    recs = [{"prompt": PROMPT, "attribute": top}, {"prompt": PROMPT, "attribute": other}]
    assert known_facts_of(model, tok, recs, progress=False) == [recs[0]]
    with pytest.raises(ValueError, match="records is empty"):
        known_facts_of(model, tok, [], progress=False)
