"""Regenerate the generated sections of the README and the docs pages from the committed results.

    python docs/build_readme.py          # rewrite the generated sections of every document
    python docs/build_readme.py --check  # exit 1 when a section differs from what this writes

A generated section is a ``<!-- pmetlab:begin NAME -->`` / ``<!-- pmetlab:end NAME -->`` pair in one
of ``DOCUMENTS`` (README.md and the docs pages); its body is ``BUILDERS[NAME]()``. Where a section
renders is decided by where its markers are: move the pair to move the section. Every builder must
have a section in some document, and a section may appear in several.

Every number in a generated section comes from a file under ``docs/results/`` or
``benchmarks/results/`` (see ``docs/results/README.md`` for the command that produced each);
nothing is typed by hand. ``tests/test_readme.py`` runs the check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pmetlab.reporting import format_ci, markdown_table, render_sections, section_names, stale_sections

logger = logging.getLogger("build_readme")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
README = REPO / "README.md"
#: The documents whose generated sections this script keeps current (the README first).
DOCUMENTS = (
    README,
    REPO / "docs" / "index.md",
    REPO / "docs" / "results.md",
    REPO / "docs" / "performance.md",
)
MODELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}
METHOD_NAMES = {"pmet": "PMET", "memit": "MEMIT", "none": "unedited"}


def _ci(row: pd.Series, metric: str) -> str:
    return format_ci(row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"])


def _score_columns(row: pd.Series) -> dict[str, str]:
    return {
        "ES": _ci(row, "efficacy_score"),
        "PS": _ci(row, "paraphrase_score"),
        "NS": _ci(row, "neighborhood_score"),
        "Score": _ci(row, "score"),
    }


def _target_columns(row: pd.Series) -> dict[str, str]:
    p = row.get("target_p_target_final_mean")
    if p is None or pd.isna(p):
        return dict.fromkeys(_TARGET_HEADERS, "–")
    return {
        "p(o*) reached": f"{p:.2f}",
        "steps": f"{row['target_steps_mean']:.1f}",
        "at step cap": f"{100 * row['target_share_at_step_cap']:.0f}%",
        "δ at norm bound": f"{100 * row['target_share_delta_at_clamp']:.0f}%",
    }


_TARGET_HEADERS = ("p(o*) reached", "steps", "at step cap", "δ at norm bound")


def stop_rule_section() -> str:
    """PMET and MEMIT on 20 CounterFact requests, before and after MEMIT got its own stop rule."""
    df = pd.read_csv(RESULTS / "smollm2-135m" / "stop_rule_20.csv")
    rows = []
    for _, r in df[df["phase"] == "post"].iterrows():
        rule = r.get("hp_stop_rule")
        rows.append(
            {
                "code": r["code"],
                "method": METHOD_NAMES[r["method"]],
                "stop rule": "pmet" if pd.isna(rule) else rule,
                **_score_columns(r),
                **_target_columns(r),
            }
        )
    pre = df[df["phase"] == "pre"].iloc[0]
    rows.append(
        {
            "code": "–",
            "method": "unedited",
            "stop rule": "–",
            **_score_columns(pre),
            **dict.fromkeys(_TARGET_HEADERS, "–"),
        }
    )
    post = df[df["phase"] == "post"].set_index(["code", "method"])
    mb, ma, pa = post.loc[("before", "memit")], post.loc[("after", "memit")], post.loc[("after", "pmet")]
    text = (
        f"With its own rule MEMIT's targets reach p(o*) = {ma['target_p_target_final_mean']:.2f} instead of "
        f"{mb['target_p_target_final_mean']:.2f}, and its Score moves from {mb['score']:.1f} to "
        f"{ma['score']:.1f}. PMET is unchanged ({pa['score']:.1f}, bit-identical updates); its targets stop "
        f"at p(o*) = {pa['target_p_target_final_mean']:.2f} with "
        f"{100 * pa['target_share_at_step_cap']:.0f}% of the requests at the step cap and "
        f"{100 * pa['target_share_delta_at_clamp']:.0f}% of the δ vectors on the norm bound "
        f"(clamp_norm_factor · ‖init‖): on SmolLM2 the clamp and the step cap, not the stopping rule, hold PMET back."
    )
    return markdown_table(pd.DataFrame(rows)) + "\n\n" + text


def presets_section() -> str:
    """λ re-check of the SmolLM2 presets (20 CounterFact requests in one batch)."""
    df = pd.read_csv(RESULTS / "smollm2-135m" / "lambda_check_20.csv")
    post = df[df["phase"] == "post"].sort_values(["method", "hp_mom2_update_weight"], ascending=[False, True])
    rows = [
        {
            "method": METHOD_NAMES[r["method"]],
            "λ": f"{r['hp_mom2_update_weight']:g}",
            "stop rule": r["hp_stop_rule"],
            **_score_columns(r),
            **_target_columns(r),
        }
        for _, r in post.iterrows()
    ]
    pre = df[df["phase"] == "pre"].iloc[0]
    rows.append(
        {"method": "unedited", "λ": "–", "stop rule": "–", **_score_columns(pre), **dict.fromkeys(_TARGET_HEADERS, "–")}
    )
    return markdown_table(pd.DataFrame(rows))


def _by_depth_table(model: str) -> pd.DataFrame:
    df = pd.read_csv(RESULTS / model / "01_similarity_by_depth.csv")
    depth = [c for c in ("early", "middle", "late") if c in df.columns]
    out = df[["protocol", "metric", "component", *depth]].copy()
    out.insert(0, "model", MODELS[model])
    return out


def similarity_section() -> str:
    """Notebook 01's by-depth table under both protocols, and its generated reading, per model."""
    parts = []
    for model, name in MODELS.items():
        folder = RESULTS / model
        if not (folder / "01_similarity_by_depth.csv").is_file():
            continue
        reading = (folder / "01_reading.md").read_text().strip()
        parts.append(f"**{name}**\n\n{markdown_table(_by_depth_table(model))}\n\n{reading}\n")
    return "\n".join(parts)


