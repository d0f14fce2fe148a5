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
# # 02 · One edit, step by step: PMET and MEMIT
#
# **Reproduces** the editing pipeline of the PMET paper (Li et al., AAAI 2024; `docs/method.md` §2)
# next to MEMIT's (Meng et al., 2023) on one CounterFact fact: the optimisation of the hidden-state targets
# at the last critical layer (PMET: δ^a and δ^m on the MHSA and FFN outputs; MEMIT: one δ on the
# layer output), the per-layer weight updates (PMET spreads the residual with a square root,
# MEMIT evenly), and what the edited model says before and after. It also checks what the library
# promises: undoing an edit restores the weights bit-exactly, and a saved edit reloads to the same
# model.
#
# **Writes** to `OUTPUT_DIR`: `02_optimization_trace.{png,pdf,csv}`, `02_update_norms.{png,pdf,csv}`,
# `02_predictions.csv` (P(new) / P(true) and the top-1 next token on the rewrite, a paraphrase and a
# neighbourhood prompt), `02_record_metrics.csv` (the record's CounterFact metrics),
# `02_generations.csv` (greedy continuations) and `02_checks.csv`.
#
# **Takes** about 1–2 min with the defaults (SmolLM2-135M in float32 on a CPU, one thread,
# `OMP_NUM_THREADS=1`; the first run on a machine also computes the covariance statistics, a few
# minutes, which are cached like the optimised targets), and under a minute with `SMOKE = True`.

# %% tags=["parameters"]
MODEL = "smollm2-135m"  # embedded model name or a local model directory
DEVICE = "auto"         # "auto" (accelerator when present), "cpu", "cuda", ...
SEED = 0                # seeds the context prefixes of the target optimisation
SMOKE = False           # tiny sizes: a quick end-to-end check that writes every file
OUTPUT_DIR = "figures"  # figures (PNG, PDF, CSV) and tables go here
CASE_INDEX = 0          # which CounterFact record to edit (position in the file)
N_GEN_TOKENS = 30       # length of the greedy continuations before / after the edit

# %%
FAST = {"v_num_grad_steps": 3, "cov_tokens": 5000} if SMOKE else {}  # preset overrides
if SMOKE:  # every file is still written; the numbers mean little
    N_GEN_TOKENS = 5

# %%
import pandas as pd

import pmetlab
from pmetlab import generate_texts, plot_optimization_trace, plot_update_norms, save_figure, score_pairs

pd.set_option("display.max_colwidth", 120)
model, tok = pmetlab.load_model(MODEL, device=DEVICE)

# %%
record = pmetlab.load_counterfact()[CASE_INDEX]
request = pmetlab.EditRequest.from_counterfact(record)
request

# %% [markdown]
# Each method's preset for the model (`pmetlab/presets/*.json`), with the run's seed. The presets
# share the critical layers and the covariance; they differ in where the target is optimised, the
# loss weights, and the spread of the residual over the layers (`spread_exponent`: 0.5 vs 1).

# %%
hparams = {"PMET": pmetlab.resolve_hparams(MODEL, "pmet", {**FAST, "seed": SEED}),
           "MEMIT": pmetlab.resolve_hparams(MODEL, "memit", {**FAST, "seed": SEED})}
pd.DataFrame({m: hp.to_dict() for m, hp in hparams.items()}).astype(str)

# %%
deltas = {m: pmetlab.compute_deltas(model, tok, [request], hp) for m, hp in hparams.items()}
pd.DataFrame({m: d.meta["timings"] for m, d in deltas.items()}).round(1)  # seconds per stage

# %% [markdown]
# **Step 1: the targets.** The loss (NLL of the new object over the prompts with context prefixes,
# plus the KL and decay terms) and P(new object) at each optimisation step.

# %%
trace = pd.concat([pd.DataFrame(d.trace).assign(method=m) for m, d in deltas.items()], ignore_index=True)
fig = plot_optimization_trace(trace, title=f"{request.subject}: {request.target_true} → {request.target_new}")
save_figure(fig, OUTPUT_DIR, "02_optimization_trace", data=trace)
fig

# %% [markdown]
# **Steps 2–4: the weight updates.** ‖ΔW_l‖ of the FFN output projection at each critical layer, with
# the solver's diagnostics (condition number, residual before/after the solve).

# %%
norms = pd.concat([pd.DataFrame(d.meta["diagnostics"]).assign(method=m) for m, d in deltas.items()],
                  ignore_index=True)
