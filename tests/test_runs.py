"""pmetlab.runs pieces: RunSpec validation and resolution, sweep keys and rows, the pre-edit
metric cache (damaged entries), and the compatibility module ``pmetlab.experiments``.

Runs use the tiny Llama and the synthetic datasets of ``tests.test_experiments``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pmetlab
from pmetlab.runs import (
    RunSpec,
    collect_summaries,
    resolve_hparams,
    run_experiment,
    run_status,
    run_sweep,
    summarize_runs,
)
from pmetlab.runs.pre_eval import cached_pre_eval
from pmetlab.runs.sweep import SPEC_KEYS
from pmetlab.store import KeyedStore
from tests.test_experiments import tiny_env, tiny_hparams, tiny_mt  # noqa: F401  (fixtures)


# ---------------------------------------------------------------------------------------------
# RunSpec
# ---------------------------------------------------------------------------------------------
def test_run_spec_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        RunSpec.build("tiny", "pmet")  # noqa  (positional arguments are refused)
    with pytest.raises(TypeError):
        RunSpec("tiny", "pmet")  # noqa
    spec = RunSpec.build(model="tiny", method="none", n_edits=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.n_edits = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"model": ""}, ValueError, "model must be a non-empty string (an embedded name or a path), got '' (str)"),
        ({"method": "rome"}, ValueError, "unknown method 'rome'; expected one of ['pmet', 'memit', 'none']"),
        ({"dataset": "wikidata"}, ValueError, "unknown dataset 'wikidata'; expected one of"),
        ({"n_edits": 0}, ValueError, "n_edits must be a positive integer, got 0 (int)"),
        ({"n_edits": 2.0}, ValueError, "n_edits must be a positive integer, got 2.0 (float)"),
        ({"n_edits": True}, ValueError, "n_edits must be a positive integer, got True (bool)"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer or None, got 0 (int)"),
        ({"mode": "parallel"}, ValueError, "unknown mode 'parallel'; expected one of ['batch', 'sequential']"),
        ({"subset": "random"}, ValueError, "unknown subset 'random'; expected one of ['first', 'sample']"),
        ({"seed": "1"}, ValueError, "seed must be an integer, got '1' (str)"),
        ({"generation": "yes"}, ValueError, "generation must be True or False, got 'yes' (str)"),
        ({"n_gen_tokens": -5}, ValueError, "n_gen_tokens must be a positive integer, got -5 (int)"),
        ({"eval_batch_size": None}, ValueError, "eval_batch_size must be a positive integer, got None (NoneType)"),
        ({"label": 3}, ValueError, "label must be a string or None, got 3 (int)"),
        ({"hparams": [("v_lr", 0.1)]}, ValueError, "hparams must be a dict of hyperparameter overrides, got list"),
        ({"hparams": {"v_lr": "fast"}}, ValueError, "v_lr must be a number, got str: 'fast'"),
        ({"hparams": {"layers": 3}}, ValueError, "'layers' must be a list of layer indices, got 3"),
        ({"hparams": {"v_num_grad_stepz": 2}}, KeyError, "unknown hyperparameter(s) ['v_num_grad_stepz']"),
        ({"method": "none", "hparams": {"bogus": 1}}, KeyError, "unknown hyperparameter(s) ['bogus']"),
    ],
)
def test_run_spec_rejects_bad_arguments_with_clear_messages(kwargs, exc, message):
    with pytest.raises(exc) as info:
        RunSpec.build(**{"model": "tiny", **kwargs})
    text = info.value.args[0] if exc is KeyError else str(info.value)
    assert message in text


def test_run_spec_resolves_every_setting():
    spec = RunSpec.build(
        model="SmolLM2-135M",
        method="pmet",
        dataset="multi-counterfact",
        n_edits=np.int64(4),
        batch_size=2,
        seed=7,
        hparams={"v_lr": 0.3},
        generation=np.bool_(False),
        label="x",
    )
    assert (spec.dataset, spec.n_edits, spec.generation) == ("multi_counterfact", 4, False)
    assert spec.preset == "smollm2-135m/counterfact"  # the tuned entry of the dataset family
    assert type(spec.n_edits) is int and type(spec.generation) is bool
    # the preset for the model, the overrides, and the run's seed unless the overrides set one
    assert spec.hp == resolve_hparams("smollm2-135m", "pmet", {"v_lr": 0.3, "seed": 7}, dataset="multi_counterfact")
    assert spec.hp.seed == 7 and spec.overrides == {"v_lr": 0.3}
    assert RunSpec.build(model="tiny", seed=7, hparams={"seed": 1}).hp.seed == 1
    assert spec.covariance == spec.hp.covariance and spec.covariance.seed == 7
    assert spec.batches_of == 2 and not spec.generates
    # run.json: params identify the run; spec holds every setting, JSON-able
    assert spec.params["n_gen_tokens"] is None and spec.params["hparams"]["v_lr"] == 0.3
    d = spec.to_dict()
    assert d == json.loads(json.dumps(d))
    assert d["covariance"] == spec.hp.covariance.to_dict() and d["eval_batch_size"] == 32
    assert d["hparams_preset"] == "smollm2-135m/counterfact" and d["label"] == "x"
    assert {k: d[k] for k in spec.params} == spec.params
    derived = RunSpec.build(model="tiny", dataset="CounterFact+Conflict-Filter")
    assert derived.dataset == pmetlab.datasets.CONFLICT_FILTERED and derived.dataset in pmetlab.runs.DATASETS
    none = RunSpec.build(model="tiny", method="none")
    assert none.hp is None and none.covariance is None and none.to_dict()["covariance"] is None


# ---------------------------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------------------------
def test_sweep_keys_are_the_run_spec_arguments(tmp_path, tiny_mt):  # noqa: F811
    assert SPEC_KEYS == tuple(p for p in inspect.signature(RunSpec.build).parameters)
    with pytest.raises(ValueError, match="grid entry 0 must be a dict"):
        run_sweep(["pmet"], out_dir=tmp_path / "sw", model="tiny")
    with pytest.raises(KeyError, match="out_dir"):
        run_sweep([{"out_dir": "x"}], out_dir=tmp_path / "sw", model="tiny")
    with pytest.raises(ValueError, match="same run directory"):
        run_sweep([{"n_edits": 2}, {"n_edits": 2}], out_dir=tmp_path / "sw", model="tiny", method="none")
    with pytest.raises(ValueError, match="n_edits must be a positive integer, got 0"):
        run_sweep(
            [{"method": "none"}, {"n_edits": 0}], out_dir=tmp_path / "sw", model="tiny", model_and_tokenizer=tiny_mt
        )
    assert not (tmp_path / "sw").exists()


def test_sweep_rows_carry_the_resolved_hyperparameters(tiny_env, tiny_mt, tmp_path):  # noqa: F811
    grid = [{"hparams": {"spread_exponent": 1.0}}, {"hparams": {"mom2_update_weight": 3.0}}]
    df = run_sweep(
        grid,
        out_dir=tmp_path / "sweep",
        model="tiny",
        method="pmet",
        n_edits=2,
        generation=False,
        eval_batch_size=8,
        hparams=tiny_hparams(tiny_env),
        progress=False,
        model_and_tokenizer=tiny_mt,
    )
    assert len(df) == 4
    fields = [f for f in pmetlab.PMETHyperParams().to_dict() if f != "method"]
    hp_cols = [f"hp_{f}" for f in fields]
    assert set(hp_cols) <= set(df.columns) and df[hp_cols].notna().all().all()  # every row, every field
    assert list(df["hp_spread_exponent"]) == [1.0, 1.0, 0.5, 0.5]  # the preset's value where not overridden
    assert list(df["hp_mom2_update_weight"]) == [10.0, 10.0, 3.0, 3.0]
    assert set(df["hp_layers"]) == {"0-1"} and set(df["hp_cov_tokens"]) == {400} and set(df["hp_seed"]) == {0}
    # the grid keys stay as given (empty where an entry does not set them)
    assert df["spread_exponent"].iloc[0] == 1.0 and df["spread_exponent"].iloc[2:].isna().all()
    # the run settings that summary.csv lacks
    assert set(df["eval_batch_size"]) == {8} and set(df["subset"]) == {"first"} and not df["generation"].any()
    post = df[df["phase"] == "post"]
    assert post["target_p_target_final_mean"].between(0, 1).all()
    assert df.loc[df["phase"] == "pre", "target_p_target_final_mean"].isna().all()
    # the same columns as summarize_runs reads back from the run directories
    back = summarize_runs(tmp_path / "sweep").set_index(["run_dir", "phase"])
    rows = df.set_index(["run_dir", "phase"]).loc[back.index]
    cols = [c for c in back.columns if c.startswith(("hp_", "target_")) or c in ("eval_batch_size", "subset")]
    pd.testing.assert_frame_equal(rows[cols], back[cols], check_dtype=False)
    # run directories written before run.json had "spec" still summarise (from their params)
    run_json = Path(df["run_dir"].iloc[0]) / "run.json"
    run = json.loads(run_json.read_text())
    assert run["spec"]["covariance"]["n_tokens"] == 400
    del run["spec"]
    run_json.write_text(json.dumps(run))
    old = summarize_runs(run_json.parent)
    assert set(old["subset"]) == {"first"} and "eval_batch_size" not in old and old["hp_v_lr"].notna().all()


# ---------------------------------------------------------------------------------------------
# summaries of many runs: what is readable, and a list of what is not
# ---------------------------------------------------------------------------------------------
def _sweep_with_bad_runs(tiny_env, tiny_mt, root: Path) -> dict[str, Path]:  # noqa: F811
    run_sweep(
        [{"n_edits": 2}, {"n_edits": 3}],
        out_dir=root,
        model="tiny",
        method="none",
        generation=False,
        progress=False,
        model_and_tokenizer=tiny_mt,
    )
    garbled = root / "garbled"
    garbled.mkdir()
    (garbled / "run.json").write_text('{"status": "comp')  # a truncated write
    listed = root / "listed"
    listed.mkdir()
    (listed / "run.json").write_text("[1, 2]")
    failed = root / "failed"
    (tiny_env / "counterfact.json").rename(tiny_env / "moved.json")
    with pytest.raises(LookupError):
        run_experiment("tiny", "none", out_dir=failed, generation=False, progress=False, model_and_tokenizer=tiny_mt)
    (tiny_env / "moved.json").rename(tiny_env / "counterfact.json")
    return {"garbled": garbled, "listed": listed, "failed": failed}


def test_summaries_keep_what_is_readable_and_list_the_rest(tiny_env, tiny_mt, tmp_path, caplog):  # noqa: F811
    bad = _sweep_with_bad_runs(tiny_env, tiny_mt, tmp_path / "sweep")
    caplog.set_level("WARNING", logger="pmetlab.runs")
    df = summarize_runs(tmp_path / "sweep")
    assert sorted(set(df["n_edits"])) == [2, 3] and len(df) == 4 and set(df["status"]) == {"complete"}
    warned = [r.getMessage() for r in caplog.records if "not summarised" in r.getMessage()]
    for d in bad.values():
        assert sum(str(d) in m for m in warned) == 1, d
    found = collect_summaries(tmp_path / "sweep")
    assert set(found.skipped) == {str(d) for d in bad.values()}
    assert "unreadable" in found.skipped[str(bad["garbled"])]
    assert "JSON list, not a run record" in found.skipped[str(bad["listed"])]
    assert found.skipped[str(bad["failed"])].startswith("no results yet (status failed: DatasetNotFoundError")
    only_bad = collect_summaries([bad["garbled"], bad["failed"]])
    assert only_bad.table.empty and len(only_bad.skipped) == 2


def test_run_status_tells_a_killed_run_from_a_live_one(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    assert run_status({"status": "running", "pid": dead.pid, "host": here}) == "interrupted"
    assert run_status({"status": "running", "pid": os.getpid(), "host": here}) == "running"
    assert run_status({"status": "running", "pid": dead.pid, "host": "elsewhere"}) == "running"
    assert run_status({"status": "complete"}) == "complete"


def test_cli_summarize_and_run_report_bad_input(tiny_env, tiny_mt, tmp_path, capsys):  # noqa: F811
    from pmetlab.cli import main

    bad = _sweep_with_bad_runs(tiny_env, tiny_mt, tmp_path / "sweep")
    capsys.readouterr()
    assert main(["summarize", str(tmp_path / "sweep"), "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    table_end = max(i for i, line in enumerate(out) if "complete" in line)
    after = out[table_end + 1 :]
    assert len(after) == 3 and all(line.startswith("not summarised: ") for line in after)
    assert {line.split(": ")[1] for line in after} == {str(d) for d in bad.values()}
    # nothing readable: an error, not an empty table
    assert main(["summarize", str(bad["garbled"]), str(bad["failed"]), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no run could be summarised" in err and str(bad["failed"]) in err
    # an empty --out is refused before any work
    for argv in (["summarize", str(tmp_path / "sweep"), "--out", ""], ["run", "--out", "", "--model", "tiny"]):
        assert main([*argv, "-q"]) == 2
        assert "--out must be a path, got ''" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the pre-edit metric cache
# ---------------------------------------------------------------------------------------------
def _fake_records(n: int) -> list[dict]:
    return [{"case_id": i, "prompt": f"fact {i}"} for i in range(n)]


class _FakeEvaluate:
    """Stands in for the evaluation: float32/float64/int/bool/tuple/None cells, NaN included."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def __call__(self, records: list) -> pd.DataFrame:
        ids = [r["case_id"] for r in records]
        self.seen.append(ids)
        df = pd.DataFrame(
            {
                "case_id": ids,
                "efficacy_score": [0.1 * i + 1 / 3 for i in ids],
                "fluency": np.array([np.nan if i == 1 else i / 7 for i in ids], dtype=np.float32),
                "hit": [i % 2 == 0 for i in ids],
                "neighborhood_prefers_true": [tuple(bool(j % 2) for j in range(i + 1)) for i in ids],
                "note": [None if i else "first" for i in ids],
            }
        )
        df.insert(0, "phase", "pre")
        return df


