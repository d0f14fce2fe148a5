"""Small, dependency-free tracing: retain or edit module inputs/outputs with forward hooks.

In the spirit of baukit's ``nethook``: :class:`Trace` watches one module, :class:`TraceDict`
several. Both are context managers that always remove their hooks, also when the forward
raises. ``stop=True`` ends the forward pass right after the (last) traced module by raising
:class:`StopForward`, which the context manager swallows.

Modules whose output is a tuple (older transformers decoder layers, attention modules) are
handled in one place: :func:`hidden_of` reads the hidden state, :func:`replace_hidden` puts
an edited one back in the same structure.
"""

from __future__ import annotations

import difflib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "StopForward",
    "Trace",
    "TraceDict",
    "get_module",
    "get_parameter",
    "hidden_of",
    "replace_hidden",
    "module_names",
]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; swallowed by Trace/TraceDict."""


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (a tensor, or the first element of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot find a hidden-state tensor in a module output of type {type(output).__name__}")


def replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """Return ``output`` with its hidden-state tensor replaced, keeping the structure."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    raise TypeError(f"cannot replace the hidden state in a module output of type {type(output).__name__}")


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _close_matches(name: str, candidates: Iterable[str]) -> str:
    cands = list(candidates)
    close = difflib.get_close_matches(name, cands, n=5, cutoff=0.5)
    if not close:
        parts = name.split(".")
        close = [c for c in cands if c.endswith(parts[-1])][:5]
    return ", ".join(close) if close else "(no similar names)"


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a LookupError lists close matches when it does not exist."""
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LookupError(
            f"module {name!r} not found in {type(model).__name__}; close matches: "
            f"{_close_matches(name, module_names(model))}"
        ) from None


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter called ``name``; a LookupError lists close matches when it does not exist."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise LookupError(
            f"parameter {name!r} not found in {type(model).__name__}; close matches: "
            f"{_close_matches(name, [n for n, _ in model.named_parameters()])}"
        ) from None


def _copy(x: Any, clone: bool, detach: bool) -> Any:
    if isinstance(x, torch.Tensor):
        if detach:
            x = x.detach()
        if clone:
            x = x.clone()
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_copy(v, clone, detach) for v in x)
    return x


EditFn = Callable[[Any, str], Any]


class Trace(AbstractContextManager):
    """Trace one module: ``with Trace(model, "model.layers.3.mlp") as t: model(**x); t.output``.

    Args:
        module: the model (then ``layer`` names the submodule) or the module itself.
        layer: dotted module name inside ``module`` (None: trace ``module`` itself).
        retain_output / retain_input: keep the output / the first positional input.
        clone / detach: how retained tensors are copied.
        edit_output: ``fn(output, layer_name) -> new_output`` applied before retention; returning
            None keeps the (possibly in-place edited) output.
        stop: raise :class:`StopForward` after this module ran (caught on exit).
    """

    def __init__(
        self,
        module: nn.Module,
        layer: str | None = None,
        *,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
    ) -> None:
        self.layer = layer or ""
        target = get_module(module, layer) if layer else module
        self.input: Any = None
        self.output: Any = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        name = self.layer

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if retain_input:
                inp = args[0] if args else (kwargs.get("hidden_states") if kwargs else None)
                if inp is None and kwargs:
                    inp = next(iter(kwargs.values()))
                self.input = _copy(inp, clone, detach)
            if edit_output is not None:
                edited = edit_output(output, name)
                if edited is not None:  # None: edited in place (as for a plain forward hook)
                    output = edited
            if retain_output:
                self.output = _copy(output, clone, detach)
            if stop:
                raise StopForward()
            return output

        self._handles.append(target.register_forward_hook(hook, with_kwargs=True))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict, AbstractContextManager):
    """Trace several modules at once; ``td[name]`` is the :class:`Trace` of one module.

    ``stop=True`` stops after the last of ``layers`` in forward order (the one that runs last).
    ``edit_output`` receives ``(output, name)`` for every traced module.
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Iterable[str],
        *,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(layers))
        for n in names:  # validate every name before any hook is attached
            get_module(module, n)
        self._pending: set[str] = set(names)
        try:
            for n in names:
                self[n] = Trace(
                    module,
                    n,
                    retain_output=retain_output,
                    retain_input=retain_input,
                    clone=clone,
                    detach=detach,
                    edit_output=edit_output,
                    stop=False,
                )
            if stop and names:
                self._stop_handles = [get_module(module, n).register_forward_hook(self._make_stopper(n)) for n in names]
            else:
                self._stop_handles = []
        except BaseException:
            self.close()
            raise

    def _make_stopper(self, name: str) -> Callable:
        def stopper(mod: nn.Module, args: tuple, output: Any) -> None:
            self._pending.discard(name)
            if not self._pending:
                self._pending = set(self.keys())  # ready for the next forward in this context
                raise StopForward()

        return stopper

    def close(self) -> None:
        for t in self.values():
            t.close()
        for h in getattr(self, "_stop_handles", []):
            h.remove()
        self._stop_handles = []

    def __enter__(self) -> TraceDict:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)
