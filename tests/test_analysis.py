"""The MHSA-vs-FFN hidden-state study (pmetlab.analysis) on tiny random models and on SmolLM2."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pmetlab.analysis import (
    COMPONENTS,
    METRICS,
    component_io_states,
    component_similarity,
    component_similarity_values,
    component_states,
    input_embedding_topk,
    logit_lens_topk,
    mean_ci,
    similarity_by_depth,
    similarity_reading,
    summarize_similarity,
    topk_jaccard,
)
from pmetlab.analysis.reading import SIMILARITY_RULE, jaccard_chance
from pmetlab.models import get_adapter
from tests.tiny_models import TINY_FAMILIES, TINY_LAYERS, make_tiny_model

PROMPTS = ["The Eiffel Tower is in", "Paris", "A much longer prompt about the capital of France is"]
SUMMARY_COLUMNS = ["protocol", "projection", "layer", "component", "metric", "mean", "ci_low", "ci_high", "n"]
VALUE_COLUMNS = ["protocol", "projection", "prompt_id", "layer", "component", "metric", "value"]


class CharTokenizer:
    """A character-level stand-in for a Hugging Face tokenizer (no download): ids 4.., pad 0."""

    padding_side = "right"
    pad_token_id = 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [4 + ord(c) % (self.vocab_size - 4) for c in text]

    def __call__(self, texts, return_tensors=None, padding=False, **_):
        ids = [self.encode(t) for t in texts]
        width = max(map(len, ids))
        pad = [[self.pad_token_id] * (width - len(i)) for i in ids]
        left = self.padding_side == "left"
        return {
            "input_ids": torch.tensor([(p + i) if left else (i + p) for i, p in zip(ids, pad)]),
            "attention_mask": torch.tensor(
                [[0] * len(p) + [1] * len(i) if left else [1] * len(i) + [0] * len(p) for i, p in zip(ids, pad)]
            ),
        }


def _tiny(family: str):
    model = make_tiny_model(family, seed=0)
    return model, CharTokenizer(model.config.vocab_size)


def _unpadded_hidden_states(model, tok, prompt: str) -> list[torch.Tensor]:
    """``output_hidden_states`` of one unpadded prompt at its last token: L + 1 vectors (d,)."""
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    return [h[0, -1] for h in hs]


# --- states -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_states_reconstruct_the_residual_stream(family, caplog):
    """MHSA in is the layer input; in + a + m is the next layer's input; padding and the choice of
    the last real token do not matter (compared with unpadded single-prompt forwards)."""
    model, tok = _tiny(family)
    adapter = get_adapter(model)
    with caplog.at_level(logging.WARNING, logger="pmetlab.analysis"):
        st = component_states(model, tok, PROMPTS, batch_size=3)
    assert not [r for r in caplog.records if "residual" in r.getMessage()]
    assert st.mhsa_in.shape == (len(PROMPTS), TINY_LAYERS, model.config.hidden_size)
    assert st.parallel == adapter.parallel and st.protocol == "residual"
    torch.testing.assert_close(st.ffn_in, st.mhsa_in if st.parallel else st.mhsa_out, rtol=0, atol=0)
    for i, prompt in enumerate(PROMPTS):
        hs = _unpadded_hidden_states(model, tok, prompt)
        for l in range(TINY_LAYERS):
            torch.testing.assert_close(st.mhsa_in[i, l], hs[l], rtol=1e-4, atol=1e-5)
            if l + 1 < TINY_LAYERS:  # hs[L] is after the final norm
                nxt = st.ffn_out[i, l] if not st.parallel else st.mhsa_out[i, l] + st.ffn_out[i, l] - st.mhsa_in[i, l]
                torch.testing.assert_close(nxt, hs[l + 1], rtol=1e-4, atol=1e-4)


def test_parallel_and_sequential_families_are_both_covered():
    kinds = {
        get_adapter(make_tiny_model(f)).parallel for f in ("LlamaForCausalLM", "GPTJForCausalLM", "GPTNeoXForCausalLM")
    }
    assert kinds == {True, False}


# --- the paper protocol: what each component reads and computes ---------------------------------------


def _perturb_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """Random norm weights/biases: a freshly built norm (weight 1 or Gemma's 1 + 0, bias 0) is
    idempotent, which would hide a post-norm applied twice or a missing norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower():
                for prm in mod.parameters(recurse=False):
                    prm.add_(0.5 * torch.randn(prm.shape, generator=g))


def _expected_io(model, family: str, l: int, h, a, m):
    """``(attn input, ffn input, next residual)`` of layer ``l`` written out by hand from the
    modeling code, given h = h^{l-1} and the module outputs a^l, m^l (each ``(d,)``)."""
    if family in ("GPTJForCausalLM", "PhiForCausalLM"):  # parallel, one shared norm
        layer = model.transformer.h[l] if family == "GPTJForCausalLM" else model.model.layers[l]
        x = layer.ln_1(h) if family == "GPTJForCausalLM" else layer.input_layernorm(h)
        return x, x, h + a + m
    if family == "GPTNeoXForCausalLM":
        layer = model.gpt_neox.layers[l]
        ffn_read = h if model.config.use_parallel_residual else h + a
        return layer.input_layernorm(h), layer.post_attention_layernorm(ffn_read), h + a + m
    if family == "GPT2LMHeadModel":
        layer = model.transformer.h[l]
        return layer.ln_1(h), layer.ln_2(h + a), h + a + m
    if family == "OPTForCausalLM":
        layer = model.model.decoder.layers[l]
        return layer.self_attn_layer_norm(h), layer.final_layer_norm(h + a), h + a + m
    if family == "Gemma3ForCausalLM":  # a^l, m^l are the modules' outputs, before their post-norms
        layer = model.model.layers[l]
        mid = h + layer.post_attention_layernorm(a)
        nxt = mid + layer.post_feedforward_layernorm(m)
        return layer.input_layernorm(h), layer.pre_feedforward_layernorm(mid), nxt
    assert family in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM")
    layer = model.model.layers[l]
    return layer.input_layernorm(h), layer.post_attention_layernorm(h + a), h + a + m


@pytest.mark.parametrize(
    "family, overrides", [(f, {}) for f in TINY_FAMILIES] + [("GPTNeoXForCausalLM", {"use_parallel_residual": False})]
)
def test_paper_inputs_and_outputs_match_a_manual_forward(family, overrides):
    """Traced inputs are the normed vectors each module reads and traced outputs are what the
    module computes: with them the hand-written block reproduces the next layer's input."""
    model = make_tiny_model(family, seed=0, **overrides)
    _perturb_norms(model)
    tok = CharTokenizer(model.config.vocab_size)
    st = component_io_states(model, tok, PROMPTS, batch_size=3)  # right-padded batch
    assert st.protocol == "paper" and st.mhsa_in.shape == (len(PROMPTS), TINY_LAYERS, model.config.hidden_size)
    for i, prompt in enumerate(PROMPTS):
        hs = _unpadded_hidden_states(model, tok, prompt)
        for l in range(TINY_LAYERS):
            with torch.no_grad():
                attn_in, ffn_in, nxt = _expected_io(model, family, l, hs[l], st.mhsa_out[i, l], st.ffn_out[i, l])
            torch.testing.assert_close(st.mhsa_in[i, l], attn_in, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(st.ffn_in[i, l], ffn_in, rtol=1e-4, atol=1e-5)
            if l + 1 < TINY_LAYERS:  # hs[L] is after the final norm
                torch.testing.assert_close(nxt, hs[l + 1], rtol=1e-4, atol=1e-4)


def test_gemma3_outputs_are_taken_before_the_post_norms():
    """The paper protocol's a^l / m^l are the modules' own outputs; the residual protocol's
    contributions are the post-normed ones."""
    model = make_tiny_model("Gemma3ForCausalLM", seed=0)
    _perturb_norms(model)
    tok = CharTokenizer(model.config.vocab_size)
    paper = component_io_states(model, tok, PROMPTS)
    resid = component_states(model, tok, PROMPTS)
    layer = model.model.layers[1]
    with torch.no_grad():
        torch.testing.assert_close(
            resid.mhsa_out[:, 1] - resid.mhsa_in[:, 1],
            layer.post_attention_layernorm(paper.mhsa_out[:, 1]),
            rtol=1e-4,
            atol=1e-4,
        )
        torch.testing.assert_close(
            resid.ffn_out[:, 1] - resid.ffn_in[:, 1],
            layer.post_feedforward_layernorm(paper.ffn_out[:, 1]),
            rtol=1e-4,
            atol=1e-4,
        )
    assert not torch.allclose(paper.mhsa_out[:, 1], resid.mhsa_out[:, 1] - resid.mhsa_in[:, 1], atol=1e-3)


def test_paper_jaccard_uses_the_input_embeddings():
    """Untied, different embedding and LM-head weights: the top-k ids are those of x @ E^T, not
    of the logit lens, and the per-prompt Jaccard is computed from them."""
    model, tok = _tiny("LlamaForCausalLM")
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr() and not torch.allclose(emb, head)
    k, layer = 7, 1
    st = component_io_states(model, tok, PROMPTS)
    with torch.no_grad():
        ids = {n: (getattr(st, n) @ emb.T).topk(k).indices for n in ("mhsa_in", "mhsa_out", "ffn_in", "ffn_out")}
    assert torch.equal(input_embedding_topk(model, st.mhsa_in, k), ids["mhsa_in"])
    assert not torch.equal(logit_lens_topk(model, st.mhsa_in, k), ids["mhsa_in"])
    values = component_similarity_values(model, tok, PROMPTS, top_k=k, progress=False)
    assert list(values.columns) == VALUE_COLUMNS
    assert set(values["protocol"]) == {"paper"} and set(values["projection"]) == {"input_embeddings"}
    got = values[(values["layer"] == layer) & (values["metric"] == "jaccard")]
    got = got.set_index(["prompt_id", "component"])
    for i in range(len(PROMPTS)):
        for comp, (a, b) in {"MHSA": ("mhsa_in", "mhsa_out"), "FFN": ("ffn_in", "ffn_out")}.items():
            sa, sb = set(ids[a][i, layer].tolist()), set(ids[b][i, layer].tolist())
            assert got.loc[(i, comp), "value"] == pytest.approx(len(sa & sb) / len(sa | sb))
    lens = component_similarity_values(model, tok, PROMPTS, top_k=k, projection="logit_lens", progress=False)
    assert set(lens["projection"]) == {"logit_lens"}
    assert (lens["value"] - values["value"]).abs().max() > 0.01  # the projection matters


def test_paper_cosine_and_jaccard_match_a_manual_computation():
    """Llama layer 1, one unpadded prompt at a time: a^l and m^l from plain forward hooks, the
    inputs from output_hidden_states and the layer's norms, the top-k from x @ E^T."""
    model, tok = _tiny("LlamaForCausalLM")
    _perturb_norms(model)
    k, layer = 9, 1
    values = component_similarity_values(model, tok, PROMPTS, top_k=k, batch_size=2, progress=False)
    got = values[values["layer"] == layer].set_index(["prompt_id", "component", "metric"])["value"]
    blk, emb = model.model.layers[layer], model.get_input_embeddings().weight
    for i, prompt in enumerate(PROMPTS):
        cap = {}
        hooks = [
            blk.self_attn.register_forward_hook(lambda mod, args, out: cap.__setitem__("a", out[0][0, -1])),  # noqa: B023 (used in this iteration)
            blk.mlp.register_forward_hook(lambda mod, args, out: cap.__setitem__("m", out[0, -1])),  # noqa: B023
        ]
        try:
            h = _unpadded_hidden_states(model, tok, prompt)[layer]
        finally:
            for hook in hooks:
                hook.remove()
        with torch.no_grad():
            pairs = {
                "MHSA": (blk.input_layernorm(h), cap["a"]),
                "FFN": (blk.post_attention_layernorm(h + cap["a"]), cap["m"]),
            }
            for comp, (x, y) in pairs.items():
                sx, sy = set((x @ emb.T).topk(k).indices.tolist()), set((y @ emb.T).topk(k).indices.tolist())
                assert got[(i, comp, "cosine")] == pytest.approx(F.cosine_similarity(x, y, dim=0).item(), abs=1e-5)
                assert got[(i, comp, "jaccard")] == pytest.approx(len(sx & sy) / len(sx | sy), abs=1e-9)


#: Per-(component, metric) means of the residual protocol as computed before the paper protocol
#: existed (tiny models, seed 0, PROMPTS, top_k=10): protocol="residual" must keep these numbers.
OLD_RESIDUAL_MEANS = {
    "GPT2LMHeadModel": (0.995298, 0.83424, 0.987052, 0.686092),
    "GPTJForCausalLM": (0.947933, 0.566693, 0.878874, 0.480667),
    "GPTNeoXForCausalLM": (0.946497, 0.668184, 0.876543, 0.531762),
    "LlamaForCausalLM": (0.945316, 0.571318, 0.997596, 0.861953),
    "MistralForCausalLM": (0.945316, 0.571318, 0.997596, 0.861953),
    "Qwen2ForCausalLM": (0.929858, 0.574685, 0.996086, 0.845118),
    "GemmaForCausalLM": (0.999117, 0.89899, 0.999938, 0.939394),
    "Gemma3ForCausalLM": (0.639379, 0.226171, 0.863157, 0.399848),
    "OPTForCausalLM": (0.972287, 0.722352, 0.876843, 0.438441),
    "PhiForCausalLM": (0.945721, 0.600067, 0.875727, 0.439153),
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_residual_protocol_reproduces_the_old_numbers(family):
    model, tok = _tiny(family)
    values = component_similarity_values(
        model, tok, PROMPTS, protocol="residual", top_k=10, batch_size=2, progress=False
    )
    assert set(values["protocol"]) == {"residual"} and set(values["projection"]) == {"logit_lens"}
    means = values.groupby(["component", "metric"], observed=True)["value"].mean()
    got = [means[(c, m)] for c in COMPONENTS for m in METRICS]
    assert got == pytest.approx(list(OLD_RESIDUAL_MEANS[family]), abs=2e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"protocol": "Paper"}, r"protocol must be one of \['paper', 'residual'\], got 'Paper'"),
        ({"protocol": "logit_lens"}, r"protocol must be one of .*got 'logit_lens'"),
        ({"protocol": None}, r"protocol must be one of .*got None"),
        (
            {"projection": "unembedding"},
            r"projection must be one of \['input_embeddings', 'logit_lens'\].*got 'unembedding'",
        ),
        ({"protocol": "residual", "projection": "lm_head"}, r"projection must be one of .*got 'lm_head'"),
    ],
)
def test_bad_protocol_or_projection_is_rejected(kwargs, match):
    model, tok = _tiny("LlamaForCausalLM")
    with pytest.raises(ValueError, match=match):
        component_similarity(model, tok, ["ok"], progress=False, **kwargs)
    with pytest.raises(ValueError, match=match):
        component_similarity_values(model, tok, ["ok"], progress=False, **kwargs)


