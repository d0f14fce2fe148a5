"""Trace / TraceDict: retention, editing, early stop, hook hygiene, tuple outputs, name errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pmetlab.tracing import StopForward, Trace, TraceDict, get_module, get_parameter, hidden_of, replace_hidden
from tests.tiny_models import assert_no_hooks, make_tiny_model, random_input_ids

# Names inside the tiny LLaMA (3 layers).
MLP0, MLP1, MLP2 = "model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"
ATTN1 = "model.layers.1.self_attn"
NORM = "model.norm"


class _Toy(nn.Module):
    """x -> lin0 -> relu -> lin1, plus a branch returning a tuple (out, aux)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(4, 6)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x)
        return y, y.sum(-1)


class _TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = _TupleOut()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, aux = self.block(x)
        return self.head(y) + aux[..., None]


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return make_tiny_model("LlamaForCausalLM")


@pytest.fixture(scope="module")
def ids(llama) -> torch.Tensor:
    return random_input_ids(llama, batch=2, seq=6)


def _spy(module: nn.Module, store: list):
    """A plain forward hook that records every output of ``module``; returns its handle."""
    return module.register_forward_hook(lambda m, a, o: store.append(o))


# --- retention ------------------------------------------------------------------------------------
def test_trace_retains_the_tensor_the_next_module_receives() -> None:
    toy, x = _Toy(), torch.randn(2, 4)
    seen: list = []
    h = toy.relu.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with Trace(toy, "lin0") as t:
            toy(x)
    finally:
        h.remove()
    assert t.output is seen[0]  # clone=False, detach=False: the very tensor, graph attached
    assert t.output.grad_fn is not None
    assert_no_hooks(toy)


def test_trace_clone_and_detach_copy_as_documented() -> None:
    toy, x = _Toy(), torch.randn(2, 4)
    with Trace(toy, "lin0", detach=True) as det, Trace(toy, "lin0", clone=True, detach=True) as cl:
        toy(x)
    expected = toy.lin0(x)
    assert det.output.grad_fn is None and not det.output.requires_grad
    assert cl.output.grad_fn is None
    torch.testing.assert_close(det.output, expected, rtol=0, atol=0)
    torch.testing.assert_close(cl.output, expected, rtol=0, atol=0)
    assert cl.output.data_ptr() != det.output.data_ptr()  # clone owns its storage

    # detach without clone shares storage with what flowed on; clone does not.
    with Trace(toy, "lin0", detach=True) as shared, Trace(toy, "lin0", clone=True) as own:
        toy(x)
    shared_before, own_before = shared.output.clone(), own.output.clone()
    shared.output.add_(1.0)
    own.output.add_(1.0)
    assert torch.equal(own.output, own_before + 1.0)
    assert torch.equal(shared.output, shared_before + 1.0)


def test_trace_retain_input_is_the_first_positional_argument() -> None:
    toy, x = _Toy(), torch.randn(2, 4)
    with Trace(toy, "lin1", retain_input=True, retain_output=False) as t:
        out = toy(x)
    assert t.output is None
    torch.testing.assert_close(t.input, toy.relu(toy.lin0(x)), rtol=0, atol=0)
    torch.testing.assert_close(toy.lin1(t.input), out, rtol=0, atol=0)


def test_trace_retains_input_and_output_of_a_transformer_mlp(llama, ids) -> None:
    with Trace(llama, "model.layers.1.mlp.down_proj", retain_input=True, detach=True) as t:
        llama(input_ids=ids)
    assert t.input.shape == (2, 6, 80) and t.output.shape == (2, 6, 48)
    w = llama.model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(t.input @ w.T, t.output)
    assert_no_hooks(llama)


def test_trace_of_the_model_itself(llama, ids) -> None:
    with Trace(llama) as t:
        out = llama(input_ids=ids)
    assert t.output is out


# --- editing --------------------------------------------------------------------------------------
def test_edit_output_changes_logits_and_is_undone_on_exit(llama, ids) -> None:
    base = llama(input_ids=ids).logits
    calls: list[str] = []

    def add_one(output: torch.Tensor, name: str) -> torch.Tensor:
        calls.append(name)
        return output + 1.0

    with Trace(llama, MLP1, edit_output=add_one) as t:
        edited = llama(input_ids=ids).logits
    assert calls == [MLP1]
    assert not torch.allclose(edited, base)
    # The retained output is the edited one.
    with Trace(llama, MLP1) as plain:
        llama(input_ids=ids)
    torch.testing.assert_close(t.output, plain.output + 1.0)
    assert torch.equal(llama(input_ids=ids).logits, base)  # bit-exact after the context
    assert_no_hooks(llama)


