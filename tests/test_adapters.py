"""Architecture adapters: the same contract for every family, on tiny random-weight models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import pmetlab
from pmetlab.models import (
    ArchSpec,
    ModelAdapter,
    UnsupportedArchitectureError,
    adapters,
    get_adapter,
    register_adapter,
    supported_architectures,
)
from pmetlab.tracing import Trace, TraceDict, get_module, hidden_of
from tests.tiny_models import (
    TINY_D_FF,
    TINY_D_MODEL,
    TINY_FAMILIES,
    TINY_LAYERS,
    assert_no_hooks,
    make_tiny_model,
    random_input_ids,
)

# Edits add a fixed random direction: a constant shift along every dimension would be erased by
# the next LayerNorm (mean subtraction) and prove nothing on GPT-2/OPT/NeoX/Phi/GPT-J.
_DIRECTION = torch.randn(TINY_D_MODEL, generator=torch.Generator().manual_seed(0))


def _push(output: torch.Tensor, name: str) -> torch.Tensor:
    return output + _DIRECTION


PARALLEL = {"GPTJForCausalLM", "GPTNeoXForCausalLM", "PhiForCausalLM"}
POST_NORMS = {"Gemma3ForCausalLM"}


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family) -> nn.Module:
    return make_tiny_model(family)


@pytest.fixture(scope="module")
def adapter(model) -> ModelAdapter:
    return get_adapter(model)


@pytest.fixture(scope="module")
def ids(model) -> torch.Tensor:
    return random_input_ids(model, batch=2, seq=7)


# --- the per-family contract ---------------------------------------------------------------------
def test_family_is_found_by_class(model, adapter, family) -> None:
    assert type(model).__name__ == family
    assert adapter.n_layers == TINY_LAYERS
    assert adapter.d_model == TINY_D_MODEL and adapter.d_ff == TINY_D_FF
    assert adapter.d_attn == TINY_D_MODEL  # 4 heads x 12
    assert adapter.describe()["class"] == family


def test_every_name_resolves(model, adapter, family) -> None:
    for layer in range(adapter.n_layers):
        names = [
            adapter.layer_name(layer),
            adapter.attn_name(layer),
            adapter.attn_out_name(layer),
            adapter.mlp_name(layer),
            adapter.ffn_out_name(layer),
        ]
        for name in names:
            assert isinstance(get_module(model, name), nn.Module), name
        for norm in (adapter.attn_post_norm_name(layer), adapter.ffn_post_norm_name(layer)):
            assert (norm is not None) == (family in POST_NORMS)
            if norm is not None:
                get_module(model, norm)
    assert get_module(model, adapter.final_norm_name) is not None
    assert adapter.module(adapter.unembed_name) is model.get_output_embeddings()
    assert adapter.layers() is get_module(model, adapter.spec.layers)


def test_component_input_modules_resolve(model, adapter, family) -> None:
    """What each component reads: the first input of attn / mlp, except OPT's inline FFN (fc1)."""
    for layer in range(adapter.n_layers):
        assert adapter.attn_input_name(layer) == adapter.attn_name(layer)
        want_ffn = f"{adapter.layer_name(layer)}.fc1" if family == "OPTForCausalLM" else adapter.mlp_name(layer)
        assert adapter.ffn_input_name(layer) == want_ffn
        get_module(model, adapter.ffn_input_name(layer))
    assert adapter.input_embed_weight is model.get_input_embeddings().weight


