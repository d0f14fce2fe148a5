"""What the phases of one run share besides its :class:`~pmetlab.runs.spec.RunSpec`: where the
model comes from, the run directory and its ``run.json`` state, and what the load phase found."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..datasets import ConsistencyReference, Selection
from .rundir import RunDir, RunState

__all__ = ["RunContext", "ModelSource", "GivenModel", "ModelPool", "check_model_name"]

ModelPair = tuple[Any, Any]  # (model, tokenizer)


class ModelSource(Protocol):
    """Where a run gets its ``(model, tokenizer)``; ``preloaded`` when it already holds it."""

    preloaded: bool

    def get(self, name: str) -> ModelPair: ...


class GivenModel:
    """An already loaded ``(model, tokenizer)`` (``model_and_tokenizer=``), whatever the name."""

    preloaded = True

    def __init__(self, pair: Any) -> None:
        try:
            model, tok = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"model_and_tokenizer must be a (model, tokenizer) pair, got {type(pair).__name__}"
            ) from None
        self.pair: ModelPair = (model, tok)

    def get(self, name: str) -> ModelPair:
        return self.pair


class ModelPool:
    """Models loaded by name with ``loader``, each once, on first request; a sweep shares one
    pool across its runs."""

    preloaded = False

    def __init__(self, loader: Callable[[str], ModelPair]) -> None:
        self.loader = loader
        self.models: dict[str, ModelPair] = {}

    def get(self, name: str) -> ModelPair:
        if name not in self.models:
            self.models[name] = self.loader(name)
        return self.models[name]


def check_model_name(model: Any, name: str) -> None:
    """Refuse a loaded model recorded under another name than ``name`` (presets and run records
    follow the name)."""
    src = getattr(model, "pmetlab_source", None)
    if src is not None and str(src).lower() != str(name).lower():
        raise ValueError(
            f"model={name!r} but model_and_tokenizer holds {src!r}; pass model={src!r} so that "
            f"the run uses that model's preset and is recorded under its name"
        )


@dataclass
class RunContext:
    """The mutable side of one run invocation, passed explicitly to every phase.

    Attributes:
        store: the run directory. state: its ``run.json``.
        models: where the model comes from; ``pair`` holds it once a phase asked for it.
        progress: show progress bars. reuse_pre_eval: use the cross-run pre-edit metric cache.
        selection: the records edited and evaluated (set by the load phase: the selected records
            less those skipped as conflicting in their batch); requests: their edit requests;
            batches: the requests per edit batch (``requests`` cut as the load phase cut them).
        load_s: seconds spent loading the dataset and (in this invocation) the model.
        reference: the consistency reference, once loaded (``reference_loaded``).
    """

    store: RunDir
    state: RunState
    models: ModelSource
    progress: bool = True
    reuse_pre_eval: bool = True
    selection: Selection | None = None
    requests: list = field(default_factory=list)
    batches: list[list] = field(default_factory=list)
    load_s: float = 0.0
    pair: ModelPair | None = None
    reference: ConsistencyReference | None = None
    reference_loaded: bool = False

    @property
    def model_loaded(self) -> bool:
        return self.pair is not None

    @property
    def records(self) -> list[dict]:
        """The selected dataset records (the load phase must have run)."""
        assert self.selection is not None, "the load phase has not run"
        return self.selection.records
