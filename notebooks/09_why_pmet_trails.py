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
# # 09 · Why PMET trails MEMIT: a paired, causal ablation
#
# **Reproduces** the paper's central comparison (PMET more reliable than MEMIT at equal specificity)
# as a decision: it asks whether PMET's deficit against MEMIT on our models is about the method or about
# how it was ported from GPT-J's parallel blocks to sequential ones (`docs/method.md` §1, issue #21). Every
# hypothesis is a switch and an arm: MEMIT; PMET as released; PMET writing the FFN output observed in
# the optimised pass (`ffn_target="observed"`) or the whole change of the block at L (`"block"`);
# PMET's δ bounded by ‖h^L‖ like MEMIT's (`clamp_reference="residual"`); both; MEMIT's even spread;
# and PMET without δ^a with MEMIT's bound (on sequential blocks its δ acts like MEMIT's δ, so beside
# MEMIT it isolates the spread, the stop rule and the decay normaliser).
#
# Each arm is tuned on the **tuning split** with the same λ × v_lr grid (the rule of `pmetlab tune`),
# then every arm edits the **same** evaluation records in one batch; arms are compared **paired** over
# records (bootstrap of the per-record difference; the rule is printed in the reading). Arms that differ
# only in what is written or how it is solved share their optimisation through the target cache.
#
# **Writes** to `OUTPUT_DIR`: `09_arms.{png,pdf,csv}` (paired differences against MEMIT; p(o*)
# optimised vs written), `09_arms_table.csv`, `09_paired.csv`, `09_records.csv.gz` (per record, every
# arm: every number of the reading can be re-derived from it), `09_tuning.csv` and `09_reading.md`.
#
# **Takes** about 10 min with the defaults (`PROFILE = "quick"`: 16 records, 8 tuning records, a 2 × 1
# grid; SmolLM2-135M on a 2-core CPU, `WORKERS = 2`), about 2 min with `SMOKE = True` (three arms), and
# several CPU-hours with `PROFILE = "paper"` (256 records, 32 tuning records, the 3 × 3 grid; resumable:
# point `RUNS_DIR` at the runs of `pmetlab arms` to reuse them).

# %% tags=["parameters"]
MODEL = "smollm2-135m"   # embedded model name or a local model directory
DEVICE = "auto"          # "auto" (accelerator when present), "cpu", "cuda", ...
SEED = 0                 # seeds the context prefixes and the bootstrap
SMOKE = False            # tiny sizes and three arms: a quick end-to-end check that writes every file
OUTPUT_DIR = "figures"   # figures (PNG, PDF, CSV) and tables go here
RUNS_DIR = "runs/arms"   # run directories go under RUNS_DIR/MODEL (the same layout as `pmetlab arms`)
DATASET = "counterfact"  # "counterfact" or "zsre"
PROFILE = "quick"        # "quick" (16 records) or "paper" (256 records, the 3 x 3 grid)
ARMS = ""                # comma-separated arm names; empty: all eight
WORKERS = 2              # processes for the target optimisation (1 on a single core)

# %%
import pmetlab

SIZES = {"quick": (16, 8, (300.0, 1000.0), (1.0,)), "paper": (256, 32, (300.0, 1000.0, 3000.0), (0.25, 0.5, 1.0))}
N_EDITS, TUNE_N, LAMBDAS, V_LRS = SIZES[PROFILE]
FAST, arms = {}, [a.strip() for a in ARMS.split(",") if a.strip()] or None
if SMOKE:  # every file is still written; the numbers mean little
    N_EDITS, TUNE_N, LAMBDAS, V_LRS = 3, 2, (300.0,), (1.0,)
    FAST, arms = {"v_num_grad_steps": 3, "cov_tokens": 5000}, arms or ["memit", "pmet", "pmet_block"]

# %%
model, tok = pmetlab.load_model(MODEL, device=DEVICE)
sweep = pmetlab.run_arm_sweep(
    model=MODEL, dataset=DATASET, n_edits=N_EDITS, tune_n=TUNE_N, grid=pmetlab.TuningGrid(LAMBDAS, V_LRS),
    out_dir=f"{RUNS_DIR}/{MODEL}{'_smoke' if SMOKE else ''}", arms=arms, seed=SEED, hparams=FAST,
    workers=WORKERS, model_and_tokenizer=(model, tok))
sweep.plans

# %% [markdown]
# Each arm's chosen point and its tuning Score (the full table is saved as `09_tuning.csv`).

# %%
chosen = sweep.tuning[sweep.tuning["selected"]]
chosen[["arm", "mom2_update_weight", "v_lr", "tuning_score"]].round(2)

# %%
tables = sweep.tables
pmetlab.save_table(tables["arms"], OUTPUT_DIR, "09_arms_table.csv")
pmetlab.save_table(tables["paired"], OUTPUT_DIR, "09_paired.csv")
pmetlab.save_table(tables["records"], OUTPUT_DIR, "09_records.csv.gz", float_format="%.6g")
pmetlab.save_table(sweep.tuning, OUTPUT_DIR, "09_tuning.csv")
fig = pmetlab.plot_arms(tables["paired"], tables["arms"], title=f"{MODEL}, {N_EDITS} records")
pmetlab.save_figure(fig, OUTPUT_DIR, "09_arms", data=tables["paired"])
fig

# %%
from IPython.display import Markdown

reading = pmetlab.arms_reading(tables["arms"], tables["paired"], model_name=MODEL, n_edits=N_EDITS)
pmetlab.save_text(reading, OUTPUT_DIR, "09_reading.md")
Markdown(reading)
