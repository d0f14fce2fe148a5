"""Covariance statistics: the accumulator, one-pass collection, the disk cache and its keys,
damaged files, merging partial results, resuming an interrupted run, and the spec form."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import pmetlab.stats as stats
from pmetlab import get_adapter
from pmetlab.corpus import resolve_corpus
from pmetlab.covspec import CovarianceSpec
from pmetlab.stats import (
    SecondMoment,
    collect_second_moments,
    covariance_cache_paths,
    layer_covariances,
    stats_key,
    symmetric_accumulate_,
    symmetrize,
    tokenize_corpus,
    tokenizer_identity,
)
from pmetlab.store import DamagedEntryError, KeyedStore
from pmetlab.tracing import TraceDict
from tests.tiny_models import _TOKENIZER_WORDS, make_tiny_model, make_tiny_tokenizer

WORDS = [w for w in _TOKENIZER_WORDS if w.isalpha()]


def write_corpus(path: Path, n_docs: int = 24, seed: int = 0) -> Path:
    """``<doc>``-separated documents of 20-70 known words (varied lengths -> padded batches)."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 70))) for _ in range(n_docs)]
    path.write_text("".join(f"<doc id={i}>\n{d}\n</doc>\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(cache))
    corpus = write_corpus(tmp_path / "corpus.txt")
    return {"cache": cache, "corpus": str(corpus), "tmp": tmp_path}


COV_KW = dict(n_tokens=600, seq_len=32, progress=False, tokens_per_batch=128)


def _cache_files(cache: Path) -> list[Path]:
    """The per-layer statistics files (not the partial checkpoints)."""
    return sorted(p for p in cache.rglob("*.safetensors") if not p.name.startswith("partial-"))


def _partial_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("partial-*.safetensors"))


# --- the accumulator ----------------------------------------------------------------------


@pytest.mark.parametrize("d, block", [(10, 3), (7, 256), (16, 4)])
def test_symmetric_accumulate_equals_gram(d, block):
    g = torch.Generator().manual_seed(0)
    acc = torch.zeros(d, d, dtype=torch.float64)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in (5, 9, 1)]
    for x in xs:
        symmetric_accumulate_(acc, x, block=block)
    full = symmetrize(acc)
    want = sum(x.T @ x for x in xs)
    torch.testing.assert_close(full, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(full, full.T)


def test_second_moment_mom2_and_merge():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    key = {"module": "m", "tokens": 40}
    whole = SecondMoment(x.T @ x, 40, key)
    a = SecondMoment(x[:15].T @ x[:15], 15, {**key, "tokens": 15, "shard": 0})
    b = SecondMoment(x[15:].T @ x[15:], 25, {**key, "tokens": 25, "shard": 1})
    merged = a.merge(b)
    assert merged.count == 40
    torch.testing.assert_close(merged.sum, whole.sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.mom2, x.T @ x / 40, rtol=1e-12, atol=1e-12)
    other = SecondMoment(b.sum, b.count, {**key, "module": "other"})
    with pytest.raises(ValueError, match="different keys"):
        a.merge(other)
    with pytest.raises(ValueError, match="no tokens"):
        _ = SecondMoment(torch.zeros(2, 2), 0).mom2


# --- collection -----------------------------------------------------------------------------


def _setup(family: str = "LlamaForCausalLM", corpus: str | None = None, n_tokens: int = 600):
    model = make_tiny_model(family)
    tok = make_tiny_tokenizer()
    chunks = tokenize_corpus(tok, resolve_corpus(corpus), n_tokens, 32) if corpus else None
    return model, tok, get_adapter(model), chunks


def test_collect_matches_brute_force_and_skips_padding(env):
    model, tok, adapter, chunks = _setup(corpus=env["corpus"])
    assert len({len(c) for c in chunks}) > 1  # padded batches are exercised
    names = [adapter.ffn_out_name(1)]
    got = collect_second_moments(model, tok, names, chunks, dtype=torch.float64, tokens_per_batch=128, progress=False)[
        names[0]
    ]
    xs = []
    for c in chunks:  # one unpadded sequence at a time
        with torch.no_grad(), TraceDict(model, names, retain_input=True, stop=True) as td:
            model(input_ids=torch.tensor([c]))
        xs.append(td[names[0]].input[0].double())
    x = torch.cat(xs)
    assert got.count == len(x) == sum(len(c) for c in chunks)
    # the model runs in float32: batched and single-sequence activations differ in the last bits
    torch.testing.assert_close(got.mom2, x.T @ x / len(x), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", ["LlamaForCausalLM", "GPT2LMHeadModel", "GPTJForCausalLM"])
def test_collect_all_layers_in_one_pass_equals_each_alone(env, family):
    model, tok, adapter, chunks = _setup(family, env["corpus"])
    names = [adapter.ffn_out_name(l) for l in range(3)] + [adapter.attn_out_name(1)]
    together = collect_second_moments(model, tok, names, chunks, tokens_per_batch=128, progress=False)
    for n in names:
        alone = collect_second_moments(model, tok, [n], chunks, tokens_per_batch=128, progress=False)[n]
        assert together[n].count == alone.count
        assert torch.equal(together[n].sum, alone.sum)
    assert together[names[0]].sum.shape == (adapter.d_ff, adapter.d_ff)
    assert together[names[-1]].sum.shape == (adapter.d_attn, adapter.d_attn)


def test_collect_resume_from_checkpoint_equals_uninterrupted(env):
    model, tok, adapter, chunks = _setup(corpus=env["corpus"])
    names = [adapter.ffn_out_name(0), adapter.ffn_out_name(2)]
    full = collect_second_moments(model, tok, names, chunks, tokens_per_batch=64, progress=False)
    saved: list = []

    class Interrupted(Exception):
        pass

    def checkpoint(st, next_batch):
        saved.append((st, next_batch))
        raise Interrupted  # the process dies right after its first checkpoint

    with pytest.raises(Interrupted):
        collect_second_moments(
            model, tok, names, chunks, tokens_per_batch=64, progress=False, checkpoint=checkpoint, checkpoint_every=2
        )
    st, nb = saved[0]
    assert nb == 2
    resumed = collect_second_moments(model, tok, names, chunks, tokens_per_batch=64, progress=False, start=nb, init=st)
    for n in names:
        assert resumed[n].count == full[n].count
        assert torch.equal(resumed[n].sum, full[n].sum)


def test_collect_refuses_empty_chunks():
    model, tok, adapter, _ = _setup()
    with pytest.raises(ValueError, match="no corpus chunks"):
        collect_second_moments(model, tok, [adapter.ffn_out_name(0)], [], progress=False)


# --- layer_covariances: cache, keys, damage, resume ------------------------------------------


def _forbid_collect(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("collect_second_moments ran although the cache should have answered")

    monkeypatch.setattr(stats, "collect_second_moments", fail)


def test_second_call_hits_the_cache(env, monkeypatch):
    model, tok, _, _ = _setup()
    first = layer_covariances(model, tok, [0, 2], corpus=env["corpus"], **COV_KW)
    assert len(_cache_files(env["cache"])) == 2
    _forbid_collect(monkeypatch)
    second = layer_covariances(model, tok, [0, 2], corpus=env["corpus"], **COV_KW)
    for l in (0, 2):
        assert torch.equal(first[l].sum, second[l].sum) and first[l].count == second[l].count
        assert first[l].key == second[l].key
    sub = layer_covariances(model, tok, [2], corpus=env["corpus"], **COV_KW)  # a subset is cached too
    assert torch.equal(sub[2].sum, first[2].sum)


def test_only_missing_layers_are_computed_in_one_pass(env, monkeypatch):
    model, tok, adapter, _ = _setup()
    layer_covariances(model, tok, [1], corpus=env["corpus"], **COV_KW)
    calls = []
    real = stats.collect_second_moments

    def spy(model_, tok_, names, *a, **k):
        calls.append(list(names))
        return real(model_, tok_, names, *a, **k)

    monkeypatch.setattr(stats, "collect_second_moments", spy)
    out = layer_covariances(model, tok, [0, 1, 2], corpus=env["corpus"], **COV_KW)
    assert calls == [[adapter.ffn_out_name(0), adapter.ffn_out_name(2)]]
    assert sorted(out) == [0, 1, 2]
    assert out[0].mom2.shape == (adapter.d_ff, adapter.d_ff)


def test_attn_kind_has_its_own_cache(env):
    model, tok, adapter, _ = _setup()
    ffn = layer_covariances(model, tok, [1], kind="ffn", corpus=env["corpus"], **COV_KW)
    attn = layer_covariances(model, tok, [1], kind="attn", corpus=env["corpus"], **COV_KW)
    assert attn[1].sum.shape == (adapter.d_attn, adapter.d_attn)
    assert ffn[1].key["module"] != attn[1].key["module"]
    assert len(_cache_files(env["cache"])) == 2
    with pytest.raises(ValueError, match="kind"):
        layer_covariances(model, tok, [1], kind="mlp", corpus=env["corpus"], **COV_KW)
    with pytest.raises(ValueError, match=r"exceed the 3 layers of .* \(valid: 0\.\.2\)"):
        layer_covariances(model, tok, [5], corpus=env["corpus"], **COV_KW)


@pytest.mark.parametrize("damage", ["truncate", "garble-data", "garble-header", "empty"])
def test_damaged_cache_file_is_detected_and_recomputed(env, monkeypatch, damage, caplog):
    model, tok, _, _ = _setup()
    first = layer_covariances(model, tok, [1], corpus=env["corpus"], **COV_KW)[1]
    (path,) = _cache_files(env["cache"])
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garble-data":
        for i in range(len(raw) - 40, len(raw) - 20):  # inside the float data, header intact
            raw[i] ^= 0x15
    elif damage == "garble-header":
        for i in range(12, 40):
            raw[i] = ord("#")
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=str(path.name)):
        SecondMoment.load(path, first.key)
    calls = []
    real = stats.collect_second_moments
    monkeypatch.setattr(stats, "collect_second_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = layer_covariances(model, tok, [1], corpus=env["corpus"], **COV_KW)[1]
    assert calls == [1]
    assert "recomputed" in caplog.text and path.name in caplog.text  # the log names the file
    assert torch.equal(again.sum, first.sum) and again.count == first.count
    assert torch.equal(SecondMoment.load(path, first.key).sum, first.sum)  # the file was rewritten


def test_file_with_another_key_is_rejected(env):
    model, tok, _, _ = _setup()
    sm = layer_covariances(model, tok, [1], corpus=env["corpus"], **COV_KW)[1]
    (path,) = _cache_files(env["cache"])
    with pytest.raises(ValueError, match="another key"):
        SecondMoment.load(path, {**sm.key, "tokens": 1})
    loaded = SecondMoment.load(path)
    assert loaded.key == sm.key and torch.equal(loaded.sum, sm.sum)


def _key(env, model, tok, layer=1, **changes):
    kw = {**COV_KW, "corpus": env["corpus"], **changes}
    return layer_covariances(model, tok, [layer], **kw)[layer].key


def test_cache_key_changes_with_every_input(env, monkeypatch):
    model, tok, adapter, _ = _setup()
    base = _key(env, model, tok)
    other_corpus = str(write_corpus(env["tmp"] / "other.txt", seed=1))
    variants = {
        "corpus": _key(env, model, tok, corpus=other_corpus),
        "tokens": _key(env, model, tok, n_tokens=500),
        "dtype": _key(env, model, tok, dtype="float64"),
        "seq_len": _key(env, model, tok, seq_len=24),
    }
    for what, k in variants.items():
        assert k != base, what
    # a changed corpus file (same name) is a different corpus
    Path(env["corpus"]).write_text(Path(env["corpus"]).read_text() + "<doc>\nthe king of france\n</doc>\n")
    assert _key(env, model, tok) != base
    files = _cache_files(env["cache"])
    assert len(files) == 6  # every variant got its own file


def test_cache_key_follows_the_weights_the_statistic_depends_on(env):
    model, tok, adapter, _ = _setup()
    keys = {l: _key(env, model, tok, layer=l) for l in range(3)}
    with torch.no_grad():  # a later layer, the final norm and the head do not change layer 0's keys
        adapter.module(adapter.ffn_out_name(2)).weight.add_(1.0)
        adapter.module(adapter.final_norm_name).weight.mul_(2.0)
        adapter.module(adapter.unembed_name).weight.mul_(2.0)
    assert _key(env, model, tok, layer=0) == keys[0]
    assert _key(env, model, tok, layer=1) == keys[1]
    assert _key(env, model, tok, layer=2) != keys[2]
    with torch.no_grad():  # the embedding changes every layer's input
        model.get_input_embeddings().weight.mul_(1.5)
    for l in range(3):
        assert _key(env, model, tok, layer=l) != keys[l]
    seed1 = make_tiny_model("LlamaForCausalLM", seed=1)
    assert _key(env, seed1, tok, layer=0) != keys[0]


def test_cache_key_includes_the_tokenizer_and_model_sampling_seed(env):
    from tokenizers import normalizers

    model, tok, _, _ = _setup()
    tok2 = make_tiny_tokenizer()
    tok2.backend_tokenizer.normalizer = normalizers.Sequence([])  # not lower-cased: other tokens
    assert tokenizer_identity(tok2) != tokenizer_identity(tok)
    assert tokenizer_identity(make_tiny_tokenizer()) == tokenizer_identity(tok)
    assert _key(env, model, tok2) != _key(env, model, tok)
    corp = resolve_corpus("model:2")
    spec = CovarianceSpec(corpus="model:2", n_tokens=10, seq_len=32)
    k0 = stats_key(model, "m", "fp", spec, corpus=corp)
    k1 = stats_key(model, "m", "fp", spec.replace(seed=1), corpus=corp)
    assert k0 != k1 and k0 == stats_key(model, "m", "fp", spec)  # the corpus is resolved from the spec
    file_spec = spec.replace(corpus=env["corpus"])  # a file corpus does not depend on the seed
    assert stats_key(model, "m", "fp", file_spec) == stats_key(model, "m", "fp", file_spec.replace(seed=1))


def test_layer_covariances_resumes_an_interrupted_run(env, monkeypatch, tmp_path):
    model, tok, _, _ = _setup()
    kw = dict(COV_KW, tokens_per_batch=64, checkpoint_every=1)
    # the uninterrupted result, in a separate cache
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "clean"))
    clean = layer_covariances(model, tok, [0, 2], corpus=env["corpus"], **kw)
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(env["cache"]))

    class Interrupted(Exception):
        pass

    real = stats.collect_second_moments
    starts: list[int] = []

    def interrupted_after_first_checkpoint(*a, checkpoint=None, **k):
        starts.append(k["start"])

        def ckpt(st, nb):
            checkpoint(st, nb)
            if nb == 2:
                raise Interrupted

        return real(*a, checkpoint=ckpt, **k)

    monkeypatch.setattr(stats, "collect_second_moments", interrupted_after_first_checkpoint)
    with pytest.raises(Interrupted):
        layer_covariances(model, tok, [0, 2], corpus=env["corpus"], **kw)
    (partial,) = _partial_files(env["cache"])  # sums and batch index: one store entry
    assert int(KeyedStore.read_tensors(partial).tensors["next_batch"]) == 2
    assert not _cache_files(env["cache"])
    resumed = layer_covariances(model, tok, [0, 2], corpus=env["corpus"], **kw)
    assert starts == [0, 2]  # the second run started where the first one stopped
    for l in (0, 2):
        assert resumed[l].count == clean[l].count
        assert torch.equal(resumed[l].sum, clean[l].sum)
    assert not [p for p in env["cache"].rglob("partial-*")]  # checkpoint removed when done


