"""Editing over time: rounds of edits on the model carrying the earlier ones, evaluated against
the original model after every round; resume after an interruption; undo is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch

from pmetlab.editing.deltas import Deltas, apply_deltas_, restore_
from pmetlab.runs import RunMismatchError
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
    with pytest.raises(RunMismatchError, match="other parameters"):
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


# --- a damaged rounds.json, lowered rounds_done, foreign round files, SIGTERM --------------------


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"params": {"rou', "unreadable"),
        ("[1, 2]", "holds a JSON list, not a rounds record"),
        ("RECORD:two", "'rounds_done' must be an integer from 0 to 2, got 'two'"),
        ("RECORD:5", "'rounds_done' must be an integer from 0 to 2, got 5"),
        ("RECORD:-1", "'rounds_done' must be an integer from 0 to 2, got -1"),
        ("ROUNDS:x", "'rounds' must be a list of round entries"),
    ],
)
def test_a_damaged_rounds_json_is_one_line_naming_it(tiny_env, tiny_mt, tmp_path, content, match):  # noqa: F811
    out = tmp_path / "r"
    _run(tiny_env, tiny_mt, out)
    path = out / "rounds.json"
    rec = json.loads(path.read_text())
    if content.startswith("RECORD:"):
        v = content.split(":")[1]
        rec["rounds_done"] = int(v) if v.lstrip("-").isdigit() else v
        content = json.dumps(rec)
    elif content.startswith("ROUNDS:"):
        content = json.dumps(dict(rec, rounds="x"))
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        _run(tiny_env, tiny_mt, out)
    assert str(path) in str(info.value) and "resume=False" in str(info.value)
    assert "\n" not in str(info.value)
    assert _run(tiny_env, tiny_mt, out, resume=False).record["status"] == "complete"


def test_lowered_rounds_done_replaces_entries_and_foreign_rounds_are_redone(tiny_env, tiny_mt, tmp_path, caplog):  # noqa: F811
    out = tmp_path / "r"
    _run(tiny_env, tiny_mt, out)
    path = out / "rounds.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), rounds_done=1)))
    res = _run(tiny_env, tiny_mt, out)
    assert [e["round"] for e in res.record["rounds"]] == [0, 1]  # replaced, not appended
    assert list(res.summary["after_round"]).count(1) == 3
    # a round file copied from another run (other hyperparameters): redone from that round on
    other = tmp_path / "other"
    _run(tiny_env, tiny_mt, other, hparams=tiny_hparams(tiny_env, mom2_update_weight=3.0))
    (out / "round_01" / "deltas.safetensors").write_bytes((other / "round_01" / "deltas.safetensors").read_bytes())
    caplog.set_level("WARNING", logger="pmetlab.runs")
    res = _run(tiny_env, tiny_mt, out)
    assert res.record["status"] == "complete" and [e["round"] for e in res.record["rounds"]] == [0, 1]
    assert res.record["repairs"][-1]["redo_from_round"] == 1 and "foreign" in res.record["repairs"][-1]["problem"]
    assert Deltas.load(out / "round_01" / "deltas.safetensors").meta["hparams"]["mom2_update_weight"] == 10.0
    assert any("round_01" in r.getMessage() and "redone" in r.getMessage() for r in caplog.records)


def test_sigterm_during_rounds_is_recorded_failed(tiny_env, tiny_mt, tmp_path, monkeypatch):  # noqa: F811
    import os
    import signal

    from pmetlab.runs import RunTerminated

    def terminate(self, batch, stats):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(rounds_mod._Rounds, "_edit", terminate)
    with pytest.raises(RunTerminated):
        _run(tiny_env, tiny_mt, tmp_path / "r")
    rec = json.loads((tmp_path / "r" / "rounds.json").read_text())
    assert rec["status"] == "failed" and rec["error"] == "RunTerminated: received SIGTERM"
    assert rec["pid"] == os.getpid() and not (tmp_path / "r" / "run.lock").exists()


# --- issue #25: the null space's energy rule, norm anchoring and collapse diagnostics ------------


def test_new_fields_resume_bit_identically_and_rounds_record_diagnostics_and_leakage(
    tiny_env,  # noqa: F811
    tiny_mt,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    hp = tiny_hparams(
        tiny_env,
        null_space=True,
        null_space_rule="energy",
        null_space_energy=0.2,
        null_space_ridge=10.0,
        norm_anchor=True,
    )
    whole = _run(tiny_env, tiny_mt, tmp_path / "whole", hparams=hp)
    real = rounds_mod._Rounds._edit
    calls = []

    def failing(self, batch, stats):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("stop in round 1")
        return real(self, batch, stats)

    monkeypatch.setattr(rounds_mod._Rounds, "_edit", failing)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_env, tiny_mt, tmp_path / "cut", hparams=hp)
    resumed = _run(tiny_env, tiny_mt, tmp_path / "cut", hparams=hp)
    for t in (0, 1):
        a = Deltas.load(tmp_path / "whole" / f"round_{t:02d}" / "deltas.safetensors")
        b = Deltas.load(tmp_path / "cut" / f"round_{t:02d}" / "deltas.safetensors")
        assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors), f"round {t} differs after resuming"
    assert a.meta["hparams"]["norm_anchor"] is True and a.meta["null_space"]["rule"] == "energy"
    for rec in (whole.record, resumed.record):
        entry = rec["rounds"][-1]
        assert entry["null_space"]["rule"] == "energy"
        assert all(0 < v <= 0.2 for v in entry["null_space"]["leakage"]["ffn"].values())
        diag = entry["diagnostics"]
        assert set(diag["weights"]) and all(
            w["change_fro"] > 0 and w["condition"] >= 1 for w in diag["weights"].values()
        )
        assert diag["seconds"] >= 0 and "neighbourhood_kl" in diag and "perplexity" in diag
        assert rec["collapse"]["within_edits"] == 4
    s = resumed.summary
    assert {"perplexity", "neighbourhood_kl", "weight_change", "max_condition"} <= set(s.columns)
    assert (s["weight_change"] > 0).all()


def test_collapse_point_is_the_first_round_below_the_first_rounds_interval():
    import pandas as pd

    from pmetlab.runs.round_diagnostics import collapse_point

    def summary(es, ns):
        rows = [
            {
                "after_round": t,
                "group": "all",
                "edits_total": 4 * (t + 1),
                "efficacy_score": e,
                "efficacy_score_ci_low": e - 10,
                "neighborhood_score": n,
                "neighborhood_score_ci_low": n - 10,
            }
            for t, (e, n) in enumerate(zip(es, ns))
        ]
        return pd.DataFrame(rows + [{**rows[0], "group": "current"}])

    assert collapse_point(summary([90, 85, 81, 60], [70, 70, 70, 70])) == {
        "round": 3,
        "edits_total": 16,
        "metric": "efficacy_score",
        "within_edits": 16,
    }
    assert collapse_point(summary([90, 90, 90], [70, 55, 40]))["round"] == 1
    none = collapse_point(summary([90, 95, 88], [70, 75, 61]))
    assert none["round"] is None and none["within_edits"] == 12


def test_collapse_reading_and_diagnostics_figure_from_a_summary():
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from pmetlab import collapse_reading, collapse_table, plot_round_diagnostics

    rows = []
    for method, es in (("PMET", [90, 50]), ("PMET + null space", [90, 88]), ("PMET + norm anchor", [90, 20])):
        for t, e in enumerate(es):
            rows.append(
                {
                    "method": method,
                    "after_round": t,
                    "group": "all",
                    "edits_total": 4 * (t + 1),
                    "efficacy_score": e,
                    "efficacy_score_ci_low": e - 10,
                    "neighborhood_score": 70,
                    "neighborhood_score_ci_low": 60,
                    "neighborhood_score_ci_high": 80,
                    "efficacy_score_ci_high": min(e + 10, 100),
                    "n_records": 4,
                    "perplexity_ratio": 1 + t,
                    "neighbourhood_kl": 0.1 * t,
                    "weight_change": 1.0 + t,
                    "max_condition": 10.0 + t,
                    "max_top_sv_ratio": 2.0,
                }
            )
    summary = pd.DataFrame(rows)
    table = collapse_table(summary).set_index("method")
    assert table.loc["PMET", "edits_total"] == 8 and pd.isna(table.loc["PMET + null space", "round"])
    text = collapse_reading(summary, model_name="m")
    assert "PMET + null space: none within 8 edits" in text
    assert "`null space` on PMET: delays it past the run" in text
    assert "`norm anchor` on PMET: does not move it (+0 edits)" in text
    assert "without → with the `norm anchor` switch" in text and "without → with the `null space` switch" in text
    fig = plot_round_diagnostics(summary)
    assert len([ax for ax in fig.axes if ax.has_data()]) == 5
    with pytest.raises(ValueError, match="diagnostics columns"):
        plot_round_diagnostics(summary[["method", "after_round", "group", "edits_total"]])