def test_edit_output_returning_none_keeps_an_in_place_edit(llama, ids) -> None:
    base = llama(input_ids=ids).logits

    def zero_in_place(output: torch.Tensor, name: str) -> None:
        output.zero_()

    with Trace(llama, MLP1, edit_output=zero_in_place) as t:
        edited = llama(input_ids=ids).logits
    assert torch.count_nonzero(t.output) == 0
    assert not torch.allclose(edited, base)


def test_identity_edit_leaves_logits_bit_identical(llama, ids) -> None:
    base = llama(input_ids=ids).logits
    with Trace(llama, MLP1, edit_output=lambda o, n: o):
        same = llama(input_ids=ids).logits
    assert torch.equal(same, base)


# --- stopping -------------------------------------------------------------------------------------
def test_stop_ends_the_forward_after_the_module(llama, ids) -> None:
    later: list = []
    h = _spy(get_module(llama, MLP2), later)
    reached_after_forward = False
    try:
        with Trace(llama, MLP1, stop=True) as t:
            llama(input_ids=ids)
            reached_after_forward = True  # StopForward skips the rest of the block
    finally:
        h.remove()
    assert not reached_after_forward
    assert later == []  # layer 2 never ran
    assert t.output.shape == (2, 6, 48)
    assert_no_hooks(llama)


def test_stop_forward_outside_a_trace_is_not_swallowed(llama, ids) -> None:
    t = Trace(llama, MLP1, stop=True)
    try:
        with pytest.raises(StopForward):
            llama(input_ids=ids)
    finally:
        t.close()
    assert_no_hooks(llama)


# --- hook hygiene ---------------------------------------------------------------------------------
def test_hooks_removed_when_the_forward_raises(llama, ids) -> None:
    def boom(output: torch.Tensor, name: str) -> torch.Tensor:
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        with Trace(llama, MLP1, edit_output=boom):
            llama(input_ids=ids)
    assert_no_hooks(llama)
    with pytest.raises(RuntimeError, match="edit failed"):
        with TraceDict(llama, [MLP0, MLP2], edit_output=boom, stop=True):
            llama(input_ids=ids)
    assert_no_hooks(llama)
    # A failure of the forward itself (bad input) also leaves nothing behind.
    with pytest.raises(Exception):  # noqa: B017 (whatever the model raises on float ids)
        with TraceDict(llama, [MLP0, MLP2], stop=True):
            llama(input_ids=ids.float())
    assert_no_hooks(llama)
    assert torch.isfinite(llama(input_ids=ids).logits).all()


def test_close_is_idempotent(llama) -> None:
    t = Trace(llama, MLP1)
    t.close()
    t.close()
    td = TraceDict(llama, [MLP0, MLP1], stop=True)
    td.close()
    td.close()
    assert_no_hooks(llama)


# --- tuple outputs --------------------------------------------------------------------------------
def test_tuple_outputs_are_retained_cloned_and_edited() -> None:
    model, x = _TupleModel(), torch.randn(3, 4)
    base = model(x)
    with Trace(model, "block", clone=True, detach=True) as t:
        model(x)
    assert isinstance(t.output, tuple) and len(t.output) == 2
    assert all(v.grad_fn is None for v in t.output)
    torch.testing.assert_close(hidden_of(t.output), model.block.lin(x))

    def scale_hidden(output: tuple, name: str) -> tuple:
        return replace_hidden(output, hidden_of(output) * 0.0)

    with Trace(model, "block", edit_output=scale_hidden) as e:
        edited = model(x)
    assert torch.count_nonzero(e.output[0]) == 0
    torch.testing.assert_close(e.output[1], t.output[1])  # the rest of the tuple untouched
    torch.testing.assert_close(edited, model.head.bias + t.output[1][..., None])
    assert not torch.allclose(edited, base)
    assert_no_hooks(model)


def test_tuple_output_of_a_transformer_attention(llama, ids) -> None:
    base = llama(input_ids=ids).logits
    with Trace(llama, ATTN1, detach=True) as t:
        llama(input_ids=ids)
    assert isinstance(t.output, tuple)
    assert hidden_of(t.output).shape == (2, 6, 48)
    with Trace(llama, ATTN1, edit_output=lambda o, n: replace_hidden(o, hidden_of(o) * 2.0)):
        edited = llama(input_ids=ids).logits
    assert not torch.allclose(edited, base)