def test_checkpoint_of_another_batch_plan_is_not_reused(env, monkeypatch):
    model, tok, _, _ = _setup()

    class Interrupted(Exception):
        pass

    real = stats.collect_second_moments

    def die(*a, checkpoint=None, **k):
        def ckpt(st, nb):
            checkpoint(st, nb)
            raise Interrupted

        return real(*a, checkpoint=ckpt, **k)

    monkeypatch.setattr(stats, "collect_second_moments", die)
    with pytest.raises(Interrupted):
        layer_covariances(
            model, tok, [1], corpus=env["corpus"], **dict(COV_KW, tokens_per_batch=64, checkpoint_every=1)
        )
    starts = []
    monkeypatch.setattr(stats, "collect_second_moments", lambda *a, **k: starts.append(k["start"]) or real(*a, **k))
    got = layer_covariances(model, tok, [1], corpus=env["corpus"], **dict(COV_KW, tokens_per_batch=256))
    assert starts == [0]
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(env["tmp"] / "clean"))
    clean = layer_covariances(model, tok, [1], corpus=env["corpus"], **dict(COV_KW, tokens_per_batch=256))
    assert got[1].count == clean[1].count
    torch.testing.assert_close(got[1].sum, clean[1].sum)


def test_use_cache_false_writes_nothing(env):
    model, tok, _, _ = _setup()
    layer_covariances(model, tok, [0], corpus=env["corpus"], use_cache=False, **COV_KW)
    assert _cache_files(env["cache"]) == []


