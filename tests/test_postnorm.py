"""Writes through the FFN post-norm (Gemma 2/3, ``post_norm_write``): the norm read exactly, its
pre-image satisfies its equations, a one-layer write moves the post-norm output by r up to the logged
undeliverable part, edits work for both methods, the fast path equals the reference one, and
pre-norm families are unchanged bit for bit."""

from __future__ import annotations

import pytest
import torch

from pmetlab import MEMITHyperParams, PMETHyperParams, compute_deltas, edited, get_adapter
from pmetlab.editing.prefixes import context_templates
from pmetlab.editing.solve import keys_and_outputs
from pmetlab.editing.targets import optimize_targets_cached
from pmetlab.models.postnorm import PostNorm, post_norm, post_norm_preimage
from tests import test_compute
from tests.test_compute import REQUESTS, _hp, _model, _p_target
from tests.tiny_models import make_tiny_tokenizer

env = test_compute.env  # the same fixture: an isolated cache and a tiny corpus

GEMMA = ["Gemma2ForCausalLM", "Gemma3ForCausalLM"]
METHODS = [PMETHyperParams, MEMITHyperParams]


def _gemma(family: str):
    """A tiny Gemma whose post-norm gains are not all 1 (a fresh model stores w = 0, g = 1 + w = 1)."""
    model = _model(family, sliding_window=64)  # the tiny default (4) hides the subject from the target
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "post_feedforward_layernorm" in name:
                p.copy_(0.6 * torch.randn(p.shape, generator=g))
    return model


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


# --- the norm and its pre-image ------------------------------------------------------------------
@pytest.mark.parametrize("family", GEMMA)
def test_post_norm_is_the_module_bit_for_bit(family):
    model = _gemma(family)
    ad = get_adapter(model)
    for l in range(ad.n_layers):
        norm, module = ad.ffn_post_norm(l), ad.module(ad.ffn_post_norm_name(l))
        x = 7 * torch.randn(5, ad.d_model, generator=torch.Generator().manual_seed(l))
        with torch.no_grad():
            assert torch.equal(post_norm(norm, x), module(x))
        assert torch.equal(norm.gain(), 1.0 + module.weight.float())


def test_pre_norm_families_have_no_post_norm():
    assert get_adapter(_model("LlamaForCausalLM")).ffn_post_norm(0) is None


def test_a_record_that_misdescribes_the_norm_is_refused():
    from pmetlab.models.postnorm import read_post_norm

    module = get_adapter(_gemma("Gemma3ForCausalLM")).module("model.layers.0.post_feedforward_layernorm")
    with pytest.raises(ValueError, match="post_norm_offset"):
        read_post_norm(module, 0.0, "model.layers.0.post_feedforward_layernorm")


def _random_norm(d: int = 48, eps: float = 1e-6) -> PostNorm:
    return PostNorm(0.5 * torch.randn(d, generator=torch.Generator().manual_seed(3)), 1.0, eps)


def test_preimage_satisfies_its_equations_on_random_tensors():
    """m* = rms(m) · u / rms(u), u = (N(m) + r) ⊘ g; so N(m*) = c · y* with
    c = rms(m) / (rms_ε(m) · rms(u)), and the undeliverable part is |c − 1| · ‖y*‖ / ‖r‖."""
    norm = _random_norm(eps=1e-2)  # a large ε, so that it is handled, not hidden
    gen = torch.Generator().manual_seed(4)
    m = 3 * torch.randn(6, 48, generator=gen, dtype=torch.float64)
    r = 0.5 * torch.randn(6, 48, generator=gen, dtype=torch.float64)
    pre = post_norm_preimage(norm, m, r)
    m_star = m + pre.residual
    g = norm.gain(torch.float64)
    y = post_norm(norm, m) + r
    u = y / g
    torch.testing.assert_close(m_star, _rms(m) * u / _rms(u), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_rms(m_star), _rms(m), rtol=1e-12, atol=0)  # m's size is kept
    c = _rms(m) / (_rms(m).pow(2) + norm.eps).sqrt() / _rms(u)
    torch.testing.assert_close(post_norm(norm, m_star), c * y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre.scale, c.squeeze(-1), rtol=1e-12, atol=0)
    want = (c.squeeze(-1) - 1).abs() * y.norm(dim=-1) / r.norm(dim=-1)
    torch.testing.assert_close(pre.undeliverable, want, rtol=1e-9, atol=1e-12)
    assert (pre.undeliverable > 0).all()


