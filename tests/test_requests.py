"""Edit requests: validation messages, dataset builders, and requests the tokenizer cannot place."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pmetlab import EditRequest, PMETHyperParams, compute_deltas
from pmetlab.editing.compute import validate_requests
from pmetlab.requests import conflict_free_batches, find_conflicts
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

CF_RECORD = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "{} plays the sport of",
        "subject": "Danny Miles",
        "relation_id": "P641",
        "target_new": {"str": "jazz", "id": "Q1"},
        "target_true": {"str": "football", "id": "Q2"},
    },
    "paraphrase_prompts": ["x"],
    "neighborhood_prompts": ["y"],
}
ZSRE_RECORD = {
    "subject": "Danny Miles",
    "src": "What sport does Danny Miles play?",
    "rephrase": "r",
    "answers": ["jazz", "football"],
    "alt": "baseball",
    "loc": "nq question: who",
    "loc_ans": "x",
    "case_id": 3,
}


def test_valid_request_and_text():
    r = EditRequest(prompt="{} plays the sport of", subject="Danny Miles", target_new="jazz")
    assert r.text == "Danny Miles plays the sport of"
    assert EditRequest.from_dict(r.to_dict()) == r
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.subject = "x"  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("prompt, n", [("plays the sport of", 0), ("{} and {} play", 2), ("{}{}", 2)])
def test_prompt_must_have_exactly_one_placeholder(prompt, n):
    with pytest.raises(ValueError, match=rf"exactly one '{{}}'.*found {n}") as ei:
        EditRequest(prompt=prompt, subject="Danny", target_new="jazz")
    assert repr(prompt) in str(ei.value)  # says what it received


@pytest.mark.parametrize(
    "prompt", ["{} plays {the} sport", "{} plays }", "{ {} plays", "{{}} plays {}", "{0} plays", "{x} {} plays"]
)
def test_stray_braces_are_rejected(prompt):
    with pytest.raises(ValueError, match="prompt"):
        EditRequest(prompt=prompt, subject="Danny", target_new="jazz")


@pytest.mark.parametrize("field", ["prompt", "subject", "target_new"])
@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_empty_fields_name_the_field(field, value):
    kw = dict(prompt="{} plays", subject="Danny", target_new="jazz")
    kw[field] = value
    with pytest.raises(ValueError, match=f"EditRequest.{field} must be non-empty"):
        EditRequest(**kw)


@pytest.mark.parametrize("field", ["prompt", "subject", "target_new", "target_true"])
@pytest.mark.parametrize("value", [3, b"jazz", ["jazz"], {"str": "jazz"}])
def test_non_strings_name_the_field_and_type(field, value):
    kw = dict(prompt="{} plays", subject="Danny", target_new="jazz")
    kw[field] = value
    with pytest.raises(TypeError, match=f"EditRequest.{field} must be a string") as ei:
        EditRequest(**kw)
    assert type(value).__name__ in str(ei.value)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(KeyError, match="relation"):
        EditRequest.from_dict({"prompt": "{} x", "subject": "a", "target_new": "b", "relation": "P1"})


def test_from_counterfact():
    r = EditRequest.from_counterfact(CF_RECORD)
    assert r == EditRequest(
        prompt="{} plays the sport of", subject="Danny Miles", target_new="jazz", target_true="football", case_id=7
    )


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("requested_rewrite"),
        lambda d: d["requested_rewrite"].pop("subject"),
        lambda d: d["requested_rewrite"]["target_new"].pop("str"),
        lambda d: d["requested_rewrite"].__setitem__("target_true", "football"),  # a string, not {str}
    ],
    ids=["no-rewrite", "no-subject", "no-target-str", "flat-target"],
)
def test_from_counterfact_bad_records(mutate):
    rec = copy.deepcopy(CF_RECORD)
    mutate(rec)
    with pytest.raises(KeyError, match="not a CounterFact record"):
        EditRequest.from_counterfact(rec)


def test_from_counterfact_bad_field_keeps_field_message():
    rec = copy.deepcopy(CF_RECORD)
    rec["requested_rewrite"]["target_new"]["str"] = 5
    with pytest.raises(TypeError, match="EditRequest.target_new must be a string"):
        EditRequest.from_counterfact(rec)
    rec = copy.deepcopy(CF_RECORD)
    rec["requested_rewrite"]["prompt"] = "The sport of Danny Miles"  # no {}
    with pytest.raises(ValueError, match="exactly one"):
        EditRequest.from_counterfact(rec)
    with pytest.raises(KeyError, match="not a CounterFact record"):
        EditRequest.from_counterfact(["not", "a", "dict"])  # type: ignore[arg-type]


def test_from_zsre():
    r = EditRequest.from_zsre(ZSRE_RECORD)
    assert r == EditRequest(
        prompt="What sport does {} play?", subject="Danny Miles", target_new="jazz", target_true=None, case_id=3
    )


def test_from_zsre_bad_records():
    for missing in ("subject", "src", "answers"):
        rec = {k: v for k, v in ZSRE_RECORD.items() if k != missing}
        with pytest.raises(KeyError, match=missing):
            EditRequest.from_zsre(rec)
    with pytest.raises(ValueError, match="does not occur"):
        EditRequest.from_zsre({**ZSRE_RECORD, "subject": "Miles Davis"})
    with pytest.raises(ValueError, match="no answers"):
        EditRequest.from_zsre({**ZSRE_RECORD, "answers": []})
    with pytest.raises(TypeError, match="answers must be a list"):  # not the first character "j"
        EditRequest.from_zsre({**ZSRE_RECORD, "answers": "jazz"})
    with pytest.raises(TypeError, match="src must be a string"):
        EditRequest.from_zsre({**ZSRE_RECORD, "src": None})
    with pytest.raises(ValueError, match="subject must be non-empty"):
        EditRequest.from_zsre({**ZSRE_RECORD, "subject": ""})
    with pytest.raises(ValueError, match="target_new must be non-empty"):
        EditRequest.from_zsre({**ZSRE_RECORD, "answers": [" "]})


# --- requests the tokenizer cannot place ------------------------------------------------------


def _dropping_tokenizer():
    """The tiny word tokenizer, but its normaliser deletes '@': an all-'@' subject or target
    vanishes from the token sequence although the request itself is well formed."""
    from tokenizers import normalizers

    tok = make_tiny_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("@", ""), normalizers.Lowercase()])
    return tok


GOOD = EditRequest(prompt="{} plays the sport of", subject="danny miles", target_new="jazz")


def test_validate_requests_names_the_bad_request():
    tok = _dropping_tokenizer()
    bad = EditRequest(prompt="{} plays the sport of", subject="@@@", target_new="jazz")
    with pytest.raises(ValueError, match=r"request 1 \('@@@' -> 'jazz'\).*subject '@@@' not found"):
        validate_requests(tok, [GOOD, bad])
    bad_t = EditRequest(prompt="{} plays the sport of", subject="danny", target_new="@@")
    with pytest.raises(ValueError, match=r"request 0 .*tokenizes to nothing"):
        validate_requests(tok, [bad_t])
    with pytest.raises(ValueError, match="no edit requests"):
        validate_requests(tok, [])
    with pytest.raises(TypeError, match="request 0 is a dict"):
        validate_requests(tok, [GOOD.to_dict()])
    assert validate_requests(tok, GOOD) == [GOOD]  # a single request is accepted


def test_compute_deltas_refuses_unplaceable_subject_and_leaves_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path))
    tok = _dropping_tokenizer()
    model = make_tiny_model("LlamaForCausalLM")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = EditRequest(prompt="{} plays the sport of", subject="@@@", target_new="jazz")
    hp = PMETHyperParams(layers=(0, 1), cov_corpus=str(tmp_path / "absent.txt"))  # never reached
    with pytest.raises(ValueError, match=r"request 1 \('@@@' -> 'jazz'\)"):
        compute_deltas(model, tok, [GOOD, bad], hp, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not any(tmp_path.iterdir())  # failed before any cache was written


# --- degenerate requests: the current answer as target, two targets for one fact ---------------


@pytest.mark.parametrize(
    "new, true", [("jazz", "jazz"), ("Jazz", " jazz"), ("New  York", "new york\t"), ("É", "é"), ("Cafe\u0301", "café")]
)
def test_target_equal_to_the_current_object_is_refused(new, true):
    with pytest.raises(ValueError, match=r"target_new .* is the current object target_true") as ei:
        EditRequest(prompt="{} plays", subject="Danny", target_new=new, target_true=true)
    assert repr(new) in str(ei.value) and repr(true) in str(ei.value) and "choose a different" in str(ei.value)
    rec = copy.deepcopy(CF_RECORD)
    rec["requested_rewrite"]["target_true"]["str"] = rec["requested_rewrite"]["target_new"]["str"]
    with pytest.raises(ValueError, match="is the current object"):
        EditRequest.from_counterfact(rec)
    assert EditRequest(prompt="{} plays", subject="Danny", target_new="jazz", target_true="jazz band").target_true


@pytest.mark.parametrize("true", ["", "  "])
def test_blank_target_true_is_refused(true):
    with pytest.raises(ValueError, match="target_true must be non-empty or None"):
        EditRequest(prompt="{} plays", subject="Danny", target_new="jazz", target_true=true)


def _req(subject: str, target: str, prompt: str = "{} plays the sport of") -> EditRequest:
    return EditRequest(prompt=prompt, subject=subject, target_new=target)


def test_find_conflicts_ignores_case_spacing_and_duplicates():
    reqs = [
        _req("danny miles", "jazz"),
        _req("france", "rome", "the capital of {} is"),
        _req("Danny  Miles", " JAZZ"),  # the same fact and target: a duplicate, no conflict
        _req("danny miles", "football"),
        _req("danny miles", "golf", "{} is good at"),  # another prompt: another fact
        _req("DANNY MILES", "baseball"),
    ]
    assert find_conflicts(reqs) == [(0, 3), (0, 5)]
    batches = conflict_free_batches(reqs)
    assert batches == [[reqs[0], reqs[1], reqs[2], reqs[4]], [reqs[3]], [reqs[5]]]
    assert all(find_conflicts(b) == [] for b in batches)
    assert conflict_free_batches(reqs[:3]) == [reqs[:3]]


def test_validate_requests_refuses_two_targets_for_one_fact():
    tok = make_tiny_tokenizer()
    reqs = [GOOD, _req("france", "rome", "the capital of {} is"), _req("Danny Miles", "football")]
    with pytest.raises(ValueError, match=r"requests 0 and 2 ask for different objects") as ei:
        validate_requests(tok, reqs)
    msg = str(ei.value)
    assert "'jazz'" in msg and "'football'" in msg and "average" in msg
    assert "conflict_free_batches" in msg and "2 conflict-free batches" in msg and "drop_conflicting" in msg
    assert validate_requests(tok, [GOOD, GOOD]) == [GOOD, GOOD]  # an exact duplicate is accepted


def test_compute_deltas_refuses_conflicts_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path))
    model, tok = make_tiny_model("LlamaForCausalLM"), make_tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = PMETHyperParams(layers=(0, 1), cov_corpus=str(tmp_path / "absent.txt"))  # never reached
    with pytest.raises(ValueError, match="requests 0 and 1 ask for different objects"):
        compute_deltas(model, tok, [GOOD, _req("danny miles", "football")], hp, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(tmp_path.iterdir())


# --- subjects and targets that cannot work: normalised or refused with one line -----------------


def test_surrounding_spaces_are_normalised_keeping_the_rendered_text():
    r = EditRequest(prompt="The capital of{} is", subject=" France ", target_new="  Rome ", target_true=" Paris")
    assert (r.subject, r.target_new, r.target_true) == ("France", "Rome", "Paris")
    assert r.prompt == "The capital of {}  is" and r.text == "The capital of France  is"  # as written
    tok = make_tiny_tokenizer()
    from pmetlab.tokens import subject_last_index

    ids = tok(r.text)["input_ids"]
    last = tok.convert_ids_to_tokens(ids[subject_last_index(tok, r.prompt, r.subject)])
    assert last.strip("Ġ▁ ") == "france"  # the subject's own token, not a space


@pytest.mark.parametrize(
    "field, value, char",
    [
        ("subject", "Dan\u200bny", "U+200B ZERO WIDTH SPACE at position 3"),
        ("target_new", "ja\x00zz", "U+0000"),
        ("target_true", "foot\u2060ball", "U+2060 WORD JOINER"),
        ("prompt", "{} plays\x1b the", "U+001B"),
        ("subject", "Danny\nMiles", "U+000A"),
    ],
)
def test_invisible_characters_are_refused_naming_field_and_character(field, value, char):
    kw = dict(prompt="{} plays the sport of", subject="Danny", target_new="jazz", target_true="football")
    with pytest.raises(ValueError, match=f"EditRequest.{field} contains an invisible character") as ei:
        EditRequest(**{**kw, field: value})
    assert char in str(ei.value) and "\n" not in str(ei.value)
    assert EditRequest(**{**kw, "prompt": "Context.\n{} plays\tthe sport of"})  # a line break in a prompt is text


def test_text_that_tokenizes_to_special_tokens_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path))
    tok = make_tiny_tokenizer()
    model = make_tiny_model("LlamaForCausalLM")
    hp = PMETHyperParams(layers=(0, 1), cov_corpus=str(tmp_path / "absent.txt"))  # never reached
    for bad, what in (
        (EditRequest(prompt="{} plays the sport of", subject="danny </s>", target_new="jazz"), "prompt"),
        (EditRequest(prompt="{} plays the sport of", subject="danny", target_new="</s>"), "target"),
    ):
        with pytest.raises(ValueError, match=rf"request 1 .*{what} .* special token\(s\) \['</s>'\]"):
            compute_deltas(model, tok, [GOOD, bad], hp, progress=False)
    assert not any(tmp_path.iterdir())


def test_zsre_subject_found_only_inside_a_word_is_refused():
    rec = dict(ZSRE_RECORD, subject="Dan", src="Which sport does Danny Dan play?")
    assert EditRequest.from_zsre(rec).prompt == "Which sport does Danny {} play?"  # the whole word, not "Danny"
    with pytest.raises(ValueError, match=r"subject 'Dan' occurs in question .* only inside a longer word"):
        EditRequest.from_zsre(dict(ZSRE_RECORD, subject="Dan"))
    spaced = EditRequest.from_zsre(dict(ZSRE_RECORD, subject=" Danny Miles "))
    assert spaced.subject == "Danny Miles" and spaced.text == ZSRE_RECORD["src"]
