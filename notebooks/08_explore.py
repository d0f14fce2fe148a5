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
# # 08 · Explore: try an edit by hand
#
# **Reproduces** the paper's central move one fact at a time, interactively: pick a CounterFact or zsRE
# record (or type a subject, a prompt with `{}` for the subject, and the new object), choose PMET or
# MEMIT and the main knobs (critical layers, λ, the spread exponent p, PMET without δ^a), run the edit,
# and see what changed: the top next tokens before and after on the rewrite prompt, a paraphrase and a
# neighbourhood prompt, p(new object) and p(true object), the update norm per layer and a greedy
# continuation. **Undo** restores the weights bit-exactly; **save** writes the update
# (`pmetlab.Deltas.load` reads it back).
#
# **Writes** to `OUTPUT_DIR`: `08_outcome.csv` (what the demo edit below changed). **Takes** about
# 1 min (loading the model, one edit with the cached covariance; SmolLM2-135M on a CPU), and about the
# same with `SMOKE = True`. The widgets need JupyterLab with ipywidgets (the `notebooks` extra).

# %% tags=["parameters"]
MODEL = "smollm2-135m"   # embedded model name or a local model directory
DEVICE = "auto"          # "auto" (accelerator when present), "cpu", "cuda", ...
SEED = 0                 # seeds the context prefixes of the target optimisation
SMOKE = False            # tiny sizes: a quick end-to-end check that writes every file
OUTPUT_DIR = "figures"   # figures (PNG, PDF, CSV) and tables go here
RECORD = 0               # the CounterFact record the demo edit uses

# %%
import pmetlab

FAST = {"v_num_grad_steps": 3, "cov_tokens": 5000} if SMOKE else {}  # fixed overrides under the knobs
explorer = pmetlab.explore(MODEL, device=DEVICE, fixed={**FAST, "seed": SEED})
explorer

# %% [markdown]
# The same as choosing record `RECORD` and clicking **run edit** (the explorer above shows it):

# %%
explorer.index.value = RECORD
explorer.on_pick()
outcome = explorer.on_run()
pmetlab.save_table(outcome.targets, OUTPUT_DIR, "08_outcome.csv")
outcome.targets
