"""Editing over time: ``rounds`` rounds of ``batch_size`` edits, each round computed on the model
carrying every earlier round's updates (batched-sequential, "lifelong" editing).

After every round the model is evaluated on the round's records, on every earlier round's records
(retention) and on their neighbourhood prompts, always **against the original model**: the
pre-edit metrics and answers come from the unedited model once, and ``relative_specificity`` is
the share of neighbourhood prompts on which the edited model still behaves as the original did.

The directory holds ``rounds.json`` (the protocol, the resolved parameters, the selection, versions,
the status of every round and, with the null-space switch, the preserved keys' summary),
``original/records.parquet`` (the unedited model's metrics), ``round_XX/deltas.safetensors`` (the round's
own update, computed on the model carrying rounds < XX: apply them in order to re-create any
round, undo them in reverse to go back) and ``round_XX/records.parquet`` (every edited record's
metrics after round XX; every round's entry in ``rounds.json`` also holds its collapse diagnostics,
:mod:`.round_diagnostics`), ``summary.csv`` (one row per round and record group) and, with the
null-space switch, ``round_XX/preserved.safetensors`` (the accumulated keys K_p after round XX,
from which a resumed run continues). An interrupted run resumes after its last finished round;
the model passed in is left bit-identical.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..cache import atomic_path
from ..devices import model_device
from ..editing.deltas import Deltas, apply_deltas_, restore_
from ..editing.nullspace import PreservedKeys
from ..evaluation import relative_specificity, summarize
from ..progress import tqdm
from ..stats import layer_covariances
from ..versions import versions
from .batches import plan_records
from .context import GivenModel, ModelSource
from .lock import hold_run_dir
from .phases import default_model_pool, seed_all
from .round_diagnostics import RoundDiagnostics, collapse_point, diagnostics_columns
from .rounds_state import ROUNDS_FILE, RoundsState
from .rundir import now, read_records, write_records
from .signals import terminate_as_interrupt
from .spec import RunSpec
from .verify import hparams_mismatch

logger = logging.getLogger(__name__)

__all__ = ["RoundsResult", "run_rounds", "ROUNDS_FILE"]

_GROUPS = ("current", "earlier", "all")


@dataclass
class RoundsResult:
    """The run's directory, its per-round summary and ``rounds.json``."""

    out_dir: Path
    summary: pd.DataFrame
    record: dict[str, Any] = field(default_factory=dict)


def _protocol(spec: RunSpec, rounds: int) -> dict[str, Any]:
    return {
        "batch_size": spec.batches_of,
        "rounds": rounds,
        "order": "file order of the split: round t edits the t-th batch of the selected records",
        "conflicts": "the first request per (subject, relation_id) over all rounds is kept",
        "evaluation": "after every round: the round's records, every earlier round's records (retention) "
        "and their neighbourhood prompts",
        "reference": "the original (unedited) model's metrics and answers",
    }


def _spec(model: str, method: str, dataset: str, batch_size: int, rounds: int, **kw: Any) -> RunSpec:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    return RunSpec.build(
        model=model,
        method=method,
        dataset=dataset,
        n_edits=batch_size * rounds,
        batch_size=batch_size,
        mode="sequential",
        generation=False,
        **kw,
    )


def run_rounds(
    *,
    model: str,
    method: str,
    dataset: str = "counterfact",
    batch_size: int = 8,
    rounds: int = 8,
    hparams: Mapping[str, Any] | None = None,
    seed: int = 0,
    split: str = "eval",
    out_dir: str | Path,
    model_and_tokenizer=None,
    resume: bool = True,
    progress: bool = True,
    label: str | None = None,
) -> RoundsResult:
    """Edit ``rounds`` batches of ``batch_size`` records one after another, evaluating after each.

    ``hparams`` overrides the method's preset (``null_space=True`` turns on the null-space
    projection, whose preserved keys K_p this run accumulates round by round and resets at its
    start). Raises ValueError on a bad argument, RunMismatchError when ``out_dir`` holds a run
    with other parameters.
    """
    spec = _spec(model, method, dataset, batch_size, rounds, hparams=hparams, seed=seed, split=split, label=label)
    if spec.hp is None:
        raise ValueError("editing over time needs an editing method ('pmet' or 'memit'), got 'none'")
    params = {**spec.params, "rounds": rounds, "protocol": _protocol(spec, rounds)}
    with hold_run_dir(Path(out_dir), "rounds run"), terminate_as_interrupt():
        state = RoundsState.open(Path(out_dir), json.loads(json.dumps(params)), resume)
        models: ModelSource = (
            GivenModel(model_and_tokenizer) if model_and_tokenizer is not None else default_model_pool()
        )
        mdl, tok = models.get(spec.model)
        return _Rounds(spec, state, mdl, tok, progress).run()


