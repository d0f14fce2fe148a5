"""The MHSA-vs-FFN hidden-state study (pmetlab.analysis) on tiny random models and on SmolLM2."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pmetlab.analysis import (COMPONENTS, METRICS, component_similarity, component_similarity_values,
                              component_states, logit_lens_topk, mean_ci, summarize_similarity, topk_jaccard)
from pmetlab.models import get_adapter
from tests.tiny_models import TINY_FAMILIES, TINY_LAYERS, make_tiny_model

PROMPTS = ["The Eiffel Tower is in", "Paris", "A much longer prompt about the capital of France is"]
SUMMARY_COLUMNS = ["layer", "component", "metric", "mean", "ci_low", "ci_high", "n"]


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
        return {"input_ids": torch.tensor([(p + i) if left else (i + p) for i, p in zip(ids, pad)]),
                "attention_mask": torch.tensor([[0] * len(p) + [1] * len(i) if left else [1] * len(i) + [0] * len(p)
                                                for i, p in zip(ids, pad)])}


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
    assert st.parallel == adapter.parallel
    torch.testing.assert_close(st.ffn_in, st.mhsa_in if st.parallel else st.mhsa_out, rtol=0, atol=0)
    for i, prompt in enumerate(PROMPTS):
        hs = _unpadded_hidden_states(model, tok, prompt)
        for l in range(TINY_LAYERS):
            torch.testing.assert_close(st.mhsa_in[i, l], hs[l], rtol=1e-4, atol=1e-5)
            if l + 1 < TINY_LAYERS:  # hs[L] is after the final norm
                nxt = st.ffn_out[i, l] if not st.parallel else st.mhsa_out[i, l] + st.ffn_out[i, l] - st.mhsa_in[i, l]
                torch.testing.assert_close(nxt, hs[l + 1], rtol=1e-4, atol=1e-4)


def test_parallel_and_sequential_families_are_both_covered():
    kinds = {get_adapter(make_tiny_model(f)).parallel for f in ("LlamaForCausalLM", "GPTJForCausalLM",
                                                                 "GPTNeoXForCausalLM")}
    assert kinds == {True, False}


# --- metrics against a manual computation -------------------------------------------------------------

def test_cosine_and_jaccard_match_a_manual_computation():
    """Llama (sequential): a^l from a hand-made hook on o_proj, the rest from output_hidden_states."""
    model, tok = _tiny("LlamaForCausalLM")
    k = 7
    values = component_similarity_values(model, tok, PROMPTS, top_k=k, batch_size=2, progress=False)
    layer = 1
    got = values[values["layer"] == layer].set_index(["prompt_id", "component", "metric"])["value"]
    for i, prompt in enumerate(PROMPTS):
        captured = {}
        hook = model.model.layers[layer].self_attn.o_proj.register_forward_hook(
            lambda mod, args, out: captured.__setitem__("a", out[0, -1].clone()))
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

        expected = {("MHSA", "cosine"): F.cosine_similarity(h_prev, mid, dim=0).item(),
                    ("FFN", "cosine"): F.cosine_similarity(mid, h_next, dim=0).item(),
                    ("MHSA", "jaccard"): jac(h_prev, mid), ("FFN", "jaccard"): jac(mid, h_next)}
        for (comp, metric), want in expected.items():
            assert got[(i, comp, metric)] == pytest.approx(want, abs=1e-5), (prompt, comp, metric)


def test_zeroed_ffn_gives_identical_in_and_out():
    """With W_out of layer 1 set to zero, m^1 = 0: cosine and Jaccard are exactly 1 there."""
    model, tok = _tiny("LlamaForCausalLM")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    values = component_similarity_values(model, tok, PROMPTS, top_k=10, progress=False)
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

@pytest.mark.parametrize("family", ["LlamaForCausalLM", "GPTJForCausalLM", "Gemma3ForCausalLM"])
def test_summary_schema_and_ranges(family):
    model, tok = _tiny(family)
    df = component_similarity(model, tok, PROMPTS, top_k=10, batch_size=2, progress=False)
    assert list(df.columns) == SUMMARY_COLUMNS
    assert len(df) == TINY_LAYERS * len(COMPONENTS) * len(METRICS)
    for (metric, comp), g in df.groupby(["metric", "component"], observed=True):
        assert sorted(g["layer"]) == list(range(TINY_LAYERS)), (metric, comp)
    assert set(df["component"].astype(str)) == set(COMPONENTS)
    assert set(df["metric"]) == set(METRICS)
    assert (df["n"] == len(PROMPTS)).all()
    assert df["mean"].between(-1, 1).all()
    assert df.loc[df["metric"] == "jaccard", "mean"].between(0, 1).all()
    assert ((df["ci_low"] <= df["mean"] + 1e-12) & (df["mean"] <= df["ci_high"] + 1e-12)).all()


def test_values_are_independent_of_batching():
    model, tok = _tiny("GPTNeoXForCausalLM")
    one = component_similarity_values(model, tok, PROMPTS, top_k=10, batch_size=1, progress=False)
    all_ = component_similarity_values(model, tok, PROMPTS, top_k=10, batch_size=len(PROMPTS), progress=False)
    assert list(one.columns) == ["prompt_id", "layer", "component", "metric", "value"]
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


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([], {}, "empty"),
    ("a single string", {}, "single string"),
    (["ok", ""], {}, r"prompts\[1\]"),
    (["ok"], {"top_k": 0}, "top_k"),
    (["ok"], {"top_k": 10_000}, "top_k"),
    (["ok"], {"batch_size": 0}, "batch_size"),
])
def test_bad_input_is_rejected(prompts, kwargs, match):
    model, tok = _tiny("LlamaForCausalLM")
    with pytest.raises(ValueError, match=match):
        component_similarity(model, tok, prompts, progress=False, **kwargs)


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
    df = component_similarity(model, tok, prompts, top_k=50, batch_size=4, progress=False)
    assert list(df.columns) == SUMMARY_COLUMNS
    assert len(df) == n_layers * 4
    assert (df["n"] == len(prompts)).all()
    cos = df[df["metric"] == "cosine"]["mean"]
    jac = df[df["metric"] == "jaccard"]["mean"]
    assert cos.between(-1, 1).all() and jac.between(0, 1).all()
    # A residual update is small next to the residual stream in the middle of the network.
    mid = df[(df["metric"] == "cosine") & df["layer"].between(5, n_layers - 5)]
    assert mid["mean"].min() > 0.5
    # ... but not nothing: some component changes the top-50 tokens somewhere.
    assert jac.min() < 0.9