# --- the spec form, the keyed store, refusals ----------------------------------------------


def test_spec_form_equals_the_keyword_form(env, monkeypatch):
    model, tok, _, _ = _setup()
    spec = CovarianceSpec(corpus=env["corpus"], n_tokens=600, seq_len=32)
    by_kw = layer_covariances(model, tok, [0, 2], corpus=env["corpus"], **COV_KW)
    _forbid_collect(monkeypatch)  # the same statistic, so the same cache entries
    by_spec = layer_covariances(model, tok, [0, 2], spec=spec, progress=False, tokens_per_batch=128)
    for l in (0, 2):
        assert by_spec[l].key == by_kw[l].key and torch.equal(by_spec[l].sum, by_kw[l].sum)
    corpus_obj = layer_covariances(model, tok, [0], corpus=resolve_corpus(env["corpus"]), **COV_KW)
    assert corpus_obj[0].key == by_kw[0].key
    with pytest.raises(ValueError, match="either spec= or the keyword settings"):
        layer_covariances(model, tok, [0], spec=spec, n_tokens=10, progress=False)


def test_cache_paths_name_the_files_the_store_holds(env):
    model, tok, _, _ = _setup()
    for kind in ("ffn", "attn"):
        covs = layer_covariances(model, tok, [0, 2], kind=kind, corpus=env["corpus"], **COV_KW)
        paths = covariance_cache_paths(model, covs, kind=kind)
        for l, p in paths.items():
            assert p.is_file() and p.name.startswith(f"{kind}-L{l:03d}-")
            assert torch.equal(SecondMoment.load(p, covs[l].key).sum, covs[l].sum)
    assert sorted(_cache_files(env["cache"])) == sorted(
        p
        for kind in ("ffn", "attn")
        for p in covariance_cache_paths(
            model, layer_covariances(model, tok, [0, 2], kind=kind, corpus=env["corpus"], **COV_KW), kind=kind
        ).values()
    )


