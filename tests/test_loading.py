"""load_model: bad input fails with one clear line; the embedded real models load and behave.

Tests marked ``slow`` use the real embedded models (SmolLM2-135M, Gemma 3 270M).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from pmetlab.models import ModelLoadError, embedded_models, get_adapter, load_model, model_identity
from pmetlab.tracing import TraceDict, hidden_of
from tests.tiny_models import assert_no_hooks, make_tiny_model, make_tiny_tokenizer

PROMPT = "The capital of France is"


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, f"expected a one-line message, got {msg!r}"
    return msg


# --- bad input (fast) -----------------------------------------------------------------------------
def test_unknown_name_offline_fails_with_one_clear_line(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import; patch the constant it already holds.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_model("no-such-model-xyz")
    msg = _one_line(info.value)
    assert "'no-such-model-xyz'" in msg
    assert "smollm2-135m" in msg and "gemma3-270m" in msg  # says what would work
    assert "local path" in msg


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_name_is_rejected(bad: str) -> None:
    with pytest.raises(ModelLoadError, match="non-empty"):
        load_model(bad)


def test_local_dir_without_config_fails(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    msg = _one_line(info.value)
    assert "config.json" in msg and str(tmp_path) in msg


def test_bidirectional_encoder_is_not_a_causal_lm(tmp_path: Path) -> None:
    # AutoModelForCausalLM accepts a BERT config (as BertLMHeadModel), but without is_decoder=True
    # its attention sees the whole sequence.
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40)
    BertModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    msg = _one_line(info.value)
    assert "causal" in msg and "'bert'" in msg


def test_model_type_without_a_causal_lm_class(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=40)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    msg = _one_line(info.value)
    assert "causal" in msg and "'distilbert'" in msg


def test_local_dir_without_tokenizer_fails_clearly(tmp_path: Path) -> None:
    make_tiny_model("LlamaForCausalLM").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    msg = _one_line(info.value)
    assert "tokenizer" in msg and "save_pretrained" in msg


def test_local_tiny_model_loads_ready_for_editing(tmp_path: Path) -> None:
    ref = make_tiny_model("LlamaForCausalLM", seed=5)
    ref.save_pretrained(tmp_path)
    make_tiny_tokenizer(pad=False).save_pretrained(tmp_path)
    # Extra keywords reach from_pretrained: eager attention, as in the reference, for bit-equality.
    model, tok = load_model(str(tmp_path), device="cpu", attn_implementation="eager")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token == tok.eos_token == "</s>"  # no pad token: eos is used
    assert tok.padding_side == "right"
    ids = tok([PROMPT], return_tensors="pt").input_ids
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    ident = model_identity(model)
    assert ident["source"] == str(tmp_path) and ident["class"] == "LlamaForCausalLM"
    assert ident["n_params"] == sum(p.numel() for p in ref.parameters())


def test_unsupported_class_is_caught_at_load(tmp_path: Path) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    from pmetlab.models import UnsupportedArchitectureError

    BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=2)).save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="BloomForCausalLM.*register_adapter"):
        load_model(str(tmp_path))
    model, _ = load_model(str(tmp_path), check_adapter=False)
    assert type(model).__name__ == "BloomForCausalLM"


def test_embedded_models_are_listed() -> None:
    names = embedded_models()
    assert set(names) == {"smollm2-135m", "gemma3-270m"}
    assert all(isinstance(v, str) and v for v in names.values())


# --- the real embedded SmolLM2 (slow) -------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_is_ready_for_editing(smollm2) -> None:
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and all(not m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.padding_side == "right"
    assert model_identity(model)["source"] == "smollm2-135m"
    adapter = get_adapter(model)
    assert (adapter.n_layers, adapter.d_model, adapter.d_ff) == (30, 576, 1536)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2) -> None:
    model, tok = smollm2
    enc = tok(PROMPT, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
def test_smollm2_traced_layers_match_output_hidden_states(smollm2) -> None:
    """hidden_states[l+1] is layer l's output, except the last: transformers 5 replaces
    hidden_states[-1] with last_hidden_state, i.e. the final norm applied to it."""
    model, tok = smollm2
    adapter = get_adapter(model)
    enc = tok([PROMPT, "Danny Miles plays the"], return_tensors="pt", padding=True)
    names = [adapter.layer_name(l) for l in range(adapter.n_layers)]
    with TraceDict(model, names + [adapter.final_norm_name], detach=True) as td:
        out = model(**enc, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == adapter.n_layers + 1
    for l in range(adapter.n_layers - 1):
        torch.testing.assert_close(hidden_of(td[names[l]].output), hs[l + 1], rtol=0, atol=0)
    last = hidden_of(td[names[-1]].output)
    final_norm = adapter.module(adapter.final_norm_name)
    torch.testing.assert_close(final_norm(last), hs[-1], rtol=0, atol=0)
    assert not torch.allclose(last, hs[-1])
    normed = hidden_of(td[adapter.final_norm_name].output)
    torch.testing.assert_close(adapter.logits_from_normed(normed), out.logits, rtol=1e-5, atol=1e-4)
    assert_no_hooks(model)


# --- the real embedded Gemma 3 (slow) -------------------------------------------------------------
@pytest.mark.slow
def test_gemma3_loads_generates_and_fits_its_adapter() -> None:
    model, tok = load_model("gemma3-270m", device="cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None
    enc = tok(PROMPT, return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, enc.input_ids.shape[1] + 4)
    assert tok.decode(gen[0, enc.input_ids.shape[1] :], skip_special_tokens=True).strip()

    adapter = get_adapter(model)
    assert adapter.spec.family == "gemma3" and not adapter.parallel
    assert (adapter.n_layers, adapter.d_model, adapter.d_ff) == (18, 640, 2048)
    layer = 5
    block = adapter.layer_name(layer)
    a_norm, m_norm = adapter.attn_post_norm_name(layer), adapter.ffn_post_norm_name(layer)
    names = [block, a_norm, m_norm, adapter.ffn_out_name(layer), adapter.final_norm_name]
    with TraceDict(model, names, retain_input=True, detach=True) as td:
        logits = model(**enc).logits
    # h^l = h^{l-1} + post_attn_norm(a^l) + post_ffn_norm(m^l); the norms read W_O / W_out outputs.
    h_in, h_out = td[block].input, hidden_of(td[block].output)
    torch.testing.assert_close(h_in + td[a_norm].output + td[m_norm].output, h_out, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(td[m_norm].input, td[adapter.ffn_out_name(layer)].output, rtol=0, atol=0)
    assert td[adapter.ffn_out_name(layer)].input.shape[-1] == 2048
    normed = hidden_of(td[adapter.final_norm_name].output)
    torch.testing.assert_close(adapter.logits_from_normed(normed), logits, rtol=1e-5, atol=1e-4)
    assert_no_hooks(model)


# --- the converted cache (slow) -------------------------------------------------------------------
@pytest.mark.slow
def test_corrupt_converted_cache_is_rebuilt(smollm2, tmp_path: Path, monkeypatch, caplog) -> None:
    from pmetlab.models import loading

    model, tok = smollm2
    embedded = loading._EMBEDDED["smollm2-135m"]
    source = loading._converted_dir(embedded)  # the fixture's conversion: found, not rebuilt
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path))
    # Seed the temporary cache with a copy of the good conversion (saves one ~30 s conversion).
    good = tmp_path / "models" / source.name
    shutil.copytree(source, good)
    assert loading._converted_dir(embedded) == good  # the copy is accepted as it is
    weights = good / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)

    try:
        with caplog.at_level(logging.WARNING, logger="pmetlab.models.loading"):
            rebuilt, _ = load_model("smollm2-135m", device="cpu")
        assert any("rebuilding" in r.getMessage() for r in caplog.records)
        assert weights.stat().st_size == size
        ids = tok(PROMPT, return_tensors="pt").input_ids
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)  # ~0.5 GB; pytest keeps old tmp dirs
