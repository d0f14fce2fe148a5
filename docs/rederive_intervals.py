"""Re-derive the committed results' intervals as Wilson intervals, and the readings built on them.

    python docs/rederive_intervals.py          # rewrite what differs (CSVs, readings, 03 figures)
    python docs/rederive_intervals.py --check  # exit 1 when a committed file differs from what this writes

The summaries under ``docs/results/`` were written with normal (Wald) intervals, which have zero
width at 0% and 100%, and their per-record metrics were not kept. For every rate (ES, PS, NS, the
zsRE token accuracies, relative specificity) the Wilson interval needs only the mean and the number
of records, so :func:`pmetlab.evaluation.summary.wilson_from_summary` recomputes it from the
committed mean and ``n_records`` and marks the row's ``ci_method`` "wilson (re-derived from mean
and n_records)". A Score interval of zero width at 0 or 100 is widened to the Wilson interval of
its weakest part; other Score intervals and the magnitudes keep their committed values. Then the
notebook readings (``03_reading.md``, ``04_reading.md``, ``07_reading.md``) are regenerated from
the re-derived tables (unpaired: no per-record data), and notebook 03's figure data lose their
single-record rows (n = 1: one record has no interval; ``03_reliability_specificity.csv`` keeps
them) and the figure is redrawn without them. ``make readme`` runs this first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pmetlab.analysis import ablation_reading, collapse_reading, rounds_reading, tradeoff_reading
from pmetlab.evaluation.summary import RATE_METRICS, wilson_from_summary
from pmetlab.plots import plot_tradeoff, save_figure

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
FIGURES = REPO / "docs" / "figures"


def summary_csvs(root: Path = RESULTS) -> list[Path]:
    """The committed summaries: CSVs under ``root`` with ``n_records`` and a rate's interval."""
    out = []
    for path in sorted(root.rglob("*.csv")):
        cols = set(pd.read_csv(path, nrows=0).columns)
        if "n_records" in cols and any(f"{m}_ci_low" in cols for m in RATE_METRICS):
            out.append(path)
    return out


def rederived_csv(path: Path) -> str:
    """The CSV text of ``path`` with its rate intervals re-derived as Wilson intervals."""
    return wilson_from_summary(pd.read_csv(path)).to_csv(index=False)


def _model(table: pd.DataFrame, folder: Path) -> str:
    return str(table["model"].iloc[0]) if "model" in table.columns else folder.parent.name


def _reading_03(d: Path) -> str:
    table = pd.read_csv(d / "03_tradeoff.csv")
    return tradeoff_reading(table, model_name=_model(table, d))


def _reading_04(d: Path) -> str:
    table = pd.read_csv(d / "04_ablation.csv")
    return ablation_reading(table, model_name=_model(table, d), n_edits=int(table["n_edits"].iloc[0]))


def _reading_07(d: Path) -> str:
    table = pd.read_csv(d / "07_rounds_summary.csv")
    if "weight_change" in table.columns:  # runs with collapse diagnostics (issue #25): notebook 07's newer reading
        return collapse_reading(table, model_name=_model(table, d))
    return rounds_reading(table, model_name=_model(table, d))


#: reading file → (the table it is generated from, the generator)
READINGS: dict[str, tuple[str, Callable[[Path], str]]] = {
    "03_reading.md": ("03_tradeoff.csv", _reading_03),
    "04_reading.md": ("04_ablation.csv", _reading_04),
    "07_reading.md": ("07_rounds_summary.csv", _reading_07),
}


def readings(root: Path = RESULTS) -> dict[Path, str]:
    """Every committed notebook reading under ``root`` → its text regenerated from its table."""
    out = {}
    for name, (table, make) in READINGS.items():
        for path in sorted(root.rglob(name)):
            if (path.parent / table).is_file():
                out[path] = make(path.parent) + "\n"
    return out


def single_record_tradeoffs(root: Path = RESULTS) -> list[Path]:
    """Committed ``03_tradeoff.csv`` files (notebook 03's figure data) that still hold a
    single-record row (n = 1)."""
    return [p for p in sorted(root.rglob("03_tradeoff.csv")) if (pd.read_csv(p)["n_records"] < 2).any()]


def redraw_tradeoff(csv: Path) -> list[Path]:
    """Drop the single-record rows of ``csv`` (re-derived as Wilson), rewrite it and redraw the
    figure it feeds: ``03_tradeoff.{png,pdf}`` beside it, and ``docs/figures/03_tradeoff.png`` for
    the ``make figures`` run's copy (``docs/results/smollm2-135m/figures``). Returns what it wrote."""
    table = wilson_from_summary(pd.read_csv(csv))
    table = table[table["n_records"] >= 2]
    csv.write_text(table.to_csv(index=False))
    dataset = table["dataset"].iloc[0] if "dataset" in table.columns else "counterfact"
    title = f"{_model(table, csv.parent)} on {dataset}: edits in one batch"
    written = [csv]
    if (csv.parent / "03_tradeoff.png").is_file():
        written += save_figure(plot_tradeoff(table, x="n_edits", title=title), csv.parent, "03_tradeoff").paths[:2]
    if csv.parent.name == "figures" and (FIGURES / "03_tradeoff.png").is_file():
        saved = save_figure(plot_tradeoff(table, x="n_edits", title=title), FIGURES, "03_tradeoff")
        saved.pdf.unlink()  # docs/figures keeps the PNGs only
        written.append(saved.png)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a committed file is not re-derived")
    args = ap.parse_args(argv)
    stale: list[Path] = []
    for csv in single_record_tradeoffs():
        stale += redraw_tradeoff(csv) if not args.check else [csv]
    for path in summary_csvs():
        text = rederived_csv(path)
        if path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    for path, text in readings().items():
        if path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print(f"not re-derived: {[str(p.relative_to(REPO)) for p in stale]}; run `python docs/rederive_intervals.py`")
        return 1
    for p in stale:
        print(f"rewrote {p.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
