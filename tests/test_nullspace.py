"""Null-space preservation (AlphaEdit) as a solver switch: the projector, the projected solve and
its normal equations, the preserved keys of earlier edits, the cache, and compute_deltas with the
switch off (bit-identical) and on."""

from __future__ import annotations

import json
import random

import pytest
import torch

from pmetlab import EditRequest, MEMITHyperParams, PMETHyperParams, compute_deltas, layer_covariances
from pmetlab.editing.nullspace import (
    PreservedKeys,
    cached_null_space_projector,
    null_space_projector,
    projector_rank,
    solve_update_null_space,
)
from pmetlab.store import KeyedStore
from tests.tiny_models import _TOKENIZER_WORDS, make_tiny_model, make_tiny_tokenizer

D_IN, D_OUT, RANK0 = 20, 7, 12  # preserved keys span 12 of 20 directions: an 8-dim null space


def _preserved_setting(seed: int = 0):
    """K₀ (RANK0 directions, 400 keys), C = K₀ K₀ᵀ / n + tiny noise, edit keys and residuals."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))[0][:, :RANK0]
    k0 = torch.randn(400, RANK0, generator=g, dtype=torch.float64) @ basis.T  # (n, D_IN) rows
    cov = k0.T @ k0 / len(k0) + 1e-9 * torch.eye(D_IN, dtype=torch.float64)
    keys = torch.randn(3, D_IN, generator=g, dtype=torch.float64)
    resid = torch.randn(3, D_OUT, generator=g, dtype=torch.float64)
    return k0, cov, keys, resid


def test_projector_is_a_symmetric_idempotent_projection_onto_the_small_eigenvalues():
    _, cov, _, _ = _preserved_setting()
    P = null_space_projector(cov, 1e-4)
    assert P.shape == (D_IN, D_IN) and P.dtype == torch.float64
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-12)
    assert projector_rank(P) == D_IN - RANK0
    ev, vecs = torch.linalg.eigh(cov)
    large = vecs[:, ev >= 1e-4]
    assert large.shape[1] == RANK0 and (P @ large).norm() < 1e-10
    small = vecs[:, ev < 1e-4]
    torch.testing.assert_close(P @ small, small, rtol=0, atol=1e-10)


def test_projector_with_most_eigenvalues_below_is_the_same_projection():
    """The stored basis switches to the complement above half the dimension; P is unchanged."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, D_IN, generator=g, dtype=torch.float64) * torch.logspace(-3, 0, D_IN, dtype=torch.float64)
    cov = x.T @ x / len(x)
    ev, vecs = torch.linalg.eigh(cov)
    for thr in (float(ev[2:4].mean()), float(ev[15:17].mean())):  # 3 and 16 of 20 eigenvalues below
        P = null_space_projector(cov, thr)
        u0 = vecs[:, ev < thr]
        torch.testing.assert_close(P, u0 @ u0.T, rtol=0, atol=1e-9)


@pytest.mark.parametrize("thr", [1e-12, 0.0, -1.0])
def test_a_threshold_below_every_eigenvalue_fails_naming_the_smallest(thr):
    _, cov, _, _ = _preserved_setting()
    cov = cov + 1e-6 * torch.eye(D_IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="null_space_threshold") as exc:
        null_space_projector(cov, thr)
    if thr > 0:
        smallest = float(torch.linalg.eigvalsh(cov)[0])
        assert "smallest eigenvalue" in str(exc.value) and f"{smallest:.4g}" in str(exc.value)


def test_projected_update_leaves_the_preserved_keys_unchanged_and_reduces_the_edit_residual():
    k0, cov, keys, resid = _preserved_setting()
    P = null_space_projector(cov, 1e-4)
    res = solve_update_null_space(keys, resid, P)
    dw = res.delta
    assert dw.shape == (D_OUT, D_IN) and dw.dtype == torch.float64
    # ΔW K₀ is ~0 relative to what ΔW does to keys of the same size
    assert (dw @ k0.T).norm() / (dw.norm() * k0.norm()) < 1e-8
    assert res.residual_norm_after < 0.95 * res.residual_norm_before
    assert res.update_norm == pytest.approx(float(dw.norm())) and res.condition_number >= 1.0


