"""Tiny randomly-initialised causal LMs, one per adapter family, built from configs (no download).

Usage::

    from tests.tiny_models import TINY_FAMILIES, make_tiny_model, random_input_ids

    model = make_tiny_model("LlamaForCausalLM", seed=0)
    ids = random_input_ids(model, batch=2, seq=7)
    logits = model(input_ids=ids).logits
    tok = make_tiny_tokenizer()  # word-level, lower-cased, ids < TINY_VOCAB

Sizes are chosen so that every dimension is distinguishable: d_model = 48, d_ff = 80 (FFN key),
vocab = 211, 3 layers, 4 heads (head_dim 12). A test that mixes up d_model and d_ff fails.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

__all__ = [
    "TINY_FAMILIES",
    "TINY_D_MODEL",
    "TINY_D_FF",
    "TINY_VOCAB",
    "TINY_LAYERS",
    "make_tiny_model",
    "random_input_ids",
    "make_tiny_tokenizer",
    "assert_no_hooks",
]

TINY_D_MODEL = 48
TINY_D_FF = 80
TINY_VOCAB = 211
TINY_LAYERS = 3
TINY_HEADS = 4
TINY_MAX_POS = 64


def _llama_like(cfg_cls: type, **extra) -> Callable[[], object]:
    def build() -> object:
        kw = dict(
            vocab_size=TINY_VOCAB,
            hidden_size=TINY_D_MODEL,
            intermediate_size=TINY_D_FF,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            num_key_value_heads=2,
            max_position_embeddings=TINY_MAX_POS,
            tie_word_embeddings=False,
        )
        kw.update(extra)
        return cfg_cls(**kw)

    return build


_CONFIGS: dict[str, tuple[str, Callable[[], object]]] = {
    "GPT2LMHeadModel": (
        "GPT2LMHeadModel",
        lambda: tf.GPT2Config(
            vocab_size=TINY_VOCAB,
            n_embd=TINY_D_MODEL,
            n_inner=TINY_D_FF,
            n_layer=TINY_LAYERS,
            n_head=TINY_HEADS,
            n_positions=TINY_MAX_POS,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "GPTJForCausalLM": (
        "GPTJForCausalLM",
        lambda: tf.GPTJConfig(
            vocab_size=TINY_VOCAB,
            n_embd=TINY_D_MODEL,
            n_inner=TINY_D_FF,
            n_layer=TINY_LAYERS,
            n_head=TINY_HEADS,
            rotary_dim=8,
            n_positions=TINY_MAX_POS,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "GPTNeoXForCausalLM": (
        "GPTNeoXForCausalLM",
        lambda: tf.GPTNeoXConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=TINY_D_MODEL,
            intermediate_size=TINY_D_FF,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            max_position_embeddings=TINY_MAX_POS,
            use_parallel_residual=True,
        ),
    ),
    "LlamaForCausalLM": ("LlamaForCausalLM", _llama_like(tf.LlamaConfig)),
    "MistralForCausalLM": ("MistralForCausalLM", _llama_like(tf.MistralConfig, sliding_window=None)),
    "Qwen2ForCausalLM": ("Qwen2ForCausalLM", _llama_like(tf.Qwen2Config)),
    "GemmaForCausalLM": ("GemmaForCausalLM", _llama_like(tf.GemmaConfig, head_dim=12)),
    "Gemma3ForCausalLM": (
        "Gemma3ForCausalLM",
        _llama_like(
            tf.Gemma3TextConfig, head_dim=12, sliding_window=4, final_logit_softcapping=30.0, query_pre_attn_scalar=12
        ),
    ),
    "OPTForCausalLM": (
        "OPTForCausalLM",
        lambda: tf.OPTConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=TINY_D_MODEL,
            ffn_dim=TINY_D_FF,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            word_embed_proj_dim=TINY_D_MODEL,
            max_position_embeddings=TINY_MAX_POS,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        ),
    ),
    "PhiForCausalLM": (
        "PhiForCausalLM",
        lambda: tf.PhiConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=TINY_D_MODEL,
            intermediate_size=TINY_D_FF,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            max_position_embeddings=TINY_MAX_POS,
            partial_rotary_factor=0.5,
        ),
    ),
}

#: Model classes (one per adapter family) that :func:`make_tiny_model` can build.
TINY_FAMILIES: list[str] = list(_CONFIGS)

#: Further classes :func:`make_tiny_model` builds, of families TINY_FAMILIES already covers (not
#: parametrised over by default): Gemma 2 shares the post-norm adapter of Gemma 3.
_CONFIGS["Gemma2ForCausalLM"] = (
    "Gemma2ForCausalLM",
    _llama_like(
        tf.Gemma2Config,
        head_dim=12,
        sliding_window=4,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        query_pre_attn_scalar=12,
    ),
)


def make_tiny_model(family: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A tiny random-weight causal LM of class ``family`` (e.g. ``"LlamaForCausalLM"``).

    Deterministic for a given seed; float32, eval mode, eager attention, on the CPU.
    ``config_overrides`` set config attributes before the model is built (e.g.
    ``use_parallel_residual=False`` for GPT-NeoX).
    """
    if family not in _CONFIGS:
        raise KeyError(f"no tiny config for {family!r}; known: {', '.join(_CONFIGS)}")
    cls_name, make_config = _CONFIGS[family]
    config = make_config()
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise KeyError(f"{type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    config._attn_implementation = "eager"  # deterministic and identical across torch builds
    torch.manual_seed(seed)
    model = getattr(tf, cls_name)(config)
    model.to(torch.float32)
    model.eval()
    return model


def random_input_ids(model: torch.nn.Module, batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    """Random token ids ``(batch, seq)`` for ``model`` (avoids the special ids 0-3)."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(4, vocab, (batch, seq), generator=g)


_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_WORDS = (
    "the a an of in on at to from by for with and or is was are be has had not it its he she they his her "
    "their this that who which what where when how city country capital language president king queen "
    "born died lives works plays play speaks speak wrote written made founded located headquarters team "
    "club sport football basketball baseball music jazz piano guitar actor author writer singer company "
    "car phone computer river mountain ocean france paris germany berlin italy rome spain madrid japan "
    "tokyo china beijing england london russia moscow canada toronto india delhi brazil egypt cairo "
    "english french german italian spanish japanese chinese russian latin greek arabic danny miles davis "
    "apple google microsoft toyota nokia sony bbc nasa one two three four five new old big small good "
    "first last year time people world state university church "
    ". , ' ? ! : ;"
).split()
_TOKENIZER_WORDS = list(dict.fromkeys(_WORDS))[: TINY_VOCAB - len(_SPECIALS)]


def make_tiny_tokenizer(pad: bool = True):
    """A word-level fast tokenizer (lower-cased, whitespace/punctuation split) whose ids all fit
    the tiny models' vocabulary. ``<unk>``=0, ``<s>``=1, ``</s>``=2 (eos), ``<pad>``=3 if ``pad``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIALS + _TOKENIZER_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    kw = dict(pad_token="<pad>") if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kw)


def _foreign(hook: object) -> bool:
    # transformers installs its own persistent output-capturing hooks the first time a model
    # runs with output_hidden_states/output_attentions; those are not ours to remove.
    fn = getattr(hook, "__func__", hook)
    return getattr(fn, "__module__", "").startswith("transformers")


def assert_no_hooks(model: torch.nn.Module) -> None:
    """Fail when any module of ``model`` still carries a forward (pre-)hook not installed by transformers."""
    left = [
        f"{name or '<root>'}: {getattr(h, '__qualname__', h)}"
        for name, m in model.named_modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
        if not _foreign(h)
    ]
    assert not left, f"hooks left behind: {left}"