def test_hidden_of_and_replace_hidden_reject_unknown_structures() -> None:
    with pytest.raises(TypeError, match="dict"):
        hidden_of({"a": 1})
    with pytest.raises(TypeError, match="int"):
        replace_hidden(3, torch.zeros(1))
    h = torch.ones(2)
    assert replace_hidden([torch.zeros(2), 5], h)[0] is h


# --- name errors ----------------------------------------------------------------------------------
def test_get_module_error_lists_close_matches(llama) -> None:
    with pytest.raises(LookupError) as info:
        get_module(llama, "model.layers.0.mlpp")
    msg = str(info.value)
    assert "'model.layers.0.mlpp'" in msg and "LlamaForCausalLM" in msg
    assert "model.layers.0.mlp" in msg
    assert get_module(llama, "") is llama
    assert get_module(llama, MLP1) is llama.model.layers[1].mlp


def test_get_parameter_error_lists_close_matches(llama) -> None:
    with pytest.raises(LookupError) as info:
        get_parameter(llama, "model.layers.0.mlp.down_proj.weigth")
    assert "model.layers.0.mlp.down_proj.weight" in str(info.value)
    assert get_parameter(llama, "model.layers.0.mlp.down_proj.weight") is llama.model.layers[0].mlp.down_proj.weight


def test_bad_names_attach_no_hooks(llama) -> None:
    with pytest.raises(LookupError, match="model.layers.1.mlp"):
        Trace(llama, "model.layers.1.mlpx")
    with pytest.raises(LookupError, match="model.layers.9"):
        TraceDict(llama, [MLP0, MLP1, "model.layers.9.mlp"], stop=True)
    assert_no_hooks(llama)


# --- TraceDict ------------------------------------------------------------------------------------
def test_tracedict_stops_after_the_last_module_in_forward_order(llama, ids) -> None:
    middle: list = []
    after: list = []
    hm = _spy(get_module(llama, MLP1), middle)
    ha = _spy(get_module(llama, NORM), after)
    try:
        # Listed out of forward order: the stop must still wait for layer 2.
        with TraceDict(llama, [MLP2, MLP0], stop=True) as td:
            llama(input_ids=ids)
    finally:
        hm.remove()
        ha.remove()
    assert list(td) == [MLP2, MLP0]
    assert td[MLP0].output is not None and td[MLP2].output is not None
    assert len(middle) == 1  # layer 1 ran (between the traced modules)
    assert after == []  # the final norm never ran
    assert_no_hooks(llama)


def test_tracedict_edit_sees_every_name(llama, ids) -> None:
    seen: list[str] = []

    def record(output: torch.Tensor, name: str) -> torch.Tensor:
        seen.append(name)
        return output

    with TraceDict(llama, [MLP0, ATTN1, MLP2], edit_output=record):
        llama(input_ids=ids)
    assert seen == [MLP0, ATTN1, MLP2]


@pytest.mark.parametrize("stop", [False, True])
def test_tracedict_serves_two_forwards_in_one_context(llama, ids, stop: bool) -> None:
    other = random_input_ids(llama, batch=2, seq=6, seed=1)
    after: list = []
    ha = _spy(get_module(llama, NORM), after)
    try:
        with TraceDict(llama, [MLP0, MLP2], stop=stop, clone=True, detach=True) as td:
            for x in (ids, other):
                try:
                    llama(input_ids=x)
                except StopForward:  # inside one context the caller handles each stop
                    assert stop
                if x is ids:
                    first = {k: t.output for k, t in td.items()}
    finally:
        ha.remove()
    assert len(after) == (0 if stop else 2)
    with TraceDict(llama, [MLP0, MLP2], detach=True) as ref:
        llama(input_ids=other)
    for k in (MLP0, MLP2):
        torch.testing.assert_close(td[k].output, ref[k].output, rtol=0, atol=0)
        assert not torch.allclose(first[k], td[k].output)
    assert_no_hooks(llama)


def test_tracedict_stop_still_works_after_a_forward_that_raised(llama, ids) -> None:
    after: list = []
    ha = _spy(get_module(llama, NORM), after)
    fail = {"on": True}

    def maybe_fail(m, a, o):
        if fail["on"]:
            raise RuntimeError("half-way")

    hf = get_module(llama, MLP1).register_forward_hook(maybe_fail)
    try:
        with TraceDict(llama, [MLP0, MLP2], stop=True) as td:
            with pytest.raises(RuntimeError, match="half-way"):
                llama(input_ids=ids)
            fail["on"] = False
            with pytest.raises(StopForward):
                llama(input_ids=ids)
    finally:
        ha.remove()
        hf.remove()
    assert after == []
    assert td[MLP2].output is not None
    assert_no_hooks(llama)
