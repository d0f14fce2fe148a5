"""Reversible, saveable edits: apply/restore, the context manager, save/load, refusals."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pmetlab import (
    Deltas,
    EditMismatchError,
    EditRequest,
    PMETHyperParams,
    apply_deltas_,
    compute_deltas,
    edited,
    restore_,
)
from pmetlab.cache import tensor_digest
from tests.tiny_models import _TOKENIZER_WORDS, make_tiny_model, make_tiny_tokenizer

REQUESTS = [
    EditRequest(prompt="{} plays the sport of", subject="danny miles", target_new="jazz"),
    EditRequest(prompt="the capital of {} is", subject="france", target_new="rome"),
]


def _corpus(path: Path) -> str:
    rng = random.Random(0)
    words = [w for w in _TOKENIZER_WORDS if w.isalpha()]
    path.write_text("".join(f"<doc>\n{' '.join(rng.choice(words) for _ in range(60))}\n</doc>\n" for _ in range(12)))
    return str(path)


def _hp(corpus: str, **kw) -> PMETHyperParams:
    base = dict(
        layers=(0, 1),
        cov_corpus=corpus,
        cov_tokens=600,
        cov_seq_len=32,
        n_prefixes=2,
        prefix_tokens=4,
        v_num_grad_steps=6,
        clamp_norm_factor=4.0,
        mom2_update_weight=1.0,
    )
    return PMETHyperParams(**{**base, **kw})


@pytest.fixture(scope="module")
def edit(tmp_path_factory):
    """(model factory, tokenizer, deltas) for the tiny LLaMA; computed once for the module."""
    tmp = tmp_path_factory.mktemp("deltas")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PMETLAB_CACHE_DIR", str(tmp / "cache"))
        tok = make_tiny_tokenizer()
        model = make_tiny_model("LlamaForCausalLM", initializer_range=0.2)
        d = compute_deltas(model, tok, REQUESTS, _hp(_corpus(tmp / "corpus.txt")), progress=False)
    return (lambda: make_tiny_model("LlamaForCausalLM", initializer_range=0.2)), tok, d


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"parameters changed: {changed}"


def _logits(model, tok) -> torch.Tensor:
    ids = tok([r.text for r in REQUESTS], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def test_deltas_cover_only_critical_ffn_weights(edit):
    make, _, d = edit
    model = make()
    assert d.param_names() == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    for n, t in d.tensors.items():
        assert t.shape == model.get_parameter(n).shape and t.dtype == torch.float32
    assert all(v > 0 for v in d.norms().values())
    assert d.method == "pmet" and d.meta["layers"] == [0, 1]
    assert [r["subject"] for r in d.meta["requests"]] == ["danny miles", "france"]


def test_apply_then_restore_is_bit_exact(edit):
    make, tok, d = edit
    model = make()
    state = _state(model)
    clean = _logits(model, tok)
    undo = apply_deltas_(model, d)
    assert not torch.equal(_logits(model, tok), clean)  # the edit does something
    for n, t in d.tensors.items():
        torch.testing.assert_close(model.get_parameter(n), state[n] + t, rtol=0, atol=1e-6)
    restore_(model, undo)
    _assert_same_state(model, state)
    assert torch.equal(_logits(model, tok), clean)


def test_edited_restores_on_exit_and_on_exceptions(edit):
    make, tok, d = edit
    model = make()
    state = _state(model)
    with edited(model, d) as m:
        assert m is model
        inside = _logits(model, tok)
    _assert_same_state(model, state)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with edited(model, d):
            assert torch.equal(_logits(model, tok), inside)
            raise Boom
    _assert_same_state(model, state)
    with pytest.raises(KeyboardInterrupt):
        with edited(model, d):
            raise KeyboardInterrupt
    _assert_same_state(model, state)


def test_save_load_round_trip_is_exact(edit, tmp_path):
    make, tok, d = edit
    path = d.save(tmp_path / "edit.safetensors")
    back = Deltas.load(path)
    assert back.tensors.keys() == d.tensors.keys()
    assert all(torch.equal(back.tensors[k], d.tensors[k]) for k in d.tensors)
    assert back.meta == d.meta and back.trace == d.trace
    assert back.meta["base_fingerprint"] == d.meta["base_fingerprint"]
    model = make()
    with edited(model, d):
        want = _logits(model, tok)
    with edited(model, back):
        got = _logits(model, tok)
    assert torch.equal(got, want)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary behind


@pytest.mark.parametrize("other", ["GPTJForCausalLM", "GPT2LMHeadModel", "seed", "ir"])
def test_loading_into_another_model_is_refused(edit, tmp_path, other):
    make, _, d = edit
    back = Deltas.load(d.save(tmp_path / "edit.safetensors"))
    if other == "seed":
        model = make_tiny_model("LlamaForCausalLM", seed=1, initializer_range=0.2)
    elif other == "ir":
        model = make_tiny_model("LlamaForCausalLM")  # same class and shapes, other values
    else:
        model = make_tiny_model(other)
    state = _state(model)
    with pytest.raises(EditMismatchError):
        apply_deltas_(model, back)
    with pytest.raises(EditMismatchError):
        with edited(model, back):
            pass
    _assert_same_state(model, state)


def test_mismatch_messages_say_why(edit):
    make, _, d = edit
    with pytest.raises(EditMismatchError, match="LlamaForCausalLM"):
        apply_deltas_(make_tiny_model("GPTJForCausalLM"), d)
    with pytest.raises(EditMismatchError, match="already edited|different model"):
        apply_deltas_(make_tiny_model("LlamaForCausalLM", seed=3), d)


def test_applying_twice_is_refused(edit):
    make, tok, d = edit
    model = make()
    state = _state(model)
    undo = apply_deltas_(model, d)
    once = _state(model)
    with pytest.raises(EditMismatchError, match="already edited"):
        apply_deltas_(model, d)
    _assert_same_state(model, once)  # the refused second application changed nothing
    restore_(model, undo)
    _assert_same_state(model, state)
    undo = apply_deltas_(model, d)  # after restoring, it applies again
    restore_(model, undo)
    _assert_same_state(model, state)


def test_check_false_applies_anyway(edit):
    make, _, d = edit
    model = make_tiny_model("LlamaForCausalLM", seed=5)
    state = _state(model)
    undo = apply_deltas_(model, d, check=False)
    n = d.param_names()[0]
    torch.testing.assert_close(model.get_parameter(n), state[n] + d.tensors[n], rtol=0, atol=1e-6)
    restore_(model, undo)
    _assert_same_state(model, state)


def test_non_finite_deltas_are_refused(edit):
    make, _, d = edit
    model = make()
    state = _state(model)
    bad = Deltas({k: v.clone() for k, v in d.tensors.items()}, dict(d.meta))
    bad.tensors[bad.param_names()[-1]][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        apply_deltas_(model, bad)
    _assert_same_state(model, state)


@pytest.mark.parametrize("damage", ["truncate", "garble-data", "garble-header", "empty", "foreign"])
def test_damaged_file_gives_clear_valueerror(edit, tmp_path, damage):
    _, _, d = edit
    path = d.save(tmp_path / "edit.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "garble-data":
        for i in range(len(raw) - 64, len(raw) - 32):  # inside a tensor, header intact
            raw[i] ^= 0x21
        path.write_bytes(bytes(raw))
    elif damage == "garble-header":
        for i in range(10, 60):
            raw[i] = ord("%")
        path.write_bytes(bytes(raw))
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid safetensors file that is not a pmetlab edit
        save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="edit.safetensors") as ei:
        Deltas.load(path)
    assert not isinstance(ei.value, EditMismatchError)


def test_missing_file_is_filenotfound(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved edit"):
        Deltas.load(tmp_path / "nope.safetensors")


# --- digests: tensor_digest now, the formulas of files saved before still accepted ------------


def _legacy_fingerprint(model, names) -> str:
    """The base fingerprint deltas carried before tensor_digest: names and bytes only."""
    h = hashlib.blake2b(digest_size=16)
    for n in sorted(names):
        h.update(n.encode())
        h.update(memoryview(model.get_parameter(n).detach().contiguous().numpy()).cast("B"))
    return h.hexdigest()


def _legacy_checksum(tensors) -> str:
    """The checksum deltas files carried before tensor_digest (bfloat16 hashed as int16)."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        t = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def test_fingerprint_is_the_tensor_digest_and_legacy_files_still_apply(edit, tmp_path):
    make, tok, d = edit
    model = make()
    assert d.meta["fingerprint_version"] == 2
    assert d.meta["base_fingerprint"] == tensor_digest({n: model.get_parameter(n) for n in d.tensors})
    # a file saved before: the legacy fingerprint and no fingerprint_version
    old_meta = {k: v for k, v in d.meta.items() if k != "fingerprint_version"}
    old_meta["base_fingerprint"] = _legacy_fingerprint(model, d.tensors)
    legacy = Deltas.load(Deltas(d.tensors, old_meta, d.trace).save(tmp_path / "old.safetensors"))
    assert legacy.meta["base_fingerprint"] != d.meta["base_fingerprint"]
    state = _state(model)
    with edited(model, d):
        want = _logits(model, tok)
    with edited(model, legacy):
        assert torch.equal(_logits(model, tok), want)
        with pytest.raises(EditMismatchError, match="already edited"):
            apply_deltas_(model, legacy)
    _assert_same_state(model, state)
    with pytest.raises(EditMismatchError):
        apply_deltas_(make_tiny_model("LlamaForCausalLM", seed=1, initializer_range=0.2), legacy)
    # deltas that say they carry the current fingerprint are held to it
    with pytest.raises(EditMismatchError):
        apply_deltas_(model, Deltas(d.tensors, {**old_meta, "fingerprint_version": 2}))
    _assert_same_state(model, state)


