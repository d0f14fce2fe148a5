"""Write the numbered notebooks of this folder (without outputs) from the cell sources below.

    python notebooks/_build.py          # rewrite every notebook
    python notebooks/_build.py --check  # exit 1 when a notebook differs from what this writes

Edit the cells here, not in Jupyter, so the notebooks stay reproducible; run the script and
commit both. Conventions (docs/style.md): the first cell is markdown saying what the notebook
reproduces and how long it takes; the second is the only cell tagged ``parameters`` and holds
scalars only; cells stay short and call the pmetlab API; figures go through
``pmetlab.plots.save_figure`` (PNG + PDF + the CSV of the numbers) into ``OUTPUT_DIR``. The
files each notebook writes are listed in ``pmetlab.notebooks.EXPECTED_OUTPUTS``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from textwrap import dedent

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python", "pygments_lexer": "ipython3"}


def md(src: str):
    return new_markdown_cell(dedent(src).strip("\n"))


def code(src: str, *tags: str):
    cell = new_code_cell(dedent(src).strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(src: str):
    return code(src, "parameters")


# -------------------------------------------------------------------------------------------------
# 01: MHSA vs FFN hidden states
# -------------------------------------------------------------------------------------------------
NB01 = [
    md("""
    # 01 · MHSA vs FFN hidden states across layers

    **Reproduces** the analysis that motivates PMET (Li et al., *PMET: Precise Model Editing in a
    Transformer*, AAAI 2024; `docs/method.md` §5, the paper's Figure 2): on the *known facts* set, at the
    last token of each prompt and for every layer, how similar what each component **reads** (its normed
    input) is to what it **computes** (its output) — cosine similarity, and Jaccard similarity of the
    top-50 tokens of both vectors projected onto the input embedding matrix. The paper's claim: **MHSA
    hidden states keep changing across layers (general knowledge-extraction patterns), while FFN hidden
    states settle after some depth** — so PMET optimises both but updates only the FFN weights. A second,
    differently named view shows how much each component changes the residual stream (logit lens).

    **Writes** to `OUTPUT_DIR`: `01_similarity.{png,pdf,csv}` (the paper's protocol: per layer, component
    and metric, mean and 95% interval over prompts), `01_similarity_residual.{png,pdf,csv}` (the
    residual-stream view), `01_similarity_by_depth.csv` (both protocols, means over early / middle / late
    thirds of the layers) and `01_reading.md` (a paragraph generated from the numbers saying whether the
    paper's reading holds on this model).

    **Takes** about 6 min with the defaults (all 1,209 facts; SmolLM2-135M in float32 on a CPU, one thread:
    on a machine shared with other jobs `OMP_NUM_THREADS=1` is several times faster than oversubscribed
    threads; Gemma 3 270M, with its 262k-token vocabulary, about 20 min), and under 1 min with
    `SMOKE = True`.
    """),
    params("""
    MODEL = "smollm2-135m"  # embedded model name or a local model directory
    DEVICE = "auto"         # "auto" (accelerator when present), "cpu", "cuda", ...
    SEED = 0                # seeds the prompt sample
    SMOKE = False           # tiny sizes: a quick end-to-end check that writes every file
    OUTPUT_DIR = "figures"  # figures (PNG, PDF, CSV) and tables go here
    N_PROMPTS = None        # known-facts prompts: None takes all 1,209
    SUBSET = "sample"       # "first" N_PROMPTS records, or a seeded "sample"
    TOP_K = 50              # tokens per vector for the Jaccard similarity (the paper: 50)
    BATCH_SIZE = 16         # prompts per forward pass
    """),
    code("""
    if SMOKE:  # every file is still written; the numbers mean little
        N_PROMPTS = 8
    """),
    code("""
    import pandas as pd
    from IPython.display import Markdown

    import pmetlab
    from pmetlab.analysis import component_similarity, similarity_by_depth, similarity_reading
    from pmetlab.plots import plot_similarity, save_figure

    model, tok = pmetlab.load_model(MODEL, device=DEVICE)
    pmetlab.get_adapter(model).describe()
    """),
    code("""
    facts = pmetlab.select(pmetlab.load_known_facts(), N_PROMPTS, mode=SUBSET, seed=SEED).records
    prompts = [r["prompt"] for r in facts]
    pd.DataFrame(facts)[["known_id", "prompt", "attribute", "prediction"]].head()
    """),
    md("""
    **The paper's protocol** (`protocol="paper"`). For every layer l, at each prompt's last token, the
    "input" of a component is the normed vector it reads, the first input of its module (SmolLM2's
    sequential block: `input_layernorm(h^{l-1})` for MHSA, `post_attention_layernorm(h^{l-1} + a^l)` for
    FFN; GPT-J's parallel block: `ln_1(h^{l-1})` for both); the "output" is the module's output a^l or m^l
    (Gemma 3: before its post-norm, i.e. what the module computes). The Jaccard compares the top-`TOP_K`
    tokens of `x @ E^T`, E the input embedding matrix, with no final norm.
    """),
    code("""
    sim = component_similarity(model, tok, prompts, protocol="paper", top_k=TOP_K, batch_size=BATCH_SIZE)
    title = f"{MODEL}: module input (normed) vs output, {len(prompts):,} known facts"
    fig = plot_similarity(sim, title=title)
    save_figure(fig, OUTPUT_DIR, "01_similarity", data=sim)
    fig
    """),
    md("""
    **The residual-stream view** (`protocol="residual"`; not the paper's quantity). The residual stream
    before and after each component adds its contribution (h^{l-1} → h^{l-1} + a^l for MHSA,
    h^{l-1} + a^l → h^l for FFN), with the Jaccard read through the final norm and the unembedding
    (logit lens). Its cosine mostly measures how small a component's update is next to the stream.
    """),
    code("""
    res = component_similarity(model, tok, prompts, protocol="residual", top_k=TOP_K, batch_size=BATCH_SIZE)
    title = f"{MODEL}: residual stream before vs after each component, {len(prompts):,} known facts"
    fig = plot_similarity(res, title=title)
    save_figure(fig, OUTPUT_DIR, "01_similarity_residual", data=res)
    fig
    """),
    md("""
    Both protocols in numbers: the mean similarity over the early, middle and late thirds of the layers.
    """),
    code("""
    by_depth = similarity_by_depth(pd.concat([sim, res], ignore_index=True))
    by_depth.to_csv(f"{OUTPUT_DIR}/01_similarity_by_depth.csv", index=False)
    by_depth.round(3)
    """),
    md("""
    **Does the paper's reading hold on this model?** Generated from the paper-protocol numbers above by
    `similarity_reading`, which states the test it applies.
    """),
    code("""
    reading = similarity_reading(sim, model_name=MODEL)
    with open(f"{OUTPUT_DIR}/01_reading.md", "w") as f:
        f.write(reading + "\\n")
    Markdown(reading)
    """),
]

# -------------------------------------------------------------------------------------------------
# 02: one edit, step by step
# -------------------------------------------------------------------------------------------------
NB02 = [
    md("""
    # 02 · One edit, step by step: PMET and MEMIT

    **Reproduces** the editing pipeline of the PMET paper (Li et al., AAAI 2024; `docs/method.md` §2)
    next to MEMIT's (Meng et al., 2023) on one CounterFact fact: the optimisation of the hidden-state targets
    at the last critical layer (PMET: δ^a and δ^m on the MHSA and FFN outputs; MEMIT: one δ on the
    layer output), the per-layer weight updates (PMET spreads the residual with a square root,
    MEMIT evenly), and what the edited model says before and after. It also checks what the library
    promises: undoing an edit restores the weights bit-exactly, and a saved edit reloads to the same
    model.

    **Writes** to `OUTPUT_DIR`: `02_optimization_trace.{png,pdf,csv}`, `02_update_norms.{png,pdf,csv}`,
    `02_predictions.csv` (P(new) / P(true) and the top-1 next token on the rewrite, a paraphrase and a
    neighbourhood prompt), `02_record_metrics.csv` (the record's CounterFact metrics),
    `02_generations.csv` (greedy continuations) and `02_checks.csv`.

    **Takes** about 1–2 min with the defaults (SmolLM2-135M in float32 on a CPU, one thread,
    `OMP_NUM_THREADS=1`; the first run on a machine also computes the covariance statistics, a few
    minutes, which are cached like the optimised targets), and under a minute with `SMOKE = True`.
    """),
    params("""
    MODEL = "smollm2-135m"  # embedded model name or a local model directory
    DEVICE = "auto"         # "auto" (accelerator when present), "cpu", "cuda", ...
    SEED = 0                # seeds the context prefixes of the target optimisation
    SMOKE = False           # tiny sizes: a quick end-to-end check that writes every file
    OUTPUT_DIR = "figures"  # figures (PNG, PDF, CSV) and tables go here
    CASE_INDEX = 0          # which CounterFact record to edit (position in the file)
    N_GEN_TOKENS = 30       # length of the greedy continuations before / after the edit
    """),
    code("""
    FAST = {"v_num_grad_steps": 3, "cov_tokens": 5000} if SMOKE else {}  # preset overrides
    if SMOKE:  # every file is still written; the numbers mean little
        N_GEN_TOKENS = 5
    """),
    code("""
    import pandas as pd

    import pmetlab
    from pmetlab.evaluation import generate_texts, score_pairs
    from pmetlab.experiments import resolve_hparams
    from pmetlab.plots import plot_optimization_trace, plot_update_norms, save_figure

    pd.set_option("display.max_colwidth", 120)
    model, tok = pmetlab.load_model(MODEL, device=DEVICE)
    """),
    code("""
    record = pmetlab.load_counterfact()[CASE_INDEX]
    request = pmetlab.EditRequest.from_counterfact(record)
    request
    """),
    md("""
    Each method's preset for the model (`pmetlab/presets/*.json`), with the run's seed. The presets
    share the critical layers and the covariance; they differ in where the target is optimised, the
    loss weights, and the spread of the residual over the layers (`spread_exponent`: 0.5 vs 1).
    """),
    code("""
    hparams = {"PMET": resolve_hparams(MODEL, "pmet", {**FAST, "seed": SEED}),
               "MEMIT": resolve_hparams(MODEL, "memit", {**FAST, "seed": SEED})}
    pd.DataFrame({m: hp.to_dict() for m, hp in hparams.items()}).astype(str)
    """),
    code("""
    deltas = {m: pmetlab.compute_deltas(model, tok, [request], hp) for m, hp in hparams.items()}
    pd.DataFrame({m: d.meta["timings"] for m, d in deltas.items()}).round(1)  # seconds per stage
    """),
    md("""
    **Step 1: the targets.** The loss (NLL of the new object over the prompts with context prefixes,
    plus the KL and decay terms) and P(new object) at each optimisation step.
    """),
    code("""
    trace = pd.concat([pd.DataFrame(d.trace).assign(method=m) for m, d in deltas.items()], ignore_index=True)
    fig = plot_optimization_trace(trace, title=f"{request.subject}: {request.target_true} → {request.target_new}")
    save_figure(fig, OUTPUT_DIR, "02_optimization_trace", data=trace)
    fig
    """),
    md("""
    **Steps 2–4: the weight updates.** ‖ΔW_l‖ of the FFN output projection at each critical layer, with
    the solver's diagnostics (condition number, residual before/after the solve).
    """),
    code("""
    norms = pd.concat([pd.DataFrame(d.meta["diagnostics"]).assign(method=m) for m, d in deltas.items()],
                      ignore_index=True)
    norms["module"] = norms["component"].map({"ffn": "FFN", "attn": "MHSA"})
    fig = plot_update_norms(norms, value="update_norm", title="weight update per critical layer")
    save_figure(fig, OUTPUT_DIR, "02_update_norms", data=norms)
    fig
    """),
    md("""
    **Before and after.** `observe` reads, on the current model: P(new) and P(true) after the
    rewrite prompt, a paraphrase and a neighbourhood prompt (geometric mean over the object's tokens)
    with the model's top-1 next token; the record's CounterFact metrics; greedy continuations.
    `pmetlab.edited` applies an edit inside the `with` block and always undoes it.
    """),
    code("""
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
    """),
    code("""
    observed = {"unedited": observe()}
    for m, d in deltas.items():
        with pmetlab.edited(model, d):
            observed[m] = observe()
    predictions, record_metrics, generations = (
        pd.concat({state: obs[i] for state, obs in observed.items()}, names=["model"]).reset_index(0)
        for i in range(3))
    """),
    code("""
    predictions.to_csv(f"{OUTPUT_DIR}/02_predictions.csv", index=False)
    predictions
    """),
    code("""
    record_metrics.to_csv(f"{OUTPUT_DIR}/02_record_metrics.csv", index=False)
    record_metrics[["model", "efficacy_score", "paraphrase_score", "neighborhood_score",
                    "efficacy_magnitude", "neighborhood_magnitude"]]
    """),
    code("""
    generations.to_csv(f"{OUTPUT_DIR}/02_generations.csv", index=False)
    generations
    """),
    md("""
    **Undo and reload.** Apply the PMET edit in place, check that the model is recognised as edited,
    undo it, and compare the weights bit for bit; then save the edit, load it back, and check that it
    gives the same tensors and the same prediction.
    """),
    code("""
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
    """),
    code("""
    path = pmet.save(f"{OUTPUT_DIR}/02_edit_pmet.safetensors")
    loaded = pmetlab.Deltas.load(path)
    path.unlink()  # the output folder keeps figures and tables only
    same_tensors = loaded.tensors.keys() == pmet.tensors.keys() and all(
        bool((loaded.tensors[n] == t).all()) for n, t in pmet.tensors.items())
    with pmetlab.edited(model, loaded):
        p_reloaded = p_new()
    """),
    code("""
    checks = pd.DataFrame([
        ("the edit raises P(new) on the rewrite prompt", p_edited > p_unedited, f"{p_unedited:.4f} -> {p_edited:.4f}"),
        ("an applied edit is detected", edit_detected, "check_compatible raised EditMismatchError"),
        ("restore_ is bit-exact", bit_exact, f"{len(undo)} parameters compared"),
        ("P(new) after restore equals the unedited value", p_restored == p_unedited, f"{p_restored:.6f}"),
        ("a saved edit reloads to the same tensors", same_tensors, f"{len(loaded.tensors)} tensors"),
        ("the reloaded edit gives the same P(new)", p_reloaded == p_edited, f"{p_reloaded:.6f}"),
    ], columns=["check", "passed", "detail"])
    checks.to_csv(f"{OUTPUT_DIR}/02_checks.csv", index=False)
    assert checks["passed"].all(), checks[~checks["passed"]]
    checks
    """),
]

# -------------------------------------------------------------------------------------------------
# 03: reliability vs specificity against the number of edits
# -------------------------------------------------------------------------------------------------
NB03 = [
    md("""
    # 03 · Reliability and specificity against the number of edits

    **Reproduces**, at laptop scale, the main comparison of the PMET paper (Li et al., AAAI 2024;
    `docs/method.md` §6–7): batch-edit `n` CounterFact facts with PMET and with MEMIT and measure
    *reliability* (efficacy: P(new) > P(true) on the rewrite prompt; generalisation: the same on
    paraphrases) and *specificity* (neighbourhood: unrelated subjects keep their true object), with
    the unedited model as the reference. The paper reports, for 10,000 edits on GPT-J and
    GPT-NeoX-20B, **+3.3% average reliability over the best baseline on CounterFact with
    specificity about on par**. Here the model is SmolLM2-135M and `n` is at most a few dozen, so
    expect the direction of the effect at best; the 95% intervals show how much the numbers can say.

    **Writes** to `OUTPUT_DIR`: `03_tradeoff.{png,pdf,csv}` and `03_reliability_specificity.csv`
    (every run's summary, before and after); each run's directory (run.json, per-record metrics,
    the weight updates) under `RUNS_DIR`.

    **Takes** about 8 min with the defaults (n ∈ {1, 4, 16}, generation off; SmolLM2-135M in
    float32 on a CPU, one thread, `OMP_NUM_THREADS=1`): mostly the target optimisation, about 15 s per
    fact and method, cached per request so that notebook 04 and later runs reuse it (n up to 32:
    about 18 min). About a minute with `SMOKE = True`.
    """),
    params("""
    MODEL = "smollm2-135m"   # embedded model name or a local model directory
    DEVICE = "auto"          # "auto" (accelerator when present), "cpu", "cuda", ...
    SEED = 0                 # seeds the context prefixes (and the subset when SUBSET is "sample")
    SMOKE = False            # tiny sizes: a quick end-to-end check that writes every file
    OUTPUT_DIR = "figures"   # figures (PNG, PDF, CSV) and tables go here
    RUNS_DIR = "runs"        # run directories go under here (relative to the working directory)
    DATASET = "counterfact"  # "counterfact", "multi_counterfact" (no conflicting edits) or "zsre"
    N_EDITS_MAX = 16         # largest batch; the sweep edits 1, N_EDITS_MAX // 4 and N_EDITS_MAX facts
    SUBSET = "first"         # the first n records, or a seeded "sample"
    GENERATION = False       # CounterFact fluency/consistency: generates text, slow on a CPU
    N_GEN_TOKENS = 100       # tokens per generation prompt when GENERATION
    RESUME = False           # reuse finished runs of the same parameters in RUNS_DIR
    """),
    code("""
    FAST = {"v_num_grad_steps": 3, "cov_tokens": 5000} if SMOKE else {}  # preset overrides
    if SMOKE:  # every file is still written; the numbers mean little
        N_EDITS_MAX, GENERATION = 2, False
    n_grid = sorted({n for n in (1, N_EDITS_MAX // 4, N_EDITS_MAX) if n >= 1})
    n_grid
    """),
    code("""
    import pandas as pd

    import pmetlab
    from pmetlab.plots import plot_tradeoff, save_figure

    model, tok = pmetlab.load_model(MODEL, device=DEVICE)
    """),
    md("""
    One run per (method, n): edit the first `n` records in one batch, evaluate the unedited model
    ("pre") and the edited model ("post") on the same records. The runs share the optimised targets
    through the per-request cache, so the sweep costs about one optimisation per fact and method.
    """),
    code("""
    grid = [{"method": m, "n_edits": n} for m in ("pmet", "memit") for n in n_grid]
    sweep = pmetlab.run_sweep(
        grid, out_dir=f"{RUNS_DIR}/03_reliability_specificity{'_smoke' if SMOKE else ''}",
        model=MODEL, dataset=DATASET, seed=SEED, subset=SUBSET, hparams=FAST, generation=GENERATION,
        n_gen_tokens=N_GEN_TOKENS, resume=RESUME, model_and_tokenizer=(model, tok))
    sweep.to_csv(f"{OUTPUT_DIR}/03_reliability_specificity.csv", index=False)
    """),
    md("""
    The unedited model is each PMET run's "pre" phase (the same records, before the edit).
    """),
    code("""
    names = {"pmet": "PMET", "memit": "MEMIT"}
    unedited = sweep[(sweep["phase"] == "pre") & (sweep["method"] == "pmet")].assign(method="unedited")
    table = pd.concat([sweep[sweep["phase"] == "post"].replace({"method": names}), unedited], ignore_index=True)
    fig = plot_tradeoff(table, x="n_edits", title=f"{MODEL} on {DATASET}: edits in one batch")
    save_figure(fig, OUTPUT_DIR, "03_tradeoff", data=table)
    fig
    """),
    code("""
    metrics = ["efficacy_score", "paraphrase_score", "neighborhood_score", "score"]
    table.pivot_table(index="n_edits", columns="method", values=metrics).round(1)
    """),
]

# -------------------------------------------------------------------------------------------------
# 04: ablations
# -------------------------------------------------------------------------------------------------
NB04 = [
    md("""
    # 04 · Ablations: residual spread, δ^a, MHSA updates, λ

    **Reproduces** the ablations of the PMET paper (Li et al., AAAI 2024; `docs/method.md` §3) on one
    batch of CounterFact edits: the spread of the residual over the critical layers, R / (n − i)^p
    with p = 0 (none), 0.5 (PMET's square root) and 1 (MEMIT's even spread); PMET **without δ^a**
    (only the FFN hidden state optimised); PMET **also updating the MHSA output weights**; and the
    covariance weight λ (`mom2_update_weight`) at 0.1, 0.3, 1 and 3 times the preset (100, 300, 1000
    and 3000 for SmolLM2's preset λ = 1000). The paper
    reports that the square-root spread raises reliability at some cost in specificity, that dropping
    δ^a hurts, and that updating the MHSA weights as well helps only slightly.

    **Writes** to `OUTPUT_DIR`: `04_ablation.{png,pdf,csv}` (bars per variant),
    `04_spread_sweep.{png,pdf,csv}`, `04_lambda_sweep.{png,pdf,csv}` and `04_ablations.csv` (every
    run's summary, before and after); the run directories under `RUNS_DIR`.

    **Takes** about 8 min with the defaults (8 edits, 8 variants; SmolLM2-135M in float32 on a CPU,
    one thread, `OMP_NUM_THREADS=1`; after notebook 03 the PMET targets come from the cache, the
    w/o-δ^a targets and the MHSA covariance are new; 16 edits take about 15 min), and about 1.5 min
    with `SMOKE = True`.
    """),
    params("""
    MODEL = "smollm2-135m"   # embedded model name or a local model directory
    DEVICE = "auto"          # "auto" (accelerator when present), "cpu", "cuda", ...
    SEED = 0                 # seeds the context prefixes (and the subset when SUBSET is "sample")
    SMOKE = False            # tiny sizes: a quick end-to-end check that writes every file
    OUTPUT_DIR = "figures"   # figures (PNG, PDF, CSV) and tables go here
    RUNS_DIR = "runs"        # run directories go under here (relative to the working directory)
    DATASET = "counterfact"  # "counterfact", "multi_counterfact" (no conflicting edits) or "zsre"
    N_EDITS = 8              # facts edited in one batch by every variant
    SUBSET = "first"         # the first N_EDITS records, or a seeded "sample"
    RESUME = False           # reuse finished runs of the same parameters in RUNS_DIR
    """),
    code("""
    FAST = {"v_num_grad_steps": 3, "cov_tokens": 5000} if SMOKE else {}  # preset overrides
    if SMOKE:  # every file is still written; the numbers mean little
        N_EDITS = 2
    """),
    code("""
    import pandas as pd

    import pmetlab
    from pmetlab.experiments import resolve_hparams
    from pmetlab.plots import plot_ablation, plot_tradeoff, save_figure

    model, tok = pmetlab.load_model(MODEL, device=DEVICE)
    base = resolve_hparams(MODEL, "pmet", FAST)  # the preset every variant changes one field of
    """),
    md("""
    Every variant is PMET's preset with one field changed (the ablations are hyperparameters, not
    separate methods). The variants share the optimised targets through the per-request cache except
    "w/o δ^a", whose optimisation differs.
    """),
    code("""
    lambdas = [base.mom2_update_weight * f for f in ((0.3,) if SMOKE else (0.1, 0.3, 3))]
    variants = {"PMET": {}, "no spread (p=0)": {"spread_exponent": 0.0},
                "even spread (p=1)": {"spread_exponent": 1.0}, "w/o δ^a": {"optimize_attn": False},
                "+ MHSA update": {"update_attn_weights": True},
                **{f"λ={lam:,.0f}": {"mom2_update_weight": lam} for lam in lambdas}}
    grid = [{"label": name, "hparams": hp} for name, hp in variants.items()]
    pd.DataFrame({"variant": list(variants), "overrides": [str(hp) for hp in variants.values()]})
    """),
    code("""
    sweep = pmetlab.run_sweep(
        grid, out_dir=f"{RUNS_DIR}/04_ablations{'_smoke' if SMOKE else ''}", model=MODEL, method="pmet",
        dataset=DATASET, n_edits=N_EDITS, seed=SEED, subset=SUBSET, hparams=FAST, generation=False,
        resume=RESUME, model_and_tokenizer=(model, tok))
    sweep = sweep.fillna({"spread_exponent": base.spread_exponent, "mom2_update_weight": base.mom2_update_weight})
    sweep.to_csv(f"{OUTPUT_DIR}/04_ablations.csv", index=False)
    """),
    md("""
    The unedited model is the "pre" phase of the PMET run (the same records, before the edit).
    """),
    code("""
    post = sweep[sweep["phase"] == "post"].assign(variant=lambda d: d["label"])
    unedited = sweep[(sweep["phase"] == "pre") & (sweep["label"] == "PMET")].assign(variant="unedited")
    bars = pd.concat([unedited, post[~post["label"].str.startswith("λ=")]], ignore_index=True)
    fig = plot_ablation(bars, title=f"PMET ablations, {N_EDITS} edits ({MODEL})")
    save_figure(fig, OUTPUT_DIR, "04_ablation", data=bars)
    fig
    """),
    code("""
    spread = post[post["label"].isin(["PMET", "no spread (p=0)", "even spread (p=1)"])].assign(method="PMET")
    spread = pd.concat([spread, unedited.assign(method="unedited")], ignore_index=True)
    fig = plot_tradeoff(spread, x="spread_exponent", title="residual spread R / (n − i)^p")
    save_figure(fig, OUTPUT_DIR, "04_spread_sweep", data=spread)
    fig
    """),
    code("""
    lam = post[(post["label"] == "PMET") | post["label"].str.startswith("λ=")].assign(method="PMET")
    lam = pd.concat([lam, unedited.assign(method="unedited")], ignore_index=True)
    fig = plot_tradeoff(lam, x="mom2_update_weight", title="covariance weight λ")
    save_figure(fig, OUTPUT_DIR, "04_lambda_sweep", data=lam)
    fig
    """),
    code("""
    metrics = ["efficacy_score", "paraphrase_score", "neighborhood_score", "score"]
    pd.concat([unedited, post]).set_index("variant")[metrics].round(1)
    """),
]

NOTEBOOKS = {
    "01_component_similarity": NB01,
    "02_edit_walkthrough": NB02,
    "03_reliability_specificity": NB03,
    "04_ablations": NB04,
}


def build(name: str, cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO})
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: rebuilding gives the same bytes
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        text = nbformat.writes(build(name, cells)) + "\n"
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/_build.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