# --- the residual protocol against a manual computation -------------------------------------------------


def test_cosine_and_jaccard_match_a_manual_computation():
    """Llama (sequential): a^l from a hand-made hook on o_proj, the rest from output_hidden_states."""
    model, tok = _tiny("LlamaForCausalLM")
    k = 7
    values = component_similarity_values(
        model, tok, PROMPTS, protocol="residual", top_k=k, batch_size=2, progress=False
    )
    layer = 1
    got = values[values["layer"] == layer].set_index(["prompt_id", "component", "metric"])["value"]
    for i, prompt in enumerate(PROMPTS):
        captured = {}
        hook = model.model.layers[layer].self_attn.o_proj.register_forward_hook(
            lambda mod, args, out: captured.__setitem__("a", out[0, -1].clone())  # noqa: B023
        )
        try:
            hs = _unpadded_hidden_states(model, tok, prompt)
        finally:
            hook.remove()
        h_prev, a, h_next = hs[layer], captured["a"], hs[layer + 1]
        mid = h_prev + a

        def top(x):
            with torch.no_grad():
                return model.lm_head(model.model.norm(x)).topk(k).indices.tolist()

        def jac(x, y):
            sx, sy = set(top(x)), set(top(y))
            return len(sx & sy) / len(sx | sy)

        expected = {
            ("MHSA", "cosine"): F.cosine_similarity(h_prev, mid, dim=0).item(),
            ("FFN", "cosine"): F.cosine_similarity(mid, h_next, dim=0).item(),
            ("MHSA", "jaccard"): jac(h_prev, mid),
            ("FFN", "jaccard"): jac(mid, h_next),
        }
        for (comp, metric), want in expected.items():
            assert got[(i, comp, metric)] == pytest.approx(want, abs=1e-5), (prompt, comp, metric)


