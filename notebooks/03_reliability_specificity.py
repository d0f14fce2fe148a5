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
# # 03 · Reliability and specificity against the number of edits
#
# **Reproduces**, at laptop scale, the main comparison of the PMET paper (Li et al., AAAI 2024;
# `docs/method.md` §6–7): batch-edit `n` CounterFact facts with PMET and with MEMIT and measure
# *reliability* (efficacy: P(new) > P(true) on the rewrite prompt; generalisation: the same on
# paraphrases) and *specificity* (neighbourhood: unrelated subjects keep their true object), with
# the unedited model as the reference. The paper reports, for 10,000 edits on GPT-J and
# GPT-NeoX-20B, **+3.3% average reliability over the best baseline on CounterFact with
# specificity about on par**. Here the model is SmolLM2-135M; the quick profile stops at 16 edits,
# where the 95% intervals are wide, and the paper profile goes to 512 edits in one batch. Both
# methods edit the same records, so the reading compares them **paired** (a bootstrap over records
# of the per-record difference; it prints the rule), and each metric's interval is a Wilson
# interval. There is no n = 1 point: one record has no interval, and MEMIT's n = 1 condition (many
# records, each edited alone, then averaged) is a run mode of its own. The records
# come from the dataset's evaluation split (never the tuning split the presets were chosen on); a
# batch never holds two requests with the same (subject, relation) (the multi-CounterFact rule).
#
# **Writes** to `OUTPUT_DIR`: `03_tradeoff.{png,pdf,csv}`, `03_reliability_specificity.csv`
# (every run's summary, before and after), `03_records.csv.gz` (every run's per-record metrics,
# from which every number of the reading can be re-derived), `03_phase_times.csv` (each run's wall
# time per phase) and `03_reading.md` (the findings, generated from the numbers); each run's
# directory (run.json, per-record metrics, the weight updates) under `RUNS_DIR`.
#
# **Takes** about 6 min with the defaults (`PROFILE = "quick"`: n ∈ {4, 16}, generation off;
# SmolLM2-135M in float32 on a 2-core CPU, the targets optimised by `WORKERS = 2` processes, about
# 10 s per fact and method on one core, cached per request so that notebook 04 and later runs reuse
# them). `PROFILE = "paper"` (n ∈ {8, 64, 512}) takes about 2.5 h and resumes where it stopped
# (finished runs, cached targets, covariance and pre-edit metrics are reused). About a minute with
# `SMOKE = True`.

# %% tags=["parameters"]
MODEL = "smollm2-135m"   # embedded model name or a local model directory
DEVICE = "auto"          # "auto" (accelerator when present), "cpu", "cuda", ...
SEED = 0                 # seeds the context prefixes (and the subset when SUBSET is "sample")
SMOKE = False            # tiny sizes: a quick end-to-end check that writes every file
OUTPUT_DIR = "figures"   # figures (PNG, PDF, CSV) and tables go here
RUNS_DIR = "runs"        # run directories go under here (relative to the working directory)
DATASET = "counterfact"  # "counterfact", "counterfact+conflict_filter" (no conflicting edits) or "zsre"
PROFILE = "quick"        # "quick": n in {4, 16}; "paper": n in {8, 64, 512} (hours on a CPU; resumes)
N_EDITS_MAX = None       # cap on the largest batch (None: the profile's)
SUBSET = "first"         # the first n records of the evaluation split, or a seeded "sample" of it
GENERATION = False       # CounterFact fluency/consistency: generates text, slow on a CPU
N_GEN_TOKENS = 100       # tokens per generation prompt when GENERATION
WORKERS = 2              # processes for the target optimisation (1 on a single core)
RESUME = True            # reuse finished runs of the same parameters in RUNS_DIR (False: start over)

# %%
FAST = {"v_num_grad_steps": 3, "cov_tokens": 5000} if SMOKE else {}  # preset overrides
profiles = {"quick": [4, 16], "paper": [8, 64, 512]}  # no n = 1: one record has no interval
if SMOKE:  # every file is still written; the numbers mean little (an N_EDITS_MAX given still caps)
    profiles, GENERATION = {PROFILE: [2, 3]}, False
n_grid = [n for n in profiles[PROFILE] if N_EDITS_MAX is None or n <= N_EDITS_MAX]
if not n_grid:
    raise ValueError(f"N_EDITS_MAX={N_EDITS_MAX} leaves no batch size of {profiles[PROFILE]}; raise it or pass None")
n_grid

# %%
import pandas as pd
from IPython.display import Markdown

import pmetlab
from pmetlab import plot_tradeoff, save_figure, tradeoff_reading

model, tok = pmetlab.load_model(MODEL, device=DEVICE)

# %% [markdown]
# One run per (method, n): edit the first `n` records in one batch, evaluate the unedited model
# ("pre") and the edited model ("post") on the same records. The runs share the optimised targets
# through the per-request cache, so the sweep costs about one optimisation per fact and method.

# %%
grid = [{"method": m, "n_edits": n} for m in ("pmet", "memit") for n in n_grid]
sweep = pmetlab.run_sweep(
    grid, out_dir=f"{RUNS_DIR}/03_{PROFILE}{'_smoke' if SMOKE else ''}", model=MODEL, dataset=DATASET,
    seed=SEED, subset=SUBSET, hparams=FAST, generation=GENERATION, n_gen_tokens=N_GEN_TOKENS,
    resume=RESUME, workers=WORKERS, model_and_tokenizer=(model, tok))
records = pmetlab.sweep_records(sweep)  # per record: every number below can be re-derived from it
pmetlab.save_records(records, f"{OUTPUT_DIR}/03_records.csv.gz")
pmetlab.save_table(sweep, OUTPUT_DIR, "03_reliability_specificity.csv")

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
def arms(df):  # edited models after the edit, the unedited one before
    unedited = df[(df["phase"] == "pre") & (df["method"] == "pmet")].assign(method="unedited")
    return pd.concat([df[df["phase"] == "post"].replace({"method": names}), unedited], ignore_index=True)
table = arms(sweep)
fig = plot_tradeoff(table, x="n_edits", title=f"{MODEL} on {DATASET}: edits in one batch")
save_figure(fig, OUTPUT_DIR, "03_tradeoff", data=table)
fig

# %%
metrics = ["efficacy_score", "paraphrase_score", "neighborhood_score", "score"]
table.pivot_table(index="n_edits", columns="method", values=metrics).round(1)

# %% [markdown]
# What the numbers say, written from them: PMET against MEMIT paired on the same records (the
# per-record difference with a bootstrap interval over records), with the rule it applies:

# %%
reading = tradeoff_reading(table, model_name=MODEL, records=arms(records))
pmetlab.save_text(reading, OUTPUT_DIR, "03_reading.md")
Markdown(reading)

# %% [markdown]
# Where the time went: each run's wall seconds per phase (targets are inside "edit"; cached
# targets, covariance and pre-edit metrics make later runs cheap).

# %%
times = pmetlab.phase_times(sweep["run_dir"])
pmetlab.save_table(times, OUTPUT_DIR, "03_phase_times.csv")
times.pivot_table(index=["method", "n_edits"], columns="phase", values="wall_s", sort=False).round(1)
