"""Hyperparameters: shipped presets, strict keys, validation, MEMIT's refusals, round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pmetlab.hparams import MEMITHyperParams, PMETHyperParams, check_layer_indices, hparams_from_dict, list_presets

PRESETS = ["smollm2-135m", "gpt-j-6b", "gpt-neox-20b", "gpt2-xl", "llama-7b"]
CLASSES = [PMETHyperParams, MEMITHyperParams]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.method)
@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(cls, name):
    hp = cls.preset(name)
    assert type(hp) is cls
    assert name in list_presets(cls.method)
    assert len(hp.layers) >= 1 and list(hp.layers) == sorted(set(hp.layers))
    assert hp.mom2_update_weight > 0 and hp.v_num_grad_steps >= 1
    assert cls.preset(name.upper()) == hp  # case-insensitive lookup


def test_preset_values_follow_method_md():
    """Spot-check §4 of method.md: the released GPT-J / NeoX numbers."""
    pj = PMETHyperParams.preset("gpt-j-6b")
    assert (pj.layers, pj.v_lr, pj.v_num_grad_steps, pj.kl_factor, pj.mom2_update_weight) == (
        (3, 4, 5, 6, 7, 8),
        0.2,
        30,
        1.0,
        6000.0,
    )
    assert pj.spread_exponent == 0.5 and pj.optimize_attn and not pj.update_attn_weights
    pn = PMETHyperParams.preset("gpt-neox-20b")
    assert (pn.layers, pn.v_lr, pn.clamp_norm_factor, pn.kl_factor, pn.mom2_update_weight) == (
        (6, 7, 8, 9, 10),
        0.5,
        0.8,
        0.8,
        15000.0,
    )
    mj = MEMITHyperParams.preset("gpt-j-6b")
    assert (mj.layers, mj.v_lr, mj.v_num_grad_steps, mj.kl_factor, mj.mom2_update_weight) == (
        (3, 4, 5, 6, 7, 8),
        0.5,
        25,
        0.0625,
        15000.0,
    )
    assert mj.spread_exponent == 1.0 and not mj.optimize_attn


def test_unknown_preset_lists_available():
    with pytest.raises(KeyError, match="available") as ei:
        PMETHyperParams.preset("gpt-99")
    assert "gpt-j-6b" in str(ei.value)


def test_unknown_keys_are_keyerror_naming_them():
    with pytest.raises(KeyError, match="mom2_update_wieght"):
        PMETHyperParams.from_dict({"layers": [1, 2], "mom2_update_wieght": 5.0})
    with pytest.raises(KeyError, match="bogus"):
        PMETHyperParams().replace(bogus=1)
    with pytest.raises(KeyError, match="nope"):
        hparams_from_dict({"method": "memit", "nope": 1})


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"layers": ()}, "layers"),
        ({"layers": (4, 3)}, "layers"),
        ({"layers": (3, 3)}, "layers"),
        ({"layers": (-1, 2)}, "layers"),
        ({"layers": 3}, "layers"),
        ({"layers": ("a", "b")}, "layers"),
        ({"v_lr": 0.0}, "v_lr"),
        ({"v_lr": float("nan")}, "v_lr"),
        ({"mom2_update_weight": -1.0}, "mom2_update_weight"),
        ({"mom2_update_weight": float("inf")}, "mom2_update_weight"),
        ({"clamp_norm_factor": 0.0}, "clamp_norm_factor"),
        ({"kl_factor": -0.1}, "kl_factor"),
        ({"spread_exponent": -1.0}, "spread_exponent"),
        ({"v_num_grad_steps": 0}, "v_num_grad_steps"),
        ({"v_num_grad_steps": 2.5}, "v_num_grad_steps"),
        ({"v_num_grad_steps": "30"}, "v_num_grad_steps"),
        ({"optimize_attn": "yes"}, "optimize_attn"),
        ({"v_lr": True}, "v_lr"),
        ({"n_prefixes": -1}, "n_prefixes"),
        ({"prefix_starts": ()}, "prefix_starts"),
        ({"prefix_starts": "The"}, "prefix_starts"),
        ({"cov_dtype": "float16"}, "cov_dtype"),
        ({"cov_tokens": 0}, "cov_tokens"),
        ({"cov_seq_len": 4}, "cov_seq_len"),
        ({"cov_corpus": 3}, "cov_corpus"),
    ],
)
def test_invalid_values_are_valueerror(changes, field):
    with pytest.raises(ValueError, match=field):
        PMETHyperParams(**changes)
    with pytest.raises(ValueError, match=field):  # replace validates too
        PMETHyperParams().replace(**changes)


def test_json_friendly_values_are_coerced():
    hp = PMETHyperParams(layers=[1, 2], mom2_update_weight=300, prefix_starts=["A"])
    assert hp.layers == (1, 2) and hp.prefix_starts == ("A",)
    assert isinstance(hp.mom2_update_weight, float) and hp.mom2_update_weight == 300.0


@pytest.mark.parametrize("flag", ["optimize_attn", "update_attn_weights"])
def test_memit_refuses_pmet_switches(flag):
    with pytest.raises(ValueError, match="PMET"):
        MEMITHyperParams(**{flag: True})
    with pytest.raises(ValueError, match="PMET"):
        MEMITHyperParams().replace(**{flag: True})
    with pytest.raises(ValueError, match="PMET"):
        hparams_from_dict({"method": "memit", flag: True})


def test_method_defaults_and_uses_attn():
    p, m = PMETHyperParams(), MEMITHyperParams()
    assert (p.method, m.method) == ("pmet", "memit")
    assert p.spread_exponent == 0.5 and m.spread_exponent == 1.0
    assert p.uses_attn and not m.uses_attn
    assert not p.replace(optimize_attn=False).uses_attn
    assert p.replace(update_attn_weights=True).uses_attn
    with pytest.raises(ValueError, match="needs optimize_attn=True"):
        p.replace(optimize_attn=False, update_attn_weights=True)


@pytest.mark.parametrize(
    "hp",
    [
        PMETHyperParams(),
        PMETHyperParams.preset("smollm2-135m").replace(
            update_attn_weights=True, spread_exponent=1.0, prefix_starts=("A", "B")
        ),
        MEMITHyperParams.preset("gpt2-xl"),
    ],
    ids=["pmet-default", "pmet-ablation", "memit-gpt2xl"],
)
def test_to_dict_round_trip(hp):
    d = hp.to_dict()
    assert d["method"] == hp.method
    assert isinstance(d["layers"], list)
    back = hparams_from_dict(json.loads(json.dumps(d)))  # through JSON, as saved with an edit
    assert type(back) is type(hp) and back == hp
    assert type(hp).from_dict(d) == hp


def test_from_dict_rejects_other_method_and_unknown_method():
    with pytest.raises(ValueError, match="memit"):
        PMETHyperParams.from_dict(MEMITHyperParams().to_dict())
    with pytest.raises(ValueError, match="rome"):
        hparams_from_dict({"method": "rome"})
    with pytest.raises(ValueError, match="None"):
        hparams_from_dict({"layers": [1]})


def test_replace_returns_new_validated_object():
    hp = PMETHyperParams.preset("gpt-j-6b")
    hp2 = hp.replace(mom2_update_weight=123.0, layers=[2, 5])
    assert hp2.mom2_update_weight == 123.0 and hp2.layers == (2, 5)
    assert hp.mom2_update_weight == 6000.0 and hp.layers == (3, 4, 5, 6, 7, 8)  # original untouched
    assert type(hp2) is PMETHyperParams
    with pytest.raises(dataclasses.FrozenInstanceError):
        hp.v_lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("layers", [(-1,), (2, -1), (-3, -2)])
def test_negative_layers_are_refused_with_the_absolute_convention(layers):
    for make in (
        lambda: PMETHyperParams(layers=layers),
        lambda: hparams_from_dict({"method": "memit", "layers": layers}),
    ):
        with pytest.raises(ValueError, match=r"negative indices .* absolute indices 0..n_layers-1.*not -1"):
            make()


def test_check_layer_indices_against_the_model_depth():
    check_layer_indices((0, 5), 6)  # in range: no error
    with pytest.raises(
        ValueError, match=r"exceed the 6 layers of GPT2LMHeadModel \(valid: 0..5\); use layers within 0..5"
    ):
        check_layer_indices((4, 6), 6, owner="GPT2LMHeadModel")
    with pytest.raises(ValueError, match=r"absolute indices 0..5.*\(layer 5 here\)"):
        check_layer_indices((-1,), 6)


def test_unknown_keys_suggest_the_close_match_and_method_must_be_a_name():
    with pytest.raises(KeyError, match=r"'Layers': did you mean 'layers'\?.*valid keys: \['argmax_nll_scale'"):
        PMETHyperParams().replace(Layers=[1, 2])
    with pytest.raises(KeyError, match=r"'v_lr ': did you mean 'v_lr'\?"):
        PMETHyperParams.from_dict({"v_lr ": 0.1})
    with pytest.raises(KeyError, match="the method is set by the class"):
        PMETHyperParams().replace(method="memit")
    with pytest.raises(ValueError, match=r"unknown method \['pmet'\] in the hyperparameters' 'method' key"):
        hparams_from_dict({"method": ["pmet"]})  # was TypeError: unhashable type: 'list'


@pytest.mark.parametrize(
    ("field", "value"),
    [("v_lr", 1e30), ("clamp_norm_factor", 1e300), ("v_num_grad_steps", 10**9), ("spread_exponent", 1e9)],
)
def test_absurd_finite_values_are_refused_naming_field_and_bound(field, value):
    from pmetlab.hparam_bounds import UPPER_BOUNDS

    with pytest.raises(ValueError) as exc:
        PMETHyperParams(**{field: value})
    msg = str(exc.value)
    assert f"{field}={value!r}" in msg and f"{UPPER_BOUNDS[field]:g}" in msg and "\n" not in msg
    PMETHyperParams(**{field: UPPER_BOUNDS[field]})  # the bound itself is accepted