def _evaluate(spec: RunSpec, model, tok, records: list[dict], progress: bool) -> pd.DataFrame:
    """Per-record metrics (no generation) of ``model`` on ``records``."""
    from ..evaluation import evaluate_counterfact, evaluate_zsre

    seed_all(spec.seed)
    if spec.dataset == "zsre":
        return evaluate_zsre(model, tok, records, batch_size=spec.eval_batch_size, progress=progress)
    return evaluate_counterfact(
        model, tok, records, generation=False, batch_size=spec.eval_batch_size, seed=spec.seed, progress=progress
    )


def _round_batches(spec: RunSpec) -> tuple[list[list[dict]], dict[str, Any]]:
    """The rounds' records: the selection with the conflict rule over all rounds, cut in batches."""
    import dataclasses

    plan = plan_records(dataclasses.replace(spec, batch_size=None))  # one cut: conflicts across rounds
    kept = plan.cut.batches[0]
    b = spec.batches_of
    batches = [kept[i : i + b] for i in range(0, len(kept), b)]
    info = {
        "info": plan.info,
        "split": plan.split,
        "selection": {k: v for k, v in plan.selection.description.items() if k != "dataset"},
        "skipped_conflicting_ids": [r.get("case_id") for r in plan.cut.skipped],
    }
    return batches, info


def _requests(spec: RunSpec, batch: list[dict]) -> list:
    from ..datasets import counterfact_requests, zsre_requests

    return (zsre_requests if spec.dataset == "zsre" else counterfact_requests)(batch)