def test_save_load_round_trip_and_the_count_is_checksummed(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    sm = SecondMoment(x.T @ x, 9, {"module": "m", "format": 2})
    path = sm.save(tmp_path / "anywhere.safetensors")
    back = SecondMoment.load(path, sm.key)
    assert torch.equal(back.sum, sm.sum) and back.count == 9 and back.key == sm.key
    assert SecondMoment.load(path).key == sm.key
    entry = KeyedStore.read_tensors(path, sm.key)
    assert int(entry.tensors["count"]) == 9  # a tensor, so the store's checksum covers it
    tampered = SecondMoment(sm.sum, 10, sm.key).tensors()
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    save_file(tampered, str(path), metadata=header)  # another count under the old checksum
    with pytest.raises(DamagedEntryError, match="checksum"):
        SecondMoment.load(path, sm.key)


def test_old_format_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ffn-L001-old.safetensors"
    save_file({"sum": torch.eye(3)}, str(path), metadata={"format": "1", "count": "3", "key": "x"})
    with pytest.raises(ValueError, match="old one"):
        SecondMoment.load(path)


def test_non_finite_cache_entry_is_refused_with_its_path_and_recomputed(env, monkeypatch, caplog):
    model, tok, _, _ = _setup()
    first = layer_covariances(model, tok, [1], corpus=env["corpus"], **COV_KW)
    path = covariance_cache_paths(model, first)[1]
    bad = first[1].sum.clone()
    bad[0, 0] = float("inf")
    SecondMoment(bad, first[1].count, first[1].key).save(path)  # a well-formed file with inf inside
    with pytest.raises(ValueError, match="non-finite"):
        SecondMoment.load(path, first[1].key)
    again = layer_covariances(model, tok, [1], corpus=env["corpus"], **COV_KW)
    assert "non-finite" in caplog.text and path.name in caplog.text
    assert torch.equal(again[1].sum, first[1].sum)
    assert torch.equal(SecondMoment.load(path, first[1].key).sum, first[1].sum)  # rewritten


@pytest.mark.parametrize("use_cache", [True, False])
def test_non_finite_statistics_are_refused_naming_the_module(env, monkeypatch, use_cache):
    """NaN statistics would make every edit NaN: an error naming the module and what to do, and
    nothing cached (not even the checkpoint); a later healthy pass computes them."""
    from pmetlab.moments import NonFiniteStatisticsError

    model, tok, adapter, _ = _setup()
    real = stats.collect_second_moments

    def overflowing(*a, checkpoint=None, **k):
        out = real(*a, checkpoint=checkpoint, **k)
        if checkpoint is not None:
            checkpoint(out, 1)  # a checkpoint written before the overflow
        for sm in out.values():
            sm.sum[0, 0] = float("nan")
        return out

    monkeypatch.setattr(stats, "collect_second_moments", overflowing)
    with pytest.raises(NonFiniteStatisticsError) as info:
        layer_covariances(model, tok, [1], corpus=env["corpus"], use_cache=use_cache, **COV_KW)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert adapter.ffn_out_name(1) in msg and "1 non-finite value" in msg
    assert "torch.float32" in msg and "load_model(..., dtype='float32')" in msg and "nothing was cached" in msg
    assert _cache_files(env["cache"]) == [] and _partial_files(env["cache"]) == []
    monkeypatch.setattr(stats, "collect_second_moments", real)
    assert torch.isfinite(layer_covariances(model, tok, [1], corpus=env["corpus"], **COV_KW)[1].sum).all()


def test_computing_statistics_is_announced_once_with_its_size_and_cache(env, caplog):
    model, tok, adapter, _ = _setup()
    with caplog.at_level("INFO", logger="pmetlab.stats"):
        layer_covariances(model, tok, [1, 2], corpus=env["corpus"], **COV_KW)
        layer_covariances(model, tok, [1, 2], corpus=env["corpus"], **COV_KW)  # from the cache
    said = [r.getMessage() for r in caplog.records if "computing covariance statistics" in r.getMessage()]
    assert len(said) == 1, said
    assert "once" in said[0] and "~600 tokens" in said[0] and adapter.ffn_out_name(2) in said[0]
    assert str(env["cache"]) in said[0]


def test_damaged_checkpoint_is_ignored_with_its_path(env, monkeypatch, caplog):
    model, tok, _, _ = _setup()
    kw = dict(COV_KW, tokens_per_batch=64, checkpoint_every=1)

    class Interrupted(Exception):
        pass

    real = stats.collect_second_moments

    def die(*a, checkpoint=None, **k):
        def ckpt(st, nb):
            checkpoint(st, nb)
            raise Interrupted

        return real(*a, checkpoint=ckpt, **k)

    monkeypatch.setattr(stats, "collect_second_moments", die)
    with pytest.raises(Interrupted):
        layer_covariances(model, tok, [1], corpus=env["corpus"], **kw)
    (partial,) = _partial_files(env["cache"])
    raw = bytearray(partial.read_bytes())
    for i in range(len(raw) - 40, len(raw) - 20):
        raw[i] ^= 0x15
    partial.write_bytes(bytes(raw))
    starts = []
    monkeypatch.setattr(stats, "collect_second_moments", lambda *a, **k: starts.append(k["start"]) or real(*a, **k))
    got = layer_covariances(model, tok, [1], corpus=env["corpus"], **kw)
    assert starts == [0] and partial.name in caplog.text and not _partial_files(env["cache"])
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(env["tmp"] / "clean"))
    clean = layer_covariances(model, tok, [1], corpus=env["corpus"], **kw)
    assert torch.equal(got[1].sum, clean[1].sum) and got[1].count == clean[1].count


