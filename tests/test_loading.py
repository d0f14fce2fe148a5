"""load_model: bad input fails with one clear line; the embedded real models load and behave.

Tests marked ``slow`` use the real embedded models (SmolLM2-135M, Gemma 3 270M).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

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


def test_pmetlab_offline_makes_no_hub_request(monkeypatch) -> None:
    import huggingface_hub.constants
    from transformers import AutoConfig

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("PMETLAB_OFFLINE", "1")
    asked: list[dict] = []

    def no_network(path, **kw):
        asked.append(kw)
        raise OSError(f"{path} is not in the local cache")

    monkeypatch.setattr(AutoConfig, "from_pretrained", no_network)
    with pytest.raises(ModelLoadError) as info:
        load_model("someone/some-model")
    assert asked == [{"local_files_only": True}]
    msg = _one_line(info.value)
    assert "'someone/some-model'" in msg and "embedded name or a local path" in msg


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


# --- integrity of the converted cache and of loaded weights (fast) -------------------------------
def _flip_tensor_bytes(path: Path, n: int = 64) -> None:
    """Overwrite ``n`` bytes at the start of a safetensors file's tensor data with 0xFF (a float32
    NaN pattern), keeping the file's size."""
    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_len)
        f.write(b"\xff" * n)


@pytest.fixture
def tiny_embedded(tmp_path: Path, monkeypatch):
    """An embedded model entry whose "GGUF conversion" saves a tiny Llama and tokenizer, in a
    temporary cache; ``calls`` lists the conversions, ``dir`` is the converted copy."""
    from pmetlab.models import loading

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[Path] = []
    weights = {"nan": False}

    def write(source: Path, folder: Path) -> None:
        calls.append(folder)
        model = make_tiny_model("LlamaForCausalLM", seed=3)
        if weights["nan"]:
            with torch.no_grad():
                model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        model.save_pretrained(folder)
        make_tiny_tokenizer().save_pretrained(folder)

    monkeypatch.setattr(loading, "_write_conversion", write)
    entry = loading.EmbeddedModel("tiny-embedded", "a tiny test model", "none", lambda: gguf)
    monkeypatch.setitem(loading._EMBEDDED, "tiny-embedded", entry)
    folder = tmp_path / "cache" / "models" / f"tiny-embedded-v{loading.CONVERT_FORMAT}"
    return SimpleNamespace(calls=calls, dir=folder, weights=weights, name="tiny-embedded")


def test_first_load_converts_once_and_says_so(tiny_embedded, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pmetlab.models.loading"):
        load_model(tiny_embedded.name, device="cpu")
        load_model(tiny_embedded.name, device="cpu")
    assert len(tiny_embedded.calls) == 1
    said = [r.getMessage() for r in caplog.records if "converting" in r.getMessage()]
    assert len(said) == 1 and "once" in said[0] and str(tiny_embedded.dir) in said[0]
    manifest = json.loads((tiny_embedded.dir / "pmetlab-manifest.json").read_text())
    assert len(manifest["files"]["model.safetensors"]["sha256"]) == 64


@pytest.mark.parametrize("damage", ["flip bytes, same size", "truncate"])
def test_damaged_converted_model_is_converted_again_with_a_warning_naming_the_file(
    tiny_embedded, caplog, damage: str
) -> None:
    loaded, _ = load_model(tiny_embedded.name, device="cpu")
    # copies: the loaded tensors may be memory-mapped from the file that is damaged below
    good = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    weights = tiny_embedded.dir / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
    else:
        _flip_tensor_bytes(weights)
        assert weights.stat().st_size == size  # a size check alone would accept it
    with caplog.at_level(logging.WARNING, logger="pmetlab.models.loading"):
        again, _ = load_model(tiny_embedded.name, device="cpu")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(weights) in warned[0] and "sha256" in warned[0], warned
    assert len(tiny_embedded.calls) == 2
    for n, p in again.named_parameters():
        torch.testing.assert_close(p, good[n], rtol=0, atol=0, msg=n)


def test_converted_files_are_hashed_once_per_process_while_unchanged(tiny_embedded, monkeypatch) -> None:
    from pmetlab.models import loading

    load_model(tiny_embedded.name, device="cpu")  # converts; the new files count as verified
    hashed: list[str] = []
    real = loading.file_sha256
    monkeypatch.setattr(loading, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    load_model(tiny_embedded.name, device="cpu")
    assert hashed == []
    monkeypatch.setattr(loading, "_VERIFIED", set())  # as in a fresh process
    load_model(tiny_embedded.name, device="cpu")
    assert "model.safetensors" in hashed and len(tiny_embedded.calls) == 1
    hashed.clear()
    load_model(tiny_embedded.name, device="cpu")
    assert hashed == []


def test_conversion_without_checksums_is_converted_again(tiny_embedded, caplog) -> None:
    load_model(tiny_embedded.name, device="cpu")
    manifest_path = tiny_embedded.dir / "pmetlab-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {f: meta["size"] for f, meta in manifest["files"].items()}  # the old format
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO, logger="pmetlab.models.loading"):
        load_model(tiny_embedded.name, device="cpu")
    assert len(tiny_embedded.calls) == 2
    assert "before pmetlab recorded checksums" in caplog.text
    assert "sha256" in json.loads(manifest_path.read_text())["files"]["model.safetensors"]


def test_embedded_model_with_non_finite_weights_is_refused(tiny_embedded) -> None:
    tiny_embedded.weights["nan"] = True  # the conversion itself yields NaN (e.g. a damaged GGUF)
    with pytest.raises(ModelLoadError) as info:
        load_model(tiny_embedded.name, device="cpu")
    msg = _one_line(info.value)
    assert "non-finite" in msg and "model.layers.1.mlp.down_proj.weight" in msg
    assert f"delete {tiny_embedded.dir}" in msg


def test_local_model_with_non_finite_weights_is_refused(tmp_path: Path) -> None:
    model = make_tiny_model("LlamaForCausalLM")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[2, 1] = float("inf")
    model.save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path), device="cpu")
    msg = _one_line(info.value)
    assert str(tmp_path) in msg and "model.layers.0.self_attn.o_proj.weight" in msg
    assert "non-finite" in msg and "save or download it again" in msg