def test_pre_eval_cache_reuses_exactly_and_ignores_a_damaged_entry(tiny_mt, tmp_path, caplog):  # noqa: F811
    model, tok = tiny_mt
    spec = RunSpec.build(model="tiny", method="none", n_edits=3)
    store = KeyedStore("pre_eval", root=tmp_path)
    ev = _FakeEvaluate()
    fresh, n = cached_pre_eval(model, tok, spec, _fake_records(3), has_reference=False, evaluate=ev, store=store)
    assert n == 0 and ev.seen == [[0, 1, 2]]
    pd.testing.assert_frame_equal(fresh, _FakeEvaluate()(_fake_records(3)))
    files = sorted(store.folder.glob("*.json"))
    assert len(files) == 3  # one entry per record

    again, n = cached_pre_eval(model, tok, spec, _fake_records(3), has_reference=False, evaluate=ev, store=store)
    assert n == 3 and ev.seen == [[0, 1, 2]]
    pd.testing.assert_frame_equal(again, fresh, check_exact=True)  # dtypes, NaN, tuples, None: as evaluated

    # a damaged entry (flipped content: the checksum no longer matches) is logged and re-evaluated
    doc = json.loads(files[0].read_text())
    doc["value"] = doc["value"].replace("pre", "post")
    files[0].write_text(json.dumps(doc))
    files[1].write_text("{not json")  # a truncated write
    caplog.set_level("WARNING", logger="pmetlab.store")
    more, n = cached_pre_eval(model, tok, spec, _fake_records(4), has_reference=False, evaluate=ev, store=store)
    assert n == 1 and len(ev.seen[-1]) == 3 and 3 in ev.seen[-1]  # two damaged records and the new one
    assert sum("ignoring cache entry" in r.getMessage() for r in caplog.records) == 2
    pd.testing.assert_frame_equal(more, _FakeEvaluate()(_fake_records(4)), check_exact=True)
    # the damaged entries were rewritten
    _, n = cached_pre_eval(model, tok, spec, _fake_records(4), has_reference=False, evaluate=ev, store=store)
    assert n == 4 and len(ev.seen) == 2

    # another setting (seed) shares nothing
    other = RunSpec.build(model="tiny", method="none", n_edits=3, seed=1)
    _, n = cached_pre_eval(model, tok, other, _fake_records(3), has_reference=False, evaluate=ev, store=store)
    assert n == 0 and ev.seen[-1] == [0, 1, 2]


