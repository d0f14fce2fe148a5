"""The least-squares update (method.md §2 step 3), the spread, and the key/output reader."""

from __future__ import annotations

import logging

import pytest
import torch

from pmetlab import EditRequest, get_adapter
from pmetlab.editing.solve import keys_and_outputs, solve_update, spread_residual
from pmetlab.tracing import TraceDict, hidden_of
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

D_IN, D_OUT = 20, 7  # distinct on purpose: a row/column mix-up fails the shape checks


def _problem(n: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, D_IN, generator=g, dtype=dtype)
    resid = torch.randn(n, D_OUT, generator=g, dtype=dtype)
    x = torch.randn(500, D_IN, generator=g, dtype=dtype) * torch.linspace(0.2, 3.0, D_IN, dtype=dtype)
    cov = x.T @ x / len(x)  # an uncentered second moment, SPD
    return keys, resid, cov


@pytest.mark.parametrize("n, lam", [(1, 3.0), (5, 3.0), (5, 1e-4), (30, 100.0)])
def test_solve_satisfies_normal_equations(n, lam):
    keys, resid, cov = _problem(n)
    res = solve_update(keys, resid, cov, lam)
    dw = res.delta
    assert dw.shape == (D_OUT, D_IN) and dw.dtype == torch.float64
    # ΔW (K Kᵀ + λ C) = R Kᵀ with K as columns, i.e. with keys as rows: ΔW (keysᵀ keys + λ C) = residᵀ keys
    lhs = dw @ (keys.T @ keys + lam * cov)
    rhs = resid.T @ keys
    assert torch.linalg.norm(lhs - rhs) <= 1e-8 * torch.linalg.norm(rhs)


def test_solve_runs_in_float64_from_float32_inputs():
    keys, resid, cov = (t.float() for t in _problem(4))
    res = solve_update(keys, resid, cov, 2.0)
    assert res.delta.dtype == torch.float64
    k, r, c = keys.double(), resid.double(), cov.double()
    lhs = res.delta @ (k.T @ k + 2.0 * c)
    assert torch.linalg.norm(lhs - r.T @ k) <= 1e-8 * torch.linalg.norm(r.T @ k)


def test_small_lambda_maps_the_key_to_its_target():
    """One key, λ -> 0: the edited layer sends k to W k + r (the edit is written exactly)."""
    keys, resid, cov = _problem(1, seed=3)
    layer = torch.nn.Linear(D_IN, D_OUT, bias=True).double()
    with torch.no_grad():
        before = layer(keys[0])
        res = solve_update(keys, resid, cov, 1e-8)
        layer.weight += res.delta
        after = layer(keys[0])
    torch.testing.assert_close(after, before + resid[0], rtol=1e-6, atol=1e-6)
    assert res.residual_norm_after < 1e-6 * res.residual_norm_before


def test_small_lambda_writes_every_key_when_n_below_d_in():
    keys, resid, cov = _problem(6, seed=4)
    res = solve_update(keys, resid, cov, 1e-9)
    torch.testing.assert_close(keys @ res.delta.T, resid, rtol=1e-5, atol=1e-5)


def test_large_lambda_shrinks_the_update():
    keys, resid, cov = _problem(3)
    norms = [solve_update(keys, resid, cov, lam).update_norm for lam in (1e-2, 1.0, 1e2, 1e4)]
    assert all(a > b for a, b in zip(norms, norms[1:]))
    big = solve_update(keys, resid, cov, 1e6)
    assert big.residual_norm_after == pytest.approx(big.residual_norm_before, rel=1e-3)


def test_diagnostics_are_sensible():
    keys, resid, cov = _problem(5)
    lam = 2.0
    res = solve_update(keys, resid, cov, lam)
    A = keys.T @ keys + lam * cov
    ev = torch.linalg.eigvalsh(A)
    assert res.condition_number == pytest.approx(float(ev[-1] / ev[0]), rel=1e-6)
    assert res.condition_number >= 1.0
    assert res.residual_norm_before == pytest.approx(float(resid.norm()))
    assert 0 <= res.residual_norm_after < res.residual_norm_before
    assert res.residual_norm_after == pytest.approx(float((resid - keys @ res.delta.T).norm()))
    assert res.update_norm == pytest.approx(float(res.delta.norm()))
    quiet = solve_update(keys, resid, cov, lam, diagnostics=False)
    assert torch.equal(quiet.delta, res.delta)
    assert quiet.condition_number != quiet.condition_number  # nan: not computed