def test_checksum_is_the_tensor_digest_and_legacy_bfloat16_files_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"b.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16), "a.weight": torch.randn(5, generator=g)}
    path = Deltas(t, {"method": "pmet"}).save(tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert header["checksum"] == tensor_digest(t)
    assert _legacy_checksum({"a.weight": t["a.weight"]}) == tensor_digest({"a.weight": t["a.weight"]})
    save_file(t, str(path), metadata={**header, "checksum": _legacy_checksum(t)})  # as saved before
    back = Deltas.load(path)
    assert all(torch.equal(back.tensors[k], t[k]) for k in t)
    save_file(t, str(path), metadata={**header, "checksum": "0" * 32})
    with pytest.raises(ValueError, match="checksum"):
        Deltas.load(path)


def test_saving_onto_a_directory_says_so_and_touches_nothing(tmp_path):
    d = Deltas({"w": torch.ones(2)}, {"method": "pmet"})
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot save the deltas to '.*out': it is a directory; pass a file"):
        d.save(target)
    assert target.is_dir() and not list(target.iterdir()) and sorted(tmp_path.iterdir()) == [target]
    assert torch.equal(Deltas.load(d.save(target / "deltas.safetensors")).tensors["w"], torch.ones(2))


@pytest.mark.parametrize(
    "failure",
    [
        lambda tmp: PermissionError(13, "Permission denied", str(tmp)),
        lambda tmp: __import__("safetensors").SafetensorError(
            f'Error while serializing: I/O error: No space left on device (os error 28) at path "{tmp}"'
        ),
    ],
)
def test_a_failed_write_names_the_target_not_the_temporary_file(tmp_path, monkeypatch, failure):
    import pmetlab.editing.deltas as deltas_module

    def failing_save_file(tensors, tmp, metadata=None):
        raise failure(tmp)

    monkeypatch.setattr(deltas_module, "save_file", failing_save_file)
    target = tmp_path / "edit.safetensors"
    with pytest.raises(OSError, match=rf"cannot save the deltas to '{target}': .*writable directory") as info:
        Deltas({"w": torch.ones(2)}, {"method": "pmet"}).save(target)
    assert ".tmp" not in str(info.value).split(";")[0].replace(str(target), "")
    assert not list(tmp_path.iterdir())  # the temporary file was removed


def _synthetic(model, scale: float = 0.01) -> Deltas:
    """Hand-made deltas on two down projections (independent of the edit computation)."""
    from pmetlab.editing.deltas import param_fingerprint

    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(model.get_parameter(n).shape, generator=g) * scale for n in names}
    return Deltas(tensors, {"base_fingerprint": param_fingerprint(model, names), "fingerprint_version": 2})


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "1", True])
def test_scale_must_be_a_finite_number(scale):
    model = make_tiny_model("LlamaForCausalLM")
    state = _state(model)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        apply_deltas_(model, _synthetic(model), scale=scale)
    _assert_same_state(model, state)


