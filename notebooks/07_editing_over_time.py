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
# # 07 · Editing over time: rounds of edits, with and without null-space preservation
#
# **Reproduces** beyond the paper: the question after PMET is what happens when edits arrive in many
# batches over time. MEMIT-style methods degrade as rounds accumulate; AlphaEdit (Fang et al., arXiv
# 2410.02355) projects each update onto the null space of the preserved keys' covariance (and of the
# earlier rounds' keys K_p) to keep specificity. Here the projection is a switch (`null_space`) on
# both PMET and MEMIT: `T` rounds of `B` CounterFact edits, each round computed on the model carrying
# every earlier round, evaluated after every round **against the original model** (its answers and
# metrics): efficacy on the round's records, retention of earlier rounds, neighbourhood specificity
# and the share of neighbourhood prompts on which the model still behaves as the original did.
#
# **Writes** to `OUTPUT_DIR`: `07_rounds.{png,pdf,csv}` (the four panels against the total number of
# edits, one line per method and switch), `07_rounds_summary.csv` (every round's summary) and
# `07_reading.md` (the findings, generated from the numbers); the runs (every round's update, so any
# round can be re-applied or undone) under `RUNS_DIR`.
#
# **Takes** about 5 min with the defaults (`PROFILE = "quick"`: B = 2, T = 3, four runs; SmolLM2-135M
# in float32 on a CPU, one thread), about 1 min with `SMOKE = True`; `PROFILE = "paper"` (B = 16,
# T = 8) takes a few hours and resumes after its last finished round.

# %% tags=["parameters"]
MODEL = "smollm2-135m"   # embedded model name or a local model directory
DEVICE = "auto"          # "auto" (accelerator when present), "cpu", "cuda", ...
SEED = 0                 # seeds the context prefixes
SMOKE = False            # tiny sizes: a quick end-to-end check that writes every file
OUTPUT_DIR = "figures"   # figures (PNG, PDF, CSV) and tables go here
RUNS_DIR = "runs"        # run directories go under here (relative to the working directory)
DATASET = "counterfact"  # "counterfact" or "zsre" (the evaluation split)
PROFILE = "quick"        # "quick": 3 rounds of 2 edits; "paper": 8 rounds of 16
BATCH = None             # edits per round (None: the profile's, or SMOKE's; given, it wins)
ROUNDS = None            # rounds (None: the profile's, or SMOKE's; given, it wins)
THRESHOLD = 0.01         # null_space_threshold: covariance eigenvalues below it span the null space
RESUME = True            # reuse finished rounds in RUNS_DIR (False: start over)

# %%
import pandas as pd
from IPython.display import Markdown

import pmetlab
from pmetlab import plot_rounds, save_figure

B, T = (1, 2) if SMOKE else {"quick": (2, 3), "paper": (16, 8)}[PROFILE]  # SMOKE: every file, little meaning
B, T = BATCH or B, ROUNDS or T  # sizes given explicitly win, also over SMOKE
FAST = {"v_num_grad_steps": 3, "cov_tokens": 5000} if SMOKE else {}  # preset overrides
model, tok = pmetlab.load_model(MODEL, device=DEVICE)

# %% [markdown]
# Four runs on the same records in the same order: PMET and MEMIT, each with the switch off and on.
# The null-space state (K_p) belongs to each run, starts empty and is recorded in its `rounds.json`.

# %%
variants = {f"{m.upper() if m == 'pmet' else 'MEMIT'}{' + null space' if ns else ''}": (m, ns)
            for m in ("pmet", "memit") for ns in (False, True)}
frames = []
for name, (method, ns) in variants.items():
    hp = {**FAST, "null_space": ns, **({"null_space_threshold": THRESHOLD} if ns else {})}
    res = pmetlab.run_rounds(
        model=MODEL, method=method, dataset=DATASET, batch_size=B, rounds=T, hparams=hp, seed=SEED,
        out_dir=f"{RUNS_DIR}/07_{PROFILE}{'_smoke' if SMOKE else ''}/{method}_ns{int(ns)}", resume=RESUME,
        model_and_tokenizer=(model, tok))
    frames.append(res.summary.assign(method=name))
summary = pd.concat(frames, ignore_index=True)
pmetlab.save_table(summary, OUTPUT_DIR, "07_rounds_summary.csv")

# %%
fig = plot_rounds(summary, title=f"{MODEL}: {T} rounds of {B} edits ({DATASET})")
save_figure(fig, OUTPUT_DIR, "07_rounds", data=summary)
fig

# %% [markdown]
# After the last round, every method with its intervals (×100), and the size of the updates:

# %%
last = summary[(summary["after_round"] == summary["after_round"].max()) & (summary["group"] == "all")]
last.set_index("method")[["efficacy_score", "paraphrase_score", "neighborhood_score", "relative_specificity",
                          "round_update_norm"]].round(2)

# %%
reading = pmetlab.rounds_reading(summary, model_name=MODEL)
pmetlab.save_text(reading, OUTPUT_DIR, "07_reading.md")
Markdown(reading)