def test_solve_satisfies_its_normal_equations_in_both_forms():
    k0, cov, keys, resid = _preserved_setting(seed=2)
    P = null_space_projector(cov, 1e-4)
    kp = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    G = kp.T @ kp
    dw = solve_update_null_space(keys, resid, P, G).delta
    eye = torch.eye(D_IN, dtype=torch.float64)
    M = keys.T @ keys + G  # K Kᵀ + K_p K_pᵀ (keys as columns)
    rhs = resid.T @ keys @ P  # R Kᵀ P
    scale = rhs.norm()
    assert (dw @ (eye - P)).norm() <= 1e-10 * dw.norm()  # ΔW_l = ΔW_l P
    assert (dw @ (P @ M @ P + eye) - rhs).norm() <= 1e-10 * scale  # symmetric form
    assert (dw @ (M @ P + eye) - rhs).norm() <= 1e-10 * scale  # AlphaEdit's form
    # first-order optimality of ‖ΔW P K − R‖² + ‖ΔW P‖² + ‖ΔW P K_p‖² at ΔW = ΔW_l
    grad = (dw @ P @ keys.T - resid.T) @ keys @ P + dw @ P + dw @ P @ G @ P
    assert grad.norm() <= 1e-10 * scale


def test_preserved_keys_of_earlier_edits_are_kept_better():
    _, cov, keys, resid = _preserved_setting(seed=4)
    P = null_space_projector(cov, 1e-4)
    g = torch.Generator().manual_seed(5)
    kp = 3.0 * torch.randn(4, D_IN, generator=g, dtype=torch.float64)
    preserved = PreservedKeys()
    preserved.add(5, kp[:2].float())
    preserved.add(5, kp[2:].float())
    assert preserved.count(5) == 4 and preserved.gram(6) is None
    torch.testing.assert_close(preserved.gram(5), kp.float().double().T @ kp.float().double())
    without = solve_update_null_space(keys, resid, P).delta
    with_kp = solve_update_null_space(keys, resid, P, preserved.gram(5)).delta
    assert (with_kp @ kp.T).norm() < 0.5 * (without @ kp.T).norm()


def test_bad_shapes_fail_clearly():
    _, cov, keys, resid = _preserved_setting()
    P = null_space_projector(cov, 1e-4)
    with pytest.raises(ValueError, match=r"preserved_gram.*\(20, 20\).*\(19, 19\)"):
        solve_update_null_space(keys, resid, P, torch.eye(19, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"projector must be \(20, 20\)"):
        solve_update_null_space(keys, resid, P[:5, :5])
    preserved = PreservedKeys()
    preserved.add(0, keys)
    with pytest.raises(ValueError, match="keys of size 19 for layer 0"):
        preserved.add(0, keys[:, :19])


def test_preserved_keys_save_load_reset_and_summary(tmp_path):
    g = torch.Generator().manual_seed(0)
    preserved = PreservedKeys()
    preserved.add(3, torch.randn(4, D_IN, generator=g))
    preserved.add(4, torch.randn(2, 6, generator=g), component="attn")
    assert preserved.to_dict() == {"counts": {"attn": {"4": 2}, "ffn": {"3": 4}}}
    back = PreservedKeys.load(preserved.save(tmp_path / "kp.safetensors"))
    assert back.to_dict() == preserved.to_dict()
    assert torch.equal(back.gram(3), preserved.gram(3)) and torch.equal(back.gram(4, "attn"), preserved.gram(4, "attn"))
    preserved.reset()
    assert len(preserved) == 0 and preserved.gram(3) is None and preserved.to_dict() == {"counts": {}}
    with pytest.raises(FileNotFoundError, match="no saved preserved keys"):
        PreservedKeys.load(tmp_path / "missing.safetensors")


def test_cached_projector_is_reused_and_a_damaged_entry_recomputed(tmp_path, monkeypatch):
    _, cov, _, _ = _preserved_setting()
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or eigh(*a, **k))
    store = KeyedStore("projectors", root=tmp_path)
    first = cached_null_space_projector(cov, 1e-4, store=store)
    assert len(calls) == 1 and torch.equal(first, null_space_projector(cov, 1e-4))
    calls.clear()
    assert torch.equal(cached_null_space_projector(cov, 1e-4, store=store), first) and not calls
    cached_null_space_projector(cov, 1e-3, store=store)  # another threshold: another entry
    assert len(calls) == 1 and len(list(store.folder.glob("*.safetensors"))) == 2
    calls.clear()
    for f in store.folder.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:-16] + b"\0" * 16)  # damage every entry
    assert torch.equal(cached_null_space_projector(cov, 1e-4, store=store), first) and len(calls) == 1