@dataclass
class _Rounds:
    """One rounds run: the spec, its state on disk, the model (restored at the end)."""

    spec: RunSpec
    state: RoundsState
    model: Any
    tok: Any
    progress: bool
    preserved: PreservedKeys | None = None
    diagnostics: RoundDiagnostics | None = None

    def run(self) -> RoundsResult:
        batches, dataset = _round_batches(self.spec)
        self.state.begin(dataset=dataset, versions=versions())
        self._verify_rounds(batches)
        original = self._original([r for b in batches for r in b])
        self.preserved = self._preserved_state()
        stats = layer_covariances(self.model, self.tok, self.spec.hp.layers, kind="ffn", spec=self.spec.covariance)
        if self.state.rounds_done < len(batches):  # the unedited model's reference, before any round is applied
            self.diagnostics = RoundDiagnostics.start(self.model, self.tok, self.spec.hp, self.spec.seed)
        undo: list[dict] = []
        try:
            with tqdm(total=len(batches), desc="rounds", unit="round", disable=not self.progress) as bar:
                for t, batch in enumerate(batches):
                    undo.append(self._round(t, batch, batches[:t], stats, original))
                    bar.update(1)
            self.state.complete()
        except BaseException as exc:  # SIGTERM too: raised as RunTerminated while the run executes
            self.state.fail(exc)
            raise
        finally:
            for u in reversed(undo):
                restore_(self.model, u)
            self.state.save()
        summary = self._summary()
        if not summary.empty:
            self.state.note(collapse=collapse_point(summary))
        return RoundsResult(self.state.root, summary, self.state.data)

    def _verify_rounds(self, batches: list[list[dict]]) -> None:
        """Check the finished rounds' updates before reuse: a missing, damaged or foreign one (an
        edit of other requests or hyperparameters) makes the rounds from it on be redone."""
        for t in range(min(self.state.rounds_done, len(batches))):
            path = self.state.round_dir(t) / "deltas.safetensors"
            try:
                d = Deltas.load(path)
            except (FileNotFoundError, ValueError) as exc:
                problem = f"is unusable ({exc})"
            else:
                want = json.loads(json.dumps([r.to_dict() for r in _requests(self.spec, batches[t])]))
                if json.loads(json.dumps(d.meta.get("requests"), default=str)) != want:
                    problem = "is foreign: an edit of other requests than the round's"
                elif (other := hparams_mismatch(d.meta.get("hparams"), self.spec.hp)) is not None:
                    problem = f"is foreign: it holds {other}"
                else:
                    continue
            if self.spec.hp.null_space:
                raise ValueError(f"{path} {problem}; pass resume=False to start the rounds run over")
            self.state.redo_from(t, path, problem)
            return

    def _original(self, records: list[dict]) -> pd.DataFrame:
        """The unedited model's metrics of every record of every round (read back when saved)."""
        folder = self.state.root / "original"
        found = read_records(folder) if folder.is_dir() else pd.DataFrame()
        if len(found) == len(records) and list(found["case_id"]) == [r.get("case_id") for r in records]:
            return found
        df = _evaluate(self.spec, self.model, self.tok, records, self.progress)
        folder.mkdir(parents=True, exist_ok=True)
        write_records(folder, df)
        return df

    def _round(self, t: int, batch: list[dict], earlier: list[list[dict]], stats, original: pd.DataFrame) -> dict:
        """Round ``t``: reuse it when an earlier invocation finished it, else edit and evaluate;
        returns the undo of its update (the model carries it afterwards)."""
        folder = self.state.round_dir(t)
        if t < self.state.rounds_done:
            deltas = Deltas.load(folder / "deltas.safetensors")
            return apply_deltas_(self.model, deltas)  # checks the base fingerprint: rounds chain
        if self.preserved is not None and t > 0 and len(self.preserved) == 0:
            raise RuntimeError(f"{self.state.root}: round {t} needs the preserved keys of rounds < {t}, found none")
        t0 = time.perf_counter()
        seed_all(self.spec.seed + t)
        deltas = self._edit(batch, stats)
        deltas.require_finite()  # refused before it is saved as the round's update
        folder.mkdir(parents=True, exist_ok=True)
        deltas.save(folder / "deltas.safetensors")
        undo = apply_deltas_(self.model, deltas)
        if self.preserved is not None:  # K_p of the next rounds: this round's keys join the earlier ones
            self.preserved.add_round(deltas)
            self.preserved.save(folder / "preserved.safetensors")  # K_p after this round
            self.state.data["preserved"] = self.preserved.to_dict()
        edit_s = time.perf_counter() - t0
        records = [r for b in [*earlier, batch] for r in b]
        df = _evaluate(self.spec, self.model, self.tok, records, self.progress)
        rounds_of = {r.get("case_id"): i for i, b in enumerate([*earlier, batch]) for r in b}
        df.insert(0, "edited_in_round", [rounds_of[c] for c in df["case_id"]])
        df.insert(0, "after_round", t)
        rel = relative_specificity(original[original["case_id"].isin(df["case_id"])], df)
        df["relative_specificity"] = rel["relative_specificity"].to_numpy()
        write_records(folder, df)
        eval_s = time.perf_counter() - t0 - edit_s
        self._finish(t, deltas, edit_s, eval_s, self.diagnostics.measure() if self.diagnostics else None)
        return undo

    def _edit(self, batch: list[dict], stats) -> Deltas:
        """The round's update, computed on the model as it is now (carrying the earlier rounds),
        with the unedited model's key statistics (as sequential editing does, method.md §2)."""
        from ..editing.compute import compute_deltas

        requests = _requests(self.spec, batch)
        return compute_deltas(
            self.model,
            self.tok,
            requests,
            self.spec.hp,
            progress=self.progress,
            covariances=stats,
            preserved=self.preserved,
        )

    def _preserved_state(self) -> PreservedKeys | None:
        """With the null-space switch: the keys of the finished rounds (read back when resuming),
        else a fresh, empty state (reset at the start of every run). None without the switch."""
        if not self.spec.hp.null_space:
            return None
        done = self.state.rounds_done
        if done > 0:  # a missing or damaged checkpoint is an error naming the file
            return PreservedKeys.load(
                self.state.round_dir(done - 1) / "preserved.safetensors", model_device(self.model)
            )
        return PreservedKeys(device=model_device(self.model))

    def _finish(self, t: int, deltas: Deltas, edit_s: float, eval_s: float, diagnostics: dict | None) -> None:
        norms = deltas.norms()
        ns = deltas.meta.get("null_space") or {}
        self.state.finish_round(
            {
                "diagnostics": diagnostics,  # collapse diagnostics (round_diagnostics.py), cost in "seconds"
                "null_space": {k: ns[k] for k in ("rule", "ranks", "leakage") if k in ns}
                if ns.get("enabled")
                else None,
                "round": t,
                "n_edits": len(deltas.meta.get("requests", [])),
                "edit_s": round(edit_s, 3),
                "eval_s": round(eval_s, 3),
                "update_norm": float(sum(v**2 for v in norms.values()) ** 0.5),
                "finished_at": now(),
            }
        )

    def _summary(self) -> pd.DataFrame:
        """One row per round and record group ("current", "earlier", "all"), means with 95%
        intervals (×100), the round's update norm and the cumulative number of edits."""
        frames = []
        info = {r["round"]: r for r in self.state.data["rounds"]}
        for t in range(self.state.rounds_done):
            df = read_records(self.state.round_dir(t))
            groups = {"current": df["edited_in_round"] == t, "earlier": df["edited_in_round"] < t}
            groups["all"] = groups["current"] | groups["earlier"]
            for g in _GROUPS:
                part = df[groups[g]]
                if part.empty:
                    continue
                s = summarize(part.assign(phase="post"))
                s.insert(0, "group", g)
                s.insert(0, "after_round", t)
                s["edits_total"] = int(df["case_id"].nunique())
                s["round_update_norm"] = info.get(t, {}).get("update_norm")
                for name, value in diagnostics_columns(info.get(t, {}).get("diagnostics")).items():
                    s[name] = value
                frames.append(s)
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if not out.empty:
            with atomic_path(self.state.root / "summary.csv") as tmp:
                out.to_csv(tmp, index=False)
        return out
