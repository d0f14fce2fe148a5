# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Reliability and specificity against the number of edits
#
# **Reproduces**, at laptop scale, the main comparison of the PMET paper (Li et al., AAAI 2024;
# `docs/method.md` §6–7): batch-edit `n` CounterFact facts with PMET and with MEMIT and measure
# *reliability* (efficacy: P(new) > P(true) on the rewrite prompt; generalisation: the same on
# paraphrases) and *specificity* (neighbourhood: unrelated subjects keep their true object), with
# the unedited model as the reference. The paper reports, for 10,000 edits on GPT-J and
# GPT-NeoX-20B, **+3.3% average reliability over the best baseline on CounterFact with
# specificity about on par**. Here the model is SmolLM2-135M and `n` is at most a few dozen, so
# expect the direction of the effect at best; the 95% intervals show how much the numbers can say.
#
# **Writes** to `OUTPUT_DIR`: `03_tradeoff.{png,pdf,csv}` and `03_reliability_specificity.csv`
# (every run's summary, before and after); each run's directory (run.json, per-record metrics,
# the weight updates) under `RUNS_DIR`.
#
# **Takes** about 8 min with the defaults (n ∈ {1, 4, 16}, generation off; SmolLM2-135M in
# float32 on a CPU, one thread, `OMP_NUM_THREADS=1`): mostly the target optimisation, about 15 s per
# fact and method, cached per request so that notebook 04 and later runs reuse it (n up to 32:
# about 18 min). About a minute with `SMOKE = True`.

# %% tags=["parameters"]
MODEL = "smollm2-135m"   # embedded model name or a local model directory
DEVICE = "auto"          # "auto" (accelerator when present), "cpu", "cuda", ...
SEED = 0                 # seeds the context prefixes (and the subset when SUBSET is "sample")
SMOKE = False            # tiny sizes: a quick end-to-end check that writes every file
OUTPUT_DIR = "figures"   # figures (PNG, PDF, CSV) and tables go here
RUNS_DIR = "runs"        # run directories go under here (relative to the working directory)
DATASET = "counterfact"  # "counterfact", "counterfact+conflict_filter" (no conflicting edits) or "zsre"
N_EDITS_MAX = 16         # largest batch; the sweep edits 1, N_EDITS_MAX // 4 and N_EDITS_MAX facts
SUBSET = "first"         # the first n records, or a seeded "sample"
GENERATION = False       # CounterFact fluency/consistency: generates text, slow on a CPU
N_GEN_TOKENS = 100       # tokens per generation prompt when GENERATION
RESUME = False           # reuse finished runs of the same parameters in RUNS_DIR

# %%
FAST = {"v_num_grad_steps": 3, "cov_tokens": 5000} if SMOKE else {}  # preset overrides
if SMOKE:  # every file is still written; the numbers mean little
    N_EDITS_MAX, GENERATION = 2, False
n_grid = sorted({n for n in (1, N_EDITS_MAX // 4, N_EDITS_MAX) if n >= 1})
n_grid

# %%
import pandas as pd

import pmetlab
from pmetlab import plot_tradeoff, save_figure

model, tok = pmetlab.load_model(MODEL, device=DEVICE)

# %% [markdown]
# One run per (method, n): edit the first `n` records in one batch, evaluate the unedited model
# ("pre") and the edited model ("post") on the same records. The runs share the optimised targets
# through the per-request cache, so the sweep costs about one optimisation per fact and method.

# %%
grid = [{"method": m, "n_edits": n} for m in ("pmet", "memit") for n in n_grid]
sweep = pmetlab.run_sweep(
    grid, out_dir=f"{RUNS_DIR}/03_reliability_specificity{'_smoke' if SMOKE else ''}",
    model=MODEL, dataset=DATASET, seed=SEED, subset=SUBSET, hparams=FAST, generation=GENERATION,
    n_gen_tokens=N_GEN_TOKENS, resume=RESUME, model_and_tokenizer=(model, tok))
sweep.to_csv(f"{OUTPUT_DIR}/03_reliability_specificity.csv", index=False)

# %% [markdown]
# Every row carries the settings its run used (`hp_*`: the method's preset with the overrides, as
# resolved by the run). Where PMET and MEMIT differ:

# %%
settings = sweep.drop_duplicates("method").set_index("method").filter(like="hp_").T.astype(str)
settings[settings.nunique(axis=1) > 1]

# %% [markdown]
# The unedited model is each PMET run's "pre" phase (the same records, before the edit).

# %%
names = {"pmet": "PMET", "memit": "MEMIT"}
unedited = sweep[(sweep["phase"] == "pre") & (sweep["method"] == "pmet")].assign(method="unedited")
table = pd.concat([sweep[sweep["phase"] == "post"].replace({"method": names}), unedited], ignore_index=True)
fig = plot_tradeoff(table, x="n_edits", title=f"{MODEL} on {DATASET}: edits in one batch")
save_figure(fig, OUTPUT_DIR, "03_tradeoff", data=table)
fig

# %%
metrics = ["efficacy_score", "paraphrase_score", "neighborhood_score", "score"]
table.pivot_table(index="n_edits", columns="method", values=metrics).round(1)