# --- compute_deltas --------------------------------------------------------------------------

REQUESTS = [
    EditRequest(prompt="{} plays the sport of", subject="danny miles", target_new="jazz"),
    EditRequest(prompt="the capital of {} is", subject="france", target_new="rome"),
]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(0)
    words = [w for w in _TOKENIZER_WORDS if w.isalpha()]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"<doc>\n{' '.join(rng.choice(words) for _ in range(60))}\n</doc>\n" for _ in range(12)))
    model = make_tiny_model("LlamaForCausalLM", initializer_range=0.2)
    return model, make_tiny_tokenizer(), str(corpus)


def _hp(corpus: str, cls=PMETHyperParams, **kw):
    base = dict(
        layers=(0, 1),
        cov_corpus=corpus,
        cov_tokens=600,
        cov_seq_len=32,
        n_prefixes=2,
        prefix_tokens=4,
        v_num_grad_steps=4,
        clamp_norm_factor=4.0,
        mom2_update_weight=1.0,
    )
    return cls(**{**base, **kw})


def _threshold(model, tok, hp) -> float:
    """A threshold with about half of every critical layer's eigenvalues below it."""
    covs = layer_covariances(model, tok, hp.layers, spec=hp.covariance, progress=False)
    return 1.01 * max(float(torch.linalg.eigvalsh(c.mom2.double()).median()) for c in covs.values())


def test_switch_off_is_bit_identical_and_ignores_preserved_keys(tiny):
    model, tok, corpus = tiny
    hp = _hp(corpus)
    plain = compute_deltas(model, tok, REQUESTS, hp, progress=False)
    preserved = PreservedKeys()
    preserved.add(0, torch.randn(3, 80))
    again = compute_deltas(model, tok, REQUESTS, hp, progress=False, preserved=preserved)
    assert plain.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(plain.tensors[n], again.tensors[n]) for n in plain.tensors)
    assert again.meta["null_space"] == {"enabled": False} and again.keys == {}
    assert not again.meta["hparams"]["null_space"]


@pytest.mark.parametrize("cls", [PMETHyperParams, MEMITHyperParams])
def test_switch_on_changes_the_update_records_ranks_and_hands_back_the_keys(tiny, cls):
    model, tok, corpus = tiny
    hp = _hp(corpus, cls)
    plain = compute_deltas(model, tok, REQUESTS, hp, progress=False)
    on = hp.replace(null_space=True, null_space_threshold=_threshold(model, tok, hp))
    first = compute_deltas(model, tok, REQUESTS, on, progress=False)
    assert any(not torch.allclose(plain.tensors[n], first.tensors[n]) for n in plain.tensors)
    ns = first.meta["null_space"]
    assert ns["enabled"] and ns["threshold"] == on.null_space_threshold and ns["preserved"] is None
    assert set(ns["ranks"]["ffn"]) == {"0", "1"} and all(40 <= r <= 80 for r in ns["ranks"]["ffn"].values())
    assert set(first.keys) == {("ffn", 0), ("ffn", 1)} and first.keys[("ffn", 0)].shape == (2, 80)
    preserved = PreservedKeys()
    preserved.add_round(first)  # the caller decides; compute_deltas never adds
    assert preserved.to_dict() == {"counts": {"ffn": {"0": 2, "1": 2}}}
    second = compute_deltas(model, tok, REQUESTS, on, progress=False, preserved=preserved)
    assert preserved.to_dict() == {"counts": {"ffn": {"0": 2, "1": 2}}}
    assert second.meta["null_space"]["preserved"] == preserved.to_dict()
    assert any(not torch.allclose(first.tensors[n], second.tensors[n]) for n in first.tensors)