def test_pre_eval_cache_evaluates_a_repeated_record_once(tiny_mt, tmp_path):  # noqa: F811
    model, tok = tiny_mt
    spec = RunSpec.build(model="tiny", method="none", n_edits=3)
    recs = _fake_records(2) + _fake_records(1)
    ev = _FakeEvaluate()
    out, n = cached_pre_eval(
        model, tok, spec, recs, has_reference=False, evaluate=ev, store=KeyedStore("pre_eval", root=tmp_path)
    )
    assert ev.seen == [[0, 1]] and n == 0 and list(out["case_id"]) == [0, 1, 0]


# ---------------------------------------------------------------------------------------------
# compatibility
# ---------------------------------------------------------------------------------------------
def test_experiments_module_re_exports_the_runs_package():
    from pmetlab import experiments, runs

    for name in experiments.__all__:
        assert getattr(experiments, name) is getattr(runs, name), name
    assert pmetlab.run_experiment is runs.run_experiment


# ---------------------------------------------------------------------------------------------
# one process per run directory
# ---------------------------------------------------------------------------------------------
def _write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.lock"
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started_at": "2026-12-01T00:00:00"}))
    return path


def test_a_run_directory_held_by_a_live_process_is_refused(tiny_env, tiny_mt, tmp_path):  # noqa: F811
    import socket
    import subprocess
    import sys

    from pmetlab.runs import RunDirInUseError

    out = tmp_path / "run"
    kw = dict(generation=False, progress=False, model_and_tokenizer=tiny_mt)
    run_experiment("tiny", "none", n_edits=2, out_dir=out, **kw)
    assert not (out / "run.lock").exists()  # released when the run ends
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _write_lock(out, live.pid)
        for resume in (True, False):  # neither resumed (repeating its work) nor deleted under it
            with pytest.raises(RunDirInUseError) as info:
                run_experiment("tiny", "none", n_edits=3, out_dir=out, resume=resume, **kw)
            msg = str(info.value)
            assert f"pid {live.pid}" in msg and socket.gethostname() in msg and str(out) in msg
            assert {p.name: p.read_bytes() for p in out.iterdir() if p != lock} == files
        # the command line: one line, exit status 2
        from pmetlab.cli import main

        argv = ["run", "--model", "tiny", "--method", "none", "--n-edits", "2", "--out", str(out), "--no-resume", "-q"]
        assert main(argv) == 2
    finally:
        live.kill()
        live.wait()
    # a lock on another host cannot be checked: refused, saying how to clear it
    _write_lock(out, 1, host="elsewhere")
    with pytest.raises(RunDirInUseError, match="host 'elsewhere'.*delete"):
        run_experiment("tiny", "none", n_edits=2, out_dir=out, **kw)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_env, tiny_mt, tmp_path, caplog):  # noqa: F811
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    _write_lock(out, dead.pid)
    caplog.set_level("WARNING", logger="pmetlab.runs")
    res = run_experiment(
        "tiny", "none", n_edits=2, out_dir=out, generation=False, progress=False, model_and_tokenizer=tiny_mt
    )
    assert res.run["status"] == "complete" and not (out / "run.lock").exists()
    assert any(f"pid {dead.pid}" in r.getMessage() and "taking over" in r.getMessage() for r in caplog.records)
    (out / "run.lock").write_text('{"pid": ')  # half-written: taken over too
    run_experiment(
        "tiny", "none", n_edits=2, out_dir=out, generation=False, progress=False, model_and_tokenizer=tiny_mt
    )
    assert not (out / "run.lock").exists()


