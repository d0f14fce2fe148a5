"""Models loaded with ``device_map``: editing, statistics and scoring follow each module's
device. ``device="cpu"`` with ``"auto"`` keeps every module on the CPU and the results must equal
those of a normally loaded model; with a GPU the layers are split between the GPU and the CPU,
the CPU's layers resident there (pmetlab's placement, not accelerate's offload)."""

from __future__ import annotations

import pytest
import torch

from pmetlab import EditRequest, PMETHyperParams, compute_deltas, edited, load_model
from pmetlab.evaluation.scoring import score_pairs
from pmetlab.models.placement import check_resident, needs_own_placement, place_modules
from pmetlab.stats import layer_covariances
from tests.test_stats import write_corpus
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

REQUESTS = [
    EditRequest(prompt="{} plays the sport of", subject="danny miles", target_new="jazz"),
    EditRequest(prompt="the capital of {} is", subject="france", target_new="rome"),
]


@pytest.fixture
def saved(tmp_path, monkeypatch):
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = make_tiny_model("LlamaForCausalLM", initializer_range=0.2), make_tiny_tokenizer()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    corpus = write_corpus(tmp_path / "corpus.txt")
    hp = PMETHyperParams(
        layers=(0, 1),
        cov_corpus=str(corpus),
        cov_tokens=600,
        cov_seq_len=32,
        n_prefixes=2,
        prefix_tokens=4,
        v_num_grad_steps=5,
        clamp_norm_factor=4.0,
        mom2_update_weight=1.0,
    )
    return path, hp


def _edit_and_score(model, tok, hp):
    d = compute_deltas(model, tok, REQUESTS, hp, progress=False, use_cache=False)
    prompts = [r.prompt.format(r.subject) for r in REQUESTS]
    with edited(model, d):
        nll = [float(x) for x in score_pairs(model, tok, prompts, [r.target_new for r in REQUESTS]).nll]
    covs = layer_covariances(
        model, tok, [0, 1], corpus=hp.cov_corpus, n_tokens=600, seq_len=32, progress=False, use_cache=False
    )
    return d, nll, covs


def _compare(a, b) -> None:
    (da, na, ca), (db, nb, cb) = a, b
    assert set(da.tensors) == set(db.tensors)
    for k in da.tensors:
        torch.testing.assert_close(da.tensors[k].cpu(), db.tensors[k].cpu(), rtol=1e-3, atol=1e-5)
    assert na == pytest.approx(nb, rel=1e-4, abs=1e-5)
    for l in ca:
        torch.testing.assert_close(ca[l].sum.cpu(), cb[l].sum.cpu(), rtol=1e-4, atol=1e-3)


def test_device_map_auto_on_cpu_matches_a_plain_load(saved):
    path, hp = saved
    plain = load_model(str(path), device="cpu")
    mapped = load_model(str(path), device="cpu", device_map="auto")
    assert {str(p.device) for p in mapped[0].parameters()} == {"cpu"}
    _compare(_edit_and_score(*plain, hp), _edit_and_score(*mapped, hp))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to split the layers over")
def test_layers_split_between_gpu_and_cpu_match_one_device(saved):
    path, hp = saved
    split = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    plain = load_model(str(path), device="cpu", dtype="float32")
    mapped = load_model(str(path), device="cuda", dtype="float32", device_map=split)
    devices = {str(p.device) for p in mapped[0].parameters()}
    assert any(d.startswith("cuda") for d in devices) and "cpu" in devices
    _compare(_edit_and_score(*plain, hp), _edit_and_score(*mapped, hp))


def test_a_map_mixing_cpu_and_an_accelerator_is_placed_by_pmetlab_not_offloaded():
    assert needs_own_placement({"model.layers.0": 0, "lm_head": "cpu"})
    assert needs_own_placement({"model": "cuda:0", "lm_head": "cpu"})
    assert not needs_own_placement({"model": "cpu", "lm_head": "cpu"})
    assert not needs_own_placement({"model": 0, "lm_head": 1})
    assert not needs_own_placement("auto")


def test_placed_modules_give_the_same_logits():
    model = make_tiny_model("LlamaForCausalLM", initializer_range=0.2)
    ids = torch.tensor([[3, 5, 7, 9]])
    before = model(ids).logits
    place_modules(model, {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"})
    assert torch.equal(model(ids).logits, before)
    assert model.pmetlab_device_map["lm_head"] == "cpu"


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({"model": "cpu", "lm_head": "cpu", "model.nope": "cpu"}, r"\['model.nope'\] that the model does not have"),
        ({"model": "cpu", "lm_head": "disk"}, "'disk'"),
        ({"model": "cpu"}, r"leaves parameter\(s\) \['lm_head.weight'\] without a device"),
    ],
)
def test_a_bad_device_map_is_refused_before_anything_moves(device_map, message):
    model = make_tiny_model("LlamaForCausalLM", initializer_range=0.2)
    with pytest.raises(ValueError, match=message):
        place_modules(model, device_map)
    assert {str(p.device) for p in model.parameters()} == {"cpu"}


def test_tied_weights_on_two_devices_are_refused():
    model = make_tiny_model("LlamaForCausalLM", initializer_range=0.2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied weights"):
        place_modules(model, {"model": "cuda:0", "lm_head": "cpu"})


def test_weights_left_on_meta_are_refused_with_a_clear_message():
    model = make_tiny_model("LlamaForCausalLM", initializer_range=0.2)
    model.lm_head.to("meta")
    with pytest.raises(ValueError, match=r"offloaded 1 parameter\(s\) \(e.g. \['lm_head.weight'\]\)"):
        check_resident(model, "tiny")


@pytest.mark.skipif(torch.cuda.is_available(), reason="an integer names a real accelerator here")
def test_an_accelerator_index_without_an_accelerator_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    model = make_tiny_model("LlamaForCausalLM", initializer_range=0.2)
    with pytest.raises(ValueError, match="names accelerator 0, but this machine has none"):
        place_modules(model, {"model": 0, "lm_head": "cpu"})
    assert {str(p.device) for p in model.parameters()} == {"cpu"}