def test_switch_on_with_attention_updates_uses_each_components_projector(tiny):
    model, tok, corpus = tiny
    hp = _hp(corpus, update_attn_weights=True)
    attn = layer_covariances(model, tok, hp.layers, kind="attn", spec=hp.covariance, progress=False)
    thr = max(
        _threshold(model, tok, hp), *(float(torch.linalg.eigvalsh(c.mom2.double()).median()) for c in attn.values())
    )
    d = compute_deltas(model, tok, REQUESTS[:1], hp.replace(null_space=True, null_space_threshold=thr), progress=False)
    assert set(d.meta["null_space"]["ranks"]) == {"ffn", "attn"}
    assert set(d.keys) == {("ffn", 0), ("ffn", 1), ("attn", 0), ("attn", 1)}


def test_a_threshold_too_small_names_the_layer(tiny):
    model, tok, corpus = tiny
    hp = _hp(corpus, null_space=True, null_space_threshold=1e-30)
    with pytest.raises(ValueError, match=r"layer 0 \(ffn\).*null_space_threshold"):
        compute_deltas(model, tok, REQUESTS[:1], hp, progress=False)


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan")])
def test_hparams_refuse_a_bad_threshold(bad):
    with pytest.raises(ValueError, match="null_space_threshold"):
        PMETHyperParams(null_space_threshold=bad)


def test_a_run_started_before_the_null_space_fields_existed_still_resumes(tmp_path):
    from pmetlab.runs.rundir import _with_hparam_defaults

    hp = PMETHyperParams().to_dict()
    old = {k: v for k, v in hp.items() if k not in ("null_space", "null_space_threshold")}
    params = {"model": "m", "hparams": json.loads(json.dumps(old))}
    assert _with_hparam_defaults(params)["hparams"] == json.loads(json.dumps(hp))
    changed = {**params, "hparams": {**params["hparams"], "v_lr": 123.0}}
    assert _with_hparam_defaults(changed)["hparams"]["v_lr"] == 123.0  # real differences stay


# --- issue #25: the energy rule, the ridge, the measured leakage, norm anchoring ---------------


