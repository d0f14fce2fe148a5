# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · MHSA vs FFN hidden states across layers
#
# **Reproduces** the analysis that motivates PMET (Li et al., *PMET: Precise Model Editing in a
# Transformer*, AAAI 2024; `docs/method.md` §5, the paper's Figure 2): on the *known facts* set, at the
# last token of each prompt and for every layer, how similar what each component **reads** (its normed
# input) is to what it **computes** (its output) — cosine similarity, and Jaccard similarity of the
# top-50 tokens of both vectors projected onto the input embedding matrix. The paper's claim: **MHSA
# hidden states keep changing across layers (general knowledge-extraction patterns), while FFN hidden
# states settle after some depth** — so PMET optimises both but updates only the FFN weights. A second,
# differently named view shows how much each component changes the residual stream (logit lens).
#
# **Writes** to `OUTPUT_DIR`: `01_similarity.{png,pdf,csv}` (the paper's protocol: per layer, component
# and metric, mean and 95% interval over prompts), `01_similarity_residual.{png,pdf,csv}` (the
# residual-stream view), `01_similarity_by_depth.csv` (both protocols, means over early / middle / late
# thirds of the layers) and `01_reading.md` (a paragraph generated from the numbers saying how far the
# paper's reading holds on this model: three criteria, the Jaccard's chance level, the rule applied).
#
# **Takes** about 2 min with the defaults (a seeded sample of 400 of the 1,209 facts; SmolLM2-135M in
# float32 on a CPU, one thread: on a machine shared with other jobs `OMP_NUM_THREADS=1` is several times
# faster than oversubscribed threads), about 6 min with `N_PROMPTS = None` (all 1,209 facts, as the
# committed results in `docs/results/<model>/01_*`; Gemma 3 270M, with its 262k-token vocabulary, about
# 20 min), and under 1 min with `SMOKE = True`.

# %% tags=["parameters"]
MODEL = "smollm2-135m"  # embedded model name or a local model directory
DEVICE = "auto"         # "auto" (accelerator when present), "cpu", "cuda", ...
SEED = 0                # seeds the prompt sample
SMOKE = False           # tiny sizes: a quick end-to-end check that writes every file
OUTPUT_DIR = "figures"  # figures (PNG, PDF, CSV) and tables go here
N_PROMPTS = 400         # known-facts prompts: None takes all 1,209
SUBSET = "sample"       # "first" N_PROMPTS records, or a seeded "sample"
TOP_K = 50              # tokens per vector for the Jaccard similarity (the paper: 50)
BATCH_SIZE = 16         # prompts per forward pass

# %%
if SMOKE:  # every file is still written; the numbers mean little
    N_PROMPTS = 8

# %%
import pandas as pd
from IPython.display import Markdown

import pmetlab
from pmetlab import component_similarity, plot_similarity, save_figure, similarity_by_depth, similarity_reading

model, tok = pmetlab.load_model(MODEL, device=DEVICE)
pmetlab.get_adapter(model).describe()

# %%
facts = pmetlab.select(pmetlab.load_known_facts(), N_PROMPTS, mode=SUBSET, seed=SEED).records
prompts = [r["prompt"] for r in facts]
pd.DataFrame(facts)[["known_id", "prompt", "attribute", "prediction"]].head()

# %% [markdown]
# **The paper's protocol** (`protocol="paper"`). For every layer l, at each prompt's last token, the
# "input" of a component is the normed vector it reads, the first input of its module (SmolLM2's
# sequential block: `input_layernorm(h^{l-1})` for MHSA, `post_attention_layernorm(h^{l-1} + a^l)` for
# FFN; GPT-J's parallel block: `ln_1(h^{l-1})` for both); the "output" is the module's output a^l or m^l
# (Gemma 3: before its post-norm, i.e. what the module computes). The Jaccard compares the top-`TOP_K`
# tokens of `x @ E^T`, E the input embedding matrix, with no final norm.

# %%
values = pmetlab.component_similarity_values(model, tok, prompts, top_k=TOP_K, batch_size=BATCH_SIZE)
sim = pmetlab.summarize_similarity(values)  # per layer: mean and 95% interval over prompts
chance = pmetlab.jaccard_chance(TOP_K, model.get_input_embeddings().num_embeddings)  # two random top-k sets
title = f"{MODEL}: module input (normed) vs output, {len(prompts):,} known facts"
fig = plot_similarity(sim, title=title, chance=chance)
save_figure(fig, OUTPUT_DIR, "01_similarity", data=sim)
fig

# %% [markdown]
# **The residual-stream view** (`protocol="residual"`; not the paper's quantity). The residual stream
# before and after each component adds its contribution (h^{l-1} → h^{l-1} + a^l for MHSA,
# h^{l-1} + a^l → h^l for FFN), with the Jaccard read through the final norm and the unembedding
# (logit lens). Its cosine mostly measures how small a component's update is next to the stream.

# %%
res = component_similarity(model, tok, prompts, protocol="residual", top_k=TOP_K, batch_size=BATCH_SIZE)
title = f"{MODEL}: residual stream before vs after each component, {len(prompts):,} known facts"
fig = plot_similarity(res, title=title)
save_figure(fig, OUTPUT_DIR, "01_similarity_residual", data=res)
fig

# %% [markdown]
# Both protocols in numbers: the mean similarity over the early, middle and late thirds of the layers.

# %%
by_depth = similarity_by_depth(pd.concat([sim, res], ignore_index=True))
pmetlab.save_table(by_depth, OUTPUT_DIR, "01_similarity_by_depth.csv")
by_depth.round(3)

# %% [markdown]
# **Does the paper's reading hold on this model?** Generated from the paper-protocol numbers above by
# `similarity_reading`: each of its three criteria reported on its own, the late-third comparison paired
# over prompts (bootstrap of the per-prompt late-third mean), the Jaccard read only above 10× its chance
# level, and the rule printed with the verdict.

# %%
reading = similarity_reading(sim, model_name=MODEL, values=values, chance=chance, seed=SEED)
pmetlab.save_text(reading, OUTPUT_DIR, "01_reading.md")
Markdown(reading)
