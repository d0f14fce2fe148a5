"""Evidence at scale: tuning and evaluation splits, tuned presets per dataset, the tuning table's
selection, and target optimisation sharded over worker processes (bit-identical to one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pmetlab.datasets import Records, split_bounds, split_records
from pmetlab.datasets.splits import TUNE_SIZE, tune_size
from pmetlab.hparams import MEMITHyperParams, PMETHyperParams, dataset_family
from pmetlab.runs import RunSpec, run_experiment
from pmetlab.runs.spec import preset_name, resolve_hparams
from pmetlab.runs.tune import SELECTION_RULE, TuningGrid, TuningResult, select_points, tune, write_presets
from pmetlab.runs.workers import launch_target_workers
from tests.test_experiments import tiny_env, tiny_hparams, tiny_mt  # noqa: F401  (fixtures)
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------
def test_the_tuning_split_is_the_last_200_records_and_never_overlaps_the_evaluation_split():
    assert split_bounds(1400, "tune") == (1200, 1400)
    assert split_bounds(1400, "eval") == (0, 1200)
    assert split_bounds(1037, "tune") == (837, 1037)
    assert split_bounds(1400, "all") == (0, 1400)
    records = Records([{"case_id": i} for i in range(1400)])
    tune_part, desc = split_records(records, "tune")
    eval_part, _ = split_records(records, "eval")
    assert len(tune_part) == TUNE_SIZE and desc["start"] == 1200 and desc["split"] == "tune"
    assert not {r["case_id"] for r in tune_part} & {r["case_id"] for r in eval_part}
    assert len(tune_part) + len(eval_part) == 1400


def test_small_datasets_keep_their_last_fifth_for_tuning_and_a_tiny_one_cannot_be_split():
    assert tune_size(6) == 1 and split_bounds(6, "eval") == (0, 5)
    with pytest.raises(ValueError, match="cannot be split.*split='all'"):
        split_bounds(3, "eval")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        split_bounds(100, "test")


def test_runs_select_from_the_evaluation_split_by_default_and_record_it(tiny_env, tiny_mt, tmp_path):  # noqa: F811
    hp = tiny_hparams(tiny_env)
    ev = run_experiment(
        "tiny",
        "none",
        "counterfact",
        5,
        out_dir=tmp_path / "e",
        model_and_tokenizer=tiny_mt,
        hparams=None,
        generation=False,
        progress=False,
    )
    tu = run_experiment(
        "tiny",
        "pmet",
        "counterfact",
        1,
        out_dir=tmp_path / "t",
        model_and_tokenizer=tiny_mt,
        hparams=hp,
        generation=False,
        progress=False,
        split="tune",
    )
    assert ev.run["params"]["split"] == "eval" and tu.run["params"]["split"] == "tune"
    assert ev.run["dataset"]["split"]["stop"] == 5 and tu.run["dataset"]["split"]["start"] == 5
    assert tu.run["dataset"]["selection"]["ids"] == [5]
    assert 5 not in ev.run["dataset"]["selection"]["ids"]
    with pytest.raises(ValueError, match="cannot select n=6 records from 5"):
        run_experiment(
            "tiny",
            "none",
            "counterfact",
            6,
            out_dir=tmp_path / "x",
            model_and_tokenizer=tiny_mt,
            generation=False,
            progress=False,
        )
    with pytest.raises(ValueError, match="unknown split 'test'"):
        RunSpec.build(model="tiny", split="test")


# ---------------------------------------------------------------------------------------------
# tuned presets
# ---------------------------------------------------------------------------------------------
def test_a_tuned_entry_replaces_the_model_preset_for_its_dataset_family_only(monkeypatch):
    from pmetlab import hparams as hpmod

    table = {
        "m": {
            "layers": [1, 2],
            "v_lr": 0.5,
            "mom2_update_weight": 1000.0,
            "by_dataset": {"counterfact": {"v_lr": 1.0, "mom2_update_weight": 300.0, "_source": "x.csv"}},
        }
    }
    monkeypatch.setattr(hpmod, "load_presets", lambda method: table)
    monkeypatch.setattr("pmetlab.runs.spec.load_presets", lambda method: table)
    assert PMETHyperParams.preset("m").v_lr == 0.5
    for ds in ("counterfact", "counterfact+conflict_filter", "multi_counterfact"):
        hp = resolve_hparams("m", "pmet", dataset=ds)
        assert (hp.v_lr, hp.mom2_update_weight, hp.layers) == (1.0, 300.0, (1, 2))
        assert preset_name("m", "pmet", ds) == "m/counterfact"
    assert resolve_hparams("m", "pmet", dataset="zsre").v_lr == 0.5
    assert preset_name("m", "pmet", "zsre") == "m"
    assert resolve_hparams("m", "memit", {"v_lr": 2.0}, dataset="counterfact").v_lr == 2.0  # overrides win
    assert dataset_family("zsre") == "zsre"


def test_shipped_presets_tuned_entries_name_the_table_they_came_from():
    from pmetlab.hparams import load_presets

    for method, cls in (("pmet", PMETHyperParams), ("memit", MEMITHyperParams)):
        for model, entry in load_presets(method).items():
            for ds, tuned in (entry.get("by_dataset") or {}).items():
                source = Path(__file__).resolve().parent.parent / tuned["_source"]
                assert source.is_file(), f"{method} {model} {ds}: {source} missing"
                rows = pd.read_csv(source)
                chosen = rows[(rows["method"] == method) & rows["selected"].astype(bool)]
                assert len(chosen) == 1, (method, model, ds)
                assert chosen["v_lr"].iloc[0] == tuned["v_lr"]
                assert chosen["mom2_update_weight"].iloc[0] == tuned["mom2_update_weight"]
                assert cls.preset(model, ds).v_lr == tuned["v_lr"]


# ---------------------------------------------------------------------------------------------
# the tuning table's selection
# ---------------------------------------------------------------------------------------------
_PARTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def _table(rows):
    return pd.DataFrame(rows, columns=["method", "v_lr", "mom2_update_weight", *_PARTS])


def test_selection_takes_the_highest_harmonic_mean_per_method_then_the_higher_ns():
    t = _table(
        [
            ["pmet", 0.5, 300.0, 100.0, 90.0, 10.0],  # high ES, poor NS: harmonic mean 23.5
            ["pmet", 0.5, 1000.0, 80.0, 60.0, 70.0],  # 69.1: best
            ["pmet", 1.0, 1000.0, 70.0, 70.0, 60.0],  # 66.3
            ["memit", 0.5, 300.0, 60.0, 60.0, 60.0],  # 60, NS 60
            ["memit", 0.5, 1000.0, 60.0, 60.0, 60.0],  # tie on the score with the same NS: first in grid order
            ["memit", 1.0, 1000.0, float("nan"), 60.0, 60.0],  # a failed point never wins
        ]
    )
    out = select_points(t, _PARTS)
    chosen = out[out["selected"]]
    assert list(chosen.index) == [1, 3]
    assert out.loc[1, "tuning_score"] == pytest.approx(3 / (1 / 80 + 1 / 60 + 1 / 70))
    t.loc[4, "neighborhood_score"], t.loc[4, "efficacy_score"] = 70.0, 52.5  # same score 60, higher NS
    out = select_points(t, _PARTS)
    assert out.loc[4, "tuning_score"] == pytest.approx(out.loc[3, "tuning_score"])
    assert list(out[out["selected"]].index) == [1, 4]


def test_the_grid_is_declared_and_checked():
    g = TuningGrid((300.0, 1000.0), (0.5, 1.0))
    assert g.points()[1] == {"mom2_update_weight": 300.0, "v_lr": 1.0} and len(g.points()) == 4
    with pytest.raises(ValueError, match="lambdas must be a non-empty list of positive numbers"):
        TuningGrid((), (0.5,))
    with pytest.raises(ValueError, match="v_lrs holds a value twice"):
        TuningGrid((1.0,), (0.5, 0.5))


def test_tune_runs_every_point_for_every_method_on_tuning_records_and_writes_the_presets(
    tiny_env,  # noqa: F811
    tiny_mt,  # noqa: F811
    tmp_path,
):
    hp = {k: v for k, v in tiny_hparams(tiny_env).items() if k != "mom2_update_weight"}
    res = tune(
        model="tiny",
        dataset="counterfact",
        grid=TuningGrid((10.0, 100.0), (0.5,)),
        n_edits=1,
        out_dir=tmp_path / "tune",
        hparams=hp,
        model_and_tokenizer=tiny_mt,
        progress=False,
    )
    post = res.table[res.table["method"] != "unedited"]
    assert sorted(post["method"].value_counts().to_dict().items()) == [("memit", 2), ("pmet", 2)]
    assert set(post["split"]) == {"tune"} and post["selected"].sum() == 2
    assert (res.table["method"] == "unedited").sum() == 1
    assert set(res.chosen) == {"pmet", "memit"} and res.record["rule"] == SELECTION_RULE
    for d in post["run_dir"]:
        assert json.loads((Path(d) / "run.json").read_text())["dataset"]["selection"]["ids"] == [5]
    with pytest.raises(ValueError, match="grid's fields"):
        tune(
            model="tiny",
            dataset="counterfact",
            grid=TuningGrid((10.0,), (0.5,)),
            n_edits=1,
            out_dir=tmp_path / "x",
            hparams={"v_lr": 0.1},
            model_and_tokenizer=tiny_mt,
        )
    csv, js = res.save(tmp_path / "out", "tune_counterfact")
    assert pd.read_csv(csv)["selected"].sum() == 2 and json.loads(js.read_text())["split"] == "tune"
    presets = tmp_path / "presets"
    presets.mkdir()
    for m in ("pmet", "memit"):
        (presets / f"{m}.json").write_text(json.dumps({"tiny": {"v_lr": 0.5, "_note": "kept"}}))
    write_presets(res, model="tiny", dataset="counterfact", source="t.csv", presets_dir=presets)
    entry = json.loads((presets / "pmet.json").read_text())["tiny"]
    assert entry["_note"] == "kept" and entry["by_dataset"]["counterfact"]["_source"] == "t.csv"
    assert entry["by_dataset"]["counterfact"]["mom2_update_weight"] == res.chosen["pmet"]["mom2_update_weight"]


def test_tuning_results_are_saved_atomically_with_the_choice(tmp_path):
    res = TuningResult(_table([["pmet", 0.5, 1.0, 1.0, 1.0, 1.0]]), {"pmet": {"v_lr": 0.5}}, {"rule": "r"})
    csv, js = res.save(tmp_path, "t")
    assert json.loads(js.read_text()) == {"chosen": {"pmet": {"v_lr": 0.5}}, "rule": "r"}
    assert not list(tmp_path.glob(".*tmp"))


# ---------------------------------------------------------------------------------------------
# target optimisation sharded over worker processes
# ---------------------------------------------------------------------------------------------
def _target_entries(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = sorted((cache / "targets").rglob("*.safetensors"))
    return {f.name: load_file(str(f)) for f in files}


@pytest.mark.slow
def test_two_gloo_workers_fill_the_target_cache_bit_identically_to_one(tiny_env, tmp_path, monkeypatch):  # noqa: F811
    model_dir = tmp_path / "tiny-model"
    make_tiny_model("LlamaForCausalLM", seed=0).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    spec = RunSpec.build(
        model=str(model_dir),
        method="pmet",
        dataset="counterfact",
        n_edits=5,
        hparams=tiny_hparams(tiny_env),
        generation=False,
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    caches = {}
    for workers in (1, 2):
        caches[workers] = tmp_path / f"cache{workers}"
        monkeypatch.setenv("PMETLAB_CACHE_DIR", str(caches[workers]))
        launch_target_workers([spec], workers, device="cpu", chunk_size=2)  # 3 chunks: ranks get 2 and 1
    one, two = _target_entries(caches[1]), _target_entries(caches[2])
    assert len(one) == 5 and one.keys() == two.keys()
    for name in one:
        assert one[name].keys() == two[name].keys()
        for k in one[name]:
            assert torch.equal(one[name][k], two[name][k]), (name, k)
    # the entries are the run's: an edit in this process finds every target in the cache
    from pmetlab.editing import target_cache
    from pmetlab.models.loading import load_model

    model, tok = load_model(str(model_dir), device="cpu")
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(caches[2]))
    calls = []
    monkeypatch.setattr(target_cache._CacheJob, "optimise", lambda self, missing, chunks: calls.append(missing) or {})
    run_experiment(
        str(model_dir),
        "pmet",
        "counterfact",
        5,
        hparams=tiny_hparams(tiny_env),
        generation=False,
        out_dir=tmp_path / "run",
        model_and_tokenizer=(model, tok),
        progress=False,
    )
    assert calls == [[]]


def test_a_failing_worker_is_reported_with_its_log(tiny_env, tmp_path):  # noqa: F811
    spec = RunSpec.build(
        model=str(tmp_path / "no-such-model"),
        method="pmet",
        dataset="counterfact",
        n_edits=1,
        hparams=tiny_hparams(tiny_env),
        generation=False,
    )
    with pytest.raises(RuntimeError, match="target worker 0 of 1 exited with status 2"):
        launch_target_workers([spec], 1, device="cpu")
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        launch_target_workers([spec], 0)


def test_parse_numbers_rejects_what_is_not_a_positive_list():
    import argparse

    from pmetlab.cli.evidence import parse_numbers

    assert parse_numbers("300, 1000,3e3") == (300.0, 1000.0, 3000.0)
    for bad in ("", "a,b", "0,1", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_numbers(bad)
    assert np.isclose(parse_numbers("0.25")[0], 0.25)