def _spread_cov(seed: int = 2) -> torch.Tensor:
    """A covariance with eigenvalues spread over four decades (no gap to hide a bad rule behind)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, D_IN, generator=g, dtype=torch.float64) * torch.logspace(-2, 0, D_IN, dtype=torch.float64)
    return x.T @ x / len(x)


@pytest.mark.parametrize("energy", [1e-4, 0.005, 0.02, 0.2, 0.6])
def test_energy_rule_leaks_at_most_the_requested_share_and_takes_the_largest_such_rank(energy):
    from pmetlab.editing.nullspace import projector_leakage

    cov = _spread_cov()
    ev = torch.linalg.eigvalsh(cov)
    if float(ev[0] / ev.sum()) > energy:  # not even one direction fits: refused in one line
        with pytest.raises(ValueError, match="null_space_energy"):
            null_space_projector(cov, energy=energy)
        return
    P = null_space_projector(cov, energy=energy)
    leak, rank = projector_leakage(P, cov), projector_rank(P)
    assert 0 < leak <= energy + 1e-12
    assert float(ev[: rank + 1].sum() / ev.sum()) > energy  # one more direction would leak too much
    assert abs(leak - float(ev[:rank].sum() / ev.sum())) <= 1e-9 * energy


def test_threshold_rule_leakage_is_measured_not_bounded():
    """The absolute threshold at the median eigenvalue lets through what lies below it, whatever that is."""
    from pmetlab.editing.nullspace import leakage_table, projector_leakage

    cov = _spread_cov()
    ev = torch.linalg.eigvalsh(cov)
    thr = float(ev.median())
    table = leakage_table({3: cov, 8: 2 * cov}, thresholds=[thr], energies=[0.01])
    assert list(table.columns) == ["layer", "rule", "setting", "d_in", "rank", "leakage"]
    assert list(zip(table["layer"], table["rule"])) == [
        (3, "threshold"),
        (3, "energy"),
        (8, "threshold"),
        (8, "energy"),
    ]
    row = table.iloc[0]
    assert row["rank"] == int((ev < thr).sum()) and abs(row["leakage"] - float(ev[ev < thr].sum() / ev.sum())) < 1e-9
    assert (table[table["rule"] == "energy"]["leakage"] <= 0.01).all()
    P = null_space_projector(cov, thr)  # the table's leakage is the projector's, measured
    assert abs(projector_leakage(P, cov) - row["leakage"]) < 1e-9
    assert table.iloc[1]["rank"] == table.iloc[3]["rank"]  # the energy rule does not depend on the scale


def test_ridge_one_is_the_default_solve_bit_for_bit_and_other_ridges_satisfy_their_equations():
    _, cov, keys, resid = _preserved_setting()
    P = null_space_projector(cov, 1e-4)
    gram = keys[:2].T @ keys[:2]
    default = solve_update_null_space(keys, resid, P, gram)
    assert torch.equal(default.delta, solve_update_null_space(keys, resid, P, gram, ridge=1.0).delta)
    ten = solve_update_null_space(keys, resid, P, gram, ridge=10.0)
    d = ten.delta
    lhs = d @ (P @ (keys.T @ keys + gram) @ P + 10.0 * torch.eye(D_IN, dtype=torch.float64))
    torch.testing.assert_close(lhs, resid.T @ keys @ P, rtol=1e-9, atol=1e-9)
    assert ten.update_norm < default.update_norm  # a heavier ridge, a smaller update
    with pytest.raises(ValueError, match="null_space_ridge"):
        solve_update_null_space(keys, resid, P, ridge=0.0)


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("null_space_rule", "eigen"),
        ("null_space_energy", 0.0),
        ("null_space_energy", 1.0),
        ("null_space_energy", float("nan")),
        ("null_space_ridge", 0.0),
        ("null_space_ridge", -10.0),
        ("null_space_ridge", 1e9),
        ("norm_anchor", "yes"),
    ],
)
def test_hparams_refuse_bad_issue25_values_in_one_line(field, bad):
    for cls in (PMETHyperParams, MEMITHyperParams):
        with pytest.raises(ValueError, match=field) as exc:
            cls(**{field: bad})
        assert "\n" not in str(exc.value)


def test_norm_anchor_rescales_each_written_target_to_its_init_norm_and_off_is_the_target_itself():
    from pmetlab.editing.target_result import TargetResult

    g = torch.Generator().manual_seed(0)
    init, delta = torch.randn(3, 8, generator=g), 3 * torch.randn(3, 8, generator=g)
    obs = torch.randn(3, 8, generator=g)
    t = TargetResult(5, {"ffn": init + delta}, {"ffn": init}, {"ffn": delta}, [1, 1, 1], observed={"ffn": obs})
    for target in ("released", "observed"):
        off = t.written("ffn", target)
        assert off is t.written("ffn", target, False)  # off: the very tensor, untouched
        on = t.written("ffn", target, True)
        torch.testing.assert_close(on.norm(dim=1), init.norm(dim=1))
        torch.testing.assert_close(torch.nn.functional.cosine_similarity(on, off), torch.ones(3))


@pytest.mark.parametrize("cls", [PMETHyperParams, MEMITHyperParams])
def test_energy_rule_in_compute_deltas_records_rank_and_leakage_and_defaults_are_bit_identical(tiny, cls):
    model, tok, corpus = tiny
    hp = _hp(corpus, cls, null_space=True, null_space_threshold=_threshold(model, tok, hp := _hp(corpus, cls)))
    base = compute_deltas(model, tok, REQUESTS, hp, progress=False)
    explicit = hp.replace(null_space_rule="threshold", null_space_ridge=1.0, norm_anchor=False)
    again = compute_deltas(model, tok, REQUESTS, explicit, progress=False)
    assert all(torch.equal(base.tensors[n], again.tensors[n]) for n in base.tensors)
    ns = base.meta["null_space"]
    assert ns["rule"] == "threshold" and ns["ridge"] == 1.0 and set(ns["leakage"]["ffn"]) == {"0", "1"}
    energy = compute_deltas(
        model, tok, REQUESTS, hp.replace(null_space_rule="energy", null_space_energy=0.02), progress=False
    )
    ens = energy.meta["null_space"]
    assert ens["rule"] == "energy" and ens["energy"] == 0.02
    assert all(0 < v <= 0.02 for v in ens["leakage"]["ffn"].values())
    assert all(1 <= r < 80 for r in ens["ranks"]["ffn"].values())
    anchored = compute_deltas(model, tok, REQUESTS, hp.replace(norm_anchor=True), progress=False)
    assert any(not torch.allclose(base.tensors[n], anchored.tensors[n]) for n in base.tensors)
    assert anchored.meta["hparams"]["norm_anchor"] is True
