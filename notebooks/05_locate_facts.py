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
# # 05 · Where do facts live? Causal tracing by component, and the layer window it implies
#
# **Reproduces** ROME's causal tracing (Meng et al. 2022, arXiv 2202.05262 §2.1, App. B) to test the
# PMET paper's premise:
# the subject's token embeddings are corrupted with seeded Gaussian noise (ν = 3 × the embedding std over
# the known-facts subjects), and the clean state of one layer at one token is restored at a time; the
# indirect effect (IE) is p(o | corrupted, restored) − p(o | corrupted), o the model's own answer. Three
# kinds: the whole layer state h^l, the MLP output and the attention output (each over a window of
# `WINDOW` layers centred on l). PMET's argument rests on the answer: FFN weights at the critical layers
# hold facts, MHSA holds little factual knowledge.
#
# **Writes** to `OUTPUT_DIR`: `05_trace_heatmaps.{png,pdf,csv}` (one fact, every layer and token),
# `05_trace_curves.{png,pdf,csv}` (mean IE with 95% intervals over `N_FACTS` facts at the subject's last
# token), `05_facts.csv` (each fact's clean and corrupted p), `05_window.csv` (the located MLP window next
# to the preset's layers) and `05_reading.md` (a paragraph generated from the numbers).
#
# **Takes** about 5 min with the defaults (16 facts at the subject's last token plus one full heatmap,
# 3 noise draws; SmolLM2-135M in float32 on a CPU, one thread), and under 1 min with `SMOKE = True`.

# %% tags=["parameters"]
MODEL = "smollm2-135m"  # embedded model name or a local model directory
DEVICE = "auto"         # "auto" (accelerator when present), "cpu", "cuda", ...
SEED = 0                # seeds the noise draws and the fact sample
SMOKE = False           # tiny sizes: a quick end-to-end check that writes every file
OUTPUT_DIR = "figures"  # figures (PNG, PDF, CSV) and tables go here
N_FACTS = 16            # known facts averaged at the subject's last token
N_SAMPLES = 3           # noise draws per fact (ROME: 10)
WINDOW = 10             # layers restored together for MLP / attention (ROME: 10 for GPT-J)
WIDTH = 6               # width of the located window (the preset edits 6 layers)
FACT_INDEX = -1         # which sampled fact gets the full heatmaps; -1: the one the model is surest of
KNOWN_ONLY = True       # sample only facts whose attribute's first token is the model's top-1 (as ROME)

# %%
if SMOKE:  # every file is still written; the numbers mean little
    N_FACTS, N_SAMPLES, WIDTH = 2, 1, 2

# %%
import pandas as pd
from IPython.display import Markdown

import pmetlab
from pmetlab import locate_reading, plot_trace_curves, plot_trace_heatmaps, save_figure, trace_fact, trace_facts

model, tok = pmetlab.load_model(MODEL, device=DEVICE)
pool = pmetlab.load_known_facts()
if KNOWN_ONLY:  # ROME traces facts the model knows
    pool = pmetlab.known_facts_of(model, tok, pool)
facts = pmetlab.select(pool, min(N_FACTS, len(pool)), mode="sample", seed=SEED).records
noise = pmetlab.embedding_noise_scale(model, tok)
settings = dict(window=WINDOW, noise=noise, n_samples=N_SAMPLES, seed=SEED)
pd.DataFrame(facts)[["known_id", "prompt", "attribute"]].head()

# %% [markdown]
# **The average over facts** at the subject's last token, where ROME finds the MLP effect.

# %%
traced = trace_facts(model, tok, facts, **settings)
summary = traced.summary[traced.summary["token_role"] == "last_subject"]
fig = plot_trace_curves(summary, title=f"{MODEL}: {len(facts)} of {len(pool)} facts it knows, noise ν = {noise:.3f}")
save_figure(fig, OUTPUT_DIR, "05_trace_curves", data=summary)
pmetlab.save_table(traced.facts, OUTPUT_DIR, "05_facts.csv")
fig

# %% [markdown]
# **One fact, every layer and token** (ROME's Figure 1), the fact the model is surest of unless
# `FACT_INDEX` says otherwise: the subject's tokens are starred.

# %%
best = int(traced.facts["p_clean"].idxmax()) if FACT_INDEX < 0 else FACT_INDEX
fact = facts[best]
one = trace_fact(model, tok, fact["prompt"], fact["subject"], **settings)
fig = plot_trace_heatmaps(one)
save_figure(fig, OUTPUT_DIR, "05_trace_heatmaps", data=one.to_frame())
fig

# %% [markdown]
# **The window a preset should edit**, and what the numbers say about attention.

# %%
try:
    preset = None if SMOKE else pmetlab.PMETHyperParams.preset(MODEL).layers
except KeyError:  # no PMET preset for this model
    preset = None
text, window = locate_reading(summary, width=WIDTH, preset_layers=preset, model_name=MODEL)
located = pd.DataFrame([{"model": MODEL, "located": f"{window.start}-{window.stop - 1}", "mean_ie": window.mean_ie,
                         "preset": f"{min(preset)}-{max(preset)}" if preset else None}])
pmetlab.save_table(located, OUTPUT_DIR, "05_window.csv")
pmetlab.save_text(text, OUTPUT_DIR, "05_reading.md")
Markdown(text)
