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
# # 04 · Ablations: residual spread, δ^a, MHSA updates, λ
#
# **Reproduces** the ablations of the PMET paper (Li et al., AAAI 2024; `docs/method.md` §3) on one
# batch of CounterFact edits: the spread of the residual over the critical layers, R / (n − i)^p
# with p = 0 (none), 0.5 (PMET's square root) and 1 (MEMIT's even spread); PMET **without δ^a**
# (only the FFN hidden state optimised); PMET **also updating the MHSA output weights**; and the
# covariance weight λ (`mom2_update_weight`) at 0.1, 0.3, 1 and 3 times the preset's (tuned per
# model and dataset in notebook 06). The paper reports that the square-root spread raises
# reliability at some cost in specificity, that dropping δ^a hurts, and that updating the MHSA
# weights as well helps only slightly.
#
# **Writes** to `OUTPUT_DIR`: `04_ablation.{png,pdf,csv}` (bars per variant),
# `04_spread_sweep.{png,pdf,csv}`, `04_lambda_sweep.{png,pdf,csv}`, `04_ablations.csv` (every
# run's summary, before and after), `04_records.csv.gz` (every run's per-record metrics, from which
# every number of the reading can be re-derived), `04_phase_times.csv` and `04_reading.md` (the
# findings, generated from the numbers: each variant against PMET paired on the same records, with
# the rule applied; Wilson intervals per metric); the run directories under `RUNS_DIR`.
#
# The records come from the dataset's evaluation split, never the tuning split the presets were
# chosen on (notebook 06).
#
# **Takes** about 7 min with the defaults (`PROFILE = "quick"`: 8 edits, 8 variants; SmolLM2-135M in
# float32 on a 2-core CPU, targets optimised by `WORKERS = 2` processes; after notebook 03 the PMET
# targets come from the cache, the w/o-δ^a targets and the MHSA covariance are new), and about
# 1.5 min with `SMOKE = True`. `PROFILE = "paper"` runs every variant at 128 edits in one batch
# (about 45 min after notebook 03's paper profile; it resumes where it stopped).

# %% tags=["parameters"]
MODEL = "smollm2-135m"   # embedded model name or a local model directory
DEVICE = "auto"          # "auto" (accelerator when present), "cpu", "cuda", ...
SEED = 0                 # seeds the context prefixes (and the subset when SUBSET is "sample")
SMOKE = False            # tiny sizes: a quick end-to-end check that writes every file
OUTPUT_DIR = "figures"   # figures (PNG, PDF, CSV) and tables go here
RUNS_DIR = "runs"        # run directories go under here (relative to the working directory)
DATASET = "counterfact"  # "counterfact", "counterfact+conflict_filter" (no conflicting edits) or "zsre"
PROFILE = "quick"        # "quick": 8 edits per variant; "paper": 128 (about 45 min; resumes)
N_EDITS = None           # facts edited in one batch by every variant (None: the profile's, or SMOKE's)
SUBSET = "first"         # the first N_EDITS records of the evaluation split, or a seeded "sample"
WORKERS = 2              # processes for the target optimisation (1 on a single core)
RESUME = True            # reuse finished runs of the same parameters in RUNS_DIR (False: start over)
LAYERS = ""              # critical layers for every variant, e.g. "3-8" or "2,5,7"; empty: the preset's

# %%
import pmetlab

FAST = {"v_num_grad_steps": 3, "cov_tokens": 5000} if SMOKE else {}  # preset overrides
if LAYERS:  # e.g. the window notebook 05 located
    FAST = {**FAST, "layers": pmetlab.layers_from_text(LAYERS)}
# SMOKE: every file is still written, the numbers mean little; an N_EDITS given explicitly wins
N_EDITS = N_EDITS or (2 if SMOKE else {"quick": 8, "paper": 128}[PROFILE])

# %%
import pandas as pd
from IPython.display import Markdown

import pmetlab
from pmetlab import ablation_reading, plot_ablation, plot_tradeoff, resolve_hparams, save_figure

