"""Tokenisation helpers shared by the solver and the evaluation.

Prompt + target sequences come from one function, :func:`encode_prompt_target`, for every
tokenizer: ``prompt_ids ⊕ target_ids == ids(prompt + " " + target)`` (method.md §8), so
legacy SentencePiece tokenizers (LLaMA-1/2, Mistral) never make a lone "▁" a target token.
The subject's last token is found from the tokenizer's character offsets (method.md §8).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .cache import stable_hash

logger = logging.getLogger(__name__)

__all__ = [
    "encode_prompt_target",
    "encode_prompt_targets",
    "target_ids",
    "subject_last_index",
    "encode_batch",
    "pad_token_id",
    "tokenizer_identity",
    "Batch",
    "context_length",
    "check_context_length",
    "CONTEXT_ATTRS",
    "short_text",
    "check_prompt_target_lengths",
]

#: Config attributes that state how many positions a model reads, in the order they are tried
#: (GPT-2/GPT-J map ``max_position_embeddings`` to ``n_positions`` themselves; the rest cover
#: families whose configs use another name).
CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len", "n_ctx")


def target_ids(tok, target: str) -> list[int]:
    """Token ids of `` target`` encoded alone (leading space, no BOS/EOS).

    Only for callers that need the target on its own. Never append these to a prompt's ids:
    legacy SentencePiece tokenizers encode `` Paris`` alone as ``["▁", "▁Paris"]``; use
    :func:`encode_prompt_target` for a prompt + target sequence.
    """
    t = target if target.startswith(" ") else " " + target
    ids = tok(t, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return list(ids)


def _joined(prompt: str, target: str) -> str:
    """``prompt + " " + target``; a target given with its leading space is joined the same way."""
    return prompt + " " + (target[1:] if target.startswith(" ") else target)


def _encode_many(tok, texts: Sequence[str], special: bool) -> list[list[int]]:
    """Token ids of each text; one batched call for a transformers tokenizer."""
    if isinstance(tok, PreTrainedTokenizerBase):
        return [list(x) for x in tok(list(texts), add_special_tokens=special)["input_ids"]]
    return [list(tok(t, add_special_tokens=special)["input_ids"]) for t in texts]


def _n_appended(full: Sequence[int], plain: Sequence[int]) -> int:
    """How many special tokens (e.g. EOS) the tokenizer appends after the text's own tokens."""
    n = len(plain)
    if n == 0:
        return 0
    for i in range(len(full) - n + 1):
        if list(full[i : i + n]) == list(plain):
            return len(full) - i - n
    return 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def _refuse_special(tok, what: str, text: str, ids: Sequence[int]) -> None:
    """A ValueError when ``text`` (a prompt or target) holds a special token's text that the tokenizer
    reads as that token (``"<|endoftext|>"``, ``"</s>"``): a control token, not words an edit can write
    or score. (An unknown word mapped to ``<unk>`` is not special text and passes.)"""
    specials = getattr(tok, "all_special_tokens", None) or ()
    found = [t for t in specials if t and t in text]
    if not found or not hasattr(tok, "convert_tokens_to_ids"):
        return
    found = [t for t in found if tok.convert_tokens_to_ids(t) in ids]
    if found:
        raise ValueError(
            f"{what} {text!r} contains text the tokenizer reads as its special token(s) {list(dict.fromkeys(found))}; "
            f"remove it (an edit cannot write or score a control token)"
        )


def _split_joined(
    prompt: str, target: str, p_ids: list[int], suffix: list[int], joined: list[int]
) -> tuple[list[int], list[int]]:
    """Split the joined encoding (appended special tokens removed) into prompt and target ids."""
    if suffix and joined[len(joined) - len(suffix) :] == suffix:
        joined = joined[: len(joined) - len(suffix)]
    k = _common_prefix(p_ids, joined)
    if k == 0:
        raise ValueError(
            f"prompt {prompt!r} keeps no token of its own when joined with target {target!r}; "
            f"nothing would predict the target's first token"
        )
    if k < len(p_ids):
        logger.warning(
            "the last tokens of prompt %r merge with target %r when joined (ids %s alone, %s "
            "joined); the re-tokenised prompt tail is scored and written as part of the target",
            prompt,
            target,
            p_ids[k:],
            joined[k:],
        )
    if k == len(joined):
        raise ValueError(f"target {target!r} tokenizes to nothing after prompt {prompt!r}")
    return joined[:k], joined[k:]