def test_finite_check_accepts_weights_whose_sum_overflows() -> None:
    from pmetlab.models.loading import _check_finite_weights

    model = make_tiny_model("LlamaForCausalLM")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(3e38)  # finite, but the sum is inf
    _check_finite_weights(model, "tiny", "nowhere", embedded=False)


# --- log noise (fast) ------------------------------------------------------------------------------
def test_loading_prints_no_weight_loading_bar_and_restores_the_tqdm_hook(tmp_path: Path, capfd) -> None:
    from transformers.utils import logging as hf_logging

    make_tiny_model("LlamaForCausalLM").save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    capfd.readouterr()
    load_model(str(tmp_path), device="cpu")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.set_tqdm_hook(None) is None  # nothing left installed


def test_a_slow_weight_load_still_shows_its_bar() -> None:
    """The hook only delays the "Loading weights" bar; other bars, and an earlier hook, are kept."""
    from transformers.utils import logging as hf_logging

    from pmetlab.models.loading import _WEIGHT_BAR_DELAY_S, _quiet_weight_bar

    seen: list[tuple[str, dict]] = []

    def outer(factory, args, kwargs):
        seen.append(("outer", kwargs))
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(outer)
    try:
        with _quiet_weight_bar():
            hf_logging.tqdm(range(2), desc="Loading weights", disable=True)
            hf_logging.tqdm(range(2), desc="Downloading", disable=True)
        assert hf_logging.set_tqdm_hook(outer) is outer  # restored
    finally:
        hf_logging.set_tqdm_hook(None)
    assert seen[0][1]["delay"] == _WEIGHT_BAR_DELAY_S
    assert "delay" not in seen[1][1]


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
    """Bytes flipped inside a tensor of a copy of the real conversion, the size unchanged: the
    copy is converted again (it loaded as NaN weights before checksums were recorded)."""
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
    _flip_tensor_bytes(weights, n=4096)
    assert weights.stat().st_size == size

    try:
        with caplog.at_level(logging.WARNING, logger="pmetlab.models.loading"):
            rebuilt, _ = load_model("smollm2-135m", device="cpu")
        assert any(str(weights) in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
        assert weights.stat().st_size == size
        ids = tok(PROMPT, return_tensors="pt").input_ids
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)  # ~0.5 GB; pytest keeps old tmp dirs


def test_a_bad_config_json_is_named_not_called_a_missing_directory(tmp_path):
    from pmetlab.models.loading import ModelLoadError, load_model

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json' cannot be read as a transformers config.*save_pretrained"):
        load_model(str(tmp_path))