def test_indefinite_system_falls_back_to_general_solve(caplog):
    keys, resid, _ = _problem(3)
    cov = -torch.eye(D_IN, dtype=torch.float64)  # K Kᵀ - λI is indefinite for this λ
    lam = 0.5
    with caplog.at_level(logging.WARNING, logger="pmetlab.editing.solve"):
        res = solve_update(keys, resid, cov, lam)
    assert "not positive definite" in caplog.text
    lhs = res.delta @ (keys.T @ keys + lam * cov)
    assert torch.linalg.norm(lhs - resid.T @ keys) <= 1e-8 * torch.linalg.norm(resid.T @ keys)


@pytest.mark.parametrize(
    "keys, resid, cov, what",
    [
        (torch.zeros(3, D_IN), torch.zeros(2, D_OUT), torch.eye(D_IN), "share N"),
        (torch.zeros(D_IN), torch.zeros(1, D_OUT), torch.eye(D_IN), "share N"),
        (torch.zeros(3, D_IN), torch.zeros(3, D_OUT), torch.eye(D_OUT), "cov must be"),
    ],
)
def test_solve_shape_errors(keys, resid, cov, what):
    with pytest.raises(ValueError, match=what):
        solve_update(keys, resid, cov, 1.0)


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_spread_residual_scaling(p):
    r = torch.randn(3, D_OUT, dtype=torch.float64)
    n = 5
    for i in range(n):
        torch.testing.assert_close(spread_residual(r, i, n, p), r / (n - i) ** p)
    torch.testing.assert_close(spread_residual(r, n - 1, n, p), r)  # the last layer takes what is left


def test_square_root_spread_vs_even_spread():
    r = torch.ones(1, 4, dtype=torch.float64)
    n = 4
    sqrt_share = [float(spread_residual(r, i, n, 0.5)[0, 0]) for i in range(n)]
    even_share = [float(spread_residual(r, i, n, 1.0)[0, 0]) for i in range(n)]
    assert sqrt_share == pytest.approx([1 / 2, 1 / 3**0.5, 1 / 2**0.5, 1.0])
    assert even_share == pytest.approx([1 / 4, 1 / 3, 1 / 2, 1.0])
    # PMET gives every layer but the last a larger share than MEMIT
    assert all(s > e for s, e in zip(sqrt_share[:-1], even_share[:-1]))
    with pytest.raises(ValueError, match="0..3"):
        spread_residual(r, 4, n, 0.5)
    with pytest.raises(ValueError):
        spread_residual(r, -1, n, 0.5)


def test_keys_and_outputs_average_templates_like_the_release():
    """Keys: mean over the bare prompt (weight 1/2) and the mean of the prefixed prompts (1/2),
    at the subject's last token; outputs: bare prompt only."""
    model = make_tiny_model("LlamaForCausalLM")
    tok = make_tiny_tokenizer()
    adapter = get_adapter(model)
    reqs = [
        EditRequest(prompt="{} plays the sport of", subject="danny miles", target_new="jazz"),
        EditRequest(prompt="the capital of {} is", subject="france", target_new="rome"),
    ]
    templates = ["{}", "one two three. {}", "the old king. {}"]
    kmod, omod = adapter.ffn_out_name(1), adapter.ffn_out_name(2)
    tok.padding_side = "left"  # keys_and_outputs pads right internally and must put this back
    keys, outs = keys_and_outputs(model, tok, adapter, reqs, templates, [kmod], [omod], batch_size=2)
    assert keys[kmod].shape == (2, adapter.d_ff) and outs[omod].shape == (2, adapter.d_model)

    def read(text: str, look: int):
        with torch.no_grad(), TraceDict(model, [kmod, omod], retain_input=True) as td:
            model(input_ids=tok(text, return_tensors="pt")["input_ids"])
        return td[kmod].input[0, look], hidden_of(td[omod].output)[0, look]

    looks = {
        ("danny miles", "{}"): 1,
        ("danny miles", "one two three. {}"): 5,
        ("danny miles", "the old king. {}"): 5,
        ("france", "{}"): 3,
        ("france", "one two three. {}"): 7,
        ("france", "the old king. {}"): 7,
    }
    for i, r in enumerate(reqs):
        per = [read(ctx.format(r.prompt).format(r.subject), looks[(r.subject, ctx)]) for ctx in templates]
        want_k = 0.5 * per[0][0] + 0.5 * (per[1][0] + per[2][0]) / 2
        torch.testing.assert_close(keys[kmod][i], want_k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[omod][i], per[0][1], rtol=1e-5, atol=1e-6)
    assert tok.padding_side == "left"