def test_racing_processes_get_the_lock_once(tmp_path):
    from pmetlab.runs.lock import RunDirInUseError, hold_run_dir

    with hold_run_dir(tmp_path / "d") as lock:
        data = json.loads(lock.read_text())
        assert data["pid"] == __import__("os").getpid() and data["started_at"]
        with pytest.raises(RunDirInUseError):  # another process: simulated by the lock's pid
            data["pid"] = 1  # init is always alive
            lock.write_text(json.dumps(data))
            with hold_run_dir(tmp_path / "d"):
                pass
    assert lock.exists()  # not ours any more (pid 1's), so not removed


# ---------------------------------------------------------------------------------------------
# summaries are checked against the records
# ---------------------------------------------------------------------------------------------
def test_summarize_rebuilds_a_summary_that_disagrees_with_the_records(tiny_env, tiny_mt, tmp_path, caplog, capsys):  # noqa: F811
    from pmetlab.cli import main

    out = tmp_path / "run"
    run_experiment(
        "tiny", "none", n_edits=3, out_dir=out, generation=False, progress=False, model_and_tokenizer=tiny_mt
    )
    good = summarize_runs(out)
    assert list(good["phase"]) == ["pre", "post"]
    summary = out / "summary.csv"
    text = summary.read_text()
    caplog.set_level("WARNING", logger="pmetlab.runs")
    summary.write_text("\n".join(text.splitlines()[:2]) + "\n")  # the post row lost
    df = summarize_runs(out)
    assert list(df["phase"]) == ["pre", "post"] and list(df["n_records"]) == [3, 3]
    assert any("summary.csv" in r.getMessage() and "from the records" in r.getMessage() for r in caplog.records)
    summary.write_text(text[:12])  # a header cut short: not "no results yet"
    assert list(summarize_runs(out)["phase"]) == ["pre", "post"]
    summary.write_text("")
    assert list(summarize_runs(out)["phase"]) == ["pre", "post"]
    # the same run named twice (and through another spelling of its path): one row per phase
    twice = summarize_runs([out, out, tmp_path / "." / "run"])
    assert list(twice["phase"]) == ["pre", "post"]
    assert len(pmetlab.phase_times([out, tmp_path / "." / "run"])) == len(pmetlab.runs.PHASES)
    capsys.readouterr()
    assert main(["summarize", str(out), str(out) + "/", "-q", "--out", str(tmp_path / "t.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "t.csv")) == 2


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("phases", [], "field 'phases' is a JSON list"),
        ("phases.eval_pre", "done", "phase 'eval_pre' is 'done', not an object"),
        ("wall_s", [], "field 'wall_s' is a JSON list"),
        ("resumes", "x", "field 'resumes' is a JSON str"),
        ("status", 5, "field 'status' is a JSON int"),
    ],
)
def test_a_run_json_of_the_wrong_shape_is_one_line_naming_it(tiny_env, tiny_mt, tmp_path, field, value, says):  # noqa: F811
    out = tmp_path / "run"
    kw = dict(generation=False, progress=False, model_and_tokenizer=tiny_mt)
    run_experiment("tiny", "none", n_edits=2, out_dir=out, **kw)
    run = json.loads((out / "run.json").read_text())
    if "." in field:
        run["phases"][field.split(".")[1]] = value
    else:
        run[field] = value
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="resume=False") as info:
        run_experiment("tiny", "none", n_edits=2, out_dir=out, **kw)
    assert f"{out / 'run.json'} is damaged: {says}" in str(info.value)
    assert "not summarised" not in str(collect_summaries(out).skipped)  # listed with the reason
    assert says in collect_summaries(out).skipped[str(out)]
    assert run_experiment("tiny", "none", n_edits=2, out_dir=out, resume=False, **kw).run["status"] == "complete"