def test_preimage_of_a_reachable_target_is_exact_and_of_no_change_is_m():
    norm = _random_norm()
    gen = torch.Generator().manual_seed(5)
    m, m_t = (
        torch.randn(4, 48, generator=gen, dtype=torch.float64),
        torch.randn(4, 48, generator=gen, dtype=torch.float64),
    )
    r = post_norm(norm, m_t) - post_norm(norm, m)  # reachable: N(m_t) itself
    pre = post_norm_preimage(norm, m, r)
    torch.testing.assert_close(post_norm(norm, m + pre.residual), post_norm(norm, m_t), rtol=1e-5, atol=1e-5)
    assert pre.undeliverable.max() < 1e-4  # only ε separates rms(m)/rms_ε(m) from rms(m_t)/rms_ε(m_t)
    cos = torch.nn.functional.cosine_similarity(m + pre.residual, m_t, dim=-1)
    torch.testing.assert_close(cos, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    none = post_norm_preimage(norm, m, torch.zeros_like(m))
    assert none.residual.abs().max() < 1e-12 * m.abs().max() and torch.equal(
        none.undeliverable, torch.zeros(4, dtype=torch.float64)
    )


def test_nearest_preimage_is_the_closest_reachable_output():
    """min ‖g ⊙ v − y*‖ at rms(v) = ρ: at the optimum the miss N(m*) − y* is normal to the reachable
    ellipsoid, i.e. parallel to N(m*) ⊘ g²; it is never farther than the ray, equal to it for constant g,
    and m itself for r = 0."""
    norm = _random_norm(eps=1e-2)
    gen = torch.Generator().manual_seed(6)
    m = 2 * torch.randn(5, 48, generator=gen, dtype=torch.float64)
    r = torch.randn(5, 48, generator=gen, dtype=torch.float64)
    near, ray = post_norm_preimage(norm, m, r, "nearest"), post_norm_preimage(norm, m, r, "ray")
    m_star = m + near.residual
    out, y = post_norm(norm, m_star), post_norm(norm, m) + r
    torch.testing.assert_close(_rms(m_star), _rms(m), rtol=1e-12, atol=0)
    normal = out / norm.gain(torch.float64).pow(2)
    cos = torch.nn.functional.cosine_similarity(out - y, normal, dim=-1).abs()
    torch.testing.assert_close(cos, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (near.undeliverable <= ray.undeliverable + 1e-12).all() and (near.undeliverable < ray.undeliverable).any()
    flat = PostNorm(torch.full((48,), 0.3, dtype=torch.float64), 1.0, 1e-2)
    a, b = post_norm_preimage(flat, m, r, "nearest"), post_norm_preimage(flat, m, r, "ray")
    torch.testing.assert_close(a.residual, b.residual, rtol=1e-9, atol=1e-9)
    none = post_norm_preimage(norm, m, torch.zeros_like(m), "nearest")
    assert none.residual.abs().max() < 1e-9 * m.abs().max()
    with pytest.raises(ValueError, match="how must be one of"):
        post_norm_preimage(norm, m, r, "closest")


def test_a_zero_gain_coordinate_is_not_divided_by():
    norm = PostNorm(torch.cat([torch.tensor([-1.0]), torch.zeros(7)]), 1.0, 1e-6)  # g_0 = 0
    m, r = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    pre = post_norm_preimage(norm, m, r)
    assert torch.isfinite(pre.residual).all() and torch.isfinite(pre.undeliverable).all()


# --- the switch ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["yes", "ON", "", "true"])
def test_bad_switch_values_are_refused_in_one_line(value):
    with pytest.raises(ValueError, match=r"post_norm_write must be one of \['auto', 'on', 'off'\], got ") as e:
        PMETHyperParams(post_norm_write=value)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"post_norm_preimage must be one of \['ray', 'nearest'\], got "):
        MEMITHyperParams(post_norm_preimage=value)


def test_the_switch_is_in_the_saved_hyperparameters():
    hp = MEMITHyperParams(post_norm_write="off")
    assert hp.to_dict()["post_norm_write"] == "off" and MEMITHyperParams().post_norm_write == "auto"
    assert MEMITHyperParams.from_dict(hp.to_dict()) == hp


@pytest.mark.parametrize("cls", METHODS, ids=["pmet", "memit"])
def test_a_pre_norm_family_is_unchanged_bit_for_bit(env, cls):
    model, tok = _model("LlamaForCausalLM"), make_tiny_tokenizer()
    runs = {
        v: compute_deltas(model, tok, REQUESTS[:2], _hp(env, cls, post_norm_write=v), progress=False)
        for v in ("off", "auto", "on")
    }
    for v in ("auto", "on"):
        assert runs[v].param_names() == runs["off"].param_names()
        for n in runs["off"].tensors:
            assert torch.equal(runs[v].tensors[n], runs["off"].tensors[n]), (v, n)
        assert [x["post_norm_write"] for x in runs[v].meta["diagnostics"]] == [False, False]
        assert runs[v].meta["diagnostics"] == runs["off"].meta["diagnostics"]
        assert "post_norm_undeliverable" not in runs[v].meta["diagnostics"][0]


# --- writes on tiny Gemma models ----------------------------------------------------------------
@torch.no_grad()
def _outputs_at_subject(model, tok, hp, modules: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of ``modules`` at the subject's last token of the bare prompt of REQUESTS[0], (1, d)."""
    _, cur = keys_and_outputs(model, tok, get_adapter(model), REQUESTS[:1], ["{}"], [], modules)
    return cur


@pytest.mark.parametrize("family", GEMMA)
@pytest.mark.parametrize("cls", METHODS, ids=["pmet", "memit"])
def test_one_layer_write_moves_the_post_norm_output_by_r(env, family, cls):
    """layers=(1,), no prefixes (the key is the bare prompt's) and a tiny λ: the solve writes R̃ at the
    key, so layer 1's post-norm output moves by r up to the undeliverable part logged for it, for both
    pre-images; the nearest never misses by more than the ray."""
    model, tok = _gemma(family), make_tiny_tokenizer()
    ad = get_adapter(model)
    kw = dict(layers=(1,), n_prefixes=0, mom2_update_weight=1e-6, v_num_grad_steps=8, clamp_norm_factor=0.5)
    hp = _hp(env, cls, **kw)
    norm, ffn, layer = ad.ffn_post_norm_name(1), ad.ffn_out_name(1), ad.layer_name(1)
    before = _outputs_at_subject(model, tok, hp, [norm, ffn, layer])
    targets = optimize_targets_cached(model, tok, REQUESTS[:1], hp, context_templates(model, tok, hp), progress=False)
    if hp.residual_space == "layer":
        r = targets.values["layer"] - before[layer]  # a change of h^1, i.e. of N_1's output
    else:  # a change of m^1 before N_1: what it means for the stream
        n1 = ad.ffn_post_norm(1)
        r = post_norm(n1, targets.values["ffn"].double()) - post_norm(n1, before[ffn].double())
    misses = {}
    for v, how in (("auto", "ray"), ("on", "nearest"), ("off", "ray")):
        d = compute_deltas(
            model, tok, REQUESTS[:1], hp.replace(post_norm_write=v, post_norm_preimage=how), progress=False
        )
        with edited(model, d):
            after = _outputs_at_subject(model, tok, hp, [norm])
        misses[v] = float((after[norm] - before[norm] - r.float()).norm() / r.norm())
        if v != "off":
            diag = d.meta["diagnostics"][0]
            assert diag["post_norm_write"] is True and diag["layer"] == 1
            assert diag["residual_norm_after"] < 1e-3 * diag["residual_norm_before"]  # R̃ written at the key
            assert misses[v] == pytest.approx(diag["post_norm_undeliverable"], abs=1e-3), (misses, diag)
    assert misses["on"] <= misses["auto"] + 1e-3, misses
    if hp.residual_space == "ffn":  # PMET at l = L: V itself (off) and V's direction at M's size look alike
        assert max(misses.values()) < 1e-3, misses
    if hp.residual_space == "layer":  # measured: ray 0.72-0.80, nearest 0.51-0.53, off 0.59-0.62 of ‖r‖
        assert misses["on"] < misses["off"], misses


@pytest.mark.parametrize("cls", METHODS, ids=["pmet", "memit"])
def test_an_edit_raises_p_target_on_tiny_gemma3(env, cls):
    model, tok = _gemma("Gemma3ForCausalLM"), make_tiny_tokenizer()
    r = REQUESTS[0]
    hp = _hp(env, cls, v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=1.0, kl_factor=0.0, v_weight_decay=0.0)
    hp = hp.replace(mom2_update_weight=0.01)
    before = _p_target(model, tok, r)
    d = compute_deltas(model, tok, [r], hp, progress=False)
    assert all(x["post_norm_write"] for x in d.meta["diagnostics"])
    with edited(model, d):
        after = _p_target(model, tok, r)
    assert _p_target(model, tok, r) == before  # restored
    assert after > 1.2 * before, (before, after)  # a tiny random Gemma is hard to edit; the targets reach ~7x
    assert [x["layer"] for x in d.meta["diagnostics"]] == [0, 1]
    assert all(0 <= x["post_norm_undeliverable"] <= x["post_norm_undeliverable_max"] for x in d.meta["diagnostics"])


@pytest.mark.parametrize("cls", METHODS, ids=["pmet", "memit"])
def test_fast_path_equals_reference_path_with_the_write_through(env, cls):
    model, tok = _gemma("Gemma3ForCausalLM"), make_tiny_tokenizer()
    hp = _hp(env, cls, v_num_grad_steps=6, kl_factor=0.5)
    fast = compute_deltas(model, tok, REQUESTS, hp, progress=False, cache_targets=False)
    ref = compute_deltas(model, tok, REQUESTS, hp, progress=False, cache_targets=False, reference=True)
    assert fast.param_names() == ref.param_names()
    for n in ref.tensors:
        torch.testing.assert_close(fast.tensors[n], ref.tensors[n], rtol=1e-3, atol=1e-5)
    for a, b in zip(fast.meta["diagnostics"], ref.meta["diagnostics"]):
        assert a["post_norm_undeliverable"] == pytest.approx(b["post_norm_undeliverable"], rel=1e-3, abs=1e-6)


def test_the_switch_resolves_by_the_adapter_and_is_logged(caplog):
    from pmetlab.editing.postnorm_write import resolve_post_norm_write

    gemma, llama = get_adapter(_gemma("Gemma3ForCausalLM")), get_adapter(_model("LlamaForCausalLM"))
    with caplog.at_level("INFO", logger="pmetlab.editing.postnorm_write"):
        got = {(a.spec.family, v): resolve_post_norm_write(v, a) for a in (gemma, llama) for v in ("auto", "on", "off")}
    assert got == {
        ("gemma3", "auto"): True,
        ("gemma3", "on"): True,
        ("gemma3", "off"): False,
        ("llama", "auto"): False,
        ("llama", "on"): False,
        ("llama", "off"): False,
    }
    assert "post_norm_write='auto' resolves to on on Gemma3ForCausalLM" in caplog.text
    assert "the llama family has no FFN post-norm" in caplog.text


@pytest.mark.parametrize("space", ["ffn", "layer"])
def test_the_residual_meant_for_layer_l_is_the_spread_stream_change(space):
    """MEMIT: r = (V − h^L)/(n − i)^p; PMET: r = (N_L(V) − N_L(M))/(n − i)^p, written through N_l."""
    from pmetlab.editing.postnorm_write import post_norm_modules, through_post_norm

    ad = get_adapter(_gemma("Gemma2ForCausalLM"))
    gen = torch.Generator().manual_seed(7)
    rand = lambda: torch.randn(3, ad.d_model, generator=gen)  # noqa: E731
    out_mod = ad.ffn_out_name(2) if space == "ffn" else ad.layer_name(2)
    names = post_norm_modules(ad, space, (0, 2), out_mod)
    assert names == ([ad.ffn_out_name(2), ad.ffn_out_name(0)] if space == "ffn" else [out_mod, ad.ffn_out_name(0)])
    cur = {n: rand() for n in names}
    V = rand()
    pre = through_post_norm(ad, space, (0, 2), V, cur, (0, 3, 0.5))
    if space == "ffn":
        nL = ad.ffn_post_norm(2)
        r = (post_norm(nL, V.double()) - post_norm(nL, cur[ad.ffn_out_name(2)].double())) / 3**0.5
    else:
        r = (V.double() - cur[out_mod].double()) / 3**0.5
    want = post_norm_preimage(ad.ffn_post_norm(0), cur[ad.ffn_out_name(0)], r)
    torch.testing.assert_close(pre.residual, want.residual.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pre.undeliverable, want.undeliverable, rtol=1e-9, atol=1e-12)
