"""The keyed store: round trips, the key inside the file, checksums, damage, atomicity."""

from __future__ import annotations

import json

import pytest
import torch

from pmetlab.cache import weights_fingerprint
from pmetlab.store import DamagedEntryError, KeyedStore, tensor_digest
from tests.tiny_models import make_tiny_model

KEY = {"format": 1, "model": "tiny", "layer": 3}


@pytest.fixture
def store(tmp_path):
    return KeyedStore("things", "Sub", root=tmp_path)


def test_tensors_round_trip_with_meta(store):
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    path = store.save_tensors(KEY, t, {"n_steps": 7})
    assert path.parent == store.folder and path.suffix == ".safetensors"
    e = store.load_tensors(KEY)
    assert e.meta == {"n_steps": 7} and e.path == path
    assert all(torch.equal(e.tensors[n], t[n]) for n in t)
    assert store.load_tensors({**KEY, "layer": 4}) is None  # another key: another file, missing


def test_a_file_under_another_key_or_damaged_is_ignored(store, caplog):
    path = store.save_tensors(KEY, {"a": torch.ones(4)})
    other = store.path({**KEY, "layer": 9})
    other.write_bytes(path.read_bytes())  # a foreign entry under this key's name
    with caplog.at_level("WARNING"):
        assert store.load_tensors({**KEY, "layer": 9}) is None
    assert "another key" in caplog.text and str(other) in caplog.text
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the tensor data: same size, header intact
    path.write_bytes(bytes(raw))
    with pytest.raises(DamagedEntryError, match="checksum mismatch"):
        KeyedStore.read_tensors(path, KEY)
    assert store.load_tensors(KEY) is None
    path.write_bytes(b"not a safetensors file")
    assert store.load_tensors(KEY) is None


def test_non_finite_values_are_refused_when_asked(store):
    store.save_tensors(KEY, {"a": torch.tensor([1.0, float("nan")])})
    assert store.load_tensors(KEY) is not None
    assert store.load_tensors(KEY, finite=True) is None


def test_json_round_trip_and_damage(store):
    path = store.save_json(KEY, {"prefixes": ["The cat. {}", "{}"]})
    assert store.load_json(KEY) == {"prefixes": ["The cat. {}", "{}"]}
    doc = json.loads(path.read_text())
    doc["value"] = doc["value"].replace("cat", "dog")
    path.write_text(json.dumps(doc))
    assert store.load_json(KEY) is None
    path.write_text("{")
    assert store.load_json(KEY) is None


def test_interrupted_write_leaves_the_old_entry(store, monkeypatch):
    store.save_tensors(KEY, {"a": torch.ones(2)})
    import safetensors.torch as st

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        store.save_tensors(KEY, {"a": torch.zeros(2)})
    assert torch.equal(store.load_tensors(KEY).tensors["a"], torch.ones(2))
    assert [p.name for p in store.folder.iterdir() if p.name.endswith(".tmp")] == []


def test_tensor_digest_sees_names_shapes_dtypes_and_bytes():
    a = torch.arange(6.0)
    base = tensor_digest({"a": a})
    assert tensor_digest({"a": a.clone()}) == base
    assert tensor_digest({"b": a}) != base
    assert tensor_digest({"a": a.reshape(2, 3)}) != base
    assert tensor_digest({"a": a.double()}) != base
    b = a.clone()
    b[5] = 5.000001
    assert tensor_digest({"a": b}) != base
    assert tensor_digest({"a": a}, extra="count=3") != base
    assert tensor_digest({"x": a.bfloat16()}) == tensor_digest({"x": a.bfloat16()})


def test_weights_fingerprint_is_the_tensor_digest_of_the_unique_parameters():
    model = make_tiny_model("LlamaForCausalLM")
    pairs = [(n, p) for n, p in model.named_parameters(remove_duplicate=True)]
    assert weights_fingerprint(model) == tensor_digest(pairs)


def _full_disk(monkeypatch) -> None:
    """Every write of a file's content fails as on a full disk (the temporary file is created)."""
    import errno
    import pathlib

    import safetensors.torch as st

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", enospc)
    monkeypatch.setattr(pathlib.Path, "write_text", enospc)


def test_a_full_disk_is_one_warning_naming_the_file_and_the_values_stay_usable(store, monkeypatch, caplog):
    _full_disk(monkeypatch)
    caplog.set_level("DEBUG", logger="pmetlab.store")
    assert store.save_tensors(KEY, {"a": torch.ones(2)}) is None
    assert store.save_json(KEY, {"x": 1}) is None
    assert store.save_tensors(dict(KEY, layer=4), {"a": torch.ones(2)}) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # once per store, the rest at debug
    assert str(store.path(KEY)) in warnings[0] and "No space left on device" in warnings[0]
    assert "$PMETLAB_CACHE_DIR" in warnings[0] and "\n" not in warnings[0]
    assert list(store.folder.iterdir()) == []  # no temporary file left behind
    with pytest.raises(OSError, match=r"cannot write .*explicit.safetensors: No space left on device") as info:
        KeyedStore.write_tensors(store.folder / "explicit.safetensors", KEY, {"a": torch.ones(2)})
    assert info.value.errno == 28 and ".tmp" not in str(info.value)


def test_a_run_goes_on_when_its_caches_cannot_be_written(monkeypatch, caplog, tmp_path):
    import errno

    import safetensors.torch as st

    import pmetlab
    import pmetlab.editing.deltas as deltas_mod
    from pmetlab import datasets as ds
    from tests.test_experiments import tiny_hparams, write_data_dir
    from tests.tiny_models import make_tiny_tokenizer

    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(ds.OFFLINE_ENV, "1")
    data = write_data_dir(tmp_path)
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(data))
    monkeypatch.setattr(ds.files, "_PROJECT_DATA_DIR", tmp_path / "no-project-data")
    real_save = st.save_file

    def enospc_in_cache(tensors, filename, *a, **k):  # the run's own files (deltas) still fit
        if str(filename).startswith(str(tmp_path / "cache")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(st, "save_file", enospc_in_cache)
    monkeypatch.setattr(deltas_mod, "save_file", enospc_in_cache)
    caplog.set_level("WARNING", logger="pmetlab")
    res = pmetlab.run_experiment(
        "tiny",
        "pmet",
        "counterfact",
        2,
        out_dir=tmp_path / "run",
        hparams=tiny_hparams(data),
        generation=False,
        progress=False,
        model_and_tokenizer=(make_tiny_model("LlamaForCausalLM"), make_tiny_tokenizer()),
    )
    assert res.run["status"] == "complete" and list(res.summary["phase"]) == ["pre", "post"]
    msgs = [r.getMessage() for r in caplog.records if "cannot write the cache file" in r.getMessage()]
    assert msgs and all("PMETLAB_CACHE_DIR" in m and str(tmp_path / "cache") in m for m in msgs)
