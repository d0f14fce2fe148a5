"""Figures (pmetlab.plots): right number of panels and lines from small synthetic tidy DataFrames."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from pmetlab.plots import (
    SavedFigure,
    color_for,
    plot_ablation,
    plot_optimization_trace,
    plot_similarity,
    plot_tradeoff,
    plot_update_norms,
    save_figure,
)

RNG = np.random.default_rng(0)


def _similarity_summary(n_layers: int = 5) -> pd.DataFrame:
    rows = []
    for metric in ("cosine", "jaccard"):
        for comp in ("MHSA", "FFN"):
            for layer in range(n_layers):
                m = float(RNG.uniform(0.3, 0.9))
                rows.append(
                    dict(layer=layer, component=comp, metric=metric, mean=m, ci_low=m - 0.05, ci_high=m + 0.05, n=20)
                )
    return pd.DataFrame(rows)


def _tradeoff_summary() -> pd.DataFrame:
    rows = [
        dict(method=method, n_edits=n, metric=metric, mean=float(RNG.uniform()), ci_low=0.1, ci_high=0.9)
        for method in ("PMET", "MEMIT")
        for n in (1, 10, 100, 1000)
        for metric in ("efficacy", "paraphrase", "neighborhood")
    ]
    rows += [
        dict(method="unedited", n_edits=0, metric=metric, mean=0.5)
        for metric in ("efficacy", "paraphrase", "neighborhood")
    ]
    return pd.DataFrame(rows)


def _labelled_lines(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_plot_similarity_panels_lines_and_bands():
    df = _similarity_summary()
    fig = plot_similarity(df)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    for ax, metric in zip(fig.axes, ("cosine", "jaccard")):
        assert _labelled_lines(ax) == ["MHSA", "FFN"]
        assert len(ax.collections) == 2  # one CI band per component
        x, y = ax.get_lines()[0].get_data()
        want = df[(df.metric == metric) & (df.component == "MHSA")].sort_values("layer")["mean"]
        assert list(x) == list(range(5)) and np.allclose(y, want)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["MHSA", "FFN"]


def test_plot_similarity_names_the_projection_and_refuses_mixed_protocols():
    paper = _similarity_summary().assign(protocol="paper", projection="input_embeddings")
    fig = plot_similarity(paper)
    assert [ax.get_title() for ax in fig.axes] == ["cosine similarity", "Jaccard of top-k tokens (input embeddings)"]
    residual = paper.assign(protocol="residual", projection="logit_lens")
    assert plot_similarity(residual).axes[1].get_title() == "Jaccard of top-k tokens (logit lens)"
    with pytest.raises(ValueError, match=r"mixes protocols \['paper', 'residual'\]"):
        plot_similarity(pd.concat([paper, residual]))


def test_plot_similarity_from_per_prompt_values_and_subsets():
    values = pd.DataFrame(
        [
            dict(prompt_id=p, layer=l, component=c, metric=m, value=float(RNG.uniform()))
            for p in range(6)
            for l in range(4)
            for c in ("MHSA", "FFN")
            for m in ("cosine", "jaccard")
        ]
    )
    fig = plot_similarity(values, metrics=["jaccard"])
    assert len(fig.axes) == 1 and len(_labelled_lines(fig.axes[0])) == 2
    y = fig.axes[0].get_lines()[1].get_data()[1]  # FFN
    want = values[(values.metric == "jaccard") & (values.component == "FFN")].groupby("layer")["value"].mean()
    assert np.allclose(y, want.to_numpy())


def test_plot_tradeoff_methods_baseline_and_log_axis():
    fig = plot_tradeoff(_tradeoff_summary(), x="n_edits")
    assert len(fig.axes) == 3
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["efficacy (reliability)", "paraphrase (reliability)", "neighborhood (specificity)"]
    for ax in fig.axes:
        assert _labelled_lines(ax) == ["PMET", "MEMIT", "unedited"]
        assert ax.get_xscale() == "log"
    fig = plot_tradeoff(_tradeoff_summary(), methods=["MEMIT"], metrics=["neighborhood"], log_x=False)
    assert len(fig.axes) == 1 and _labelled_lines(fig.axes[0]) == ["MEMIT", "unedited"]
    assert fig.axes[0].get_xscale() == "linear"
    with pytest.raises(ValueError, match="ROME"):
        plot_tradeoff(_tradeoff_summary(), methods=["ROME"])


def test_wide_evaluation_summaries_are_accepted():
    """The wide form of pmetlab.evaluation.summary.summarize: <metric>, <metric>_ci_low/high."""
    rows = []
    for method, n in [("PMET", 1), ("PMET", 100), ("MEMIT", 1), ("MEMIT", 100), ("unedited", 0)]:
        row = dict(method=method, n_edits=n, n_records=50, score=80.0, score_ci_low=75.0, score_ci_high=85.0)
        for m in ("efficacy_score", "paraphrase_score", "neighborhood_score", "fluency"):
            v = float(RNG.uniform(0, 100))
            row.update({m: v, f"{m}_ci_low": v - 5, f"{m}_ci_high": v + 5})
        rows.append(row)
    wide = pd.DataFrame(rows)
    fig = plot_tradeoff(wide)
    assert [ax.get_title() for ax in fig.axes] == [
        "efficacy (ES) (reliability)",
        "paraphrase (PS) (reliability)",
        "neighborhood (NS) (specificity)",
    ]
    y = fig.axes[2].get_lines()[0].get_data()[1]
    assert np.allclose(y, wide[wide.method == "PMET"]["neighborhood_score"])
    ablation = wide[wide.n_edits != 1].drop(columns="n_edits").rename(columns={"method": "variant"})
    fig = plot_ablation(ablation, metrics=["score", "efficacy_score"])
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert len(bars) == 3 and bars[0][0].get_height() == pytest.approx(80.0)
    with pytest.raises(ValueError, match="several rows"):  # one summary row per variant, please
        plot_ablation(wide.rename(columns={"method": "variant"}))


def test_plot_ablation_one_bar_group_per_variant():
    df = pd.DataFrame(
        [
            dict(variant=v, metric=m, value=float(RNG.uniform()))
            for v in ("PMET", "w/o δ^a", "even spread", "update MHSA")
            for m in ("efficacy", "paraphrase", "neighborhood")
            for _ in range(4)
        ]
    )
    fig = plot_ablation(df)
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 4 and all(len(b) == 3 for b in bars)
    want = df[(df.variant == "PMET") & (df.metric == "paraphrase")]["value"].mean()
    assert bars[0][1].get_height() == pytest.approx(want)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["efficacy", "paraphrase", "neighborhood"]


def test_plot_optimization_trace_wide_and_long():
    steps = np.arange(10)
    wide = pd.DataFrame(
        [
            dict(method=m, request=r, step=s, loss=float(np.exp(-s / 3) + 0.01), p_target=float(1 - np.exp(-s / 3)))
            for m in ("PMET", "MEMIT")
            for r in range(3)
            for s in steps
        ]
    )
    fig = plot_optimization_trace(wide)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.get_lines()) == 6  # 2 methods x 3 requests
    assert fig.axes[0].get_yscale() == "log"
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["PMET", "MEMIT"]
    long = wide.melt(id_vars=["method", "request", "step"], var_name="quantity", value_name="value")
    fig2 = plot_optimization_trace(long, quantities=["p_target"])
    assert len(fig2.axes) == 1 and len(fig2.axes[0].get_lines()) == 6
    with pytest.raises(KeyError, match="quantities"):
        plot_optimization_trace(wide[["step"]])


def test_plot_update_norms_panels_per_module():
    df = pd.DataFrame(
        [
            dict(method=m, layer=l, module=mod, norm=float(RNG.uniform()))
            for m in ("PMET", "MEMIT")
            for l in range(3, 9)
            for mod in ("FFN", "MHSA")
            for _ in range(2)
        ]
    )
    fig = plot_update_norms(df)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == 2 and all(len(b) == 6 for b in bars)
    fig = plot_update_norms(df[df.module == "FFN"].drop(columns="module"))
    assert len(fig.axes) == 1


def test_plots_reject_missing_columns():
    with pytest.raises(KeyError, match="component"):
        plot_similarity(_similarity_summary().drop(columns="component"))
    with pytest.raises(KeyError, match="'mean'"):
        plot_tradeoff(_tradeoff_summary().drop(columns="mean"))
    with pytest.raises(ValueError, match="empty"):
        plot_ablation(pd.DataFrame(columns=["variant", "metric", "mean"]))


def test_style_does_not_leak_and_pyplot_is_untouched():
    import matplotlib.pyplot as plt

    before = dict(matplotlib.rcParams)
    open_before = plt.get_fignums()
    plot_similarity(_similarity_summary())
    assert dict(matplotlib.rcParams) == before
    assert plt.get_fignums() == open_before


def test_colors_are_stable():
    assert color_for("PMET") == color_for("PMET", ["MEMIT", "PMET"])
    assert color_for("MHSA") != color_for("FFN")
    assert color_for("variant-x") == color_for("variant-x")


def test_save_figure_writes_png_pdf_csv(tmp_path):
    df = _similarity_summary()
    fig = plot_similarity(df)
    saved = save_figure(fig, tmp_path / "figs", "fig1_similarity", df)
    assert isinstance(saved, SavedFigure)
    assert [p.name for p in saved.paths] == ["fig1_similarity.png", "fig1_similarity.pdf", "fig1_similarity.csv"]
    assert saved.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved.pdf.read_bytes()[:5] == b"%PDF-"
    back = pd.read_csv(saved.csv)
    assert list(back.columns) == list(df.columns) and len(back) == len(df)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(p.name for p in saved.paths)
    # Re-saving replaces the files; the PDF carries no date, so it is byte-identical.
    pdf_bytes = saved.pdf.read_bytes()
    again = save_figure(fig, tmp_path / "figs", "fig1_similarity")
    assert again.csv is None and again.pdf.read_bytes() == pdf_bytes


@pytest.mark.parametrize("name", ["", "a/b", "fig.png", "../up", " space"])
def test_save_figure_rejects_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="file stem"):
        save_figure(plot_similarity(_similarity_summary()), tmp_path, name)
