"""The edit explorer's widgets (ipywidgets): a thin layer over :class:`.session.EditSession`.

Every button calls a method of :class:`Explorer` (``on_pick``, ``on_run``, ``on_undo``,
``on_save``), so tests drive the explorer headless by calling them; the status line says what
happened ("edit applied ...", "undone ...", "error: ...").
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ..hparams import layers_from_text
from .session import EditOutcome, EditSession, Fact

logger = logging.getLogger(__name__)

__all__ = ["Explorer"]

STATUS_APPLIED = "edit applied"


def _widgets():
    try:
        import ipywidgets
    except ImportError:  # pragma: no cover - the notebooks extra installs it
        raise ImportError(
            "the explorer needs ipywidgets: pip install 'pmetlab[notebooks]' (or pip install ipywidgets)"
        ) from None
    return ipywidgets


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0) if not df.empty else ""


class Explorer:
    """Pick a CounterFact/zsRE record or type a fact, choose PMET or MEMIT and the main knobs,
    run the edit, see what changed, undo, save.

    Args:
        session: the model and its edit state.
        records: records to pick from, by dataset name ("counterfact", "zsre").
    """

    def __init__(self, session: EditSession, records: Mapping[str, Sequence[Mapping[str, Any]]] | None = None):
        w = _widgets()
        self.session, self.records = session, dict(records or {})
        self.dataset = w.Dropdown(options=list(self.records) or ["(typed)"], description="dataset")
        self.index = w.BoundedIntText(value=0, min=0, max=max(0, self._n_records() - 1), description="record")
        self.pick = w.Button(description="load record")
        self.subject = w.Text(description="subject")
        self.prompt = w.Text(description="prompt", placeholder="{} plays the")
        self.target_new = w.Text(description="new object")
        self.target_true = w.Text(description="true object")
        self.paraphrase = w.Text(description="paraphrase")
        self.neighborhood = w.Text(description="neighbour")
        self.method = w.ToggleButtons(options=[("PMET", "pmet"), ("MEMIT", "memit")], value="pmet")
        self.layers = w.Text(description="layers", placeholder="preset")
        self.lam = w.FloatText(value=0.0, description="λ (0: preset)")
        self.spread = w.FloatText(value=-1.0, description="spread p (-1: preset)")
        self.no_attn = w.Checkbox(value=False, description="w/o δ^a (PMET)")
        self.run = w.Button(description="run edit", button_style="primary")
        self.undo_button = w.Button(description="undo")
        self.save_path = w.Text(value="edit.safetensors", description="save to")
        self.save_button = w.Button(description="save")
        self.status = w.HTML(value="no edit yet")
        self.result = w.HTML(value="")
        self.progress = w.Output()
        self.pick.on_click(self.on_pick)
        self.run.on_click(self.on_run)
        self.undo_button.on_click(self.on_undo)
        self.save_button.on_click(self.on_save)
        self.widget = self._layout(w)
        if self.records:
            self.on_pick()

    def _layout(self, w):
        return w.VBox(
            [
                w.HBox([self.dataset, self.index, self.pick]),
                w.HBox([self.subject, self.prompt]),
                w.HBox([self.target_new, self.target_true]),
                w.HBox([self.paraphrase, self.neighborhood]),
                w.HBox([self.method, self.layers]),
                w.HBox([self.lam, self.spread, self.no_attn]),
                w.HBox([self.run, self.undo_button, self.save_path, self.save_button]),
                self.status,
                self.progress,
                self.result,
            ]
        )

    def _ipython_display_(self) -> None:  # pragma: no cover - display only
        from IPython.display import display

        display(self.widget)

    def _n_records(self) -> int:
        return len(self.records.get(self.dataset.value, [])) if hasattr(self, "dataset") else 0

    # --- reading the form --------------------------------------------------------------------
    def fact(self) -> Fact:
        """The fact in the form (typed or loaded)."""
        return Fact.typed(
            self.subject.value.strip(),
            self.prompt.value.strip(),
            self.target_new.value.strip(),
            self.target_true.value.strip(),
            paraphrase=self.paraphrase.value.strip(),
            neighborhood=self.neighborhood.value.strip(),
        )

    def knobs(self) -> dict[str, Any]:
        """The knobs set in the form (None where the preset's value stays)."""
        return {
            "layers": list(layers_from_text(self.layers.value)) if self.layers.value.strip() else None,
            "mom2_update_weight": self.lam.value if self.lam.value > 0 else None,
            "spread_exponent": self.spread.value if self.spread.value >= 0 else None,
            "optimize_attn": False if self.no_attn.value and self.method.value == "pmet" else None,
        }

    # --- callbacks ---------------------------------------------------------------------------
    def on_pick(self, _: Any = None) -> None:
        """Fill the form from the chosen record."""
        recs = self.records.get(self.dataset.value, [])
        if not recs:
            return
        self.index.max = len(recs) - 1
        f = Fact.from_record(recs[self.index.value])
        r = f.request
        self.subject.value, self.prompt.value, self.target_new.value = r.subject, r.prompt, r.target_new
        self.target_true.value = r.target_true or ""
        self.paraphrase.value, self.neighborhood.value = f.paraphrase or "", f.neighborhood or ""
        self.status.value = f"record {self.index.value} of {self.dataset.value} loaded"

    def on_run(self, _: Any = None) -> EditOutcome | None:
        """Run the edit in the form; the status says what happened (the model is unedited after a failure)."""
        self.status.value = "editing..."
        try:
            fact = self.fact()
            data = self.dataset.value if self.dataset.value in ("counterfact", "zsre") else None
            hp = self.session.hparams(self.method.value, self.knobs(), dataset=data)
            self.progress.clear_output()
            with self.progress:
                out = self.session.edit(fact, hp)
        except Exception as exc:  # noqa: BLE001 - shown to the user, the session stays usable
            logger.warning("explorer: edit failed: %s", exc)
            self.status.value = f"<b>error:</b> {html.escape(str(exc))}"
            return None
        self.status.value = (
            f"<b>{STATUS_APPLIED}</b> in {out.seconds:.1f}s: {html.escape(fact.request.text)} → "
            f"{html.escape(fact.request.target_new)} ({self.method.value.upper()}, layers {list(hp.layers)})"
        )
        self.result.value = self.render(out)
        return out

    def on_undo(self, _: Any = None) -> None:
        """Undo the applied edit (bit-exact); refused when the weights changed since (see EditSession.undo)."""
        try:
            undone = self.session.undo()
        except ValueError as exc:
            self.status.value = f"<b>error:</b> {html.escape(str(exc))}"
            return
        self.status.value = "undone: the model is as loaded" if undone else "nothing to undo"

    def on_save(self, _: Any = None) -> None:
        """Save the last edit's update to the path in the form."""
        try:
            path = self.session.save(self.save_path.value.strip())
        except (ValueError, OSError) as exc:
            self.status.value = f"<b>error:</b> {html.escape(str(exc))}"
            return
        self.status.value = f"saved to {html.escape(str(path))}"

    @staticmethod
    def render(out: EditOutcome) -> str:
        """HTML of an outcome: p(new)/p(true), top-k before/after per probe, norms, continuations."""
        topk = out.topk.assign(entry=lambda d: d["token"].map(repr) + " " + d["prob"].map("{:.3f}".format))
        wide = topk.pivot_table(index=["probe", "rank"], columns="state", values="entry", aggfunc="first")
        wide = wide[[c for c in ("before", "after") if c in wide.columns]]
        wide.columns.name = None  # no stray "state" header above the index columns
        gens = "".join(f"<p><b>{k}</b>: {html.escape(v)}</p>" for k, v in out.generations.items())
        return (
            "<h4>p(new object), p(true object)</h4>"
            + _table(out.targets)
            + "<h4>top next tokens</h4>"
            + wide.reset_index().to_html(index=False, border=0)
            + "<h4>update norm per layer</h4>"
            + _table(out.norms)
            + "<h4>greedy continuation of the rewrite prompt</h4>"
            + gens
        )