def test_finite_updates_that_overflow_the_weights_are_refused_before_anything_is_applied():
    model = make_tiny_model("LlamaForCausalLM").to(torch.float16)
    d = _synthetic(model)
    state = _state(model)
    last = d.param_names()[-1]
    d.tensors[last] = d.tensors[last] * 1e30  # finite in float32, inf in float16
    with pytest.raises(ValueError, match="non-finite weights") as ei:
        apply_deltas_(model, d)
    assert last in str(ei.value)
    _assert_same_state(model, state)  # the first parameter was not touched either


def test_an_update_far_larger_than_its_weights_warns(caplog):
    model = make_tiny_model("LlamaForCausalLM")
    state = _state(model)
    with caplog.at_level("WARNING", logger="pmetlab.editing.deltas"):
        restore_(model, apply_deltas_(model, _synthetic(model)))
    assert not [r for r in caplog.records if "times the weight" in r.getMessage()]
    d = _synthetic(model, scale=1e3)
    with caplog.at_level("WARNING", logger="pmetlab.editing.deltas"):
        undo = apply_deltas_(model, d)
    assert [r for r in caplog.records if d.param_names()[0] in r.getMessage() and "times the weight" in r.getMessage()]
    for n, t in d.tensors.items():  # applied all the same, bit-identical to an in-place add
        assert torch.equal(model.get_parameter(n), state[n].clone().add_(t))
    restore_(model, undo)
    _assert_same_state(model, state)