def test_zeroed_ffn_gives_identical_in_and_out():
    """Residual protocol: with W_out of layer 1 set to zero, m^1 = 0, so cosine and Jaccard are
    exactly 1 there."""
    model, tok = _tiny("LlamaForCausalLM")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    values = component_similarity_values(model, tok, PROMPTS, protocol="residual", top_k=10, progress=False)
    ffn1 = values[(values["layer"] == 1) & (values["component"] == "FFN")]
    assert len(ffn1) == 2 * len(PROMPTS)
    assert ffn1["value"].tolist() == pytest.approx([1.0] * len(ffn1), abs=1e-12)
    others = values[~((values["layer"] == 1) & (values["component"] == "FFN"))]
    assert (others["value"] < 1 - 1e-6).any()  # the other components do change the state


def test_topk_jaccard_and_logit_lens():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    b = torch.tensor([[4, 3, 2, 1], [5, 6, 7, 8], [1, 2, 9, 10]])
    assert topk_jaccard(a, b).tolist() == [1.0, 0.0, pytest.approx(2 / 6)]
    with pytest.raises(ValueError, match="same shape"):
        topk_jaccard(a, b[:, :3])
    model, _ = _tiny("Gemma3ForCausalLM")  # soft-capped logits, post-norms
    x = torch.randn(2, 3, model.config.hidden_size)
    ids = logit_lens_topk(model, x, 5, max_elements=model.config.vocab_size)  # one row per chunk
    assert ids.shape == (2, 3, 5)
    with torch.no_grad():
        ref = model.lm_head(model.model.norm(x)).topk(5).indices
    assert torch.equal(ids, ref)


