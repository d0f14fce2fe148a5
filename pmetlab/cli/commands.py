"""What each ``pmetlab`` sub-command does, given its parsed arguments; each returns an exit status.
Heavy imports (torch, models, runs) happen inside the commands, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .args import pairs_to_dict

__all__ = ["cmd_run", "cmd_stats", "cmd_summarize", "cmd_notebooks", "cmd_demo"]

_SUMMARY_COLUMNS = (
    "label",
    "method",
    "dataset",
    "n_edits",
    "mode",
    "phase",
    "n_records",
    "score",
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "efficacy_token_acc",
    "paraphrase_token_acc",
    "neighborhood_token_acc",
    "relative_specificity",
    "fluency",
    "consistency",
)


def _echo(text: str = "") -> None:
    """The command's output (stdout); logging goes to stderr."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def _table(df, columns: Sequence[str] = _SUMMARY_COLUMNS) -> str:
    import pandas as pd

    cols = [c for c in columns if c in df.columns and not df[c].isna().all()]
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.1f}".format):
        return df[cols].to_string(index=False) if cols else df.to_string(index=False)


def _out_path(value: str | None, option: str = "--out") -> Path | None:
    """``--out`` as a path; an empty value is refused (it would write into the current directory)."""
    if value is not None and not value.strip():
        raise ValueError(f"{option} must be a path, got {value!r}; give a path or leave {option} out")
    return Path(value) if value is not None else None


