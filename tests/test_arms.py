"""The paired sweep of issue #21: arms, the optimisation plan (what arms share), tuning per arm with an
equal budget, evaluation on the same records and the committed tables."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pmetlab.evaluation.paired import PAIRED_RULE
from pmetlab.runs.arms import (
    WHY_PMET_TRAILS,
    Arm,
    arm_tables,
    arms_by_name,
    evaluate_arms,
    plan_optimisations,
    tune_arms,
    write_arm_tables,
)
from pmetlab.runs.tune import TuningGrid, select_points
from tests.test_experiments import tiny_env, tiny_hparams, tiny_mt  # noqa: F401  (fixtures)

GRID = TuningGrid((300.0, 1000.0, 3000.0), (0.25, 0.5, 1.0))


def test_the_issue_arms_share_four_optimisations_per_learning_rate():
    names = [a.name for a in WHY_PMET_TRAILS]
    assert len(names) == len(set(names)) == 8 and names[:2] == ["memit", "pmet"]
    plan = plan_optimisations(WHY_PMET_TRAILS, GRID.points(), model="smollm2-135m", dataset="counterfact")
    # what is written (ffn_target), the spread and λ do not change the targets: MEMIT, PMET's component
    # bound, PMET's residual bound and PMET without δ^a are the only optimisations, at each of 3 v_lr
    assert (plan["runs"], plan["optimisations"], plan["saved"]) == (72, 12, 60)
    one = {"mom2_update_weight": 300.0, "v_lr": 1.0}
    at_chosen = plan_optimisations(
        WHY_PMET_TRAILS, {a.name: [one] for a in WHY_PMET_TRAILS}, model="smollm2-135m", dataset="counterfact"
    )
    assert (at_chosen["runs"], at_chosen["optimisations"]) == (8, 4)
    groups = sorted(sorted(s.split(" ")[0] for s in g) for g in at_chosen["shared"])
    assert ["pmet", "pmet_block", "pmet_even_spread", "pmet_observed"] in groups


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"name": "x", "method": "rome"}, "method must be one of"),
        ({"name": "x", "method": "pmet", "hparams": {"v_lr": 0.1}}, "grid's fields"),
        ({"name": "x", "method": "pmet", "hparams": {"ffn_targt": "block"}}, "did you mean 'ffn_target'"),
        ({"name": "x", "method": "memit", "hparams": {"ffn_target": "block"}}, "PMET switches"),
    ],
)
def test_bad_arms_are_refused(kw, needle):
    with pytest.raises((ValueError, KeyError), match=needle):
        Arm(**kw)


def test_arms_by_name_keeps_order_and_refuses_unknown_names():
    assert [a.name for a in arms_by_name(["pmet_block", "memit"])] == ["pmet_block", "memit"]
    with pytest.raises(KeyError, match="unknown arm"):
        arms_by_name(["pmet", "nope"])


def test_select_points_groups_by_arm():
    t = pd.DataFrame(
        {
            "arm": ["a", "a", "b", "b"],
            "method": ["pmet"] * 4,
            "efficacy_score": [50.0, 90.0, 80.0, 70.0],
            "paraphrase_score": [50.0, 90.0, 80.0, 70.0],
            "neighborhood_score": [50.0, 90.0, 80.0, 70.0],
        }
    )
    out = select_points(t, ("efficacy_score", "paraphrase_score", "neighborhood_score"), by="arm")
    assert out["selected"].tolist() == [False, True, True, False]


def test_tune_and_evaluate_arms_on_the_same_records_then_write_the_tables(tiny_env, tiny_mt, tmp_path):  # noqa: F811
    hp = {k: v for k, v in tiny_hparams(tiny_env).items() if k != "mom2_update_weight"}
    arms = [Arm("memit", "memit"), Arm("pmet", "pmet"), Arm("pmet_block", "pmet", {"ffn_target": "block"})]
    common = dict(model="tiny", dataset="counterfact", hparams=hp, model_and_tokenizer=tiny_mt, progress=False)
    table, chosen = tune_arms(arms, TuningGrid((10.0, 100.0), (0.5,)), n_edits=1, out_dir=tmp_path, **common)
    assert table.groupby("arm").size().to_dict() == {"memit": 2, "pmet": 2, "pmet_block": 2}
    assert set(chosen) == {"memit", "pmet", "pmet_block"} and table["selected"].sum() == 3
    summary, frames = evaluate_arms(arms, chosen, n_edits=3, out_dir=tmp_path, **common)
    assert set(frames) == {"memit", "pmet", "pmet_block", "unedited"}
    ids = [sorted(f["case_id"]) for f in frames.values()]
    assert all(i == ids[0] for i in ids) and len(ids[0]) == 3  # every arm edits the same records
    post = frames["pmet_block"]
    assert {"target_p_optimised", "target_p_written", "target_on_bound"} <= set(post.columns)
    tables = arm_tables(summary, frames)
    assert set(tables["arms"]["arm"]) == {"memit", "pmet", "pmet_block", "unedited"}
    paired = tables["paired"]
    assert set(paired["baseline"]) == {"memit", "pmet"} and set(paired["metric"]) >= {"efficacy_score", "score"}
    assert len(tables["records"]) == 4 * 3
    paths = write_arm_tables(tables, tmp_path / "out", "arms_counterfact_3", chosen=chosen)
    assert pd.read_csv(paths[2])["arm"].nunique() == 4
    meta = json.loads(paths[-1].read_text())
    assert meta["paired_rule"] == PAIRED_RULE and meta["chosen"] == chosen
