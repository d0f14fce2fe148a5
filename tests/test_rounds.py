"""Editing over time: rounds of edits on the model carrying the earlier ones, evaluated against
the original model after every round; resume after an interruption; undo is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch

from pmetlab.editing.deltas import Deltas, apply_deltas_, restore_
from pmetlab.runs import rounds as rounds_mod
from pmetlab.runs.rounds import run_rounds
from tests.test_experiments import tiny_env, tiny_hparams, tiny_mt  # noqa: F401  (fixtures)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(env, mt, out, **kw):
    kw.setdefault("hparams", tiny_hparams(env))
    return run_rounds(
        model="tiny",
        method=kw.pop("method", "pmet"),
        dataset="counterfact",
        batch_size=2,
        rounds=2,
        out_dir=out,
        model_and_tokenizer=mt,
        progress=False,
        **kw,
    )


def test_rounds_evaluate_current_and_earlier_records_against_the_original_model(tiny_env, tiny_mt, tmp_path):  # noqa: F811
    model, _ = tiny_mt
    before = _state(model)
    res = _run(tiny_env, tiny_mt, tmp_path / "r")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model is left as it was"
    rec = json.loads((tmp_path / "r" / "rounds.json").read_text())
    assert rec["status"] == "complete" and rec["rounds_done"] == 2
    assert rec["params"]["protocol"]["batch_size"] == 2 and rec["params"]["protocol"]["rounds"] == 2
    assert rec["params"]["protocol"]["reference"].startswith("the original")
    s = res.summary
    assert list(zip(s["after_round"], s["group"])) == [
        (0, "current"),
        (0, "all"),
        (1, "current"),
        (1, "earlier"),
        (1, "all"),
    ]
    assert list(s["edits_total"]) == [2, 2, 4, 4, 4]
    assert s["relative_specificity"].between(0, 100).all()
    r1 = rounds_mod.read_records(tmp_path / "r" / "round_01")
    assert sorted(r1["edited_in_round"].unique()) == [0, 1] and len(r1) == 4


def test_an_interrupted_run_resumes_at_the_last_finished_round(tiny_env, tiny_mt, tmp_path, monkeypatch):  # noqa: F811
    model, _ = tiny_mt
    before = _state(model)
    real = rounds_mod._Rounds._edit
    calls = []

    def failing(self, batch, stats):
        calls.append(len(calls))
        if len(calls) == 2:
            raise KeyboardInterrupt("stop in round 1")
        return real(self, batch, stats)

    monkeypatch.setattr(rounds_mod._Rounds, "_edit", failing)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_env, tiny_mt, tmp_path / "r")
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before), "restored after the failure"
    rec = json.loads((tmp_path / "r" / "rounds.json").read_text())
    assert rec["status"] == "failed" and rec["rounds_done"] == 1
    round0 = (tmp_path / "r" / "round_00" / "deltas.safetensors").read_bytes()
    monkeypatch.setattr(rounds_mod._Rounds, "_edit", lambda self, b, s: calls.append("again") or real(self, b, s))
    res = _run(tiny_env, tiny_mt, tmp_path / "r")
    assert calls[-1] == "again" and calls.count("again") == 1, "round 0 was reused, round 1 computed"
    assert (tmp_path / "r" / "round_00" / "deltas.safetensors").read_bytes() == round0
    assert res.record["status"] == "complete" and res.record["rounds_done"] == 2
    with pytest.raises(rounds_mod.RunMismatchError, match="other parameters"):
        _run(tiny_env, tiny_mt, tmp_path / "r", hparams=tiny_hparams(tiny_env, mom2_update_weight=3.0))


def test_every_round_can_be_reapplied_and_undoing_all_restores_the_model_bit_exactly(tiny_env, tiny_mt, tmp_path):  # noqa: F811
    model, _ = tiny_mt
    before = _state(model)
    _run(tiny_env, tiny_mt, tmp_path / "r")
    undo = [apply_deltas_(model, Deltas.load(tmp_path / "r" / f"round_{t:02d}" / "deltas.safetensors")) for t in (0, 1)]
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in before)
    for u in reversed(undo):
        restore_(model, u)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    with pytest.raises(ValueError):  # round 1 was computed on the model carrying round 0
        apply_deltas_(model, Deltas.load(tmp_path / "r" / "round_01" / "deltas.safetensors"))


def test_bad_arguments_fail_clearly(tiny_env, tiny_mt, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="rounds must be a positive integer, got 0"):
        run_rounds(model="tiny", method="pmet", rounds=0, out_dir=tmp_path, model_and_tokenizer=tiny_mt)
    with pytest.raises(ValueError, match="needs an editing method"):
        run_rounds(model="tiny", method="none", rounds=1, batch_size=1, out_dir=tmp_path, model_and_tokenizer=tiny_mt)


def test_null_space_rounds_accumulate_the_keys_of_earlier_rounds_and_resume_with_them(
    tiny_env,  # noqa: F811
    tiny_mt,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from pmetlab.editing.nullspace import PreservedKeys

    hp = tiny_hparams(tiny_env, null_space=True, null_space_threshold=1e6)  # every direction is null on tiny
    seen = []
    real = rounds_mod._Rounds._edit

    def record(self, batch, stats):
        seen.append(0 if self.preserved is None else len(self.preserved))
        if len(seen) == 2 and not getattr(record, "failed", False):
            record.failed = True
            raise KeyboardInterrupt("stop in round 1")
        return real(self, batch, stats)

    monkeypatch.setattr(rounds_mod._Rounds, "_edit", record)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_env, tiny_mt, tmp_path / "n", hparams=hp)
    res = _run(tiny_env, tiny_mt, tmp_path / "n", hparams=hp)
    assert seen[0] == 0 and seen[1] > 0 and seen[2] == seen[1], "round 1 sees round 0's keys, also after resuming"
    assert res.record["preserved"]["counts"]["ffn"]
    k0 = PreservedKeys.load(tmp_path / "n" / "round_00" / "preserved.safetensors")
    k1 = PreservedKeys.load(tmp_path / "n" / "round_01" / "preserved.safetensors")
    layer = max(int(x) for x in k1.to_dict()["counts"]["ffn"])
    assert k1.count(layer, "ffn") == 2 * k0.count(layer, "ffn")
    meta = Deltas.load(tmp_path / "n" / "round_01" / "deltas.safetensors").meta
    assert meta["null_space"]["enabled"] is True
