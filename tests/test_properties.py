"""Property-based tests (hypothesis) of the input surfaces: whatever a user passes as edit
requests, hyperparameter overrides or command-line arguments, pmetlab either answers with a clear
error of a documented type or a valid result, and a model is never changed by a failure.

Deterministic (``derandomize=True``, no example database) and bounded in time: the tiny model
and small settings keep every ``compute_deltas`` call well under a second."""

from __future__ import annotations

import dataclasses
import logging
import random
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pmetlab import EditRequest, PMETHyperParams, compute_deltas
from pmetlab.editing.deltas import Deltas
from pmetlab.hparams import hparams_from_dict
from pmetlab.requests import conflict_free_batches, find_conflicts
from tests.tiny_models import _TOKENIZER_WORDS, make_tiny_model, make_tiny_tokenizer

#: The error types the style guide documents for bad input.
CLEAR = (ValueError, KeyError, TypeError, LookupError)

SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- a tiny model, its corpus and a cache directory shared by the examples ------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("properties")
    rng = random.Random(0)
    words = [w for w in _TOKENIZER_WORDS if w.isalpha()]
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"<doc>\n{' '.join(rng.choice(words) for _ in range(60))}\n</doc>\n" for _ in range(8)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PMETLAB_CACHE_DIR", str(tmp / "cache"))
        model = make_tiny_model("LlamaForCausalLM", initializer_range=0.2)
        yield model, make_tiny_tokenizer(), str(corpus)


def _base(corpus: str) -> dict:
    """Small settings: each edit optimises 3 steps over 2 rows per request."""
    return dict(
        layers=(0, 1),
        cov_corpus=corpus,
        cov_tokens=400,
        cov_seq_len=32,
        n_prefixes=1,
        prefix_tokens=3,
        v_num_grad_steps=3,
        mom2_update_weight=1.0,
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, state) -> None:
    now = model.state_dict()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"the model changed: {changed}"


