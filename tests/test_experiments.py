"""Experiments: run directories, resume, sweeps, modes and the model left untouched.

Plumbing tests on a tiny random Llama with synthetic CounterFact / zsRE records written in the
tiny tokenizer's vocabulary (no real data needed); one slow test runs ``pmetlab run`` on the real
SmolLM2-135M with the shared data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pmetlab
from pmetlab import Deltas, edited
from pmetlab.datasets import DatasetNotFoundError
from pmetlab.runs import (
    PHASES,
    RunMismatchError,
    batches,
    load_run,
    phases,
    records_io,
    run_experiment,
    run_sweep,
    summarize_runs,
)
from pmetlab.runs.signals import RunTerminated
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent

# (subject, prompt, new, true, neighbour subjects)
_FACTS = [
    ("danny miles", "{} plays the", "piano", "guitar", ["miles davis", "the king"]),
    ("paris", "{} is the capital of", "germany", "france", ["berlin", "madrid"]),
    ("sony", "{} was founded in", "china", "japan", ["toyota", "nokia"]),
    ("the queen", "{} speaks", "french", "english", ["the king", "the president"]),
    ("tokyo", "{} is located in", "italy", "japan", ["rome", "london"]),
    ("apple", "{} has headquarters in", "london", "canada", ["google", "microsoft"]),
]


def counterfact_records() -> list[dict]:
    out = []
    for i, (subj, prompt, new, true, neigh) in enumerate(_FACTS):
        out.append(
            {
                "case_id": i,
                "pararel_idx": i,
                "requested_rewrite": {
                    "prompt": prompt,
                    "subject": subj,
                    "relation_id": f"P{i}",
                    "target_new": {"str": new, "id": f"Q{i}n"},
                    "target_true": {"str": true, "id": f"Q{i}t"},
                },
                "paraphrase_prompts": [f"the big {prompt.format(subj)}", f"one year {prompt.format(subj)}"],
                "neighborhood_prompts": [prompt.format(n) for n in neigh],
                "attribute_prompts": [prompt.format(neigh[0])],
                "generation_prompts": [f"{subj} is", f"the {subj} was"],
            }
        )
    return out


def zsre_records() -> list[dict]:
    return [
        {
            "subject": "paris",
            "src": "what country is paris in ?",
            "rephrase": "paris is in what country ?",
            "answers": ["france"],
            "alt": "italy",
            "loc": "nq question: who is the king of england",
            "loc_ans": "the king",
            "pred": "france",
            "cond": "",
        },
        {
            "subject": "sony",
            "src": "where was sony founded ?",
            "rephrase": "sony was founded where ?",
            "answers": ["japan"],
            "alt": "china",
            "loc": "nq question: what is the capital of italy",
            "loc_ans": "rome",
            "pred": "japan",
            "cond": "",
        },
        {
            "subject": "danny miles",
            "src": "what does danny miles play ?",
            "rephrase": "danny miles plays what ?",
            "answers": ["piano"],
            "alt": "guitar",
            "loc": "nq question: who wrote the book",
            "loc_ans": "the writer",
            "pred": "piano",
            "cond": "",
        },
    ]


CORPUS_TEXT = "\n\n".join(
    " ".join(
        (
            "the city of paris is the capital of france and the king lives in london with the queen . "
            "miles davis plays jazz piano in new york . sony and toyota are companies in japan . "
        ).split()[k:]
        * 3
    )
    for k in range(30)
)


def write_data_dir(root: Path) -> Path:
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    (d / "counterfact.json").write_text(json.dumps(counterfact_records()))
    (d / "zsre_mend_eval.json").write_text(json.dumps(zsre_records()))
    (d / "corpus.txt").write_text(CORPUS_TEXT)
    return d


def tiny_hparams(data_dir: Path, **extra) -> dict:
    return {
        "layers": [0, 1],
        "v_num_grad_steps": 2,
        "cov_corpus": str(data_dir / "corpus.txt"),
        "cov_tokens": 400,
        "cov_seq_len": 32,
        "n_prefixes": 1,
        "prefix_tokens": 2,
        "mom2_update_weight": 10.0,
        **extra,
    }


@pytest.fixture
def tiny_env(tmp_path, monkeypatch):
    """An isolated cache and data dir with synthetic datasets; returns the data dir."""
    from pmetlab import datasets as ds

    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(ds.OFFLINE_ENV, "1")
    data = write_data_dir(tmp_path)
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(data))
    monkeypatch.setattr(ds.files, "_PROJECT_DATA_DIR", tmp_path / "no-project-data")
    return data


@pytest.fixture
def tiny_mt():
    return make_tiny_model("LlamaForCausalLM", seed=0), make_tiny_tokenizer()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"model left edited: {changed}"


def _run(tiny_env, mt, out, **kw):
    kw.setdefault("hparams", tiny_hparams(tiny_env))
    kw.setdefault("n_gen_tokens", 3)
    kw.setdefault("progress", False)
    return run_experiment(
        kw.pop("model", "tiny"),
        kw.pop("method", "pmet"),
        kw.pop("dataset", "counterfact"),
        kw.pop("n_edits", 3),
        out_dir=out,
        model_and_tokenizer=mt,
        **kw,
    )


class Counter:
    """Wraps a function; counts calls and can fail on a given call."""

    def __init__(self, fn, fail_on: int | None = None) -> None:
        self.fn, self.fail_on, self.calls, self.kwargs = fn, fail_on, 0, []

    def __call__(self, *a, **k):
        self.calls += 1
        self.kwargs.append(k)
        if self.fail_on is not None and self.calls >= self.fail_on:
            raise RuntimeError(f"injected failure on call {self.calls}")
        return self.fn(*a, **k)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_run_directory_contents_and_schema(tiny_env, tiny_mt, tmp_path):
    model, tok = tiny_mt
    before = _state(model)
    out = tmp_path / "run"
    res = _run(tiny_env, tiny_mt, out, label="tiny-pmet")
    _assert_same_state(model, before)

    assert res.run_dir == out
    assert {"run.json", "records.parquet", "summary.csv", "deltas.safetensors"} <= set(os.listdir(out))
    assert not (out / "deltas_batches").exists()
    run = json.loads((out / "run.json").read_text())
    assert run == json.loads(json.dumps(res.run))
    for key in ("format", "status", "params", "versions", "model", "dataset", "seed", "phases", "wall_s"):
        assert key in run, key
    assert run["status"] == "complete"
    p = run["params"]
    assert (p["method"], p["dataset"], p["n_edits"], p["mode"], p["seed"]) == ("pmet", "counterfact", 3, "batch", 0)
    assert p["hparams"]["method"] == "pmet" and p["hparams"]["layers"] == [0, 1]
    assert p["hparams"]["v_num_grad_steps"] == 2 and p["hparams"]["seed"] == 0
    assert set(p["hparams"]) == set(pmetlab.PMETHyperParams().to_dict())  # the full dict, not the overrides
    assert run["model"]["class"] == "LlamaForCausalLM"
    assert run["dataset"]["info"]["sha256"] and run["dataset"]["selection"]["ids"] == [0, 1, 2]
    assert "torch" in run["versions"]
    for ph in PHASES:
        assert run["phases"][ph]["status"] == "done", ph
        assert run["wall_s"][ph] >= 0

    s = res.summary
    assert list(s["phase"]) == ["pre", "post"]
    for c in (
        "efficacy_score",
        "paraphrase_score",
        "neighborhood_score",
        "score",
        "efficacy_score_ci_low",
        "efficacy_score_ci_high",
        "relative_specificity",
        "fluency",
        "method",
        "dataset",
        "n_edits",
        "label",
    ):
        assert c in s.columns, c
    assert set(s["method"]) == {"pmet"} and set(s["label"]) == {"tiny-pmet"} and set(s["n_edits"]) == {3}
    assert s[["efficacy_score", "paraphrase_score", "neighborhood_score"]].stack().between(0, 100).all()
    assert s["fluency"].notna().all()  # generation on (3 tokens)

    r = res.records
    assert list(r["phase"]) == ["pre"] * 3 + ["post"] * 3
    assert r.loc[r.phase == "post", "relative_specificity"].between(0, 1).all()
    assert r.loc[r.phase == "pre", "relative_specificity"].isna().all()

    # the post phase really is the edited model, the pre phase the unedited one
    d = Deltas.load(out / "deltas.safetensors")
    assert sorted(d.tensors) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert len(d.meta["requests"]) == 3 and all(v > 0 for v in d.norms().values())
    recs = counterfact_records()[:3]
    pre = pmetlab.evaluate_counterfact(model, tok, recs, generation=False, progress=False)
    with edited(model, d):
        post = pmetlab.evaluate_counterfact(model, tok, recs, generation=False, progress=False)
    for phase, ref in (("pre", pre), ("post", post)):
        got = r[r.phase == phase].reset_index(drop=True)
        np.testing.assert_allclose(got["efficacy_magnitude"], ref["efficacy_magnitude"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(pre["efficacy_magnitude"], post["efficacy_magnitude"])
    _assert_same_state(model, before)

    back = load_run(out)
    pd.testing.assert_frame_equal(back.summary, pd.read_csv(out / "summary.csv"))
    assert back.run["params"] == run["params"] and len(back.records) == 6
    assert back.deltas() is not None


def test_resume_skips_finished_phases(tiny_env, tiny_mt, tmp_path, monkeypatch):
    model, tok = tiny_mt
    before = _state(model)
    out = tmp_path / "run"
    ev = Counter(phases.evaluate_counterfact, fail_on=2)  # eval_post fails
    monkeypatch.setattr(phases, "evaluate_counterfact", ev)
    with pytest.raises(RuntimeError, match="injected"):
        _run(tiny_env, tiny_mt, out)
    _assert_same_state(model, before)  # restored although evaluation failed on the edited model
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "injected" in run["error"]
    assert [run["phases"][p]["status"] for p in ("covariance", "edit", "eval_pre", "eval_post")] == [
        "done",
        "done",
        "done",
        "pending",
    ]
    pre_first = pd.read_parquet(out / "records.parquet")
    assert set(pre_first["phase"]) == {"pre"}

    # resume: the edit and eval_pre are reused, only eval_post runs
    cd = Counter(phases.compute_deltas, fail_on=1)
    ev = Counter(pmetlab.evaluation.evaluate_counterfact)
    monkeypatch.setattr(phases, "compute_deltas", cd)
    monkeypatch.setattr(phases, "evaluate_counterfact", ev)
    res = _run(tiny_env, tiny_mt, out)
    assert cd.calls == 0 and ev.calls == 1
    assert res.run["status"] == "complete" and "error" not in res.run
    assert list(res.summary["phase"]) == ["pre", "post"]
    post_only = ["relative_specificity", *[c for c in res.records if c.startswith("target_")]]  # NaN on pre rows
    assert res.records.loc[res.records.phase == "post", "target_p_written"].notna().all()
    pd.testing.assert_frame_equal(
        res.records[res.records.phase == "pre"].drop(columns=post_only), pre_first, check_dtype=False
    )
    _assert_same_state(model, before)

    # everything done: nothing runs, the model is not even loaded
    ev.calls = 0
    monkeypatch.setattr(phases, "load_model", Counter(None, fail_on=1))
    res2 = run_experiment(
        "tiny", "pmet", "counterfact", 3, hparams=tiny_hparams(tiny_env), n_gen_tokens=3, out_dir=out, progress=False
    )
    assert ev.calls == 0 and cd.calls == 0
    pd.testing.assert_frame_equal(res2.summary, res.summary)


def test_sequential_resume_at_the_next_batch(tiny_env, tiny_mt, tmp_path, monkeypatch):
    model, tok = tiny_mt
    before = _state(model)
    out = tmp_path / "run"
    cd = Counter(phases.compute_deltas, fail_on=2)
    monkeypatch.setattr(phases, "compute_deltas", cd)
    with pytest.raises(RuntimeError, match="injected"):
        _run(tiny_env, tiny_mt, out, n_edits=4, batch_size=2, mode="sequential", generation=False)
    _assert_same_state(model, before)  # batch 0 was applied while batch 1 ran; undone
    assert (out / "deltas_batches" / "batch_0000.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["phases"]["edit"]["batches_done"] == 1
    cd = Counter(pmetlab.compute_deltas)
    monkeypatch.setattr(phases, "compute_deltas", cd)
    res = _run(tiny_env, tiny_mt, out, n_edits=4, batch_size=2, mode="sequential", generation=False)
    assert cd.calls == 1  # only the second batch
    assert res.run["deltas"]["n_batches"] == 2
    assert not (out / "deltas_batches").exists()
    _assert_same_state(model, before)


def test_changed_parameters_are_refused(tiny_env, tiny_mt, tmp_path):
    out = tmp_path / "run"
    _run(tiny_env, tiny_mt, out, n_edits=2, method="none", generation=False)
    with pytest.raises(RunMismatchError, match=r"n_edits: 2 -> 3.*resume=False"):
        _run(tiny_env, tiny_mt, out, n_edits=3, method="none", generation=False)
    with pytest.raises(RunMismatchError, match="mom2_update_weight"):
        _run(
            tiny_env,
            tiny_mt,
            out,
            n_edits=2,
            method="pmet",
            generation=False,
            hparams=tiny_hparams(tiny_env, mom2_update_weight=3.0),
        )
    # the label is not part of a run's identity
    res = _run(tiny_env, tiny_mt, out, n_edits=2, method="none", generation=False, label="renamed")
    assert set(res.summary["label"]) == {"renamed"}
    # resume=False starts over (and leaves other files alone)
    (out / "notes.txt").write_text("mine")
    res = _run(tiny_env, tiny_mt, out, n_edits=3, method="none", generation=False, resume=False)
    assert res.run["params"]["n_edits"] == 3 and len(res.records) == 6
    assert (out / "notes.txt").read_text() == "mine"


def test_bad_arguments_fail_before_any_work(tiny_env, tiny_mt, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started")

    for name in ("load_model", "compute_deltas", "layer_covariances"):
        monkeypatch.setattr(phases, name, boom)
    monkeypatch.setattr(batches, "load_dataset", boom)
    out = tmp_path / "run"
    with pytest.raises(KeyError, match="v_num_grad_stepz"):
        _run(tiny_env, tiny_mt, out, hparams={"v_num_grad_stepz": 2})
    with pytest.raises(KeyError, match="bogus"):
        _run(tiny_env, tiny_mt, out, method="none", hparams={"bogus": 1})
    with pytest.raises(ValueError, match="method"):
        _run(tiny_env, tiny_mt, out, method="rome")
    with pytest.raises(ValueError, match="dataset"):
        _run(tiny_env, tiny_mt, out, dataset="wikidata")
    with pytest.raises(ValueError, match="mode"):
        _run(tiny_env, tiny_mt, out, mode="parallel")
    with pytest.raises(ValueError, match="n_edits"):
        _run(tiny_env, tiny_mt, out, n_edits=0)
    with pytest.raises(KeyError, match="v_num_grad_stepz"):
        run_sweep(
            [{"method": "none"}, {"hparams": {"v_num_grad_stepz": 1}}],
            out_dir=tmp_path / "sw",
            model="tiny",
            model_and_tokenizer=tiny_mt,
        )
    with pytest.raises(KeyError, match="n_edit"):
        run_sweep([{"n_edit": 2}], out_dir=tmp_path / "sw", model="tiny", model_and_tokenizer=tiny_mt)
    assert not out.exists() and not (tmp_path / "sw").exists()
    # a loaded model under another name than `model` is refused (presets and records follow the name)
    tiny_mt[0].pmetlab_source = "smollm2-135m"
    with pytest.raises(ValueError, match="model_and_tokenizer holds"):
        _run(tiny_env, tiny_mt, out, model="gemma3-270m")


def test_batch_and_sequential_modes(tiny_env, tiny_mt, tmp_path, monkeypatch):
    model, tok = tiny_mt
    before = _state(model)
    cov = Counter(phases.layer_covariances)
    monkeypatch.setattr(phases, "layer_covariances", cov)
    cd = Counter(phases.compute_deltas)
    monkeypatch.setattr(phases, "compute_deltas", cd)
    fps = {}
    for mode in ("batch", "sequential"):
        cov.calls, cd.calls, cd.kwargs = 0, 0, []
        res = _run(tiny_env, tiny_mt, tmp_path / mode, n_edits=4, batch_size=2, mode=mode, generation=False)
        _assert_same_state(model, before)
        assert cov.calls == 1 and cd.calls == 2  # covariances of the unedited model, computed once
        assert all(k["covariances"] is not None for k in cd.kwargs)
        d = Deltas.load(tmp_path / mode / "deltas.safetensors")
        assert d.meta["mode"] == mode and d.meta["n_batches"] == 2 and len(d.meta["requests"]) == 4
        assert [b["n_requests"] for b in d.meta["batches"]] == [2, 2]
        fps[mode] = [b["base_fingerprint"] for b in d.meta["batches"]]
        assert list(res.summary["phase"]) == ["pre", "post"]
    # batch: every batch computed on the unedited model; sequential: batch 1 on the model edited by batch 0
    assert fps["batch"][0] == fps["batch"][1] == fps["sequential"][0]
    assert fps["sequential"][1] != fps["sequential"][0]
    # the pre-edit evaluation does not depend on the mode
    a = load_run(tmp_path / "batch").records
    b = load_run(tmp_path / "sequential").records
    pd.testing.assert_frame_equal(a[a.phase == "pre"], b[b.phase == "pre"])


def test_method_none_is_a_baseline(tiny_env, tiny_mt, tmp_path, monkeypatch):
    model, _ = tiny_mt
    before = _state(model)
    for name in ("compute_deltas", "layer_covariances"):
        monkeypatch.setattr(phases, name, Counter(None, fail_on=1))
    res = _run(tiny_env, tiny_mt, tmp_path / "none", method="none", hparams=None)
    _assert_same_state(model, before)
    assert not (tmp_path / "none" / "deltas.safetensors").exists()
    assert res.run["params"]["hparams"] is None
    pre, post = res.summary.iloc[0], res.summary.iloc[1]
    for c in ("efficacy_score", "paraphrase_score", "neighborhood_score", "fluency"):
        assert pre[c] == pytest.approx(post[c]), c
    assert post["relative_specificity"] == 100.0


def test_zsre_and_multi_counterfact_never_replaced(tiny_env, tiny_mt, tmp_path):
    model, _ = tiny_mt
    before = _state(model)
    res = _run(tiny_env, tiny_mt, tmp_path / "zsre", dataset="zsre", n_edits=2, split="all")
    _assert_same_state(model, before)
    assert res.run["params"]["n_gen_tokens"] is None  # no generation metrics on zsRE
    for c in ("efficacy_token_acc", "paraphrase_token_acc", "neighborhood_token_acc", "relative_specificity"):
        assert c in res.summary.columns, c
    assert list(res.summary["dataset"]) == ["zsre", "zsre"]
    # offline and without multi_counterfact.json: an error naming where it looked and the derived
    # dataset, never CounterFact under multi_counterfact's name; the run is recorded failed
    out = tmp_path / "mcf"
    with pytest.raises(DatasetNotFoundError) as info:
        _run(tiny_env, tiny_mt, out, dataset="multi_counterfact", method="none", n_edits=2, generation=False)
    msg = str(info.value)
    assert str(tiny_env / "multi_counterfact.json") in msg and "counterfact+conflict_filter" in msg
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["error"].startswith("DatasetNotFoundError: multi_counterfact file")
    assert run["dataset"] is None and run["phases"]["load"]["status"] == "pending"
    # the derivation, asked for by its name: recorded as such in run.json and the summary
    res = _run(
        tiny_env,
        tiny_mt,
        tmp_path / "derived",
        dataset="counterfact+conflict-filter",
        method="none",
        n_edits=2,
        generation=False,
    )
    assert res.run["params"]["dataset"] == "counterfact+conflict_filter"
    assert res.run["dataset"]["info"]["name"] == "counterfact+conflict_filter"
    assert res.run["dataset"]["info"]["derived_from"] == "counterfact"
    assert res.run["dataset"]["derived"].startswith("drop_conflicting")
    assert set(res.summary["dataset"]) == {"counterfact+conflict_filter"}
    assert set(summarize_runs(tmp_path / "derived")["dataset"]) == {"counterfact+conflict_filter"}


def _conflicting_counterfact(data: Path) -> None:
    """CounterFact whose record 1 repeats record 0's (subject, relation_id) and record 4 record 2's."""
    recs = counterfact_records()
    for dup, orig in ((1, 0), (4, 2)):
        rw = recs[dup]["requested_rewrite"]
        rw["subject"] = recs[orig]["requested_rewrite"]["subject"]
        rw["relation_id"] = recs[orig]["requested_rewrite"]["relation_id"]
    (data / "counterfact.json").write_text(json.dumps(recs))


def test_conflicting_records_are_skipped_per_batch(tiny_env, tiny_mt, tmp_path, monkeypatch, caplog):
    _conflicting_counterfact(tiny_env)
    sizes = []

    def compute(model, tok, requests, hp, **kw):
        sizes.append([r.case_id for r in requests])
        return pmetlab.compute_deltas(model, tok, requests, hp, **kw)

    monkeypatch.setattr(phases, "compute_deltas", compute)
    caplog.set_level("WARNING", logger="pmetlab.runs")
    # batches [0, 1] [2, 3] [4, 5]: record 1 conflicts within its batch; record 4 only with record 2
    # of another batch, which edits never share, so it stays
    res = _run(tiny_env, tiny_mt, tmp_path / "run", n_edits=6, batch_size=2, generation=False, split="all")
    assert sizes == [[0], [2, 3], [4, 5]]
    ds_rec = res.run["dataset"]
    assert ds_rec["skipped_conflicting"] == 1 and ds_rec["skipped_conflicting_ids"] == [1]
    assert ds_rec["n_edited"] == 5 and ds_rec["selection"]["n"] == 6
    assert list(res.records.loc[res.records.phase == "pre", "case_id"]) == [0, 2, 3, 4, 5]
    assert any("1 of 6 selected records skipped" in r.getMessage() for r in caplog.records)
    # one batch of all six: both conflicts are in it
    sizes.clear()
    res = _run(tiny_env, tiny_mt, tmp_path / "one", n_edits=6, generation=False, split="all")
    assert sizes == [[0, 2, 3, 5]] and res.run["dataset"]["skipped_conflicting_ids"] == [1, 4]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_files_of_a_complete_run_are_redone_not_reused(tiny_env, tiny_mt, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    _run(tiny_env, tiny_mt, out, generation=False)
    good = {n: t.clone() for n, t in Deltas.load(out / "deltas.safetensors").tensors.items()}
    _flip_last_byte(out / "deltas.safetensors")  # tensor data: the checksum no longer matches
    cd = Counter(pmetlab.compute_deltas)
    ev = Counter(pmetlab.evaluation.evaluate_counterfact)
    monkeypatch.setattr(phases, "compute_deltas", cd)
    monkeypatch.setattr(phases, "evaluate_counterfact", ev)
    caplog.set_level("WARNING", logger="pmetlab.runs")
    res = _run(tiny_env, tiny_mt, out, generation=False)
    assert cd.calls == 1 and ev.calls == 1  # the edit and the post-edit evaluation, again
    assert any(
        "deltas.safetensors is damaged" in r.getMessage() and "--no-resume" in r.getMessage() for r in caplog.records
    )
    repair = res.run["repairs"][0]
    assert repair["file"] == "deltas.safetensors" and "checksum" in repair["problem"]
    assert repair["redone"] == ["edit", "eval_post"] and repair["kept_as"] == "deltas.safetensors.damaged"
    assert (out / "deltas.safetensors.damaged").is_file() and res.run["status"] == "complete"
    for n, t in Deltas.load(out / "deltas.safetensors").tensors.items():
        torch.testing.assert_close(t, good[n])  # the same seeded edit
    # an unreadable records file: both evaluations are redone, the edit is reused
    cd.calls = ev.calls = 0
    (out / "records.parquet").write_bytes(b"not parquet")
    res = _run(tiny_env, tiny_mt, out, generation=False)
    assert cd.calls == 0 and ev.calls == 1  # pre rows from the pre-edit metric cache, post evaluated again
    assert res.run["repairs"][-1]["file"] == "records.parquet" and len(res.records) == 6
    assert res.run["status"] == "complete"


def test_foreign_files_in_a_finished_run_are_redone_not_reused(tiny_env, tiny_mt, tmp_path, monkeypatch, caplog):
    out, other = tmp_path / "run", tmp_path / "other"
    _run(tiny_env, tiny_mt, out, generation=False)
    _run(tiny_env, tiny_mt, other, generation=False, hparams=tiny_hparams(tiny_env, mom2_update_weight=100.0))
    own = Deltas.load(out / "deltas.safetensors")
    shutil.copy(other / "deltas.safetensors", out / "deltas.safetensors")  # another run's edit (its λ)
    (out / "records.parquet").unlink()
    cd = Counter(pmetlab.compute_deltas)
    monkeypatch.setattr(phases, "compute_deltas", cd)
    caplog.set_level("WARNING", logger="pmetlab.runs")
    res = _run(tiny_env, tiny_mt, out, generation=False)
    assert cd.calls == 1 and res.run["status"] == "complete"
    repair = next(r for r in res.run["repairs"] if r["file"] == "deltas.safetensors")
    assert "foreign" in repair["problem"] and "mom2_update_weight: 100.0 -> 10.0" in repair["problem"]
    assert repair["redone"] == ["edit", "eval_post"] and repair["kept_as"] == "deltas.safetensors.damaged"
    redone = Deltas.load(out / "deltas.safetensors")
    assert redone.meta["hparams"] == own.meta["hparams"]  # the run's own edit again
    assert redone.meta["hparams"]["mom2_update_weight"] == 10.0
    assert any("is foreign" in r.getMessage() for r in caplog.records)
    # records of another selection (a run of 2 edits) are redone too
    small = tmp_path / "small"
    _run(tiny_env, tiny_mt, small, method="none", n_edits=2, generation=False)
    shutil.copy(small / "records.parquet", out / "records.parquet")
    res = _run(tiny_env, tiny_mt, out, generation=False)
    assert res.run["repairs"][-1]["file"] == "records.parquet" and "foreign" in res.run["repairs"][-1]["problem"]
    assert len(res.records) == 6 and sorted(res.records["phase"]) == ["post"] * 3 + ["pre"] * 3
    assert cd.calls == 1  # the edit (intact, the run's own) is reused
    # the same settings computed on other weights (another checkpoint of the same architecture)
    d = Deltas.load(out / "deltas.safetensors")
    Deltas(d.tensors, dict(d.meta, base_fingerprint="0" * 32), d.trace).save(out / "deltas.safetensors")
    res = _run(tiny_env, tiny_mt, out, generation=False)
    assert cd.calls == 2 and "other weights" in res.run["repairs"][-1]["problem"]


def test_a_non_finite_edit_fails_the_run_before_it_is_saved(tiny_env, tiny_mt, tmp_path, monkeypatch):
    def blown_up(*a, **k):
        d = pmetlab.compute_deltas(*a, **k)
        name = sorted(d.tensors)[0]
        d.tensors[name] = d.tensors[name] * float("inf")
        return d

    monkeypatch.setattr(phases, "compute_deltas", blown_up)
    out = tmp_path / "run"
    model, _ = tiny_mt
    before = _state(model)
    with pytest.raises(ValueError, match="non-finite values.*nothing was saved or applied"):
        _run(tiny_env, tiny_mt, out, generation=False)
    _assert_same_state(model, before)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "non-finite" in run["error"] and run["phases"]["edit"]["status"] != "done"
    assert not (out / "deltas.safetensors").exists()


def _other_requests(path: Path) -> None:
    d = Deltas.load(path)
    Deltas({n: t.clone() for n, t in d.tensors.items()}, dict(d.meta, requests=d.meta["requests"][::-1]), d.trace).save(
        path
    )


def _other_hparams(path: Path) -> None:
    d = Deltas.load(path)
    hp = dict(d.meta["hparams"], mom2_update_weight=123.0)
    Deltas({n: t.clone() for n, t in d.tensors.items()}, dict(d.meta, hparams=hp), d.trace).save(path)


@pytest.mark.parametrize(
    "damage", [_flip_last_byte, _other_requests, _other_hparams], ids=["flipped-byte", "other-requests", "other-hp"]
)
def test_damaged_batch_checkpoint_is_recomputed(tiny_env, tiny_mt, tmp_path, monkeypatch, caplog, damage):
    out = tmp_path / "run"
    monkeypatch.setattr(phases, "compute_deltas", Counter(phases.compute_deltas, fail_on=2))
    with pytest.raises(RuntimeError, match="injected"):
        _run(tiny_env, tiny_mt, out, n_edits=4, batch_size=2, generation=False)
    damage(out / "deltas_batches" / "batch_0000.safetensors")
    cd = Counter(pmetlab.compute_deltas)
    monkeypatch.setattr(phases, "compute_deltas", cd)
    caplog.set_level("WARNING", logger="pmetlab.runs")
    res = _run(tiny_env, tiny_mt, out, n_edits=4, batch_size=2, generation=False)
    assert cd.calls == 2 and res.run["status"] == "complete"
    assert any(
        "edit batch 1/2" in r.getMessage() and "computing the batch again" in r.getMessage() for r in caplog.records
    )


def test_every_exit_is_recorded_failed_with_its_reason(tiny_env, tiny_mt, tmp_path, monkeypatch):
    # a dataset error before the first phase
    (tiny_env / "counterfact.json").unlink()
    out = tmp_path / "nodata"
    with pytest.raises(DatasetNotFoundError):
        _run(tiny_env, tiny_mt, out, method="none", generation=False)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "counterfact.json" in run["error"] and run["failed_at"]
    write_data_dir(tiny_env.parent)

    # SIGTERM in the middle of a phase: raised like Ctrl-C, recorded, and the previous handler back
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("previous handler"))
    try:

        def terminate(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt the run")

        monkeypatch.setattr(phases, "layer_covariances", terminate)
        out = tmp_path / "term"
        with pytest.raises(RunTerminated, match="SIGTERM") as info:
            _run(tiny_env, tiny_mt, out, generation=False)
        assert isinstance(info.value, KeyboardInterrupt) and seen == []
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "failed" and run["error"] == "RunTerminated: received SIGTERM"
        assert run["phases"]["load"]["status"] == "done" and run["phases"]["covariance"]["status"] == "pending"
        os.kill(os.getpid(), signal.SIGTERM)  # outside a run: the handler that was there before
        assert seen == ["previous handler"]
    finally:
        signal.signal(signal.SIGTERM, previous)

    # a refusal to resume a directory holding another run leaves its run.json as it was
    out = tmp_path / "done"
    _run(tiny_env, tiny_mt, out, method="none", generation=False)
    before = (out / "run.json").read_text()
    recs = counterfact_records()
    (tiny_env / "counterfact.json").write_text(json.dumps(recs + [dict(recs[0], case_id=99)]))
    with pytest.raises(RunMismatchError, match="dataset file or the selected records changed"):
        _run(tiny_env, tiny_mt, out, method="none", generation=False)
    assert (out / "run.json").read_text() == before


def test_generation_length_is_checked_before_the_edit(tiny_env, tiny_mt, tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(phases, "check_generation_length", lambda m, lengths, n: order.append(("check", m, lengths, n)))
    cd = Counter(pmetlab.compute_deltas)
    monkeypatch.setattr(phases, "compute_deltas", lambda *a, **k: order.append("edit") or cd(*a, **k))
    _run(tiny_env, tiny_mt, tmp_path / "a", n_edits=2, n_gen_tokens=3)
    (_, model, lengths, n), rest = order[0], order[1:]
    assert model is tiny_mt[0] and n == 3 and rest == ["edit"]
    assert len(lengths) == 4 and all(isinstance(x, int) and x > 0 for x in lengths)  # 2 prompts per record
    order.clear()
    _run(tiny_env, tiny_mt, tmp_path / "b", n_edits=2, generation=False)
    assert order == ["edit"]  # nothing generated, nothing checked

    def too_long(model, lengths, n):
        raise ValueError(f"n_new_tokens={n} does not fit")

    monkeypatch.setattr(phases, "check_generation_length", too_long)
    cd.calls = 0
    with pytest.raises(ValueError, match="n_new_tokens=5000 does not fit"):
        _run(tiny_env, tiny_mt, tmp_path / "c", n_edits=2, n_gen_tokens=5000)
    assert cd.calls == 0 and json.loads((tmp_path / "c" / "run.json").read_text())["status"] == "failed"


def test_empty_out_dir_is_refused(tiny_env, tiny_mt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "data")
    before = sorted(os.listdir("."))
    for bad in ("", "  "):
        with pytest.raises(ValueError, match=rf"out_dir must be a directory path, got {bad!r}"):
            _run(tiny_env, tiny_mt, bad, method="none")
        with pytest.raises(ValueError, match="out_dir must be a directory path"):
            run_sweep([{"method": "none"}], out_dir=bad, model="tiny", model_and_tokenizer=tiny_mt)
    with pytest.raises(ValueError, match=r"got 3 \(int\)"):
        _run(tiny_env, tiny_mt, 3, method="none")
    assert sorted(os.listdir(".")) == before


def test_csv_records_without_pyarrow(tiny_env, tiny_mt, tmp_path, monkeypatch):
    monkeypatch.setattr(records_io, "parquet_ok", lambda: False)
    out = tmp_path / "run"
    _run(tiny_env, tiny_mt, out, method="none", n_edits=2, generation=False)
    assert (out / "records.csv").is_file() and not (out / "records.parquet").exists()
    # eval_post again from the CSV copy of eval_pre: list cells must come back as tuples
    run = json.loads((out / "run.json").read_text())
    run["phases"]["eval_post"]["status"] = "pending"
    (out / "run.json").write_text(json.dumps(run))
    res = _run(tiny_env, tiny_mt, out, method="none", n_edits=2, generation=False)
    cell = res.records["neighborhood_prefers_true"].iloc[0]
    assert isinstance(cell, tuple) and all(isinstance(x, bool) for x in cell)
    assert list(res.records.loc[res.records.phase == "post", "relative_specificity"]) == [1.0, 1.0]


def test_sweep_and_summaries(tiny_env, tiny_mt, tmp_path):
    model, _ = tiny_mt
    before = _state(model)
    grid = [{"method": "none"}, {"method": "pmet", "hparams": {"spread_exponent": 1.0}}]
    df = run_sweep(
        grid,
        out_dir=tmp_path / "sweep",
        model="tiny",
        n_edits=2,
        generation=False,
        hparams=tiny_hparams(tiny_env),
        progress=False,
        model_and_tokenizer=tiny_mt,
    )
    _assert_same_state(model, before)
    assert len(df) == 4 and list(df["phase"]) == ["pre", "post"] * 2
    assert list(df["method"]) == ["none"] * 2 + ["pmet"] * 2
    assert df["spread_exponent"].iloc[2] == 1.0 and pd.isna(df["spread_exponent"].iloc[0])
    dirs = sorted(set(df["run_dir"]))
    assert len(dirs) == 2 and all(Path(d).parent == tmp_path / "sweep" for d in dirs)
    # the grid's hparams were merged into the common ones
    run = load_run(df["run_dir"].iloc[2]).run
    assert run["params"]["hparams"]["spread_exponent"] == 1.0 and run["params"]["hparams"]["layers"] == [0, 1]
    # a sweep directory stands for its runs
    s = summarize_runs(tmp_path / "sweep")
    assert len(s) == 4 and set(s["run_dir"]) == set(dirs)
    # every row carries the resolved hyperparameters; post rows also how far the targets got
    pm = s[s["method"] == "pmet"].set_index("phase")
    assert pm.loc["post", "hp_spread_exponent"] == 1.0 and pm.loc["post", "hp_layers"] == "0-1"
    assert pm.loc["pre", "hp_stop_rule"] == "pmet" and pd.isna(pm.loc["pre", "target_p_target_final_mean"])
    targets = run["targets"]
    assert pm.loc["post", "target_p_target_final_mean"] == pytest.approx(targets["p_target_final_mean"])
    assert 0 < targets["p_target_final_mean"] < 1 and targets["n_requests"] == 2
    assert 1 <= targets["steps_mean"] <= run["params"]["hparams"]["v_num_grad_steps"]
    assert len(summarize_runs(dirs)) == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        summarize_runs([tmp_path / "missing"])
    with pytest.raises(FileNotFoundError, match="run.json"):
        load_run(tmp_path)


# ---------------------------------------------------------------------------------------------
# slow: the real model through the command line
# ---------------------------------------------------------------------------------------------
def _shared_data() -> Path | None:
    for cand in (os.environ.get("PMETLAB_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "counterfact").is_dir() and (Path(cand) / "corpus").is_dir():
            return Path(cand)
    return None


@pytest.mark.slow
@pytest.mark.skipif(_shared_data() is None, reason="the shared data (CounterFact, corpus) is absent")
def test_cli_run_on_smollm2(tmp_path, monkeypatch, capsys):
    from pmetlab.cli import main

    monkeypatch.setenv("PMETLAB_DATA_DIR", str(_shared_data()))
    monkeypatch.setenv("PMETLAB_OFFLINE", "1")
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            "--model",
            "smollm2-135m",
            "--method",
            "pmet",
            "--n-edits",
            "2",
            "--no-generation",
            "--hparams",
            "v_num_grad_steps=3",
            "--hparams",
            "cov_tokens=5000",
            "--out",
            str(out),
            "--no-progress",
            "-q",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "run directory" in printed and "efficacy_score" in printed
    res = load_run(out)
    assert res.complete and res.run["model"]["source"] == "smollm2-135m"
    assert res.run["params"]["hparams"]["v_num_grad_steps"] == 3
    pre, post = res.summary.set_index("phase").loc["pre"], res.summary.set_index("phase").loc["post"]
    # three steps already move probability towards the new targets
    assert post["efficacy_magnitude"] > pre["efficacy_magnitude"]


def test_pre_edit_metrics_are_reused_across_runs(tiny_env, tiny_mt, tmp_path, monkeypatch):
    """A second run on more records of the same data evaluates only the new records before the
    edit; its pre rows equal a fresh evaluation. Other settings (seed) are not reused."""
    calls = Counter(phases.evaluate_counterfact)
    monkeypatch.setattr(phases, "evaluate_counterfact", calls)
    _run(tiny_env, tiny_mt, tmp_path / "a", n_edits=2)
    assert calls.calls == 2  # pre + post
    res = _run(tiny_env, tiny_mt, tmp_path / "b", n_edits=3)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["phases"]["eval_pre"]["reused_records"] == 2
    pre = res.records[res.records.phase == "pre"].reset_index(drop=True)
    fresh = _run(tiny_env, tiny_mt, tmp_path / "c", n_edits=3, reuse_pre_eval=False)
    fresh_pre = fresh.records[fresh.records.phase == "pre"].reset_index(drop=True)
    assert list(pre.columns) == list(fresh_pre.columns)
    num = [c for c in pre.columns if pd.api.types.is_numeric_dtype(pre[c])]
    np.testing.assert_allclose(pre[num].to_numpy(float), fresh_pre[num].to_numpy(float), rtol=1e-5, atol=1e-6)
    _run(tiny_env, tiny_mt, tmp_path / "d", n_edits=3, seed=1)
    run = json.loads((tmp_path / "d" / "run.json").read_text())
    assert run["phases"]["eval_pre"]["reused_records"] == 0