# --- results ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("protocol", ["paper", "residual"])
def test_summary_schema_and_ranges(family, protocol):
    model, tok = _tiny(family)
    df = component_similarity(model, tok, PROMPTS, protocol=protocol, top_k=10, batch_size=2, progress=False)
    assert list(df.columns) == SUMMARY_COLUMNS
    assert set(df["protocol"]) == {protocol}
    assert set(df["projection"]) == {"input_embeddings" if protocol == "paper" else "logit_lens"}
    assert len(df) == TINY_LAYERS * len(COMPONENTS) * len(METRICS)
    for (metric, comp), g in df.groupby(["metric", "component"], observed=True):
        assert sorted(g["layer"]) == list(range(TINY_LAYERS)), (metric, comp)
    assert set(df["component"].astype(str)) == set(COMPONENTS)
    assert set(df["metric"]) == set(METRICS)
    assert (df["n"] == len(PROMPTS)).all()
    assert df["mean"].between(-1, 1).all()
    assert df.loc[df["metric"] == "jaccard", "mean"].between(0, 1).all()
    assert ((df["ci_low"] <= df["mean"] + 1e-12) & (df["mean"] <= df["ci_high"] + 1e-12)).all()


@pytest.mark.parametrize("family", ["GPTNeoXForCausalLM", "OPTForCausalLM", "Gemma3ForCausalLM"])
def test_values_are_independent_of_batching(family):
    model, tok = _tiny(family)
    one = component_similarity_values(model, tok, PROMPTS, top_k=10, batch_size=1, progress=False)
    all_ = component_similarity_values(model, tok, PROMPTS, top_k=10, batch_size=len(PROMPTS), progress=False)
    assert list(one.columns) == VALUE_COLUMNS
    assert len(one) == len(PROMPTS) * TINY_LAYERS * 4
    pd.testing.assert_frame_equal(one.drop(columns="value"), all_.drop(columns="value"))
    assert (one["value"] - all_["value"]).abs().max() < 1e-5
    assert set(one["prompt_id"]) == set(range(len(PROMPTS)))