def test_layer_index_is_checked(adapter) -> None:
    assert adapter.layer_name(-1) == adapter.layer_name(TINY_LAYERS - 1)
    with pytest.raises(ValueError, match=rf"out of range.*{TINY_LAYERS} layers"):
        adapter.ffn_out_name(TINY_LAYERS)
    with pytest.raises(TypeError, match="int"):
        adapter.layer_name(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int"):
        adapter.layer_name(True)


def test_ffn_key_and_output_sizes(model, adapter, ids, family) -> None:
    """The input of the FFN output projection is the key (d_ff); its output is m^l (d_model)."""
    names = [adapter.ffn_out_name(l) for l in range(adapter.n_layers)]
    with TraceDict(model, names, retain_input=True, detach=True) as td:
        model(input_ids=ids)
    flat = family == "OPTForCausalLM"  # OPT's FFN runs on (batch*seq, d) tensors
    assert adapter.spec.ffn_flat == flat
    for name in names:
        key, out = td[name].input, hidden_of(td[name].output)
        assert key.shape == ((14, TINY_D_FF) if flat else (2, 7, TINY_D_FF)), name
        assert out.shape == ((14, TINY_D_MODEL) if flat else (2, 7, TINY_D_MODEL)), name
        assert adapter.unflatten(key, 2).shape == (2, 7, TINY_D_FF)
        assert adapter.unflatten(out, 2).shape == (2, 7, TINY_D_MODEL)


def test_ffn_out_weight_is_the_module_weight_in_model_space(model, adapter, ids, family) -> None:
    for layer in range(adapter.n_layers):
        module = get_module(model, adapter.ffn_out_name(layer))
        w = adapter.ffn_out_weight(layer)
        assert w.shape == (TINY_D_MODEL, TINY_D_FF)
        expected = module.weight.t() if family == "GPT2LMHeadModel" else module.weight
        assert w.data_ptr() == module.weight.data_ptr()  # a view: editing it edits the model
        assert torch.equal(w, expected)
        wo = adapter.attn_out_weight(layer)
        assert wo.shape == (TINY_D_MODEL, adapter.d_attn)
        assert wo.data_ptr() == get_module(model, adapter.attn_out_name(layer)).weight.data_ptr()
    assert adapter.spec.transposed == (family == "GPT2LMHeadModel")
    # W_out k (+ bias) reproduces the traced FFN output: the orientation is right.
    name = adapter.ffn_out_name(1)
    with Trace(model, name, retain_input=True, detach=True) as t:
        model(input_ids=ids)
    bias = getattr(get_module(model, name), "bias", None)
    m = torch.nn.functional.linear(t.input, adapter.ffn_out_weight(1), bias)
    torch.testing.assert_close(m, t.output, rtol=1e-5, atol=1e-5)


def test_logits_from_normed_reproduces_the_model(model, adapter, ids) -> None:
    with Trace(model, adapter.final_norm_name, detach=True) as t:
        logits = model(input_ids=ids).logits
    h = hidden_of(t.output)
    assert h.shape == (2, 7, TINY_D_MODEL)
    torch.testing.assert_close(adapter.logits_from_normed(h), logits, rtol=1e-5, atol=1e-5)


def test_residual_stream_is_the_sum_of_components(model, adapter, ids, family) -> None:
    """h^l = h^{l-1} + a^l + m^l, with a^l, m^l read where the adapter says (after post-norms)."""
    layer = 1
    a_name = adapter.attn_post_norm_name(layer) or adapter.attn_out_name(layer)
    m_name = adapter.ffn_post_norm_name(layer) or adapter.ffn_out_name(layer)
    block = adapter.layer_name(layer)
    with TraceDict(model, [block, a_name, m_name], retain_input=True, detach=True) as td:
        model(input_ids=ids)
    h_in, h_out = td[block].input, hidden_of(td[block].output)
    a, m = hidden_of(td[a_name].output), adapter.unflatten(hidden_of(td[m_name].output), 2)
    torch.testing.assert_close(h_in + a + m, h_out, rtol=1e-5, atol=1e-5)


def test_parallel_flag_matches_the_data_flow(model, adapter, ids, family) -> None:
    """Parallel blocks: the FFN key of layer l does not depend on the attention output of layer l."""
    layer = 1
    key_name = adapter.ffn_out_name(layer)

    with Trace(model, key_name, retain_input=True, retain_output=False, detach=True, clone=True) as t0:
        model(input_ids=ids)
    with TraceDict(model, [adapter.attn_out_name(layer)], edit_output=_push):
        with Trace(model, key_name, retain_input=True, retain_output=False, detach=True) as t1:
            model(input_ids=ids)
    assert adapter.parallel == (family in PARALLEL)
    assert adapter.parallel == torch.equal(t0.input, t1.input)


def test_gpt_neox_sequential_residual_is_read_from_the_config() -> None:
    model = make_tiny_model("GPTNeoXForCausalLM", use_parallel_residual=False)
    adapter = get_adapter(model)
    assert adapter.parallel is False and adapter.describe()["parallel"] is False
    ids = random_input_ids(model)
    key = adapter.ffn_out_name(0)
    with Trace(model, key, retain_input=True, clone=True, detach=True) as t0:
        model(input_ids=ids)
    with Trace(model, adapter.attn_out_name(0), edit_output=_push):
        with Trace(model, key, retain_input=True, detach=True) as t1:
            model(input_ids=ids)
    assert not torch.equal(t0.input, t1.input)


def test_editing_the_ffn_output_changes_logits(model, adapter, ids) -> None:
    base = model(input_ids=ids).logits
    with Trace(model, adapter.ffn_out_name(0), edit_output=_push):
        edited = model(input_ids=ids).logits
    assert not torch.allclose(edited, base, atol=1e-4)
    assert torch.equal(model(input_ids=ids).logits, base)
    assert_no_hooks(model)


def test_stop_after_the_ffn_output(model, adapter, ids) -> None:
    reached: list = []
    h = get_module(model, adapter.final_norm_name).register_forward_hook(lambda m, a, o: reached.append(1))
    try:
        with Trace(model, adapter.ffn_out_name(0), stop=True, retain_input=True) as t:
            model(input_ids=ids)
    finally:
        h.remove()
    assert reached == []
    assert t.input.shape[-1] == TINY_D_FF
    assert_no_hooks(model)


def test_in_place_edit_through_unflatten_reaches_the_model(model, adapter, ids) -> None:
    """Editing one token's FFN output via the (batch, seq, d) view changes only what follows it."""
    base = model(input_ids=ids).logits

    def push_token(output: torch.Tensor, name: str) -> None:
        adapter.unflatten(output, 2)[1, 3] += 10 * _DIRECTION

    with Trace(model, adapter.ffn_out_name(0), edit_output=push_token):
        edited = model(input_ids=ids).logits
    assert torch.equal(edited[0], base[0]) and torch.equal(edited[1, :3], base[1, :3])
    assert not torch.allclose(edited[1, 3:], base[1, 3:], atol=1e-4)


def test_unflatten_rejects_a_wrong_batch_size(adapter) -> None:
    with pytest.raises(ValueError, match="14 flattened tokens into 3"):
        adapter.unflatten(torch.zeros(14, 5), 3)
    x = torch.zeros(2, 7, 5)
    assert adapter.unflatten(x, 2) is x


def test_tiny_models_are_deterministic(family) -> None:
    a, b = make_tiny_model(family, seed=3), make_tiny_model(family, seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert a.training is False and next(a.parameters()).dtype == torch.float32


# --- lookup, errors and registration --------------------------------------------------------------
def test_supported_architectures_lists_every_family() -> None:
    supported = supported_architectures()
    assert supported == sorted(supported)
    assert set(TINY_FAMILIES) <= set(supported)
    assert pmetlab.supported_architectures() == supported


class _Toy(nn.Module):
    """Not a transformer, and not registered."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)


def test_unsupported_class_names_it_and_lists_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_adapter(_Toy())
    msg = str(info.value)
    assert "'_Toy'" in msg
    assert "LlamaForCausalLM" in msg and "GPT2LMHeadModel" in msg
    assert "register_adapter" in msg
    assert isinstance(info.value, LookupError)


def test_subclasses_use_their_base_class_adapter() -> None:
    base = make_tiny_model("LlamaForCausalLM")

    class MyLlama(type(base)):  # type: ignore[misc, valid-type]
        pass

    sub = MyLlama(base.config)
    assert get_adapter(sub).spec.family == "llama"


def test_an_adapter_that_does_not_fit_fails_at_lookup() -> None:
    # OPT-350m style: no final layer norm (do_layer_norm_before=False), so the record cannot fit.
    model = make_tiny_model("OPTForCausalLM", do_layer_norm_before=False)
    with pytest.raises(UnsupportedArchitectureError, match=r"final_layer_norm.*register_adapter"):
        get_adapter(model)


class _Block(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.up = nn.Linear(d, f)
        self.down = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm(x))
        return x + self.down(torch.relu(self.up(self.norm(x))))


class _CustomLM(nn.Module):
    """A custom wrapper that inherits from nothing transformers knows."""

    def __init__(self, vocab: int = 30, d: int = 8, f: int = 12, n: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, f) for _ in range(n))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_out(h))


_CUSTOM_SPEC = ArchSpec(
    "custom",
    ("_CustomLM",),
    layers="blocks",
    attn="mix",
    attn_out="mix",
    mlp="down",
    ffn_out="down",
    final_norm="ln_out",
    unembed="head",
)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the adapter registry, so registrations do not leak into other tests."""
    monkeypatch.setattr(adapters, "_REGISTRY", dict(adapters._REGISTRY))
    return adapters._REGISTRY


def test_register_adapter_for_a_custom_class(registry) -> None:
    model = _CustomLM()
    with pytest.raises(UnsupportedArchitectureError):
        get_adapter(model)
    assert register_adapter(_CUSTOM_SPEC) is _CUSTOM_SPEC
    assert "_CustomLM" in supported_architectures()
    adapter = get_adapter(model)
    assert (adapter.n_layers, adapter.d_model, adapter.d_ff) == (2, 8, 12)
    assert adapter.ffn_out_name(1) == "blocks.1.down"
    ids = torch.randint(0, 30, (2, 5))
    with Trace(model, adapter.final_norm_name, detach=True) as t:
        logits = model(ids)
    torch.testing.assert_close(adapter.logits_from_normed(t.output), logits)
    assert adapter.logit_softcap is None  # no config at all


def test_register_adapter_refuses_a_conflict_without_overwrite(registry) -> None:
    register_adapter(_CUSTOM_SPEC)
    register_adapter(_CUSTOM_SPEC)  # the same record again is fine
    other = dataclasses.replace(_CUSTOM_SPEC, family="custom2", ffn_out="up")
    with pytest.raises(ValueError, match=r"'_CustomLM'.*already registered.*overwrite=True"):
        register_adapter(other)
    assert get_adapter(_CustomLM()).spec.family == "custom"
    register_adapter(other, overwrite=True)
    assert get_adapter(_CustomLM()).spec.family == "custom2"
    # A built-in family cannot be replaced by accident either.
    llama_like = dataclasses.replace(_CUSTOM_SPEC, model_classes=("LlamaForCausalLM",))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        register_adapter(llama_like)


def test_registry_copy_did_not_leak() -> None:
    assert "_CustomLM" not in supported_architectures()


def test_arch_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        _CUSTOM_SPEC.layers = "x"  # type: ignore[misc]
