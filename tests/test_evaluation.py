"""Evaluation metrics: hand-computed cases on a model whose logits we set, padding/batching
invariance on a tiny random LLaMA, and one integration test on the real SmolLM2."""

from __future__ import annotations

import math
import types
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pmetlab.datasets import ConsistencyReference
from pmetlab.evaluation import (
    evaluate_counterfact,
    evaluate_counterfact_reference,
    evaluate_zsre,
    evaluate_zsre_reference,
    generate_ids,
    generate_texts,
    harmonic_mean,
    ngram_entropy,
    preference_metrics,
    relative_specificity,
    sample_top_k,
    score_pairs,
    score_pairs_reference,
    summarize,
    text_entropy_score,
    tfidf_cosine,
    word_tokenize,
)
from pmetlab.evaluation.generation import check_generation_length
from pmetlab.tokens import check_context_length, context_length
from tests.tiny_models import _TOKENIZER_WORDS, TINY_FAMILIES, TINY_MAX_POS, make_tiny_model, make_tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls on 2 shared cores are dominated by thread hand-offs; one thread is ~100x faster
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# A model whose next-token distribution we write down: logits depend on the last token only.
# ------------------------------------------------------------------------------------------
PIECES = ["<pad>", "<eos>", "Q", "R", "S", "T", " a", " b", " c", " New", " York", "nq question: ", "?"]