def test_summarize_matches_the_per_prompt_values():
    model, tok = _tiny("LlamaForCausalLM")
    values = component_similarity_values(model, tok, PROMPTS, top_k=10, progress=False)
    summary = summarize_similarity(values)
    row = summary[(summary["layer"] == 2) & (summary["component"] == "MHSA") & (summary["metric"] == "cosine")]
    raw = values[(values["layer"] == 2) & (values["component"] == "MHSA") & (values["metric"] == "cosine")]
    assert row["mean"].item() == pytest.approx(raw["value"].mean())
    with pytest.raises(KeyError, match="value"):
        summarize_similarity(values.drop(columns="value"))


def test_mean_ci():
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = 4.3027 * 1.0 / math.sqrt(3)  # t_{0.975, 2} · s / sqrt(n)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-3)
    m1, lo1, hi1 = mean_ci([0.5])
    assert m1 == 0.5 and math.isnan(lo1) and math.isnan(hi1)
    big = mean_ci([0.0, 1.0] * 500)
    assert big[2] - big[0] == pytest.approx(1.9623 * 0.5003 / math.sqrt(1000), rel=1e-3)
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=1.5)


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([], {}, "empty"),
        ("a single string", {}, "single string"),
        (["ok", ""], {}, r"prompts\[1\]"),
        (["ok"], {"top_k": 0}, "top_k"),
        (["ok"], {"top_k": 10_000}, "top_k"),
        (["ok"], {"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_input_is_rejected(prompts, kwargs, match):
    model, tok = _tiny("LlamaForCausalLM")
    with pytest.raises(ValueError, match=match):
        component_similarity(model, tok, prompts, progress=False, **kwargs)


# --- depth table and the generated reading --------------------------------------------------------


def _synthetic_summary(ffn, mhsa, half_width: float = 0.02, protocol: str = "paper") -> pd.DataFrame:
    """A summary with the given per-layer means (same curves for both metrics)."""
    rows = [
        dict(
            protocol=protocol,
            projection="input_embeddings",
            layer=l,
            component=comp,
            metric=metric,
            mean=v,
            ci_low=v - half_width,
            ci_high=v + half_width,
            n=100,
        )
        for metric in METRICS
        for comp, curve in (("MHSA", mhsa), ("FFN", ffn))
        for l, v in enumerate(curve)
    ]
    return pd.DataFrame(rows)


SETTLING = [min(0.3 + 0.05 * l, 0.8) if l < 8 else 0.8 for l in range(12)]  # rises, flat from layer 8
ZIGZAG = [0.3 + 0.1 * (-1) ** l for l in range(12)]  # low and changing


def test_reading_holds_when_ffn_settles_high_and_mhsa_keeps_changing():
    text = similarity_reading(_synthetic_summary(SETTLING, ZIGZAG), model_name="toy")
    assert text.startswith(
        "On toy (protocol paper, projection input_embeddings; 100 prompts, 12 layers, late third = layers 8–11; "
        "summary only)"
    )
    assert "**holds**" in text
    # late third: FFN 0.8 ± 0.02; MHSA mean of 0.4, 0.2, 0.4, 0.2; steps from layer 7 on
    assert "late third FFN 0.800, MHSA 0.300, FFN [0.780, 0.820] vs MHSA [0.280, 0.320]" in text
    assert "(1) higher passes" in text and "(2) flatter passes" in text and "(3) rises passes" in text
    assert "FFN moves 0.038 per layer against MHSA's 0.200" in text and "FFN from 0.375 (early" in text
    assert text.count("Cosine:") == 1 and text.count("Jaccard:") == 1 and SIMILARITY_RULE in text


def test_reading_does_not_hold_when_every_criterion_fails():
    text = similarity_reading(_synthetic_summary(ZIGZAG, SETTLING))
    assert text.startswith("On this model") and "**does not hold**" in text
    assert "(1) higher fails" in text and "(2) flatter fails" in text and "(3) rises fails" in text


def test_reading_holds_in_part_reports_each_criterion_and_respects_the_intervals():
    bumpy = [v + (0.3 if l % 2 and l >= 8 else 0) for l, v in enumerate(SETTLING)]  # higher, not flat
    text = similarity_reading(_synthetic_summary(bumpy, ZIGZAG))
    assert "**holds in part**" in text and "(2) flatter fails" in text and "(1) higher passes" in text
    # MHSA higher late, FFN flatter and rising: the paper's words hold in part, not "does not hold"
    low_flat = [v - 0.45 for v in SETTLING]
    text = similarity_reading(_synthetic_summary(low_flat, ZIGZAG, half_width=0.2))
    assert "**holds in part**" in text and "(1) higher fails" in text and "(3) rises passes" in text


def _values(ffn_late_shift: float, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """Per-prompt values around SETTLING (FFN, shifted by ``ffn_late_shift`` late) and ZIGZAG (MHSA)."""
    rng = np.random.default_rng(seed)
    rows = []
    for metric in METRICS:
        for comp, curve in (("FFN", SETTLING), ("MHSA", ZIGZAG)):
            for l, v in enumerate(curve):
                shift = ffn_late_shift if comp == "FFN" and l >= 8 else 0.0
                for p in range(n):
                    rows.append(
                        dict(prompt_id=p, layer=l, component=comp, metric=metric, value=v + shift + rng.normal(0, 0.3))
                    )
    return pd.DataFrame(rows)


def test_the_late_third_comparison_is_paired_over_prompts_when_values_are_given():
    summary = _synthetic_summary(SETTLING, ZIGZAG)
    text = similarity_reading(summary, values=_values(0.0))
    assert "per-prompt values" in text and "(paired over prompts)" in text and "(1) higher passes" in text
    # FFN's late values pulled down to MHSA's level: the paired interval straddles 0
    close = similarity_reading(summary, values=_values(-0.5))
    assert "(1) higher fails" in close
    assert similarity_reading(summary, values=_values(0.0), seed=3) == similarity_reading(
        summary, values=_values(0.0), seed=3
    )


def test_jaccard_chance_matches_a_simulation_and_sets_the_floor():
    assert jaccard_chance(50, 49152) == pytest.approx(5.14e-4, rel=1e-2)
    rng = np.random.default_rng(0)
    sims = [len(set(rng.choice(200, 20, replace=False)) & set(rng.choice(200, 20, replace=False))) for _ in range(4000)]
    assert np.mean([i / (40 - i) for i in sims]) == pytest.approx(jaccard_chance(20, 200), rel=0.05)
    with pytest.raises(ValueError, match="0 < k <= vocab_size"):
        jaccard_chance(0, 10)
    summary = _synthetic_summary(SETTLING, ZIGZAG)  # the Jaccard at 2× chance for both: not read
    summary.loc[summary["metric"] == "jaccard", ["mean", "ci_low", "ci_high"]] = 0.001
    text = similarity_reading(summary, chance=5e-4)
    assert "chance level 5.0e-04" in text and "not measurable at this floor" in text and "**holds**" in text
    only_jaccard = summary[summary["metric"] == "jaccard"]
    assert "**not measurable at this floor**" in similarity_reading(only_jaccard, chance=5e-4)


def test_reading_and_depth_table_reject_mixed_or_short_input():
    both = pd.concat([_synthetic_summary(SETTLING, ZIGZAG), _synthetic_summary(SETTLING, ZIGZAG, protocol="residual")])
    with pytest.raises(ValueError, match=r"mixes protocols \['paper', 'residual'\]"):
        similarity_reading(both)
    with pytest.raises(ValueError, match="at least 3 layers"):
        similarity_reading(_synthetic_summary(SETTLING[:2], ZIGZAG[:2]))
    with pytest.raises(KeyError, match="ci_low"):
        similarity_reading(_synthetic_summary(SETTLING, ZIGZAG).drop(columns="ci_low"))


def test_similarity_by_depth_covers_both_protocols():
    both = pd.concat([_synthetic_summary(SETTLING, ZIGZAG), _synthetic_summary(ZIGZAG, SETTLING, protocol="residual")])
    table = similarity_by_depth(both)
    assert list(table.columns) == ["protocol", "projection", "metric", "component", "early", "middle", "late"]
    assert len(table) == 2 * len(METRICS) * len(COMPONENTS)
    row = table[(table["protocol"] == "paper") & (table["metric"] == "cosine") & (table["component"] == "FFN")]
    assert row[["early", "middle", "late"]].iloc[0].tolist() == pytest.approx(
        [sum(SETTLING[:4]) / 4, sum(SETTLING[4:8]) / 4, 0.8]
    )
    res = table[(table["protocol"] == "residual") & (table["component"] == "MHSA")]
    assert res["late"].tolist() == pytest.approx([0.8, 0.8])


# --- the real model --------------------------------------------------------------------------------


def _known_facts_path() -> Path:
    base = Path(os.environ.get("PMETLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return base / "knowns" / "known_1000.json"


@pytest.mark.slow
def test_smollm2_known_facts():
    import pmetlab

    path = _known_facts_path()
    if not path.is_file():
        pytest.skip(f"known-facts data not found at {path} (set PMETLAB_DATA_DIR)")
    prompts = [r["prompt"] for r in json.loads(path.read_text())[:8]]
    model, tok = pmetlab.load_model("smollm2-135m", device="cpu")
    n_layers = get_adapter(model).n_layers
    res = component_similarity(model, tok, prompts, protocol="residual", top_k=50, batch_size=4, progress=False)
    paper = component_similarity(model, tok, prompts, top_k=50, batch_size=4, progress=False)
    for df in (res, paper):
        assert list(df.columns) == SUMMARY_COLUMNS
        assert len(df) == n_layers * 4
        assert (df["n"] == len(prompts)).all()
        assert df[df["metric"] == "cosine"]["mean"].between(-1, 1).all()
        assert df[df["metric"] == "jaccard"]["mean"].between(0, 1).all()
    # A residual update is small next to the residual stream in the middle of the network ...
    mid = res[(res["metric"] == "cosine") & res["layer"].between(5, n_layers - 5)]
    assert mid["mean"].min() > 0.5
    # ... but not nothing: some component changes the top-50 tokens somewhere.
    assert res[res["metric"] == "jaccard"]["mean"].min() < 0.9
    # A module's output is not a rescaled copy of its normed input: the paper's cosine is lower.
    assert paper[paper["metric"] == "cosine"]["mean"].mean() < mid["mean"].mean()
    assert "**" in similarity_reading(paper, model_name="smollm2-135m")