def cmd_run(args: argparse.Namespace) -> int:
    from ..runs import RunDir, run_experiment

    _out_path(args.out)
    res = run_experiment(
        model=args.model,
        method=args.method,
        dataset=args.dataset,
        n_edits=args.n_edits,
        batch_size=args.batch_size,
        mode=args.mode,
        hparams=pairs_to_dict(args.hparams),
        seed=args.seed,
        subset=args.subset,
        split=args.split,
        out_dir=args.out,
        generation=not args.no_generation,
        n_gen_tokens=args.n_gen_tokens,
        eval_batch_size=args.eval_batch_size,
        label=args.label,
        resume=not args.no_resume,
        progress=not args.no_progress,
        workers=args.workers,
        beyond=args.beyond,
    )
    _echo(_table(res.summary))
    _echo(f"run directory: {res.run_dir}")
    store = RunDir(res.run_dir)
    _echo(f"summary: {store.summary_csv}; records: {store.records}; run record: {store.run_json}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from ..devices import worker_device
    from ..distributed import init_from_env
    from ..experiments import resolve_hparams
    from ..models.loading import load_model
    from ..stats import covariance_cache_paths, layer_covariances

    hp = resolve_hparams(args.model, "pmet")
    layers = args.layers if args.layers is not None else list(hp.layers)
    device = worker_device(args.device)  # under a launcher: one accelerator per worker
    shard = init_from_env(device)  # torchrun / accelerate launch: shard the corpus across workers
    model, tok = load_model(args.model, device=device)
    # the preset's settings; the options that were given override them
    spec = hp.covariance.replace(corpus=args.corpus, n_tokens=args.tokens, seq_len=args.seq_len, dtype=args.dtype)
    covs = layer_covariances(model, tok, layers, kind=args.kind, spec=spec, progress=not args.no_progress, shard=shard)
    if not shard.is_main:
        return 0
    if shard.world > 1:
        _echo(f"merged the statistics of {shard.world} workers")
    paths = covariance_cache_paths(model, covs, kind=args.kind)
    for l, sm in covs.items():
        where = str(paths[l]) if paths[l].is_file() else f"{paths[l]} (not written here; see the log)"
        _echo(f"layer {l:3d} {args.kind}: {tuple(sm.sum.shape)} from {sm.count} tokens -> {where}")
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    from ..runs import collect_summaries

    out = _out_path(args.out)
    found = collect_summaries(args.run_dirs)
    if found.table.empty:
        raise LookupError("no run could be summarised: " + "; ".join(f"{d}: {why}" for d, why in found.skipped.items()))
    shown = found.table.copy()
    shown["run"] = [Path(d).name for d in shown["run_dir"]]
    _echo(_table(shown, ("run", "status") + _SUMMARY_COLUMNS))
    for d, why in found.skipped.items():
        _echo(f"not summarised: {d}: {why}")
    if out is not None:
        from ..cache import atomic_path

        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:  # a failed write leaves no half table behind
            found.table.to_csv(tmp, index=False)
        _echo(f"wrote {out}")
    return 0


_OK_STATUSES = {"ok", "passed", "pass", "success", "succeeded", "done", "skipped", "completed"}


def _notebook_failed(r: dict) -> bool:
    if r.get("ok") is False or r.get("success") is False:
        return True
    status = r.get("status")
    if status is not None:
        return str(status).lower() not in _OK_STATUSES
    return bool(r.get("error"))


def _notebook_table(results: list[dict]) -> str:
    """One line per notebook: name, status, seconds, then what went wrong (error, missing files)."""
    import pandas as pd

    rows = []
    for r in results:
        row = {"name": r.get("name"), "status": r.get("status", "failed" if _notebook_failed(r) else "ok")}
        if "seconds" in r:
            row["seconds"] = round(float(r["seconds"]), 1) if r["seconds"] is not None else None
        problem = []
        if r.get("error"):
            problem.append((f"cell {r['cell']}: " if r.get("cell") is not None else "") + str(r["error"]))
        if r.get("missing"):
            problem.append("missing " + ", ".join(map(str, r["missing"])))
        row["detail"] = " ".join("; ".join(problem).split())[:120]
        rows.append(row)
    with pd.option_context("display.width", 200, "display.max_colwidth", 120):
        return pd.DataFrame(rows).to_string(index=False)


def _copy_or_list_notebooks(args: argparse.Namespace) -> int:
    """``--list``: the notebooks and their titles; ``--copy DIR``: editable copies of the pairs."""
    from ..notebooks import NOTEBOOKS_DIR, copy_notebooks, notebook_titles

    running = [flag for flag, used in (("--out", args.out), ("--smoke", args.smoke), ("-p", args.parameter)) if used]
    if running:
        raise ValueError(f"--copy and --list run no notebook: leave out {' and '.join(running)}")
    if args.list:
        titles = notebook_titles(args.only)
        width = max(map(len, titles), default=0)
        for name, title in titles.items():
            _echo(f"{name:<{width}}  {title}")
        _echo(f"{len(titles)} notebooks in {NOTEBOOKS_DIR}; copy them to edit: pmetlab notebooks --copy DIR")
        return 0
    dest = _out_path(args.copy, "--copy")
    written = copy_notebooks(dest, names=args.only, overwrite=args.force)
    for path in written:
        _echo(f"wrote {path}")
    pairs = len({p.stem for p in written})
    _echo(f"copied {pairs} notebooks ({len(written)} files) into {dest}; open them with: jupyter lab {dest}")
    return 0


def cmd_notebooks(args: argparse.Namespace) -> int:
    if args.force and args.copy is None:
        raise ValueError("--force replaces files that --copy would write; give --copy DIR with it")
    if args.copy is not None or args.list:
        return _copy_or_list_notebooks(args)
    try:
        from ..notebooks import run_notebooks
    except ImportError as exc:
        raise ValueError(
            f"notebook support is unavailable ({exc}); install the 'notebooks' extra (pip install 'pmetlab[notebooks]')"
        ) from None
    out = args.out if args.out is not None else "figures"
    results = run_notebooks(out, names=args.only, parameters=pairs_to_dict(args.parameter) or None, smoke=args.smoke)
    results = list(results or [])
    if results:
        _echo(_notebook_table(results))
    failed = [r for r in results if _notebook_failed(r)]
    _echo(
        f"{len(results) - len(failed)}/{len(results)} notebooks ok"
        + (f"; failed: {', '.join(str(r.get('name', '?')) for r in failed)}" if failed else "")
    )
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ..editing.compute import compute_deltas
    from ..editing.deltas import edited
    from ..evaluation import score_pairs
    from ..models.loading import load_model
    from ..requests import EditRequest
    from ..runs import resolve_hparams

    req = EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target, target_true=args.target_true)
    hp = resolve_hparams(args.model, "pmet", pairs_to_dict(args.hparams))
    model, tok = load_model(args.model)
    prompts = [req.text, f"{args.subject}, which is in the country of"]

    def report(tag: str) -> None:
        _echo(f"--- {tag}")
        for pr in prompts:
            sc = score_pairs(model, tok, [pr, pr], [req.target_new, req.target_true], progress=False)
            p_new, p_true = (float(torch.exp(torch.tensor(-x))) for x in sc.nll)
            ids = tok(pr, return_tensors="pt").to(model.device)
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            cont = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            _echo(f"{pr!r} -> {cont.strip()!r}   P({req.target_new})={p_new:.3f}  P({req.target_true})={p_true:.3f}")

    report("before the edit")
    torch.manual_seed(hp.seed)
    deltas = compute_deltas(model, tok, [req], hp, progress=not args.no_progress)
    with edited(model, deltas):
        report(f"after the PMET edit {req.subject!r}: {req.target_true!r} -> {req.target_new!r}")
    _echo("update norms: " + ", ".join(f"{n} {v:.2f}" for n, v in deltas.norms().items()))
    return 0