norms["module"] = norms["component"].map({"ffn": "FFN", "attn": "MHSA"})
fig = plot_update_norms(norms, value="update_norm", title="weight update per critical layer")
save_figure(fig, OUTPUT_DIR, "02_update_norms", data=norms)
fig

# %% [markdown]
# **Before and after.** `observe` reads, on the current model: P(new) and P(true) after the
# rewrite prompt, a paraphrase and a neighbourhood prompt (geometric mean over the object's tokens)
# with the model's top-1 next token; the record's CounterFact metrics; greedy continuations.
# `pmetlab.edited` applies an edit inside the `with` block and always undoes it.

# %%
probe = {"rewrite": request.text, "paraphrase": record["paraphrase_prompts"][0],
         "neighborhood": record["neighborhood_prompts"][0]}
gen_prompts = [request.text, *record["generation_prompts"][:2]]

def observe():
    texts = list(probe.values())
    new = score_pairs(model, tok, texts, [request.target_new] * len(texts))
    true = score_pairs(model, tok, texts, [request.target_true] * len(texts))
    preds = pd.DataFrame({"prompt": list(probe), "text": texts, "p_new": new.prob, "p_true": true.prob,
                          "top1": [tok.decode(p[:1]) for p in new.token_pred]})
    metrics = pmetlab.evaluate_counterfact(model, tok, [record], generation=False, progress=False)
    gens = generate_texts(model, tok, gen_prompts, seeds=[SEED] * len(gen_prompts),
                          n_new_tokens=N_GEN_TOKENS, top_k=1)  # top-1 sampling: greedy
    return preds, metrics, pd.DataFrame({"prompt": gen_prompts, "text": gens})


# %%
observed = {"unedited": observe()}
for m, d in deltas.items():
    with pmetlab.edited(model, d):
        observed[m] = observe()
predictions, record_metrics, generations = (
    pd.concat({state: obs[i] for state, obs in observed.items()}, names=["model"]).reset_index(0)
    for i in range(3))

# %%
pmetlab.save_table(predictions, OUTPUT_DIR, "02_predictions.csv")
predictions

# %%
pmetlab.save_table(record_metrics, OUTPUT_DIR, "02_record_metrics.csv")
record_metrics[["model", "efficacy_score", "paraphrase_score", "neighborhood_score",
                "efficacy_magnitude", "neighborhood_magnitude"]]

# %%
pmetlab.save_table(generations, OUTPUT_DIR, "02_generations.csv")
generations


# %% [markdown]
# **Undo and reload.** Apply the PMET edit in place, check that the model is recognised as edited,
# undo it, and compare the weights bit for bit; then save the edit, load it back, and check that it
# gives the same tensors and the same prediction.

# %%
def p_new():  # P(new object) after the rewrite prompt, scored alone
    return score_pairs(model, tok, [request.text], [request.target_new]).prob[0]

pmet, p_unedited = deltas["PMET"], p_new()
undo = pmetlab.apply_deltas_(model, pmet)
p_edited = p_new()
try:
    pmet.check_compatible(model)
    edit_detected = False
except pmetlab.EditMismatchError:
    edit_detected = True
pmetlab.restore_(model, undo)
bit_exact = all(bool((model.get_parameter(n) == w).all()) for n, w in undo.items())
p_restored = p_new()

# %%
path = pmet.save(f"{OUTPUT_DIR}/02_edit_pmet.safetensors")
loaded = pmetlab.Deltas.load(path)
path.unlink()  # the output folder keeps figures and tables only
same_tensors = loaded.tensors.keys() == pmet.tensors.keys() and all(
    bool((loaded.tensors[n] == t).all()) for n, t in pmet.tensors.items())
with pmetlab.edited(model, loaded):
    p_reloaded = p_new()

# %%
checks = pd.DataFrame([
    ("the edit raises P(new) on the rewrite prompt", p_edited > p_unedited, f"{p_unedited:.4f} -> {p_edited:.4f}"),
    ("an applied edit is detected", edit_detected, "check_compatible raised EditMismatchError"),
    ("restore_ is bit-exact", bit_exact, f"{len(undo)} parameters compared"),
    ("P(new) after restore equals the unedited value", p_restored == p_unedited, f"{p_restored:.6f}"),
    ("a saved edit reloads to the same tensors", same_tensors, f"{len(loaded.tensors)} tensors"),
    ("the reloaded edit gives the same P(new)", p_reloaded == p_edited, f"{p_reloaded:.6f}"),
], columns=["check", "passed", "detail"])
pmetlab.save_table(checks, OUTPUT_DIR, "02_checks.csv")
assert checks["passed"].all(), checks[~checks["passed"]]
checks