class PieceTokenizer:
    """Greedy longest-match tokenizer over PIECES (no special tokens added)."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self) -> None:
        self.vocab = {p: i for i, p in enumerate(PIECES)}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids, i = [], 0
        while i < len(text):
            best = max((p for p in PIECES[2:] if text.startswith(p, i)), key=len, default=None)
            if best is None:
                raise ValueError(f"cannot tokenize {text[i:]!r}")
            ids.append(self.vocab[best])
            i += len(best)
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i < 2))


def dist(**probs: float) -> np.ndarray:
    """A next-token distribution over PIECES: the given pieces (keys name them without the space,
    e.g. a=" a", New=" New", q="?"), the rest of the mass spread evenly over the other pieces."""
    names = {"a": " a", "b": " b", "c": " c", "New": " New", "York": " York", "q": "?"}
    p = np.zeros(len(PIECES))
    for k, v in probs.items():
        p[PIECES.index(names[k])] = v
    rest = [i for i in range(len(PIECES)) if p[i] == 0]
    p[rest] = (1.0 - p.sum()) / len(rest)
    return p


TABLE = {
    "Q": dist(a=0.5, b=0.2, New=0.2),
    "R": dist(a=0.3, b=0.3, c=0.35),  # a tie between o* = a and o^c = b
    "S": dist(a=0.4, b=0.1),
    "T": dist(a=0.1, b=0.6),
    " New": dist(York=0.9),
    "?": dist(b=0.7),
}


def P(prev: str, nxt: str) -> float:
    return float(TABLE.get(prev, np.full(len(PIECES), 1 / len(PIECES)))[PIECES.index(nxt)])


class BigramLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        t = torch.zeros(len(PIECES), len(PIECES), dtype=torch.float64)
        for prev, p in TABLE.items():
            t[PIECES.index(prev)] = torch.tensor(np.log(p))
        self.table = nn.Parameter(t, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return types.SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def bigram():
    return BigramLM().eval(), PieceTokenizer()


def nll(*probs: float) -> float:
    return float(np.mean([-math.log(p) for p in probs]))


def cf_record(case_id, subject, new, true, paraphrase, neighborhood, generation=(), relation="P1", new_id="Q9"):
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": "{}",
            "subject": subject,
            "relation_id": relation,
            "target_new": {"str": new, "id": new_id},
            "target_true": {"str": true, "id": "Q8"},
        },
        "paraphrase_prompts": list(paraphrase),
        "neighborhood_prompts": list(neighborhood),
        "attribute_prompts": [],
        "generation_prompts": list(generation),
    }


# ------------------------------------------------------------------------------------------
def test_score_pairs_hand_computed(bigram):
    model, tok = bigram
    s = score_pairs(model, tok, ["Q", "Q", "R", "Q"], ["a", "New York", "New York", "a"], batch_size=2)
    np.testing.assert_allclose(s.nll, [nll(0.5), nll(0.2, 0.9), nll(P("R", " New"), 0.9), nll(0.5)], rtol=1e-6)
    assert s.n_tokens.tolist() == [1, 2, 2, 1]
    # teacher forcing: the second token is judged after the true first token " New"
    assert [c.tolist() for c in s.token_correct] == [[True], [False, True], [False, True], [True]]
    assert [p.tolist() for p in s.token_pred][:3] == [[6], [6, 10], [8, 10]]
    np.testing.assert_allclose(s.prob[1], math.sqrt(0.2 * 0.9))
    np.testing.assert_allclose(s.token_accuracy, [1, 0.5, 0.5, 1])


def test_preference_metrics_ties_fail_and_magnitudes():
    m = preference_metrics([1.0, 2.0, 0.5], [1.0, 1.0, 2.0], prefer="new")
    assert m["score"] == pytest.approx(1 / 3)  # tie fails, 2 > 1 fails, 0.5 < 2 succeeds
    exp = np.mean([0.0, math.exp(-2) - math.exp(-1), math.exp(-0.5) - math.exp(-2)])
    assert m["magnitude"] == pytest.approx(exp)
    n = preference_metrics([1.0, 2.0, 0.5], [1.0, 1.0, 2.0], prefer="true")
    assert n["score"] == pytest.approx(1 / 3) and n["magnitude"] == pytest.approx(-exp)
    assert math.isnan(preference_metrics([], [], prefer="new")["score"])
    with pytest.raises(ValueError, match="equal length"):
        preference_metrics([1.0], [1.0, 2.0], prefer="new")


@pytest.mark.parametrize("batched", [True, False])
def test_counterfact_metrics_hand_computed(bigram, batched):
    model, tok = bigram
    recs = [cf_record(0, "Q", "a", "b", ["R", "S"], ["R", "S", "T"]), cf_record(1, "Q", "New York", "b", ["R"], ["T"])]
    df = evaluate_counterfact(model, tok, recs, generation=False, batched=batched, progress=False, batch_size=3)
    r0, r1 = df.iloc[0], df.iloc[1]
    # record 0, single-token targets; R is an exact tie, which fails both ways
    assert (r0.efficacy_score, r0.paraphrase_score, r0.neighborhood_score) == (1.0, 0.5, pytest.approx(1 / 3))
    assert r0.efficacy_magnitude == pytest.approx(0.5 - 0.2)
    assert r0.paraphrase_magnitude == pytest.approx(((0.3 - 0.3) + (0.4 - 0.1)) / 2)
    assert r0.neighborhood_magnitude == pytest.approx(((0.3 - 0.3) + (0.1 - 0.4) + (0.6 - 0.1)) / 3)
    assert (r0.efficacy_token_acc, r0.paraphrase_token_acc) == (1.0, 0.5)  # argmax(R) = c
    assert r0.neighborhood_token_acc == pytest.approx(1 / 3)  # o^c = b is top-1 only after T
    assert r0.neighborhood_prefers_true == (False, False, True)
    # record 1, two-token o*: P(o*) is the geometric mean of the token probabilities
    p_new_q, p_new_r, p_new_t = (math.sqrt(P(x, " New") * 0.9) for x in "QRT")
    assert r1.efficacy_score == 1.0 and r1.efficacy_magnitude == pytest.approx(p_new_q - 0.2)
    assert r1.paraphrase_score == 0.0 and r1.paraphrase_magnitude == pytest.approx(p_new_r - 0.3)
    assert r1.neighborhood_score == 1.0 and r1.neighborhood_magnitude == pytest.approx(0.6 - p_new_t)
    assert (r1.efficacy_token_acc, r1.paraphrase_token_acc, r1.neighborhood_token_acc) == (0.5, 0.5, 1.0)
    assert df.fluency.isna().all() and df.consistency.isna().all()
    assert list(df.case_id) == [0, 1]


@pytest.mark.parametrize("batched", [True, False])
def test_zsre_metrics_hand_computed(bigram, batched):
    model, tok = bigram
    rec = {
        "subject": "Q",
        "src": "Q",
        "rephrase": "R",
        "answers": ["New York"],
        "loc": "nq question: S",
        "loc_ans": "b",
        "case_id": 5,
    }
    df = evaluate_zsre(model, tok, [rec], batched=batched, progress=False)
    row = df.iloc[0]
    assert row.case_id == 5
    assert (row.efficacy_token_acc, row.paraphrase_token_acc, row.neighborhood_token_acc) == (0.5, 0.5, 1.0)
    assert row.neighborhood_pred == (PIECES.index(" b"),)  # read after "nq question: S?"
    raw = evaluate_zsre(model, tok, [rec], loc_suffix="", progress=False).iloc[0]
    assert raw.neighborhood_token_acc == 0.0 and raw.neighborhood_pred == (PIECES.index(" a"),)


def test_evaluation_rejects_bad_input(bigram):
    model, tok = bigram
    with pytest.raises(KeyError, match="missing field 'neighborhood_prompts'"):
        evaluate_counterfact(
            model,
            tok,
            [
                {
                    "case_id": 0,
                    "requested_rewrite": cf_record(0, "Q", "a", "b", [], [])["requested_rewrite"],
                    "paraphrase_prompts": ["Q is"],
                }
            ],
            generation=False,
            progress=False,
        )
    with pytest.raises(ValueError, match="same length"):
        score_pairs(model, tok, ["Q"], ["a", "b"])
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        score_pairs(model, tok, [""], ["a"])


# ------------------------------------------------------------------------------------------
def test_word_tokenize_and_ngram_entropy():
    assert word_tokenize("Paris's mayor, today.") == ["Paris", "'s", "mayor", ",", "today", "."]
    assert word_tokenize("a well-known  fact") == ["a", "well-known", "fact"]
    toks = "a b a b".split()
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # (a,b) twice, (b,a) once
    assert ngram_entropy(toks, 2) == pytest.approx(h2)
    assert ngram_entropy(toks, 3) == pytest.approx(1.0)  # (a,b,a), (b,a,b)
    assert text_entropy_score("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy(["x"], 2) == 0.0 and text_entropy_score("") == 0.0
    assert text_entropy_score("the the the the the") == 0.0  # pure repetition has no entropy


def test_tfidf_cosine_hand_computed():
    vocab, idf = {"paris": 0, "france": 1, "city": 2}, np.array([1.0, 2.0, 3.0])
    # "Paris Paris France" -> (2·1, 1·2, 0); "France, a city" -> (0, 2, 3) ("a" is too short to count)
    assert tfidf_cosine("Paris Paris France", "France, a city", idf, vocab) == pytest.approx(
        4 / (math.sqrt(8) * math.sqrt(13))
    )
    assert tfidf_cosine("Paris", "paris", idf, vocab) == pytest.approx(1.0)
    assert math.isnan(tfidf_cosine("nothing known", "Paris", idf, vocab))


def test_sample_top_k_inverse_cdf():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]]))
    pick = lambda u: int(sample_top_k(logits, torch.tensor([u], dtype=torch.float64), 2)[0])  # noqa: E731
    # top-2 = (1: 0.5, 2: 0.3) renormalised to (0.625, 0.375)
    assert [pick(u) for u in (0.0, 0.6, 0.63, 0.999)] == [1, 1, 2, 2]
    draws = sample_top_k(logits.expand(1000, 4), torch.linspace(0, 1 - 1e-9, 1000, dtype=torch.float64), 2)
    assert set(draws.tolist()) == {1, 2} and (draws == 1).float().mean().item() == pytest.approx(0.625, abs=2e-3)


# ------------------------------------------------------------------------------------------
def _df(phase="post"):
    return pd.DataFrame(
        {
            "case_id": [0, 1, 2, 3],
            "phase": phase,
            "efficacy_score": [1.0, 1.0, 0.0, 1.0],
            "paraphrase_score": [0.5, 1.0, 0.0, 0.5],
            "neighborhood_score": [1.0, 0.5, 0.5, 1.0],
            "fluency": [6.0, 6.2, 5.8, 6.0],
            "consistency": [np.nan] * 4,
            "neighborhood_prefers_true": [(True,)] * 4,
        }
    )


def test_summarize_means_score_and_normal_ci():
    s = summarize(_df(), ci="normal")
    assert len(s) == 1 and s.loc[0, "phase"] == "post" and s.loc[0, "n_records"] == 4
    assert s.loc[0, "efficacy_score"] == pytest.approx(75.0) and s.loc[0, "fluency"] == pytest.approx(600.0)
    assert s.loc[0, "score"] == pytest.approx(100 * 3 / (1 / 0.75 + 1 / 0.5 + 1 / 0.75))
    half = NormalDist().inv_cdf(0.975) * 0.5 / 2 * 100  # sd of (1, 1, 0, 1) is 0.5
    assert s.loc[0, "efficacy_score_ci_low"] == pytest.approx(75 - half)
    assert 75 + half > 100 and s.loc[0, "efficacy_score_ci_high"] == 100.0  # a rate's interval stays in [0, 100]
    f_half = NormalDist().inv_cdf(0.975) * float(np.std([6.0, 6.2, 5.8, 6.0], ddof=1)) / 2 * 100
    assert s.loc[0, "fluency_ci_low"] == pytest.approx(600 - f_half)  # not a rate: no clipping
    assert s.loc[0, "score_ci_low"] <= s.loc[0, "score"] <= s.loc[0, "score_ci_high"]
    # no reference files: consistency stays missing, never 0
    assert np.isnan(s.loc[0, "consistency"]) and np.isnan(s.loc[0, "consistency_ci_low"])
    assert "neighborhood_prefers_true" not in s.columns


def test_summarize_groups_bootstrap_and_errors():
    both = pd.concat([_df("pre"), _df("post").assign(efficacy_score=1.0)], ignore_index=True)
    s = summarize(both, ci="bootstrap", seed=1)
    assert list(s.phase) == ["pre", "post"] and list(s.efficacy_score) == [75.0, 100.0]
    s2 = summarize(both, ci="bootstrap", seed=1)
    pd.testing.assert_frame_equal(s, s2)
    lo, hi = s.loc[0, "paraphrase_score_ci_low"], s.loc[0, "paraphrase_score_ci_high"]
    assert 0 <= lo <= 50 <= hi <= 100
    assert summarize(both, by=()).loc[0, "n_records"] == 8
    with pytest.raises(KeyError, match="by=()"):
        summarize(_df().drop(columns="phase"))
    assert harmonic_mean([1.0, 0.0]) == 0.0 and math.isnan(harmonic_mean([1.0, float("nan")]))


def test_relative_specificity():
    pre = pd.DataFrame({"case_id": [0, 1], "neighborhood_prefers_true": [(True, False, True), (True, True)]})
    post = pd.DataFrame({"case_id": [1, 0], "neighborhood_prefers_true": [(True, True), (True, True, True)]})
    r = relative_specificity(pre, post)
    assert list(r.case_id) == [1, 0] and r.relative_specificity.tolist() == pytest.approx([1.0, 2 / 3])
    z = relative_specificity(
        pd.DataFrame({"case_id": [0], "neighborhood_pred": [(5, 6)]}),
        pd.DataFrame({"case_id": [0], "neighborhood_pred": [(5, 7)]}),
    )
    assert z.relative_specificity.tolist() == [0.5]
    merged = post.merge(r, on="case_id").assign(phase="post")
    assert summarize(merged).loc[0, "relative_specificity"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    with pytest.raises(KeyError, match="not in pre_df"):
        relative_specificity(pre.iloc[:1], post)


# ------------------------------------------------------------------------------------------
# A tiny random LLaMA with the real SmolLM2 tokenizer: padding and batching invariance.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from pmetlab.models.loading import _EMBEDDED, ModelLoadError, _converted_dir

    try:
        path = _converted_dir(_EMBEDDED["smollm2-135m"])
    except ModelLoadError as exc:
        pytest.skip(f"the SmolLM2 tokenizer is unavailable: {exc}")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def tiny(smol_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smol_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.5,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval(), smol_tok


PROMPTS = [
    "The capital of France is",
    "Danielle Darrieux spoke",
    "A",
    "The mother tongue of Léon Blum is",
    "nq question: who wrote the iliad?",
]
CANDS = ["Paris", "English", "New York City", "French", "Homer"]


def _assert_same_scores(a, b, atol=2e-5):
    np.testing.assert_allclose(a.nll, b.nll, atol=atol, rtol=0)
    assert a.n_tokens.tolist() == b.n_tokens.tolist()
    for x, y in zip(a.token_pred, b.token_pred):
        assert x.tolist() == y.tolist()
    for x, y in zip(a.token_correct, b.token_correct):
        assert x.tolist() == y.tolist()


def test_scoring_padding_side_batch_size_and_reference_agree(tiny):
    model, tok = tiny
    prompts, cands = PROMPTS * 2, CANDS + CANDS[::-1]
    ref = score_pairs_reference(model, tok, prompts, cands)
    assert ref.n_tokens.tolist()[2] > 1  # a multi-token candidate is in the mix
    for side in ("right", "left"):
        for bs in (1, 3, 32):
            _assert_same_scores(score_pairs(model, tok, prompts, cands, batch_size=bs, padding_side=side), ref)
    # duplicates are scored once and come back in input order
    dup = score_pairs(model, tok, [PROMPTS[0]] * 3, ["Paris", "Rome", "Paris"])
    assert dup.nll[0] == dup.nll[2] and dup.nll[0] != dup.nll[1]
    # the correctness flags are the model's top-1 against the candidate's tokens
    from pmetlab.tokens import encode_prompt_target

    for pred, corr, p, c in zip(ref.token_pred, ref.token_correct, prompts, cands):
        assert corr.tolist() == [x == t for x, t in zip(pred.tolist(), encode_prompt_target(tok, p, c)[1])]


def test_generation_independent_of_batching_and_global_rng(tiny):
    model, tok = tiny
    seeds = [11, 12, 13, 14, 15]
    state = torch.get_rng_state()
    together = generate_ids(model, tok, PROMPTS, seeds=seeds, n_new_tokens=6, batch_size=5)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert all(len(x) == 6 for x in together)
    assert generate_ids(model, tok, PROMPTS, seeds=seeds, n_new_tokens=6, batch_size=2) == together
    alone = [generate_ids(model, tok, [p], seeds=[s], n_new_tokens=6, batch_size=1)[0] for p, s in zip(PROMPTS, seeds)]
    assert alone == together
    assert generate_ids(model, tok, PROMPTS, seeds=[s + 100 for s in seeds], n_new_tokens=6) != together
    texts = generate_texts(model, tok, PROMPTS[:2], seeds=seeds[:2], n_new_tokens=6)
    assert texts[0].startswith("The capital of France is") and len(texts[0]) > len(PROMPTS[0])


CF_RECORDS = [
    cf_record(
        0,
        "Danielle Darrieux",
        "English",
        "French",
        ["Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
        ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
        ["Danielle Darrieux's mother tongue is", "Danielle Darrieux was born in"],
        "P103",
        "Q1860",
    ),
    cf_record(
        1,
        "Autonomous University of Madrid",
        "Sweden",
        "Spain",
        ["Autonomous University of Madrid is located in"],
        ["Biscay is located in the country of"],
        ["Autonomous University of Madrid is in"],
        "P17",
        "Q34",
    ),
]
for _r, _p in zip(CF_RECORDS, ["The mother tongue of {} is", "{}, which is located in"]):
    _r["requested_rewrite"]["prompt"] = _p


def test_counterfact_batched_equals_reference_with_generation(tiny):
    model, tok = tiny
    ref_obj = ConsistencyReference(
        snippets={"P103": {"Q1860": [{"name": "X", "text": "His mother tongue is English."}]}},
        idf=np.array([1.0, 2.0, 1.5]),
        vocab={"mother": 0, "tongue": 1, "english": 2},
    )
    kw = dict(generation=True, n_gen_tokens=4, seed=3, reference=ref_obj, keep_texts=True, progress=False)
    a = evaluate_counterfact(model, tok, CF_RECORDS, batch_size=5, gen_batch_size=2, **kw)
    b = evaluate_counterfact_reference(model, tok, CF_RECORDS, **kw)
    assert list(a.columns) == list(b.columns)
    num = [c for c in a.columns if a[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(a[num], b[num], atol=1e-5, rtol=0)
    assert list(a.gen_texts) == list(b.gen_texts) and list(a.neighborhood_prefers_true) == list(
        b.neighborhood_prefers_true
    )
    for c in ("efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_token_acc"):
        assert a[c].between(0, 1).all()
    assert (a.fluency > 0).all()
    assert 0 <= a.consistency[0] <= 1 and np.isnan(a.consistency[1])  # no snippets for (P17, Q34)
    # the same seed gives the same texts; generation is off -> fluency is missing, not 0
    again = evaluate_counterfact(model, tok, CF_RECORDS, **kw)
    assert list(again.gen_texts) == list(a.gen_texts)
    off = evaluate_counterfact(model, tok, CF_RECORDS, generation=False, progress=False)
    assert off.fluency.isna().all() and off.consistency.isna().all()
    pd.testing.assert_frame_equal(off[num[:9]], a[num[:9]], atol=1e-5, rtol=0)


def test_zsre_batched_equals_reference(tiny):
    model, tok = tiny
    recs = [
        {
            "subject": "IAAF Combined Events Challenge",
            "src": "When was the inception of IAAF Combined Events Challenge?",
            "rephrase": "When was the IAAF Combined Events Challenge launched?",
            "answers": ["1998"],
            "loc": "nq question: what is the name of the last episode of spongebob",
            "loc_ans": "The String",
            "case_id": 0,
        },
        {
            "subject": "Lahti Town Hall",
            "src": "Who was the architect of Lahti Town Hall?",
            "rephrase": "Who designed Lahti Town Hall?",
            "answers": ["Eliel Saarinen"],
            "loc": "nq question: where is the world cup being held",
            "loc_ans": "Russia",
            "case_id": 1,
        },
    ]
    a = evaluate_zsre(model, tok, recs, batch_size=4, progress=False)
    b = evaluate_zsre_reference(model, tok, recs, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert relative_specificity(a, b).relative_specificity.tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smollm2_counterfact_and_zsre():
    import os
    from pathlib import Path

    from pmetlab import datasets as ds
    from pmetlab import load_model

    shared = os.environ.get(ds.DATA_DIR_ENV) or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    if not Path(shared, "counterfact", "counterfact_filtered.json").is_file():
        pytest.skip("shared evaluation data absent; set PMETLAB_DATA_DIR")
    cf = ds.load_counterfact(Path(shared, "counterfact", "counterfact_filtered.json"))
    zs = ds.load_zsre(Path(shared, "zsre", "zsre_mend_eval_portability_gpt4.json"))
    model, tok = load_model("smollm2-135m", device="cpu")
    recs = ds.select(cf, 5).records
    kw = dict(generation=True, n_gen_tokens=4, seed=0, keep_texts=True, progress=False)
    a = evaluate_counterfact(model, tok, recs, batch_size=32, **kw)
    # a record's row does not depend on the others, so the (slow) reference runs on three of them
    b = evaluate_counterfact_reference(model, tok, recs[:3], **kw)
    num = [c for c in a.columns if a[c].dtype.kind == "f" and c != "consistency"]
    pd.testing.assert_frame_equal(a[num].iloc[:3], b[num], atol=1e-4, rtol=0)
    assert list(a.gen_texts[:3]) == list(b.gen_texts)
    assert list(a.orig_case_id) == [r["orig_case_id"] for r in recs]
    for c in (
        "efficacy_score",
        "paraphrase_score",
        "neighborhood_score",
        "efficacy_token_acc",
        "paraphrase_token_acc",
        "neighborhood_token_acc",
    ):
        assert a[c].between(0, 1).all(), c
    for c in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude"):
        assert a[c].between(-1, 1).all(), c
    # an unedited model prefers the true object on most neighborhood prompts
    assert a.neighborhood_score.mean() > 0.5
    assert a.fluency.between(0.5, 10).all() and a.consistency.isna().all()
    s = summarize(a.assign(phase="pre"))
    assert 0 <= s.loc[0, "score"] <= 100
    za = evaluate_zsre(model, tok, zs[:5], progress=False)
    zb = evaluate_zsre_reference(model, tok, zs[:5], progress=False)
    pd.testing.assert_frame_equal(
        za.drop(columns="neighborhood_pred"), zb.drop(columns="neighborhood_pred"), atol=1e-6, rtol=0
    )
    assert (za.efficacy_token_acc.between(0, 1)).all() and len(za) == 5


# ------------------------------------------------------------------------------------------
# Sequence length against the model's context; generation progress counts tokens
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_context_length_is_read_from_every_tiny_config(family):
    model = make_tiny_model(family)
    assert context_length(model) == context_length(model.config) == TINY_MAX_POS


def test_context_length_from_other_attribute_names_or_none():
    assert context_length(types.SimpleNamespace(seq_length=4096)) == 4096  # ChatGLM/Qwen-1 style
    assert context_length(types.SimpleNamespace(n_ctx=512, max_position_embeddings=None)) == 512
    assert context_length(types.SimpleNamespace(max_position_embeddings=True)) is None  # not a length
    assert context_length(nn.Linear(2, 2)) is None  # no config: the checks are skipped
    check_context_length(nn.Linear(2, 2), [10**6], what="x", fix="y")


def _tiny_llama_and_words():
    words = [w for w in _TOKENIZER_WORDS if w.isalpha()]
    return make_tiny_model("LlamaForCausalLM"), make_tiny_tokenizer(), words


def test_scoring_refuses_a_pair_longer_than_the_context():
    model, tok, words = _tiny_llama_and_words()
    long_prompt = " ".join(words[:70])
    for score in (score_pairs, score_pairs_reference):
        with pytest.raises(
            ValueError, match=r"prompt \+ target \('the a an .*\+ 'jazz'\) is 7\d tokens, more than the 64"
        ):
            score(model, tok, ["the city is", long_prompt], ["paris", "jazz"])
    assert len(score_pairs(model, tok, [" ".join(words[:60])], ["jazz"])) == 1  # 61 + BOS fits


def test_generation_refuses_more_tokens_than_the_context():
    model, tok, _ = _tiny_llama_and_words()
    with pytest.raises(ValueError, match=r"n_new_tokens=20000 is 20003 tokens.*64 positions LlamaForCausalLM") as ei:
        generate_ids(model, tok, ["the city is"], seeds=[0], n_new_tokens=20000)
    assert "use n_new_tokens <= 61 (--n-gen-tokens)" in str(ei.value)
    assert len(generate_ids(model, tok, ["the city is"], seeds=[0], n_new_tokens=61)[0]) == 61
    with pytest.raises(TypeError, match="n_new_tokens must be an int, got str: '100'"):
        check_generation_length(model, [4], "100")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_new_tokens must be >= 1"):
        check_generation_length(model, 4, 0)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        generate_ids(model, tok, ["the city is"], seeds=[0], top_k=0)


def test_long_generation_warns_with_its_cost(caplog):
    config = types.SimpleNamespace(max_position_embeddings=100_000)
    with caplog.at_level("WARNING", logger="pmetlab.evaluation.generation"):
        check_generation_length(config, [10, 20], 100)
        assert not caplog.records
        check_generation_length(config, [10, 20], 20_000)
    assert "generating 20000 tokens per prompt" in caplog.text and "200x" in caplog.text


def test_generation_progress_counts_tokens(monkeypatch):
    import pmetlab.evaluation.generation as gen_mod

    bars = []

    class Bar:
        def __init__(self, *args, total=None, unit=None, **kwargs):
            self.total, self.unit, self.updates, self.postfix = total, unit, [], []
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def set_postfix(self, **kw):
            self.postfix.append(kw)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(gen_mod, "tqdm", Bar)
    model, tok, _ = _tiny_llama_and_words()
    generate_ids(model, tok, ["the city is", "a king", "paris"], seeds=[0, 1, 2], n_new_tokens=7, batch_size=2)
    (bar,) = bars
    assert bar.unit == "tok" and bar.total == 3 * 7
    assert bar.updates == [2] * 7 + [1] * 7  # one step per new token of each batch
    assert [p["batch"] for p in bar.postfix] == ["1/2", "2/2"]