def _message(exc: BaseException) -> str:
    """The message as a user reads it (a KeyError's str() is the repr of its message)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _assert_clear(exc: BaseException) -> None:
    assert isinstance(exc, CLEAR), f"{type(exc).__name__} is not a documented error type: {exc}"
    assert _message(exc).strip(), f"{type(exc).__name__} with an empty message"


def _edit(model, tok, requests, hp) -> None:
    """compute_deltas: a valid result or a clear error, the model bit-identical either way."""
    state = _state(model)
    try:
        d = compute_deltas(model, tok, requests, hp, progress=False)
    except Exception as exc:  # noqa: BLE001  (the property is about which exceptions come out)
        _assert_clear(exc)
        event(f"compute_deltas: {type(exc).__name__}")
    else:
        assert isinstance(d, Deltas) and all(torch.isfinite(t).all() for t in d.tensors.values())
        event("compute_deltas: an edit")
    _assert_same(model, state)


# --- edit requests ---------------------------------------------------------------------------

#: Text the tiny tokenizer knows (a valid edit is likely) and text that tests the validation.
WORDS = st.sampled_from(["danny miles", "jazz", "paris", "the city of", "plays the sport of", "JAZZ", "Danny  Miles"])
PIECES = st.sampled_from(
    ["{}", "{", "}", "{0}", "{{}}", "", " ", "\t\n", "é", "Cafe\u0301", "北京", "🙂", "\u200b", "danny miles"]
)
TEXT = st.one_of(st.text(max_size=10), PIECES, st.lists(st.one_of(WORDS, PIECES), min_size=1, max_size=4).map(" ".join))
BAD = st.one_of(TEXT, st.sampled_from([None, 3, 2.5, b"jazz", ["jazz"], {"str": "jazz"}]))
#: A request of known words (target_true sometimes), then at most one field replaced by random input.
WELL_FORMED = st.fixed_dictionaries(
    {"prompt": st.builds("{} {{}} {}".format, WORDS, WORDS), "subject": WORDS, "target_new": WORDS},
    optional={"target_true": WORDS, "case_id": st.one_of(st.integers(), st.text(max_size=3))},
)
MUTATION = st.one_of(
    st.none(), st.tuples(st.sampled_from(["prompt", "subject", "target_new", "target_true"]), st.one_of(BAD, TEXT))
)
REQUEST = st.builds(lambda kw, m: {**kw, **({m[0]: m[1]} if m else {})}, WELL_FORMED, MUTATION)


def _build_requests(kwargs_list: list[dict]) -> list[EditRequest] | None:
    """The requests, or None when one of them is refused (with a clear error)."""
    out = []
    for kw in kwargs_list:
        try:
            out.append(EditRequest(**kw))
        except Exception as exc:  # noqa: BLE001
            _assert_clear(exc)
            assert "EditRequest." in _message(exc), f"{exc!r} does not name the field"
            event(f"EditRequest: {type(exc).__name__}")
            return None
    return out


@settings(max_examples=60, **SETTINGS)
@given(st.lists(REQUEST, min_size=1, max_size=3))
def test_random_requests_give_a_clear_error_or_an_edit_and_never_change_the_model(tiny, kwargs_list):
    model, tok, corpus = tiny
    requests = _build_requests(kwargs_list)
    if requests is None:
        return
    for r in requests:  # a valid request is well formed and round-trips
        assert r.prompt.count("{}") == 1 and r.subject.strip() and r.target_new.strip()
        assert EditRequest.from_dict(r.to_dict()) == r
    batches = conflict_free_batches(requests)
    assert sum(len(b) for b in batches) == len(requests) and all(not find_conflicts(b) for b in batches)
    _edit(model, tok, requests, PMETHyperParams(**_base(corpus)))


# --- hyperparameter overrides ----------------------------------------------------------------

FIELDS = [f.name for f in dataclasses.fields(PMETHyperParams)]
KEYS = st.one_of(
    st.sampled_from([k for k in FIELDS if k != "cov_corpus"]),
    st.sampled_from(["bogus", "Layers", "v_lr ", "method", ""]),
    st.text(max_size=6),
)
VALUES = st.one_of(
    st.integers(-2, 6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-10, 10),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.sampled_from(["loss", "pmet", "attn_first", "simultaneous", "float32", "float64", "3-5", "[0, 1]"]),
    st.lists(st.integers(-2, 4), max_size=4),
    st.lists(st.text(max_size=3), max_size=2),
    st.tuples(st.integers(-2, 4), st.integers(-2, 4)),
)
#: Per field, values that often pass (so that edits run) besides the random ones.
PLAUSIBLE = {
    "layers": st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True).map(sorted),
    "v_num_grad_steps": st.integers(1, 4),
    "n_prefixes": st.integers(0, 2),
    "prefix_tokens": st.integers(1, 4),
    "optimize_attn": st.booleans(),
    "update_attn_weights": st.booleans(),
    "stop_rule": st.sampled_from(["loss", "pmet"]),
    "attn_update_order": st.sampled_from(["attn_first", "simultaneous"]),
    "cov_tokens": st.integers(100, 500),
    "cov_seq_len": st.integers(16, 40),
    "cov_dtype": st.sampled_from(["float32", "float64"]),
    "seed": st.integers(0, 3),
    "prefix_starts": st.lists(WORDS, min_size=1, max_size=2),
}
for _name in ("v_lr", "clamp_norm_factor", "kl_factor", "v_weight_decay", "mom2_update_weight", "spread_exponent"):
    PLAUSIBLE[_name] = st.floats(0.01, 3)
for _name in ("loss_stop", "kl_stop", "argmax_nll_scale"):
    PLAUSIBLE[_name] = st.floats(0, 1)
SOME_PLAUSIBLE = st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=3, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: PLAUSIBLE[k] for k in keys})
)
OVERRIDES = st.one_of(
    st.dictionaries(KEYS, VALUES, max_size=2),
    SOME_PLAUSIBLE,
    st.builds(lambda d, k, v: {**d, k: v}, SOME_PLAUSIBLE, KEYS, VALUES),
)


@settings(max_examples=80, **SETTINGS)
@given(OVERRIDES, st.sampled_from(["replace", "from_dict"]))
def test_random_hparam_overrides_give_a_clear_error_or_an_edit(tiny, overrides, how):
    model, tok, corpus = tiny
    base = PMETHyperParams(**_base(corpus))
    try:
        if how == "replace":
            hp = base.replace(**overrides)
        else:
            hp = hparams_from_dict({**base.to_dict(), **overrides})
    except Exception as exc:  # noqa: BLE001
        _assert_clear(exc)
        named = [k for k in overrides if str(k) in _message(exc) or repr(k) in _message(exc)]
        assert named, f"{exc!r} names none of {sorted(overrides, key=repr)}"
        event(f"hparams: {type(exc).__name__}")
        return
    assert hparams_from_dict(hp.to_dict()) == hp  # what was accepted is valid and round-trips
    request = EditRequest(prompt="{} plays the sport of", subject="danny miles", target_new="jazz")
    _edit(model, tok, [request], hp)


# --- command-line arguments (parsing and validation only: nothing heavy runs) ---------------


#: Argument text without control characters or line separators: argparse echoes an unknown
#: argument as it is, so a "\r" in one would break the error line (reported to the CLI's owner).
PRINTABLE = st.one_of(
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=10), PIECES.filter(str.strip)
).filter(lambda t: t[:1] != "-")


class _Reached(Exception):
    """Raised by the stubs where the real command would load a model or run an experiment."""


NUMBER = st.one_of(st.integers(-3, 5).map(str), st.sampled_from(["", "1.5", "x", "1e3", "-0", "０", "10000000"]))
LAYERS = st.one_of(
    st.text(alphabet="0123456789-, x", max_size=6),
    st.sampled_from(["3-8", "8-3", "-1", "1,,2", "a-b", "-", "2,5-7", ""]),
)
HPARAM = st.one_of(
    st.builds("{}={}".format, st.sampled_from(FIELDS + ["bogus"]), st.one_of(NUMBER, LAYERS, PRINTABLE)),
    PRINTABLE,
)
OPTION = st.one_of(
    st.tuples(st.sampled_from(["--n-edits", "--batch-size", "--seed", "--n-gen-tokens", "--eval-batch-size"]), NUMBER),
    st.tuples(st.just("--method"), st.sampled_from(["pmet", "memit", "none", "rome", "PMET", ""])),
    st.tuples(st.just("--dataset"), st.sampled_from(["counterfact", "zsre", "cf", ""])),
    st.tuples(st.just("--mode"), st.sampled_from(["batch", "sequential", "parallel"])),
    st.tuples(st.just("--hparams"), HPARAM),
    st.tuples(st.just("--layers"), LAYERS),
    st.tuples(st.sampled_from(["--prompt", "--subject", "--target", "--true"]), PRINTABLE),
    st.tuples(st.sampled_from(["--bogus", "-x", "--no-generation", "-q"])),
)
ARGV = st.builds(
    lambda sub, opts: [sub] + [x for o in opts for x in o],
    st.sampled_from(["run", "stats", "demo", "frobnicate"]),
    st.lists(OPTION, max_size=4),
)


@pytest.fixture
def cli_stubs(monkeypatch, tmp_path):
    """Stop each command where it would load a model or run; keep the root logger as it was."""

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr("pmetlab.runs.experiment.execute", reached)
    monkeypatch.setattr("pmetlab.models.loading.load_model", reached)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level
    logging.getLogger("pmetlab").setLevel(logging.NOTSET)


_LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


@settings(max_examples=120, **SETTINGS)
@given(ARGV)
def test_random_command_lines_exit_0_or_2_with_one_line(cli_stubs, capsys, argv):
    from pmetlab.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except _Reached:  # valid arguments: the command got as far as loading a model
        code = None
    event(f"{argv[0]}: {'valid' if code is None else f'exit {code}'}")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code is None:
        return
    assert code in (0, 2), f"exit status {code} for {argv}"
    lines = [ln for ln in err.splitlines() if ln.strip() and not _LOG_LINE.match(ln)]
    if code == 2:
        assert len(lines) == 1, f"expected one error line for {argv}, got {err!r}"
        assert lines[0].startswith("pmetlab") and "error:" in lines[0] and len(lines[0]) > len("pmetlab: error: ")
    else:
        assert not lines


# --- requests: whatever text comes in, the normalised request renders the same text -----------------

_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12)
_SPACE = st.sampled_from(["", " ", "  ", "\t", "\u00a0", " \n"])


@settings(max_examples=300, **SETTINGS)
@given(lead=_SPACE, core=_TEXT, trail=_SPACE, before=_TEXT, after=_TEXT, target=_TEXT)
def test_requests_normalise_spaces_keep_the_text_and_refuse_invisible(lead, core, trail, before, after, target):
    """A request is refused with a clear error, or built with a stripped subject and targets while
    rendering exactly the text that was asked for; it never holds a control or zero-width character."""
    import unicodedata

    prompt = (before + "{}" + after).replace("{", "(").replace("}", ")").replace("()", "{}", 1)
    prompt = prompt if prompt.count("{}") == 1 else "{} is"
    subject = lead + core + trail
    try:
        r = EditRequest(prompt=prompt, subject=subject, target_new=target)
    except CLEAR as exc:
        assert "\n" not in str(exc).strip()
        return
    assert r.text == prompt.format(subject)
    assert r.subject == r.subject.strip() and r.target_new == r.target_new.strip()
    for v in (r.subject, r.target_new):
        assert not any(unicodedata.category(c) in ("Cc", "Cf") for c in v)


# --- apply_deltas_: any scale either applies exactly (and restores bit-exactly) or changes nothing --


@settings(max_examples=60, **SETTINGS)
@given(scale=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**6), 10**6)))
def test_any_scale_applies_and_restores_or_changes_nothing(scale):
    from pmetlab import apply_deltas_, restore_

    model = make_tiny_model("LlamaForCausalLM").to(torch.float16)
    name = "model.layers.0.mlp.down_proj.weight"
    before = model.get_parameter(name).detach().clone()
    d = Deltas({name: torch.full(before.shape, 1e-3)}, {})
    try:
        undo = apply_deltas_(model, d, check=False, scale=scale)
    except ValueError as exc:
        assert "scale" in str(exc) or "non-finite" in str(exc)
        assert torch.equal(model.get_parameter(name), before)
        return
    assert torch.isfinite(model.get_parameter(name)).all()
    restore_(model, undo)
    assert torch.equal(model.get_parameter(name), before)
