"""Prompt + target ids, one invariant for every tokenizer (method.md §8).

``encode_prompt_target(tok, prompt, target)`` must give ``ids(prompt) ⊕ ids(target) ==
ids(prompt + " " + target)``. Checked on three tokenizers built here without any download:
a legacy SentencePiece-style Unigram (LLaMA-1/2, Mistral: encodes `` Paris`` alone as
``["▁", "▁Paris"]``) with BOS, a GPT-2-style byte-level BPE, the same BPE adding BOS and EOS;
plus the tests' word-level tokenizer and SmolLM2's when its files are available.
"""

from __future__ import annotations

import logging
import string

import pytest
import torch

from pmetlab.editing.compute import validate_requests
from pmetlab.editing.targets import KL_TEMPLATE, build_rows
from pmetlab.evaluation import score_pairs, score_pairs_reference
from pmetlab.requests import EditRequest
from pmetlab.tokens import encode_prompt_target, encode_prompt_targets, target_ids
from tests.tiny_models import TINY_VOCAB, make_tiny_model, make_tiny_tokenizer

SPACE = "\u2581"  # SentencePiece's word-boundary mark "▁"
WORDS = (
    "The capital of France is Paris Rome Berlin Danielle Darrieux spoke English French mother tongue "
    "Miles Davis plays the sport jazz New York City"
).split()
PAIRS = [
    ("The capital of France is", "Paris"),
    ("The capital of France is", " Rome"),
    ("Danielle Darrieux spoke", "English"),
    ("The mother tongue of Miles Davis is", "French"),
    ("The capital of France is", "New York City"),
    ("The capital of France is", "Zq"),
    ("Q: where? A:", "Berlin."),
    ("A", "1984"),
]
CORPUS = [" ".join(WORDS), "Q: where? A: Berlin. In 1984, naive cafe.", "the sport of jazz plays New York"] * 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def legacy_sentencepiece_tokenizer():
    """A LLaMA-2-style tokenizer: Unigram pieces, "▁" prepended to the text and replacing every
    space (the normalizer of LLaMA-2's tokenizer.json, legacy mode), BOS added to each text.

    The Metaspace pre-tokenizer does not reproduce the legacy behaviour: with prepend_scheme
    "always" it prepends no "▁" to a text that already starts with a space.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), (SPACE, -2.0), (SPACE * 2, -3.0)]
    pieces += [(SPACE + w, -1.0) for w in dict.fromkeys(WORDS)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + ".,?!:'-"]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def byte_level_tokenizer(bos_eos: bool = False):
    """A GPT-2-style byte-level BPE trained on a few sentences; ``bos_eos`` adds ``<s> … </s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    if bos_eos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> $B </s>",
            special_tokens=[("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))],
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from pmetlab.models.loading import _EMBEDDED, ModelLoadError, _converted_dir

    try:
        return AutoTokenizer.from_pretrained(str(_converted_dir(_EMBEDDED["smollm2-135m"])))
    except (ModelLoadError, OSError) as exc:
        pytest.skip(f"the SmolLM2 tokenizer is unavailable: {exc}")


TOKENIZERS = {
    "legacy_sp": legacy_sentencepiece_tokenizer,
    "byte_level": byte_level_tokenizer,
    "byte_level_bos_eos": lambda: byte_level_tokenizer(bos_eos=True),
    "word_level": make_tiny_tokenizer,
    "smollm2": smollm2_tokenizer,
}


@pytest.fixture(scope="module")
def legacy():
    return legacy_sentencepiece_tokenizer()


def joined_ids(tok, prompt: str, target: str) -> list[int]:
    """The reference: ``prompt + " " + target`` encoded with special tokens, a trailing EOS removed."""
    ids = list(tok(prompt + " " + target.removeprefix(" "))["input_ids"])
    return ids[:-1] if tok.eos_token_id is not None and ids[-1] == tok.eos_token_id else ids


# ------------------------------------------------------------------------------------------
def test_legacy_tokenizer_reproduces_the_lone_space_piece(legacy):
    space = legacy.convert_tokens_to_ids(SPACE)
    paris = legacy.convert_tokens_to_ids(SPACE + "Paris")
    assert target_ids(legacy, "Paris") == [space, paris]  # the naive target starts with a lone "▁"
    naive = legacy("The capital of France is")["input_ids"] + target_ids(legacy, "Paris")
    assert naive != joined_ids(legacy, "The capital of France is", "Paris")
    assert joined_ids(legacy, "The capital of France is", "Paris")[-1] == paris


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_prompt_target_ids_equal_the_joined_encoding(name):
    tok = TOKENIZERS[name]()
    bos = tok.bos_token_id if tok("a")["input_ids"][0] == tok.bos_token_id else None
    lone = tok.convert_tokens_to_ids(SPACE) if SPACE in tok.get_vocab() else None
    got = encode_prompt_targets(tok, [p for p, _ in PAIRS], [t for _, t in PAIRS])
    for (prompt, target), (p_ids, t_ids) in zip(PAIRS, got):
        full = joined_ids(tok, prompt, target)
        assert p_ids + t_ids == full, (prompt, target)
        assert p_ids == [x for x in tok(prompt)["input_ids"] if x != tok.eos_token_id]  # prompt unchanged
        assert (p_ids, t_ids) == encode_prompt_target(tok, prompt, target)
        assert (p_ids, t_ids) == encode_prompt_target(tok, prompt, " " + target.removeprefix(" "))
        if bos is not None:
            assert full[0] == bos and bos not in full[1:]
        assert t_ids and tok.eos_token_id not in t_ids
        if lone is not None and all(w.strip(".") in WORDS for w in target.split()):
            assert lone not in t_ids, (prompt, target, tok.convert_ids_to_tokens(t_ids))


def test_byte_level_bos_eos_tokenizer_appends_eos_that_is_dropped():
    tok = byte_level_tokenizer(bos_eos=True)
    raw = tok("The capital of France is Paris")["input_ids"]
    assert raw[0] == tok.bos_token_id and raw[-1] == tok.eos_token_id
    p_ids, t_ids = encode_prompt_target(tok, "The capital of France is", "Paris")
    assert p_ids + t_ids == raw[:-1]


def test_merge_across_the_boundary_warns_and_keeps_the_invariant(legacy, caplog):
    prompt = "The capital of France is "  # its trailing "▁" merges into "▁▁" with the target's space
    alone = legacy(prompt)["input_ids"]
    with caplog.at_level(logging.WARNING, logger="pmetlab.tokens"):
        p_ids, t_ids = encode_prompt_target(legacy, prompt, "zq")
    assert p_ids + t_ids == joined_ids(legacy, prompt, "zq")
    assert p_ids == alone[:-1] and legacy.convert_ids_to_tokens(t_ids) == [SPACE * 2, "z", "q"]
    assert any("merge with target 'zq'" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pmetlab.tokens"):
        encode_prompt_target(legacy, "The capital of France is", "Paris")
    assert not caplog.records


def test_bad_prompt_or_target_is_refused(legacy):
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        encode_prompt_target(make_tiny_tokenizer(), "the capital of", "")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        encode_prompt_target(make_tiny_tokenizer(), "", "paris")
    with pytest.raises(TypeError, match="must be strings"):
        encode_prompt_target(legacy, "The capital of France is", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same length"):
        encode_prompt_targets(legacy, ["a", "b"], ["c"])


# ------------------------------------------------------------------------------------------
def test_score_pairs_scores_the_joined_target_tokens(legacy):
    model = make_tiny_model("LlamaForCausalLM")
    assert len(legacy) <= TINY_VOCAB
    prompts, cands = [p for p, _ in PAIRS], [t for _, t in PAIRS]
    batched = score_pairs(model, legacy, prompts, cands, batch_size=3)
    ref = score_pairs_reference(model, legacy, prompts, cands)
    for i, (prompt, target) in enumerate(PAIRS):
        full = joined_ids(legacy, prompt, target)
        n_p = len(legacy(prompt)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), -1)
        want = -logp[torch.arange(n_p - 1, len(full) - 1), torch.tensor(full[n_p:])]
        for s in (batched, ref):
            assert s.n_tokens[i] == len(full) - n_p
            torch.testing.assert_close(torch.from_numpy(s.token_nll[i]), want, atol=2e-5, rtol=0)
            assert s.token_correct[i].tolist() == [int(p) == t for p, t in zip(s.token_pred[i], full[n_p:])]
    assert batched.n_tokens[0] == 1  # " Paris" is one token after the prompt, not "▁" + "▁Paris"


def test_build_rows_are_the_joined_encoding_without_its_last_token(legacy):
    reqs = [
        EditRequest(prompt="The capital of {} is", subject="France", target_new="Paris"),
        EditRequest(prompt="{} spoke", subject="Danielle Darrieux", target_new="New York City"),
    ]
    templates = ["{}", "Miles Davis plays jazz. {}"]
    assert validate_requests(legacy, reqs) == reqs
    rows = build_rows(legacy, reqs, templates)
    for r in range(len(rows.req)):
        ids = rows.input_ids[r, : int(rows.attention_mask[r].sum())].tolist()
        req = reqs[int(rows.req[r])]
        if int(rows.kind[r]) == 2:
            assert ids[0] == legacy.bos_token_id and len(ids) == int(rows.lookup[r]) + 1
            assert ids == legacy(KL_TEMPLATE.format(req.subject))["input_ids"][: len(ids)]
            continue
        prompt = templates[r % 3].format(req.prompt).format(req.subject)  # rows: templates, then KL
        full = joined_ids(legacy, prompt, req.target_new)
        n_p = len(legacy(prompt)["input_ids"])
        assert ids == full[:-1]
        mine = rows.t_row == r
        assert rows.t_tok[mine].tolist() == full[n_p:]
        assert rows.t_pos[mine].tolist() == list(range(n_p - 1, len(full) - 1))
        subj_last = legacy.convert_ids_to_tokens(ids[int(rows.lookup[r])])
        assert subj_last == SPACE + req.subject.split()[-1]
