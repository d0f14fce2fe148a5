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
# # 07 · Editing over time: rounds of edits, null-space preservation, norm anchoring, collapse
#
# **Reproduces** beyond the paper: the question after PMET is what happens when edits arrive in many
# batches over time. MEMIT-style methods degrade as rounds accumulate and eventually collapse; AlphaEdit
# (Fang et al., arXiv 2410.02355) projects each update onto the null space of the preserved keys'
# covariance (and of the earlier rounds' keys K_p), here with its rank chosen by the share of the
# covariance's energy it lets through (`null_space_rule = "energy"`); norm-anchor scaling (arXiv
# 2602.02543, as described in docs/method_notes.md) rescales every written target to the norm of the
# unedited state. Six runs on the same records in the same order: PMET and MEMIT, each plain, with the
# null space and with norm anchoring; `T` rounds of `B` CounterFact edits, each round computed on the
# model carrying every earlier round, evaluated after every round **against the original model**.
#
# **Writes** to `OUTPUT_DIR`: `07_rounds.{png,pdf,csv}` (efficacy, retention, specificity, relative
# specificity and update norm against the total number of edits), `07_diagnostics.{png,pdf,csv}` (held-out
# perplexity, neighbourhood KL, ‖W − W₀‖_F, condition numbers), `07_rounds_summary.csv` (every round's
# summary), `07_collapse.csv` (each run's collapse point), `07_nullspace_leakage.csv` (rank and leakage of
# the null space per layer, both rules) and `07_reading.md` (generated from the numbers); the runs (every
# round's update and diagnostics) under `RUNS_DIR`.
#
# **Takes** about 5 min with the defaults (`PROFILE = "quick"`: B = 2, T = 2, six runs; SmolLM2-135M in
# float32 on a CPU, one thread), about 1 min with `SMOKE = True`; `PROFILE = "paper"` (B = 32, T = 16: 512
# sequential edits per run) takes several CPU-hours per run and resumes after its last finished round.

# %% tags=["parameters"]
MODEL = "smollm2-135m"   # embedded model name or a local model directory
DEVICE = "auto"          # "auto" (accelerator when present), "cpu", "cuda", ...
SEED = 0                 # seeds the context prefixes and the held-out diagnostics text
SMOKE = False            # tiny sizes: a quick end-to-end check that writes every file
OUTPUT_DIR = "figures"   # figures (PNG, PDF, CSV) and tables go here
RUNS_DIR = "runs"        # run directories go under here (relative to the working directory)
DATASET = "counterfact"  # "counterfact" or "zsre" (the evaluation split)
PROFILE = "quick"        # "quick": 2 rounds of 2 edits; "paper": 16 rounds of 32
BATCH = None             # edits per round (None: the profile's, or SMOKE's; given, it wins)
ROUNDS = None            # rounds (None: the profile's, or SMOKE's; given, it wins)
ENERGY = 0.005           # null_space_energy: the share of trace(C_l) the null space may let through
ARMS = "all"             # "all" (six runs) or a comma list of arm names, e.g. "pmet_plain,memit_plain"
RESUME = True            # reuse finished rounds in RUNS_DIR (False: start over)

# %%
import pandas as pd
from IPython.display import Markdown

import pmetlab
from pmetlab import plot_round_diagnostics, plot_rounds, save_figure

B, T = (1, 2) if SMOKE else {"quick": (2, 2), "paper": (32, 16)}[PROFILE]  # SMOKE: every file, little meaning
B, T = BATCH or B, ROUNDS or T  # sizes given explicitly win, also over SMOKE
FAST = {"v_num_grad_steps": 3, "cov_tokens": 5000} if SMOKE else {}  # preset overrides
model, tok = pmetlab.load_model(MODEL, device=DEVICE)

# %% [markdown]
# The null space by each rule on this model's covariances: its rank per layer and the share of the
# preserved keys' energy it leaks (the absolute threshold 1e-2 against the energy rule).

# %%
hp0 = pmetlab.PMETHyperParams.preset(MODEL).replace(**FAST)
covs = pmetlab.layer_covariances(model, tok, hp0.layers, spec=hp0.covariance)
leakage = pmetlab.leakage_table({l: c.mom2 for l, c in covs.items()}, thresholds=[1e-2], energies=[ENERGY])
pmetlab.save_table(leakage, OUTPUT_DIR, "07_nullspace_leakage.csv")
leakage.pivot(index="layer", columns="rule", values=["rank", "leakage"]).round(4)

# %% [markdown]
# Six runs on the same records in the same order. The null-space state (K_p) belongs to each run, starts
# empty and is recorded in its `rounds.json`, with every round's diagnostics.

# %%
SWITCHES = {"plain": ("", {}), "ns": (" + null space", {"null_space": True, "null_space_rule": "energy",
                                                         "null_space_energy": ENERGY}),
            "anchor": (" + norm anchor", {"norm_anchor": True})}
arms = {f"{m}_{a}": (m, a) for m in ("pmet", "memit") for a in SWITCHES}
chosen = list(arms) if ARMS == "all" else [a.strip() for a in ARMS.split(",")]
frames = []
for arm in chosen:
    method, switch = arms[arm]
    res = pmetlab.run_rounds(
        model=MODEL, method=method, dataset=DATASET, batch_size=B, rounds=T, hparams={**FAST, **SWITCHES[switch][1]},
        seed=SEED, out_dir=f"{RUNS_DIR}/07_{PROFILE}{'_smoke' if SMOKE else ''}/{arm}", resume=RESUME,
        model_and_tokenizer=(model, tok))
    frames.append(res.summary.assign(method=method.upper() + SWITCHES[switch][0]))
summary = pd.concat(frames, ignore_index=True)
pmetlab.save_table(summary, OUTPUT_DIR, "07_rounds_summary.csv")

# %%
fig = plot_rounds(summary, title=f"{MODEL}: {T} rounds of {B} edits ({DATASET})")
save_figure(fig, OUTPUT_DIR, "07_rounds", data=summary)
fig

# %% [markdown]
# Collapse diagnostics after every round, on the model as it is: perplexity on held-out corpus text (not
# the covariance's), KL of the next token on fixed unrelated prompts, how far the edited weights moved
# and how ill-conditioned they became.

# %%
fig = plot_round_diagnostics(summary, title=f"{MODEL}: collapse diagnostics")
save_figure(fig, OUTPUT_DIR, "07_diagnostics", data=summary)
fig

# %% [markdown]
# After the last round, every run with its intervals (×100), and where each run collapsed:

# %%
last = summary[(summary["after_round"] == summary["after_round"].max()) & (summary["group"] == "all")]
last.set_index("method")[["efficacy_score", "neighborhood_score", "relative_specificity", "perplexity_ratio",
                          "neighbourhood_kl", "weight_change"]].round(3)

# %%
collapse = pmetlab.collapse_table(summary)
pmetlab.save_table(collapse, OUTPUT_DIR, "07_collapse.csv")
reading = pmetlab.collapse_reading(summary, model_name=MODEL)
pmetlab.save_text(reading, OUTPUT_DIR, "07_reading.md")
Markdown(reading)
