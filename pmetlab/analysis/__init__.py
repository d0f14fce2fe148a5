"""The MHSA-vs-FFN hidden-state study (method.md §5), under two clearly named protocols.

``protocol="paper"`` (the default) is the paper's quantity. For every layer l and each component
C ∈ {MHSA, FFN}, at the last token of each prompt, it compares what the component *reads* with
what it *computes*:

=============  ======================================  =============================================
block          MHSA: input -> output                   FFN: input -> output
=============  ======================================  =============================================
GPT-J, Phi     ln_1(h^{l-1}) -> a^l                    ln_1(h^{l-1}) (the same vector) -> m^l
GPT-NeoX       input_layernorm(h^{l-1}) -> a^l         post_attention_layernorm(h^{l-1}) -> m^l
LLaMA-like     input_layernorm(h^{l-1}) -> a^l         post_attention_layernorm(h^{l-1} + a^l) -> m^l
GPT-2          ln_1(h^{l-1}) -> a^l                    ln_2(h^{l-1} + a^l) -> m^l
OPT            self_attn_layer_norm(h^{l-1}) -> a^l    final_layer_norm(h^{l-1} + a^l) -> fc2 output
Gemma 2/3      input_layernorm(h^{l-1}) -> a^l         pre_feedforward_layernorm(h^{l-1}
                                                       + post_attention_layernorm(a^l)) -> m^l
=============  ======================================  =============================================

(LLaMA-like: LLaMA, Mistral, Qwen 2/3, Gemma 1.) Nothing is guessed from names: the input is
the first input of the module the adapter names in ``ArchSpec.attn_input`` /
``ArchSpec.ffn_input`` (default: the attention module ``attn`` and the FFN module ``mlp``; OPT,
whose FFN is inline in the decoder layer, reads the input of ``fc1``), and the output is the
output of ``attn`` / ``mlp`` (OPT: ``fc2``). For Gemma 2/3,
a^l and m^l are the modules' own outputs, *before* ``post_attention_layernorm`` /
``post_feedforward_layernorm``: the paper compares what a module reads with what it computes,
and the post-norm is a separate step on the way into the residual stream (it rescales the
output and reweights its dimensions, which would change both the cosine and the top-k).
The Jaccard projects both vectors onto the **input embedding matrix**
(``model.get_input_embeddings().weight``, no final norm), as the authors' notebook does.

``protocol="residual"`` asks a different question: how much each component changes the
**residual stream**, read through the logit lens:

=============  =========================  ==========================================
block          MHSA in -> out             FFN in -> out
=============  =========================  ==========================================
sequential     h^{l-1} -> h^{l-1} + a^l   h^{l-1} + a^l -> h^l = h^{l-1} + a^l + m^l
parallel       h^{l-1} -> h^{l-1} + a^l   h^{l-1} -> h^{l-1} + m^l
=============  =========================  ==========================================

Here a^l and m^l are the contributions that actually join the residual stream (for Gemma 2/3
the outputs of the post-norms), and the Jaccard reads vectors through the model's final norm
and unembedding (``adapter.logits_from_normed(final_norm(x))``). cos(h, h + a) mostly measures
‖a‖/‖h‖, so this is not the paper's quantity; it is kept, unchanged, under its own name.

Both protocols take the cosine similarity of the raw vectors (in float64) and the Jaccard
|A ∩ B| / |A ∪ B| of the top-k token sets; the projection can be chosen explicitly
(``projection="input_embeddings"`` or ``"logit_lens"``). Every DataFrame carries ``protocol``
and ``projection`` columns, so a saved CSV says what it measured. :func:`similarity_reading`
turns a summary into a short text saying whether the paper's reading ("MHSA states keep
changing across layers, FFN states settle after some depth") holds on the model.

The steps live in one module each: ``states`` collects the vectors under both protocols,
``projections`` turns them into top-k tokens, ``values`` computes the per-prompt similarities,
``summary`` (with ``intervals``) averages them over prompts, ``depth`` builds the by-depth table
and ``reading`` writes the reading; ``labels`` and ``checks`` hold what they share.
"""

from __future__ import annotations

from .depth import DEPTHS, depth_thirds, similarity_by_depth
from .findings import ablation_reading, rounds_reading, tradeoff_reading
from .intervals import mean_ci
from .labels import COMPONENTS, DEFAULT_PROJECTION, METRICS, PROJECTIONS, PROTOCOLS
from .projections import input_embedding_topk, logit_lens_topk, projection_topk, topk_jaccard
from .reading import jaccard_chance, similarity_reading
from .rounds_collapse import collapse_reading, collapse_table
from .states import ComponentStates, component_io_states, component_states
from .summary import component_similarity, summarize_similarity
from .values import component_similarity_values

__all__ = [
    "COMPONENTS",
    "METRICS",
    "PROTOCOLS",
    "PROJECTIONS",
    "DEFAULT_PROJECTION",
    "ComponentStates",
    "component_states",
    "component_io_states",
    "component_similarity",
    "jaccard_chance",
    "component_similarity_values",
    "summarize_similarity",
    "similarity_by_depth",
    "similarity_reading",
    "tradeoff_reading",
    "ablation_reading",
    "rounds_reading",
    "collapse_reading",
    "collapse_table",
    "depth_thirds",
    "DEPTHS",
    "logit_lens_topk",
    "input_embedding_topk",
    "projection_topk",
    "topk_jaccard",
    "mean_ci",
]