def encode_prompt_targets(tok, prompts: Sequence[str], targets: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_prompt_target` of each pair, in input order.

    Each distinct prompt and each distinct pair is tokenised once (a transformers tokenizer in
    one batched call per kind of text), so scoring many candidates after many prompts stays cheap.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"prompts and targets must have the same length, got {len(prompts)} and {len(targets)}")
    for x in (*prompts, *targets):
        if not isinstance(x, str):
            raise TypeError(f"prompts and targets must be strings, got {type(x).__name__}: {x!r}")
    pairs = list(dict.fromkeys(zip(prompts, targets)))
    if not pairs:
        return []
    uniq_p = list(dict.fromkeys(p for p, _ in pairs))
    full = dict(zip(uniq_p, _encode_many(tok, uniq_p, True)))
    plain = dict(zip(uniq_p, _encode_many(tok, uniq_p, False)))
    frame: dict[str, tuple[list[int], list[int]]] = {}
    for p in uniq_p:
        n = _n_appended(full[p], plain[p])
        frame[p] = (full[p][: len(full[p]) - n], full[p][len(full[p]) - n :])
        if not frame[p][0]:
            raise ValueError(f"prompt {p!r} tokenizes to nothing; a target needs at least one token before it")
        _refuse_special(tok, "prompt", p, plain[p])
    joined = _encode_many(tok, [_joined(p, t) for p, t in pairs], True)
    out = {pt: _split_joined(*pt, *frame[pt[0]], j) for pt, j in zip(pairs, joined)}
    for (_p, t), (_, t_ids) in out.items():
        _refuse_special(tok, "target", t, t_ids)
    return [out[pt] for pt in zip(prompts, targets)]


def encode_prompt_target(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt ids and target ids for teacher forcing, the one way the solver and the evaluator
    build a prompt + target sequence (method.md §8).

    Contract: ``prompt_ids + target_ids == ids(prompt + " " + target)``, the joined text encoded
    with the special tokens the tokenizer adds to a prompt, minus any it appends (EOS): BOS (where
    the tokenizer adds one) at position 0 only, no special token inside or after the target, and
    no lone "▁" that the joined text itself does not have (a legacy SentencePiece tokenizer
    encodes `` Paris`` alone as ``["▁", "▁Paris"]`` but ``is Paris`` as ``["▁is", "▁Paris"]``).
    ``prompt_ids`` are the prompt's own ids (appended special tokens removed) and ``target_ids``
    the joined encoding's tail, which differs from :func:`target_ids` where the target encoded
    alone does. A target given with a leading space is treated as one without.

    If the prompt's last tokens change under joining (a token merging across the boundary, e.g.
    a prompt ending in a space under a SentencePiece tokenizer), a warning names the pair and the
    split is made where the two encodings part: ``prompt_ids`` is the unchanged head and the
    re-tokenised tail counts as target, so the contract above still holds and solver and
    evaluator agree. A ValueError is raised when nothing of the prompt or of the target is left.
    """
    return encode_prompt_targets(tok, [prompt], [target])[0]


def _char_span(template: str, subject: str) -> tuple[int, int]:
    i = template.index("{}")
    return i, i + len(subject)


def subject_last_index(tok, template: str, subject: str) -> int:
    """Index (in the token ids of ``template.format(subject)``, special tokens included) of the
    token holding the subject's last character."""
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
    text = template.format(subject)
    start, end = _char_span(template, subject)
    enc = tok(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    last = None
    for j, (a, b) in enumerate(offsets):
        if b > a and a < end and b > start:
            last = j
    if last is None:
        raise ValueError(f"subject {subject!r} not found among the tokens of {text!r}")
    return last


@dataclass
class Batch:
    """A padded batch: ``input_ids``/``attention_mask`` (B, T) and each row's number of real tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths.to(device))


def pad_token_id(tok) -> int:
    """The id used to fill padded positions: the pad token, else EOS, else 0. Padded positions
    are masked out, so any id works; the tokenizer need not define a pad token (GPT-2's does not)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return 0


def encode_batch(tok, texts: Sequence[str], device: torch.device | str = "cpu", *, side: str = "right") -> Batch:
    """Padded encoding of ``texts`` (special tokens as the tokenizer adds them), padded on
    ``side``; with right padding the positions of real tokens are those of the unpadded text.

    The tokenizer's ``padding_side`` is restored afterwards. A tokenizer without a pad token
    (GPT-2's, GPT-J's, LLaMA's) is padded by hand with EOS (or 0): padded positions are masked.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode")
    if getattr(tok, "pad_token_id", None) is not None:
        old = tok.padding_side
        tok.padding_side = side
        try:
            enc = tok(texts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old
        ids, am = enc["input_ids"], enc["attention_mask"]
    else:
        seqs = [list(x) for x in tok(texts)["input_ids"]]
        T = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), T), pad_token_id(tok), dtype=torch.long)
        am = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, x in enumerate(seqs):
            if x:
                sl = slice(0, len(x)) if side == "right" else slice(T - len(x), T)
                ids[r, sl] = torch.tensor(x, dtype=torch.long)
                am[r, sl] = 1
    return Batch(ids.to(device), am.to(device), am.sum(1).to(device))


def tokenizer_identity(tok) -> dict:
    """What identifies a tokenizer for cache keys: class, size, a digest of its vocabulary and of
    the ids of a probe text (catches normalisation and special-token differences)."""
    try:
        vocab = sorted(tok.get_vocab().items())
    except (AttributeError, NotImplementedError):
        vocab = None
    probe = tok(_PROBE)["input_ids"]
    return {
        "class": type(tok).__name__,
        "size": len(tok),
        "vocab": stable_hash(vocab) if vocab else None,
        "probe": stable_hash(list(probe)),
    }


_PROBE = "The Quick brown fox, 1984: naïve café -- Mr. O'Neil's ‘test’ \t  end."


def _context_entry(model_or_config) -> tuple[str, int] | None:
    """(attribute, value) of the first positive int among :data:`CONTEXT_ATTRS` on the model's
    text config (the config itself for a text-only model), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    try:
        config = config.get_text_config() or config
    except (AttributeError, ValueError):  # not a transformers config, or several text configs
        pass
    for attr in CONTEXT_ATTRS:
        v = getattr(config, attr, None)
        if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0:
            return attr, int(v)
    return None


def context_length(model_or_config) -> int | None:
    """How many positions a model reads: ``max_position_embeddings`` of its config or the family's
    equivalent (:data:`CONTEXT_ATTRS`), read from a model or a config; None when the config states none."""
    entry = _context_entry(model_or_config)
    return entry[1] if entry else None


def check_context_length(
    model_or_config,
    lengths: Sequence[int],
    *,
    what: str,
    fix: str,
    describe: Callable[[int], str] | None = None,
) -> None:
    """Raise a ValueError naming the longest sequence when it does not fit the model's context.

    Args:
        lengths: tokens of each sequence the model will read.
        what: what a sequence is, e.g. "prompt + candidate".
        fix: how to make it fit, e.g. "shorten the prompt".
        describe: index -> a short description of that sequence, for the message.

    A model whose config states no context length (:func:`context_length`) is not checked.
    """
    lengths = list(lengths)
    entry = _context_entry(model_or_config)
    if not lengths or entry is None:
        if lengths:
            logger.debug("%s states no context length; %s not checked", type(model_or_config).__name__, what)
        return
    attr, ctx = entry
    i = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[i] > ctx:
        who = f" ({describe(i)})" if describe else ""
        raise ValueError(
            f"{what}{who} is {lengths[i]} tokens, more than the {ctx} positions "
            f"{type(model_or_config).__name__} reads (config.{attr}); {fix}"
        )


def check_prompt_target_lengths(
    model_or_config,
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    prompts: Sequence[str],
    targets: Sequence[str],
) -> None:
    """:func:`check_context_length` of each (prompt ids, target ids) pair of
    :func:`encode_prompt_targets`, naming the longest pair when it does not fit."""
    check_context_length(
        model_or_config,
        [len(p) + len(t) for p, t in encoded],
        what="prompt + target",
        fix="shorten the prompt or the target",
        describe=lambda i: f"{short_text(prompts[i])} + {short_text(targets[i])}",
    )


def short_text(text: str, n: int = 60) -> str:
    """``repr(text)``, cut in the middle to about ``n`` characters (for messages about long inputs)."""
    r = repr(text)
    return r if len(r) <= n else f"{r[: n // 2]}...{r[-n // 2 :]} ({len(text)} characters)"