# --- checkpoints by time, token budgets ------------------------------------------------------


class FakeClock:
    """A clock that only moves when told (each forward pass "takes" ``per_batch`` seconds)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _slow_forwards(model, clock: FakeClock, per_batch: float, die_after: int | None = None):
    """Each forward pass advances ``clock`` by ``per_batch``; the one after ``die_after`` passes is
    interrupted (Ctrl-C) before it does anything."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        if die_after is not None and len(calls) > die_after:
            raise KeyboardInterrupt
        clock.t += per_batch

    return model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("done", [2, 3, 5, 7, 8])
def test_an_interrupt_loses_at_most_the_checkpoint_interval(env, monkeypatch, tmp_path, done):
    """A Ctrl-C after ``done`` batches of 25 s each (fake clock) resumes from a checkpoint that is
    less than the 60 s interval old; the resumed statistics are bit-identical."""
    model, tok, _, _ = _setup()
    kw = dict(COV_KW, tokens_per_batch=64, checkpoint_seconds=60.0)
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "clean"))
    clean = layer_covariances(model, tok, [0, 2], corpus=env["corpus"], **kw)
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(env["cache"]))
    clock, real, starts = FakeClock(), stats.collect_second_moments, []

    def with_fake_clock(*a, **k):
        starts.append(k["start"])
        return real(*a, clock=clock, **k)

    monkeypatch.setattr(stats, "collect_second_moments", with_fake_clock)
    hook = _slow_forwards(model, clock, per_batch=25.0, die_after=done)
    with pytest.raises(KeyboardInterrupt):
        layer_covariances(model, tok, [0, 2], corpus=env["corpus"], **kw)
    hook.remove()
    partials = _partial_files(env["cache"])  # one checkpoint (the latest), or none yet
    assert len(partials) == (done >= 3)
    saved_at = int(KeyedStore.read_tensors(partials[0]).tensors["next_batch"]) if partials else 0
    assert (done - saved_at) * 25.0 < 60.0  # finished work not in the checkpoint: under the interval
    assert saved_at == 3 * (done // 3)  # 25 s batches: a checkpoint after every third
    resumed = layer_covariances(model, tok, [0, 2], corpus=env["corpus"], **kw)
    assert starts == [0, saved_at]
    for l in (0, 2):
        assert resumed[l].count == clean[l].count and torch.equal(resumed[l].sum, clean[l].sum)


def test_the_default_checkpoints_by_time_not_every_20_batches(env):
    model, tok, adapter, chunks = _setup(corpus=env["corpus"])
    clock, saved = FakeClock(), []
    hook = _slow_forwards(model, clock, per_batch=31.0)  # a slow model: over a minute for 2 batches
    names = [adapter.ffn_out_name(1)]
    collect_second_moments(
        model, tok, names, chunks, tokens_per_batch=64, progress=False, clock=clock,
        checkpoint=lambda st, nb: saved.append(nb),
    )  # fmt: skip
    hook.remove()
    n_batches = len(stats.plan_batches(chunks, 64))
    assert n_batches > 6 and saved == list(range(2, n_batches, 2))


def test_slow_checkpoint_writes_stretch_the_interval(env):
    """A write that takes 10 s (over a tenth of 60 s) makes the interval 100 s: checkpointing never
    takes more than about a tenth of the time."""
    model, tok, adapter, chunks = _setup(corpus=env["corpus"])
    clock, saved = FakeClock(), []

    def slow_write(st, nb):
        saved.append((nb, clock.t))
        clock.t += 10.0

    hook = _slow_forwards(model, clock, per_batch=25.0)
    collect_second_moments(
        model, tok, [adapter.ffn_out_name(1)], chunks, tokens_per_batch=64, progress=False, clock=clock,
        checkpoint=slow_write, checkpoint_seconds=60.0,
    )  # fmt: skip
    hook.remove()
    # at 75 s, then after 100 s (10 x the write) instead of 60 s: batch 7, not 6
    assert [nb for nb, _ in saved[:2]] == [3, 7]


@pytest.mark.parametrize("bad", [dict(checkpoint_seconds=-1.0), dict(checkpoint_every=0), dict(checkpoint_every=1.5)])
def test_bad_checkpoint_settings_are_refused(env, bad):
    model, tok, adapter, chunks = _setup(corpus=env["corpus"])
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
        collect_second_moments(model, tok, [adapter.ffn_out_name(0)], chunks, progress=False, **bad)


@pytest.mark.parametrize("kind", ["ffn", "attn"])
def test_a_token_budget_below_the_key_dimension_is_refused(env, monkeypatch, kind):
    model, tok, adapter, _ = _setup()
    d = adapter.d_ff if kind == "ffn" else adapter.d_attn
    _forbid_collect(monkeypatch)  # refused before the pass
    with pytest.raises(ValueError, match=rf"n_tokens={d - 1} is fewer than the key dimension {d} .*singular"):
        layer_covariances(model, tok, [1], kind=kind, corpus=env["corpus"], **dict(COV_KW, n_tokens=d - 1))
    monkeypatch.undo()
    got = layer_covariances(model, tok, [1], kind=kind, corpus=env["corpus"], **dict(COV_KW, n_tokens=d))
    assert got[1].count >= d


def test_a_corpus_yielding_fewer_tokens_than_the_key_dimension_is_refused(env, monkeypatch):
    model, tok, adapter, _ = _setup()
    short = write_corpus(env["tmp"] / "short.txt", n_docs=1)
    _forbid_collect(monkeypatch)
    with pytest.raises(ValueError, match=rf"yields only \d+ usable tokens .* key dimension {adapter.d_ff}"):
        layer_covariances(model, tok, [1], corpus=str(short), **COV_KW)


def test_spec_states_its_minimums():
    from pmetlab.covspec import MIN_SEQ_LEN

    with pytest.raises(ValueError, match=rf"seq_len must be an int >= {MIN_SEQ_LEN}, got 8: .*pieces under 8"):
        CovarianceSpec(seq_len=8)
    spec = CovarianceSpec(n_tokens=100)
    spec.check_key_dim(100, "m")  # exactly d tokens: allowed
    with pytest.raises(ValueError, match="n_tokens=100 is fewer than the key dimension 101 of m"):
        spec.check_key_dim(101, "m")
    with pytest.raises(ValueError, match="yields only 50 usable tokens"):
        spec.check_key_dim(80, "m", yielded=50)


def test_negative_layer_indices_are_refused_as_everywhere_else(env):
    model, tok = make_tiny_model("LlamaForCausalLM"), make_tiny_tokenizer()
    with pytest.raises(ValueError, match=r"absolute|0\.\.2"):
        layer_covariances(model, tok, [-1], corpus=env["corpus"], n_tokens=600, seq_len=32, progress=False)
