"""Dataset loaders: the shared files, resolution order, verification of downloads, subsets."""

from __future__ import annotations

import copy
import io
import json
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from pmetlab import datasets as ds
from pmetlab.requests import EditRequest

REPO = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path | None:
    for cand in (os.environ.get(ds.DATA_DIR_ENV), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "counterfact" / "counterfact_filtered.json").is_file():
            return Path(cand)
    return None


SHARED = _shared_dir()
needs_shared = pytest.mark.skipif(
    SHARED is None,
    reason="the shared evaluation data is absent: set PMETLAB_DATA_DIR to the shared data "
    "folder (the Makefile exports ../shared/data when it exists)",
)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No data anywhere: empty env dir, empty project dir, empty cache, no network."""
    env_dir, proj, cache = tmp_path / "env", tmp_path / "project", tmp_path / "cache"
    for d in (env_dir, proj, cache):
        d.mkdir()
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(env_dir))
    monkeypatch.setattr(ds.files, "_PROJECT_DATA_DIR", proj)
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(cache))
    for name in ds.OFFLINE_ENVS:  # the test command may set HF_HUB_OFFLINE
        monkeypatch.delenv(name, raising=False)
    calls: list[str] = []

    def offline(url, *a, **k):
        calls.append(url)
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(ds.urllib.request, "urlopen", offline)
    return {"env": env_dir, "project": proj, "cache": cache, "calls": calls}


@pytest.fixture
def shared_env(monkeypatch):
    if SHARED is None:
        pytest.skip("shared data absent")
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(SHARED))
    return SHARED


def _cf_record(case_id: int = 0, **over) -> dict:
    rec = {
        "case_id": case_id,
        "pararel_idx": 1,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": ["p1", "p2"],
        "neighborhood_prompts": ["n1"],
        "attribute_prompts": ["a1"],
        "generation_prompts": ["g1"],
    }
    rec.update(over)
    return rec


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------
@needs_shared
def test_shared_files_load_with_info(shared_env):
    cf, z, k = ds.load_counterfact(), ds.load_zsre(), ds.load_known_facts()
    assert (len(cf), len(z), len(k)) == (1400, 1037, 1209)
    assert cf.info.source == "env" and cf.info.n_records == 1400
    assert cf.info.sha256 == "7e93c8e6d162997dec97875c8a9a4f46816e691e8b613f952813bd6cbe1ba574"
    assert k.info.sha256 == "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a"
    assert [r["case_id"] for r in z[:3]] == [0, 1, 2]  # zsRE numbered by position, as ROME does
    assert set(cf[0]) >= {
        "case_id",
        "requested_rewrite",
        "paraphrase_prompts",
        "neighborhood_prompts",
        "attribute_prompts",
        "generation_prompts",
        "orig_case_id",
    }
    assert json.loads(json.dumps(cf.info.to_dict()))["name"] == "counterfact"


@needs_shared
def test_orig_case_id_from_map(shared_env):
    cf = ds.load_counterfact()
    mapping = json.loads((SHARED / "counterfact" / "counterfact_filtered.case_id_map.json").read_text())
    assert [r["case_id"] for r in cf] == list(range(1400))  # the renumbered id is kept as case_id
    assert all(r["orig_case_id"] == mapping[str(r["case_id"])] for r in cf)
    assert cf[1]["orig_case_id"] == 3
    assert cf.info.case_id_map.endswith("counterfact_filtered.case_id_map.json")


@needs_shared
def test_requests_from_shared_records(shared_env):
    reqs = ds.counterfact_requests(ds.load_counterfact()[:3])
    assert isinstance(reqs[0], EditRequest) and reqs[0].text == "The mother tongue of Danielle Darrieux is"
    assert reqs[0].target_new == "English" and reqs[0].target_true == "French" and reqs[0].case_id == 0
    zr = ds.zsre_requests(ds.load_zsre()[:2])
    assert zr[0].text == ds.load_zsre()[0]["src"] and zr[1].case_id == 1


# ------------------------------------------------------------------------------------------
def test_resolution_env_canonical_names_and_precedence(isolated):
    sub = isolated["env"] / "counterfact"
    sub.mkdir()
    (sub / "counterfact_filtered.json").write_text(json.dumps([_cf_record(0), _cf_record(1)]))
    recs = ds.load_counterfact()
    assert len(recs) == 2 and recs.info.path.endswith("counterfact_filtered.json") and recs.info.source == "env"
    assert "orig_case_id" not in recs[0]  # no map beside this copy
    # the complete canonical file, directly in the directory, wins over the shared subset
    (isolated["env"] / "counterfact.json").write_text(json.dumps([_cf_record(7)]))
    recs = ds.load_counterfact()
    assert recs.info.path == str(isolated["env"] / "counterfact.json") and recs[0]["case_id"] == 7
    assert isolated["calls"] == []


def test_resolution_project_dir_then_explicit_path(isolated, tmp_path):
    (isolated["project"] / "knowns").mkdir()
    rec = {
        "known_id": 0,
        "subject": "Vinson Massif",
        "attribute": "Antarctica",
        "template": "{} is in",
        "prediction": " Antarctica",
        "prompt": "Vinson Massif is in",
        "relation_id": "P30",
    }
    (isolated["project"] / "knowns" / "known_1000.json").write_text(json.dumps([rec]))
    k = ds.load_known_facts()
    assert k.info.source == "project" and k[0]["subject"] == "Vinson Massif"
    other = tmp_path / "mine.json"
    other.write_text(json.dumps([dict(rec, known_id=5)]))
    k2 = ds.load_known_facts(path=other)
    assert k2.info.source == "path" and k2[0]["known_id"] == 5
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ds.load_known_facts(path=tmp_path / "nope.json")


def test_case_id_map_beside_file(tmp_path):
    f = tmp_path / "sub.json"
    f.write_text(json.dumps([_cf_record(0), _cf_record(1)]))
    (tmp_path / "sub.case_id_map.json").write_text(json.dumps({"0": 10, "1": 42}))
    recs = ds.load_counterfact(path=f)
    assert [(r["case_id"], r["orig_case_id"]) for r in recs] == [(0, 10), (1, 42)]
    (tmp_path / "sub.case_id_map.json").write_text(json.dumps({"0": 10}))
    with pytest.raises(KeyError, match=r"case_id=1.*no entry '1'"):
        ds.load_counterfact(path=f)


def test_offline_missing_names_file_and_every_place(isolated):
    with pytest.raises(ds.DatasetNotFoundError) as ei:
        ds.load_counterfact()
    err = ei.value
    assert isinstance(err, FileNotFoundError) and isinstance(err, LookupError)
    msg = str(err)
    assert "'counterfact.json'" in msg
    for place in (
        isolated["env"] / "counterfact" / "counterfact_filtered.json",
        isolated["project"] / "counterfact.json",
        isolated["cache"] / "data" / "counterfact.json",
    ):
        assert str(place) in msg
    assert "https://rome.baulab.info/data/dsets/counterfact.json" in msg and "URLError" in msg
    assert len(isolated["calls"]) == len(ds.REMOTE_ROOTS)


def test_offline_switches_never_touch_network(isolated, monkeypatch):
    with pytest.raises(ds.DatasetNotFoundError, match="download=False"):
        ds.load_zsre(download=False)
    monkeypatch.setenv(ds.OFFLINE_ENV, "1")
    with pytest.raises(ds.DatasetNotFoundError, match="PMETLAB_OFFLINE"):
        ds.load_zsre()
    assert isolated["calls"] == []


@pytest.mark.parametrize("switch", ds.OFFLINE_ENVS)
def test_every_offline_switch_stops_downloads(isolated, monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    assert ds.offline_switch() == switch
    with pytest.raises(ds.DatasetNotFoundError, match=rf"no download attempted \(\${switch} is set\)"):
        ds.load_zsre()
    with pytest.raises(ds.DatasetNotFoundError, match=rf"unset \${switch} to allow the download"):
        ds.load_multi_counterfact()
    assert isolated["calls"] == []
    monkeypatch.setenv(switch, "0")
    assert ds.offline_switch() is None


def test_multi_counterfact_error_suggests_subset(isolated):
    with pytest.raises(LookupError, match="drop_conflicting") as info:
        ds.load_multi_counterfact(download=False)
    msg = str(info.value)
    assert str(isolated["env"] / "counterfact" / "multi_counterfact.json") in msg
    assert "'counterfact+conflict_filter'" in msg and "--dataset counterfact+conflict_filter" in msg


def test_conflict_filtered_is_an_explicit_named_derivation(isolated):
    dup = _cf_record(1)  # same subject and relation as record 0
    other = _cf_record(2)
    other["requested_rewrite"] = dict(other["requested_rewrite"], relation_id="P27")
    (isolated["env"] / "counterfact.json").write_text(json.dumps([_cf_record(0), dup, other]))
    for name in ("counterfact+conflict_filter", "CounterFact+Conflict-Filter", ds.CONFLICT_FILTERED):
        recs = ds.load_dataset(name)
        assert [r["case_id"] for r in recs] == [0, 2]
        info = recs.info
        assert (info.name, info.derived_from, info.n_records) == ("counterfact+conflict_filter", "counterfact", 2)
        assert info.derivation.startswith("drop_conflicting") and "3 -> 2 records" in info.derivation
        assert info.path == str(isolated["env"] / "counterfact.json")
    assert ds.load_counterfact().info.derivation is None
    with pytest.raises(KeyError, match=r"unknown dataset 'multi'.*counterfact\+conflict_filter"):
        ds.load_dataset("multi")
    with pytest.raises(TypeError, match="dataset name must be a string, got 3"):
        ds.load_dataset(3)


def test_mistyped_data_dir_is_an_error_for_every_loader(isolated, monkeypatch, tmp_path):
    missing = tmp_path / "dataa"
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(missing))
    for load in (ds.load_counterfact, ds.load_zsre, ds.load_idf):
        with pytest.raises(ValueError, match=rf"\$PMETLAB_DATA_DIR='{missing}' does not exist.*unset"):
            load()
    afile = tmp_path / "data.json"
    afile.write_text("[]")
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(afile))
    with pytest.raises(ValueError, match="is a file"):
        ds.load_counterfact()
    monkeypatch.setenv(ds.DATA_DIR_ENV, "")  # empty: unset, the other places are searched
    assert ds.env_data_dir() is None
    with pytest.raises(ds.DatasetNotFoundError):
        ds.load_counterfact(download=False)


@needs_shared
def test_download_verified_then_cached(isolated, monkeypatch):
    payload = (SHARED / "knowns" / "known_1000.json").read_bytes()
    calls = []

    def serve(url, *a, **k):
        calls.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(ds.urllib.request, "urlopen", serve)
    k = ds.load_known_facts()
    assert k.info.source == "download" and k.info.url == "https://rome.baulab.info/data/dsets/known_1000.json"
    assert k.info.path == str(isolated["cache"] / "data" / "known_1000.json") and len(k) == 1209
    k2 = ds.load_known_facts()
    assert k2.info.source == "cache" and k2.info.sha256 == k.info.sha256 and len(calls) == 1


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"<html>502 Bad Gateway</html>", "not valid JSON"),
        (json.dumps([{"known_id": 0, "subject": "x"}]).encode(), "has 1 records, expected 1209"),
        (
            json.dumps([{"known_id": i, "subject": "x"} for i in range(1209)]).encode(),
            r"known-facts record 0 \(known_id=0\).*missing field 'attribute'",
        ),
    ],
    ids=["html", "truncated", "bad-schema"],
)
def test_corrupt_download_rejected_and_not_kept(isolated, monkeypatch, payload, match):
    monkeypatch.setattr(ds.urllib.request, "urlopen", lambda url, *a, **k: FakeResponse(payload))
    with pytest.raises(ValueError, match=match):
        ds.load_known_facts()
    assert list((isolated["cache"] / "data").iterdir()) == []  # neither the file nor a temporary


@needs_shared
def test_download_with_wrong_sha256_rejected(isolated, monkeypatch):
    data = json.loads((SHARED / "knowns" / "known_1000.json").read_text())
    payload = json.dumps(data).encode()  # same records, different bytes
    monkeypatch.setattr(ds.urllib.request, "urlopen", lambda url, *a, **k: FakeResponse(payload))
    with pytest.raises(ValueError, match="sha256"):
        ds.load_known_facts()
    assert not (isolated["cache"] / "data" / "known_1000.json").exists()


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (
            lambda r: r["requested_rewrite"]["target_new"].pop("str"),
            KeyError,
            r"CounterFact record 3 \(case_id=0\).*missing field 'requested_rewrite.target_new.str'",
        ),
        (lambda r: r.pop("neighborhood_prompts"), KeyError, "missing field 'neighborhood_prompts'"),
        (lambda r: r["requested_rewrite"].update(prompt="no subject slot"), ValueError, "exactly one"),
        (lambda r: r.update(paraphrase_prompts="oops"), ValueError, "list of strings"),
        (lambda r: r.update(case_id="7"), ValueError, "must be an integer"),
        # an empty list leaves the record's PS/NS undefined; an empty prompt cannot be scored
        (
            lambda r: r.update(neighborhood_prompts=[]),
            ValueError,
            r"CounterFact record 3 \(case_id=0\): field 'neighborhood_prompts' must be a non-empty list",
        ),
        (lambda r: r.update(paraphrase_prompts=[]), ValueError, "'paraphrase_prompts' must be a non-empty list"),
        (
            lambda r: r.update(paraphrase_prompts=["fine", " "]),
            ValueError,
            r"record 3 \(case_id=0\): field 'paraphrase_prompts' has an empty string at position 1",
        ),
        (lambda r: r.update(generation_prompts=[""]), ValueError, "'generation_prompts' has an empty string"),
    ],
)
def test_counterfact_validation_messages(mutate, exc, match):
    rec = copy.deepcopy(_cf_record())
    mutate(rec)
    with pytest.raises(exc, match=match):
        ds.validate_counterfact_record(rec, 3)


def test_zsre_and_known_validation_messages(tmp_path):
    z = {
        "subject": "S",
        "src": "What is S?",
        "rephrase": "S is?",
        "answers": [],
        "loc": "nq question: q",
        "loc_ans": "a",
    }
    with pytest.raises(ValueError, match=r"zsRE record 0.*'answers' must be a non-empty list"):
        ds.validate_zsre_record(z)
    z2 = dict(z, answers=["x"])
    del z2["loc_ans"]
    f = tmp_path / "z.json"
    f.write_text(json.dumps([dict(z, answers=["x"]), z2]))
    with pytest.raises(KeyError, match=rf"zsRE record 1 in {f}: missing field 'loc_ans'"):
        ds.load_zsre(path=f)
    with pytest.raises(KeyError, match="missing field 'template'"):
        ds.validate_known_record({"known_id": 1, "subject": "s", "attribute": "a"})


# ------------------------------------------------------------------------------------------
def test_select_first_and_sample_deterministic():
    recs = ds.Records([_cf_record(i) for i in range(50)], ds.DatasetInfo("counterfact", "/x.json", "abc", 50, "path"))
    first = ds.select(recs, 5)
    assert [r["case_id"] for r in first.records] == [0, 1, 2, 3, 4]
    assert first.description["mode"] == "first" and first.description["dataset"]["sha256"] == "abc"
    a, b = ds.select(recs, 10, "sample", seed=3), ds.select(recs, 10, mode="sample", seed=3)
    c = ds.select(recs, 10, mode="sample", seed=4)
    assert a.records == b.records and a.description == b.description
    assert a.description["ids"] != c.description["ids"]
    assert a.description["ids"] == sorted(a.description["ids"]) and len(set(a.description["ids"])) == 10
    records, desc = ds.select(recs)  # unpacks as (records, description)
    assert len(records) == 50 and desc["n"] == 50 and desc["ids_hash"] == ds.select(recs).description["ids_hash"]
    json.dumps(desc)
    with pytest.raises(ValueError, match="n=51"):
        ds.select(recs, 51)
    with pytest.raises(ValueError, match="mode"):
        ds.select(recs, 5, mode="random")


def test_drop_conflicting_keeps_first_per_subject_relation():
    r0, r1 = _cf_record(0), _cf_record(1)
    r2 = _cf_record(2)
    r2["requested_rewrite"] = dict(r2["requested_rewrite"], relation_id="P27")
    assert [r["case_id"] for r in ds.drop_conflicting([r0, r1, r2])] == [0, 2]


def test_drop_conflicting_per_batch_keeps_other_batches_apart():
    def rec(i, subject, rel):
        r = _cf_record(i)
        r["requested_rewrite"] = dict(r["requested_rewrite"], subject=subject, relation_id=rel)
        return r

    recs = [rec(0, "a", "P1"), rec(1, "a", "P1"), rec(2, "a", "P2"), rec(3, "b", "P1"), rec(4, "a", "P1")]
    kept, dropped = ds.split_conflicting(recs)
    assert [r["case_id"] for r in kept] == [0, 2, 3] and [r["case_id"] for r in dropped] == [1, 4]
    cut = ds.drop_conflicting_per_batch(recs, 2)  # [0, 1] [2, 3] [4]: only 1 conflicts inside its batch
    assert [[r["case_id"] for r in b] for b in cut.batches] == [[0], [2, 3], [4]]
    assert [r["case_id"] for r in cut.skipped] == [1]
    assert [r["case_id"] for r in ds.drop_conflicting_per_batch(recs, 5).skipped] == [1, 4]
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        ds.drop_conflicting_per_batch(recs, 0)
    with pytest.raises(KeyError, match="record 1 has no requested_rewrite.subject"):
        ds.drop_conflicting([recs[0], {"src": "a zsRE record"}])


# ------------------------------------------------------------------------------------------
def test_consistency_reference_missing_is_none(isolated):
    assert ds.load_idf() is None and ds.load_tfidf_vocab() is None and ds.load_attribute_snippets() is None
    assert ds.load_consistency_reference() is None
    assert isolated["calls"] == []  # never downloaded unless asked


def test_consistency_reference_loads_local_files(isolated):
    d = isolated["env"]
    np.save(d / "idf.npy", np.array([1.0, 2.0, 3.0]))
    (d / "tfidf_vocab.json").write_text(json.dumps({"paris": 0, "france": 1, "city": 2}))
    (d / "attribute_snippets.json").write_text(
        json.dumps(
            [
                {
                    "name": "X",
                    "relation_id": "P17",
                    "target_id": "Q142",
                    "samples": [{"name": "X", "text": "Paris city"}],
                },
                {"name": "Y", "relation_id": "P17", "target_id": "Q142", "samples": [{"name": "Y", "text": "France"}]},
            ]
        )
    )
    ref = ds.load_consistency_reference()
    assert ref is not None and ref.texts("P17", "Q142") == ["Paris city", "France"]
    assert ref.texts("P17", "Q1") == [] and ref.vocab["city"] == 2 and ref.idf.dtype == np.float64


def test_mistyped_data_dir_is_an_error_for_the_corpus_too(monkeypatch, tmp_path):
    from pmetlab.corpus import data_dir

    monkeypatch.setenv("PMETLAB_DATA_DIR", str(tmp_path / "typo"))
    with pytest.raises(ValueError, match=r"PMETLAB_DATA_DIR=.*typo.* does not exist.*unset"):
        data_dir()