def figures_timing_section() -> str:
    """Wall time of each notebook in the committed ``make figures`` report."""
    report = json.loads((RESULTS / "make_figures_report.json").read_text())
    parts = [f"{nb['name'][:2]} {nb['seconds']:.0f} s ({nb['status']})" for nb in report["notebooks"]]
    total = sum(nb["seconds"] for nb in report["notebooks"])
    return (
        f"Timings of the run behind `docs/figures/` ({report['started'][:16].replace('T', ' ')} UTC, "
        f"{report.get('threads', '?')} torch thread per kernel, 2-core machine; "
        f"`docs/results/make_figures_report.json`): {', '.join(parts)}; {total / 60:.1f} min in all. "
        f"{report.get('note', '')}".rstrip()
    )


def _window_comparison(model: str) -> str:
    """PMET's 04 variants with the preset's window next to the located one (when both are committed)."""
    preset = RESULTS / model / "figures" / "04_ablations.csv"
    located = RESULTS / model / "04_ablations_located.csv"
    if not (preset.is_file() and located.is_file()):
        return ""
    rows = []
    for tag, path in (("preset", preset), ("located", located)):
        df = pd.read_csv(path)
        for _, r in df[(df["phase"] == "post") & df["label"].isin(["PMET", "w/o δ^a"])].iterrows():
            rows.append({"window": f"{tag} ({r['hp_layers']})", "variant": r["label"], **_score_columns(r)})
    return markdown_table(pd.DataFrame(rows))


def locate_section() -> str:
    """Notebook 05's generated reading per model, and the 04 quick profile on both windows."""
    parts = []
    for model, name in MODELS.items():
        reading = RESULTS / model / "05_reading.md"
        if reading.is_file():
            parts.append(f"**{name}**: {reading.read_text().strip()}")
        table = _window_comparison(model)
        if table:
            n = int(pd.read_csv(RESULTS / model / "04_ablations_located.csv")["n_edits"].iloc[0])
            parts.append(
                f"Notebook 04's quick profile ({n} CounterFact edits, one batch) on {name} with the "
                f"preset's window and with the located one:\n\n{table}"
            )
    return "\n\n".join(parts)


BUILDERS: dict[str, Callable[[], str]] = {
    "stop-rule": stop_rule_section,
    "presets": presets_section,
    "similarity": similarity_section,
    "figures-timing": figures_timing_section,
    "locate": locate_section,
}


def _sibling_builders(module: str) -> dict[str, Callable[[], str]]:
    """The ``BUILDERS`` of a sibling module (``evidence_sections.py``, ``bench_sections.py``)."""
    spec = importlib.util.spec_from_file_location(module, Path(__file__).with_name(f"{module}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.BUILDERS


BUILDERS.update(_sibling_builders("evidence_sections"))
BUILDERS.update(_sibling_builders("bench_sections"))


def builders_of(text: str) -> dict[str, Callable[[], str]]:
    """The builders of the sections that ``text`` holds."""
    names = set(section_names(text))
    return {n: b for n, b in BUILDERS.items() if n in names}


def unplaced_builders() -> list[str]:
    """Builders whose section is in none of ``DOCUMENTS`` (each must render somewhere)."""
    placed = {n for doc in DOCUMENTS for n in section_names(doc.read_text())}
    return sorted(set(BUILDERS) - placed)


def stale_documents() -> dict[str, list[str]]:
    """Document (relative path) -> names of its sections that differ from what the builders write."""
    out = {}
    for doc in DOCUMENTS:
        text = doc.read_text()
        stale = stale_sections(text, builders_of(text))
        if stale:
            out[str(doc.relative_to(REPO))] = stale
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a document is out of date")
    args = ap.parse_args(argv)
    unplaced = unplaced_builders()
    if unplaced:
        docs = [str(d.relative_to(REPO)) for d in DOCUMENTS]
        print(f"sections {unplaced} are in none of {docs}; add their marker pairs to one", file=sys.stderr)
        return 1
    if args.check:
        stale = stale_documents()
        if stale:
            print(f"sections out of date: {stale}; run `python docs/build_readme.py`", file=sys.stderr)
            return 1
        return 0
    for doc in DOCUMENTS:
        text = doc.read_text()
        rendered = render_sections(text, builders_of(text))
        if rendered != text:
            doc.write_text(rendered)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