model, tok = pmetlab.load_model(MODEL, device=DEVICE)
base = resolve_hparams(MODEL, "pmet", FAST, dataset=DATASET)  # the preset each variant changes one field of

# %% [markdown]
# Every variant is PMET's preset with one field changed (the ablations are hyperparameters, not
# separate methods). The variants share the optimised targets through the per-request cache except
# "w/o δ^a", whose optimisation differs.

# %%
lambdas = [base.mom2_update_weight * f for f in ((0.3,) if SMOKE else (0.1, 0.3, 3))]
variants = {"PMET": {}, "no spread (p=0)": {"spread_exponent": 0.0},
            "even spread (p=1)": {"spread_exponent": 1.0}, "w/o δ^a": {"optimize_attn": False},
            "+ MHSA update": {"update_attn_weights": True},
            **{f"λ={lam:,.0f}": {"mom2_update_weight": lam} for lam in lambdas}}
grid = [{"label": name, "hparams": hp} for name, hp in variants.items()]
pd.DataFrame({"variant": list(variants), "overrides": [str(hp) for hp in variants.values()]})

# %%
sweep = pmetlab.run_sweep(
    grid, out_dir=f"{RUNS_DIR}/04_{PROFILE}{'_smoke' if SMOKE else ''}", model=MODEL, method="pmet",
    dataset=DATASET, n_edits=N_EDITS, seed=SEED, subset=SUBSET, hparams=FAST, generation=False,
    resume=RESUME, workers=WORKERS, model_and_tokenizer=(model, tok))
# the sweeps' x axes: the value each run used (hp_*), also where the entry kept the preset's
sweep = sweep.assign(spread_exponent=sweep["hp_spread_exponent"], mom2_update_weight=sweep["hp_mom2_update_weight"])
records = pmetlab.sweep_records(sweep)  # per record: every number below can be re-derived from it
pmetlab.save_records(records, f"{OUTPUT_DIR}/04_records.csv.gz")
pmetlab.save_table(sweep, OUTPUT_DIR, "04_ablations.csv")

# %% [markdown]
# The unedited model is the "pre" phase of the PMET run (the same records, before the edit).

# %%
post = sweep[sweep["phase"] == "post"].assign(variant=lambda d: d["label"])
unedited = sweep[(sweep["phase"] == "pre") & (sweep["label"] == "PMET")].assign(variant="unedited")
bars = pd.concat([unedited, post[~post["label"].str.startswith("λ=")]], ignore_index=True)
fig = plot_ablation(bars, title=f"PMET ablations, {N_EDITS} edits ({MODEL})")
save_figure(fig, OUTPUT_DIR, "04_ablation", data=bars)
fig

# %%
spread = post[post["label"].isin(["PMET", "no spread (p=0)", "even spread (p=1)"])].assign(method="PMET")
spread = pd.concat([spread, unedited.assign(method="unedited")], ignore_index=True)
fig = plot_tradeoff(spread, x="spread_exponent", title="residual spread R / (n − i)^p")
save_figure(fig, OUTPUT_DIR, "04_spread_sweep", data=spread)
fig

# %%
lam = post[(post["label"] == "PMET") | post["label"].str.startswith("λ=")].assign(method="PMET")
lam = pd.concat([lam, unedited.assign(method="unedited")], ignore_index=True)
fig = plot_tradeoff(lam, x="mom2_update_weight", title="covariance weight λ")
save_figure(fig, OUTPUT_DIR, "04_lambda_sweep", data=lam)
fig

# %%
metrics = ["efficacy_score", "paraphrase_score", "neighborhood_score", "score"]
pd.concat([unedited, post]).set_index("variant")[metrics].round(1)

# %%
post_records = records[records["phase"] == "post"].assign(variant=lambda d: d["label"])
reading = ablation_reading(post, model_name=MODEL, n_edits=N_EDITS, records=post_records)
pmetlab.save_text(reading, OUTPUT_DIR, "04_reading.md")
times = pmetlab.phase_times(sweep["run_dir"])
pmetlab.save_table(times, OUTPUT_DIR, "04_phase_times.csv")
Markdown(reading)
