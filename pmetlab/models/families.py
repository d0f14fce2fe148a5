"""The built-in adapter records, one per model family (registered when :mod:`pmetlab.models` is imported)."""

from __future__ import annotations

from .adapters import ArchSpec, register_adapter

_LLAMA_LIKE = dict(
    layers="model.layers",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    ffn_out="mlp.down_proj",
    final_norm="model.norm",
)

for _spec in (
    ArchSpec(
        "gpt2",
        ("GPT2LMHeadModel",),
        layers="transformer.h",
        attn="attn",
        attn_out="attn.c_proj",
        mlp="mlp",
        ffn_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        transposed=True,
    ),
    ArchSpec(
        "gptj",
        ("GPTJForCausalLM",),
        layers="transformer.h",
        attn="attn",
        attn_out="attn.out_proj",
        mlp="mlp",
        ffn_out="mlp.fc_out",
        final_norm="transformer.ln_f",
        parallel=True,
    ),
    ArchSpec(
        "gpt_neox",
        ("GPTNeoXForCausalLM",),
        layers="gpt_neox.layers",
        attn="attention",
        attn_out="attention.dense",
        mlp="mlp",
        ffn_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        parallel=True,
        parallel_config_attr="use_parallel_residual",
    ),
    ArchSpec("llama", ("LlamaForCausalLM", "MistralForCausalLM"), **_LLAMA_LIKE),
    ArchSpec("qwen2", ("Qwen2ForCausalLM", "Qwen3ForCausalLM"), **_LLAMA_LIKE),
    ArchSpec("gemma", ("GemmaForCausalLM",), **_LLAMA_LIKE),
    ArchSpec(
        "gemma3",
        ("Gemma2ForCausalLM", "Gemma3ForCausalLM"),
        **_LLAMA_LIKE,
        attn_post_norm="post_attention_layernorm",
        ffn_post_norm="post_feedforward_layernorm",
        post_norm_offset=1.0,
    ),
    ArchSpec(
        "opt",
        ("OPTForCausalLM",),
        layers="model.decoder.layers",
        attn="self_attn",
        attn_out="self_attn.out_proj",
        mlp="fc2",
        ffn_out="fc2",
        final_norm="model.decoder.final_layer_norm",
        ffn_flat=True,
        ffn_input="fc1",
    ),
    ArchSpec(
        "phi",
        ("PhiForCausalLM",),
        layers="model.layers",
        attn="self_attn",
        attn_out="self_attn.dense",
        mlp="mlp",
        ffn_out="mlp.fc2",
        final_norm="model.final_layernorm",
        parallel=True,
    ),
):
    register_adapter(_spec)
