"""Evaluation beyond teacher forcing (issue #23): greedy decoding and matching, neighbourhood KL,
CounterFact+ prompts, held-out prefixes and perplexity, the run field and the re-evaluation of a
finished run from its saved deltas. Tiny models and the synthetic datasets of ``tests.test_experiments``."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from pmetlab.corpus import resolve_corpus, tokenize_corpus
from pmetlab.editing.deltas import Deltas
from pmetlab.evaluation.beyond import (
    BEYOND_FAMILIES,
    BeyondSettings,
    beyond_families,
    cfplus_prompt,
    evaluate_beyond,
)
from pmetlab.evaluation.beyond_summary import summarize_beyond
from pmetlab.evaluation.greedy import answer_match, greedy_continuations, normalize_answer
from pmetlab.evaluation.heldout import chunk_nll, heldout_pool, perplexity_chunks, prefix_passages
from pmetlab.evaluation.nkl import kl_per_pair
from pmetlab.evaluation.scoring import score_pairs
from pmetlab.runs import beyond_eval
from pmetlab.runs.beyond_eval import evaluate_beyond_run
from tests.test_experiments import (  # noqa: F401  (fixtures)
    CORPUS_TEXT,
    _run,
    counterfact_records,
    tiny_env,
    tiny_hparams,
    tiny_mt,
    zsre_records,
)
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

#: Held-out settings that fit the tiny corpus (~3000 tokens) and the tiny models' 64 positions.
TINY = dict(heldout_skip=400, seq_len=32, pool_chunks=8, ppl_chunks=4, prefix_tokens=8, max_new_tokens=4)


@pytest.fixture
def mt():
    model = make_tiny_model("LlamaForCausalLM", seed=0).eval()
    return model, make_tiny_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT)
    return str(p)


def _random_deltas(model, scale: float = 0.05, seed: int = 1) -> Deltas:
    g = torch.Generator().manual_seed(seed)
    name = "model.layers.1.mlp.down_proj.weight"
    w = dict(model.named_parameters())[name]
    return Deltas({name: scale * torch.randn(w.shape, generator=g)}, {})


# ---------------------------------------------------------------------------------------------
# matching and greedy decoding
# ---------------------------------------------------------------------------------------------
def test_answers_match_after_normalisation_at_word_boundaries():
    assert normalize_answer("  Paris,\tFRANCE! ") == "paris france"
    assert answer_match("Paris is big", "paris") == (True, True)
    assert answer_match("Parisian food", "Paris") == (False, False)
    assert answer_match("the city of Paris.", "Paris") == (False, True)
    assert answer_match("New  York City", "new york") == (True, True)
    assert answer_match("anything", "") == (False, False)


def test_greedy_decoding_does_not_depend_on_the_batch_and_equals_a_plain_argmax_loop(mt):
    model, tok = mt
    prompts = [
        "paris is the capital of",
        "the king",
        "sony was founded in japan and the queen",
        "paris is the capital of",
    ]
    one = greedy_continuations(model, tok, prompts, max_new_tokens=5, batch_size=1)
    many = greedy_continuations(model, tok, prompts, max_new_tokens=5, batch_size=3)
    assert one == many and one[0] == one[3]
    ids = tok(prompts[2], return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert one[2] == tok.decode(new, skip_special_tokens=True).split("\n")[0]


@pytest.mark.parametrize(
    "kw, says",
    [({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"), ({"batch_size": -1}, "batch_size must be")],
)
def test_greedy_decoding_refuses_bad_settings_in_one_line(mt, kw, says):
    with pytest.raises(ValueError, match=says):
        greedy_continuations(*mt, ["paris is"], **kw)
    with pytest.raises(ValueError, match="non-empty prompts"):
        greedy_continuations(*mt, ["paris is", "  "])


@pytest.mark.parametrize(
    "kw, says",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
        ({"prefix_tokens": -3}, "prefix_tokens must be an int >= 1"),
        ({"families": ("nkl", "bogus")}, r"unknown beyond family \['bogus'\]"),
        ({"ppl_chunks": 9, "pool_chunks": 8}, "exceeds pool_chunks"),
        ({"heldout_skip": -1}, "heldout_skip must be"),
    ],
)
def test_bad_beyond_settings_are_one_line_errors(kw, says):
    with pytest.raises(ValueError, match=says):
        BeyondSettings(**kw)


def test_malformed_records_and_empty_input_are_refused_clearly(mt, corpus):
    s = BeyondSettings(families=("cfplus",), corpus=corpus, **TINY)
    with pytest.raises(ValueError, match="at least one record"):
        evaluate_beyond(*mt, [], settings=s)
    bad = counterfact_records()[:1]
    del bad[0]["neighborhood_prompts"]
    with pytest.raises((ValueError, KeyError), match="neighborhood_prompts"):
        evaluate_beyond(*mt, bad, settings=s)


def test_families_are_named_in_one_order():
    assert beyond_families(True) == beyond_families("all") == BEYOND_FAMILIES
    assert beyond_families(False) == beyond_families(None) == beyond_families("") == ()
    assert beyond_families("prefix, nkl") == ("nkl", "prefix")


def test_a_known_continuation_is_a_generation_success(mt, corpus):
    model, tok = mt
    recs = counterfact_records()
    rw = recs[0]["requested_rewrite"]
    said = greedy_continuations(model, tok, [rw["prompt"].format(rw["subject"])], max_new_tokens=4)[0]
    assert said.strip(), "the tiny model should say something after the rewrite prompt"
    rw["target_new"]["str"] = said.split()[0]  # its own first word: begins (and contains)
    rw["target_true"]["str"] = "zebra"  # never said by a word-level model without that word
    s = BeyondSettings(families=("generation",), corpus=corpus, **TINY)
    res = evaluate_beyond(model, tok, recs[:1], settings=s, progress=False)
    pre = res.records[res.records["phase"] == "pre"].iloc[0]
    assert pre["gen_efficacy_new_begins"] == 1.0 and pre["gen_efficacy_new_contains"] == 1.0
    assert pre["gen_efficacy_true_begins"] == 0.0
    assert set(res.records.columns) >= {"gen_paraphrase_new_begins", "gen_neighborhood_true_contains"}


# ---------------------------------------------------------------------------------------------
# NKL, identity edits, perplexity
# ---------------------------------------------------------------------------------------------
def test_kl_per_pair_is_the_hand_computed_value():
    p = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    q = torch.log(torch.tensor([[0.9, 0.1], [0.25, 0.75]]))
    want = (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1) + 0.0) / 2
    assert kl_per_pair([p], [q]) == pytest.approx([want], rel=1e-6)


@pytest.mark.parametrize("identity", ["none", "zeros"])
def test_an_identity_edit_has_zero_nkl_and_unchanged_perplexity(mt, corpus, identity):
    model, tok = mt
    deltas = None
    if identity == "zeros":
        deltas = Deltas({k: torch.zeros_like(v) for k, v in _random_deltas(model).tensors.items()}, {})
    s = BeyondSettings(corpus=corpus, **TINY)
    res = evaluate_beyond(model, tok, counterfact_records()[:3], deltas=deltas, settings=s, progress=False)
    assert (res.records["neighborhood_kl"] == 0.0).all()
    assert (res.perplexity["nll_pre"] == res.perplexity["nll_post"]).all()
    summary = summarize_beyond(res.records, res.perplexity).set_index("phase")
    assert summary.loc["post", "perplexity_rel_change"] == 0.0
    pre = res.records[res.records["phase"] == "pre"].drop(columns="phase").reset_index(drop=True)
    post = res.records[res.records["phase"] == "post"].drop(columns="phase").reset_index(drop=True)
    pd.testing.assert_frame_equal(pre, post)


def test_a_real_edit_moves_nkl_and_perplexity_and_leaves_the_model_unedited(mt, corpus):
    model, tok = mt
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = BeyondSettings(families=("nkl", "perplexity"), corpus=corpus, **TINY)
    res = evaluate_beyond(
        model, tok, counterfact_records()[:3], deltas=_random_deltas(model), settings=s, progress=False
    )
    post = res.records[res.records["phase"] == "post"]
    assert (post["neighborhood_kl"] > 0).all()
    assert (res.perplexity["nll_pre"] != res.perplexity["nll_post"]).any()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_chunk_nll_is_the_plain_forward_nll(mt, corpus):
    model, tok = mt
    pool = heldout_pool(tok, corpus=corpus, skip=400, seq_len=32, n_chunks=3)
    got = chunk_nll(model, tok, pool, batch_size=2)
    for c, (nll, n) in zip(pool, got):
        ids = torch.tensor([c])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        want = -logp.gather(1, ids[0, 1:, None]).sum()
        assert n == len(c) - 1 and nll == pytest.approx(float(want), rel=1e-5)


def test_the_unedited_values_are_reused_exactly_from_the_cache(mt, corpus, tmp_path):
    from pmetlab.store import KeyedStore

    model, tok = mt
    store = KeyedStore("beyond_pre", "tiny", root=tmp_path / "cache")
    s = BeyondSettings(corpus=corpus, **TINY)
    recs = counterfact_records()[:4]
    deltas = _random_deltas(model)
    first = evaluate_beyond(model, tok, recs[:3], deltas=deltas, settings=s, store=store, progress=False)
    again = evaluate_beyond(model, tok, recs, deltas=deltas, settings=s, store=store, progress=False)
    plain = evaluate_beyond(model, tok, recs, deltas=deltas, settings=s, progress=False)
    pd.testing.assert_frame_equal(again.records, plain.records)
    pd.testing.assert_frame_equal(again.perplexity, plain.perplexity)
    pd.testing.assert_frame_equal(
        first.records[first.records["phase"] == "pre"].reset_index(drop=True),
        again.records[again.records["phase"] == "pre"].iloc[:3].reset_index(drop=True),
    )
    cold = evaluate_beyond(
        make_tiny_model("LlamaForCausalLM", seed=5).eval(), tok, recs[:1], settings=s, store=store, progress=False
    )
    assert "generation" in cold.wall_s  # other weights: nothing reused


# ---------------------------------------------------------------------------------------------
# CounterFact+ and prefixes
# ---------------------------------------------------------------------------------------------
def test_cfplus_prompts_are_the_rewrite_its_new_target_and_the_neighbour(mt, corpus):
    assert (
        cfplus_prompt("The Eiffel Tower is in", "Rome", "The Louvre is in")
        == "The Eiffel Tower is in Rome. The Louvre is in"
    )
    model, tok = mt
    rec = counterfact_records()[1]
    rw = rec["requested_rewrite"]
    s = BeyondSettings(families=("cfplus",), corpus=corpus, **TINY)
    res = evaluate_beyond(model, tok, [rec], settings=s, progress=False)
    ps = [f"paris is the capital of germany. {p}" for p in rec["neighborhood_prompts"]]
    sc = score_pairs(model, tok, ps + ps, [rw["target_new"]["str"]] * 2 + [rw["target_true"]["str"]] * 2)
    want = float(np.mean(sc.nll[2:] < sc.nll[:2]))
    assert res.records.loc[0, "cfplus_neighborhood_score"] == want


def test_prefix_passages_are_held_out_seeded_and_the_same_in_every_call(mt, corpus):
    _, tok = mt
    cov = tokenize_corpus(tok, resolve_corpus(corpus), 400, 32)
    every = tokenize_corpus(tok, resolve_corpus(corpus), 400 + 8 * 32, 32)
    pool = heldout_pool(tok, corpus=corpus, skip=400, seq_len=32, n_chunks=8, covariance_tokens=400)
    # the covariance read every[: len(cov)] (the last chunk possibly cut short); the pool starts after
    assert cov[:-1] == every[: len(cov) - 1] and every[len(cov) - 1][: len(cov[-1])] == cov[-1]
    start = int(np.searchsorted(np.cumsum([len(c) for c in every]), 400)) + 1
    assert start >= len(cov) and every[start : start + 8] == pool
    a = prefix_passages(tok, pool, [0, 1, 2, 5], n_tokens=8, seed=3)
    assert a == prefix_passages(
        tok, heldout_pool(tok, corpus=corpus, skip=400, seq_len=32, n_chunks=8), [0, 1, 2, 5], n_tokens=8, seed=3
    )
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 8 for t in a[0])
    assert perplexity_chunks(pool, 4, seed=0) == perplexity_chunks(pool, 4, seed=0)
    with pytest.raises(ValueError, match="heldout_skip >= 500"):
        heldout_pool(tok, corpus=corpus, skip=400, seq_len=32, n_chunks=8, covariance_tokens=500)
    with pytest.raises(ValueError, match="leaves"):
        heldout_pool(tok, corpus=corpus, skip=400, seq_len=32, n_chunks=10_000)


def test_zsre_records_get_their_columns(mt, corpus):
    s = BeyondSettings(corpus=corpus, **TINY)
    res = evaluate_beyond(*mt, zsre_records(), dataset="zsre", settings=s, progress=False)
    assert list(res.records["case_id"]) == [0, 1, 2, 0, 1, 2]
    assert {"cfplus_neighborhood_token_acc", "prefix_efficacy_token_acc", "gen_efficacy_new_begins"} <= set(res.records)
    assert res.records["gen_efficacy_true_begins"].isna().all()  # zsRE has no o^c


# ---------------------------------------------------------------------------------------------
# runs: the spec field, eval_post, and re-evaluation from saved deltas
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_beyond(monkeypatch):
    monkeypatch.setattr(beyond_eval, "beyond_settings", partial(beyond_eval.beyond_settings, **{**TINY, "seq_len": 32}))


def test_a_run_with_beyond_records_the_columns_and_reeval_reproduces_them(tiny_env, tiny_mt, tiny_beyond, tmp_path):  # noqa: F811
    tiny_mt[0].eval()
    out = tmp_path / "run"
    res = _run(tiny_env, tiny_mt, out, generation=False, beyond=True)
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["beyond"] == list(BEYOND_FAMILIES) and "beyond" not in run["params"]
    assert set(run["beyond"]["wall_s"]) >= {"generation", "nkl", "perplexity", "total"}
    assert (out / "beyond_summary.csv").is_file() and (out / "beyond_perplexity.csv").is_file()
    rec = res.records
    assert (rec.loc[rec["phase"] == "pre", "neighborhood_kl"] == 0).all()
    assert (rec.loc[rec["phase"] == "post", "neighborhood_kl"] > 0).all()
    again = evaluate_beyond_run(out, model_and_tokenizer=tiny_mt, progress=False, **TINY)
    saved = pd.read_parquet(out / "beyond_records.parquet")
    pd.testing.assert_frame_equal(saved, again.records)
    for phase in ("pre", "post"):
        a = rec[rec["phase"] == phase].set_index("case_id")[again.records.columns.drop(["phase", "case_id"])]
        b = again.records[again.records["phase"] == phase].set_index("case_id").drop(columns="phase")
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
    note = json.loads((out / "beyond.json").read_text())
    assert note["from"] == "deltas.safetensors" and note["n_records"] == 3 and note["wall_s"]["per_record"] > 0


def test_beyond_is_off_by_default_and_reeval_refuses_what_it_cannot_do(tiny_env, tiny_mt, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    res = _run(tiny_env, tiny_mt, out, method="none", generation=False)
    assert json.loads((out / "run.json").read_text())["spec"]["beyond"] == []
    assert "neighborhood_kl" not in res.records and not (out / "beyond_summary.csv").exists()
    (out / "beyond.json").write_text("{}")  # left by a reeval of the run's old deltas
    _run(tiny_env, tiny_mt, out, method="none", generation=False, resume=False)
    assert not (out / "beyond.json").exists()  # a run that starts over deletes it with its own files
    with pytest.raises(FileNotFoundError, match="no run.json"):
        evaluate_beyond_run(tmp_path, model_and_tokenizer=tiny_mt)
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "status": "running"}))
    with pytest.raises(ValueError, match="not complete"):
        evaluate_beyond_run(out, model_and_tokenizer=tiny_mt)


def test_cli_beyond_flags_parse_and_refuse_unknown_families(capsys):
    from pmetlab.cli import main
    from pmetlab.cli.parser import build_parser

    args = build_parser().parse_args(["run", "--beyond"])
    assert args.beyond == BEYOND_FAMILIES
    assert build_parser().parse_args(["run", "--beyond", "nkl,prefix"]).beyond == ("nkl", "prefix")
    assert build_parser().parse_args(["run"]).beyond == ()
    assert main(["run", "--beyond", "fluent"]) == 2
    assert "unknown beyond family ['fluent']" in capsys.readouterr().err
