"""Model-level forward helpers shared by the target optimisation and generation.

Two concerns, both independent of any editing method:

* **Cache shims.** transformers changed its KV-cache API across versions: the forward argument
  and output field are ``cache`` in recent releases and ``past_key_values`` before, and a
  cache exposes its per-layer tensors as ``cache.layers[i].keys/values`` (v5) or as the
  ``key_cache``/``value_cache`` lists (older). :func:`cache_kwarg`, :func:`cache_of`,
  :func:`new_cache`, :func:`cache_layers` and :func:`cache_from_layers` are the one place
  that knows.
* **Layer replay.** :func:`replay_from_layer` runs only the decoder layers >= L: layers
  below L become pass-through modules and layer L reads a given input. Used when the
  layers below L cannot change (their output was computed once).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .models.adapters import ModelAdapter

logger = logging.getLogger(__name__)

__all__ = [
    "forward_accepts",
    "cache_kwarg",
    "cache_of",
    "new_cache",
    "cache_layers",
    "cache_from_layers",
    "replay_from_layer",
]

KeyValue = tuple[torch.Tensor, torch.Tensor]


# --- transformers cache shims -------------------------------------------------------------------
def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` names the keyword argument ``name`` (False when the signature
    cannot be read, e.g. for some compiled or wrapped modules)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``"cache"`` (transformers >= 5.2x) or
    ``"past_key_values"`` (older releases)."""
    return "cache" if forward_accepts(model, "cache") else "past_key_values"


def cache_of(output: Any) -> Any:
    """The KV cache a model returned with ``use_cache=True`` (``output.cache`` or
    ``output.past_key_values``); raises TypeError when the output carries none."""
    for name in ("cache", "past_key_values"):
        c = getattr(output, name, None)
        if c is not None:
            return c
    raise TypeError(
        f"the model's output {type(output).__name__} carries no KV cache (neither `cache` nor "
        f"`past_key_values`); this needs a model that supports use_cache=True"
    )


def new_cache(model: nn.Module) -> Any:
    """An empty dynamic KV cache for ``model`` (built from its config where the class accepts one)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # releases whose DynamicCache takes no config
        return DynamicCache()


def cache_layers(cache: Any) -> list[KeyValue]:
    """Per-layer ``(keys, values)`` of a cache, each (batch, kv_heads, seq, head_dim)."""
    if hasattr(cache, "layers"):
        return [(ly.keys, ly.values) for ly in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def cache_from_layers(model: nn.Module, kv: Sequence[KeyValue]) -> Any:
    """A cache for ``model`` holding ``kv[i]`` = (keys, values) as layer i's entries."""
    cache = new_cache(model)
    for li, (k, v) in enumerate(kv):
        cache.update(k, v, li)
    return cache


# --- layer replay -------------------------------------------------------------------------------
class _PassThrough(nn.Module):
    """Stands in for a decoder layer below L: returns its input hidden state unchanged
    (tests look for this class name to check that every layer was restored).

    Copies the attributes transformers reads from a layer while building masks and caches
    (attention type, layer index, sliding window) so the model's forward is unaffected.
    """

    def __init__(self, original: nn.Module, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        for attr in ("attention_type", "layer_idx", "is_sliding", "sliding_window"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


@contextmanager
def replay_from_layer(adapter: ModelAdapter, L: int, h_in: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Run only layers >= L: layers < L become pass-throughs and layer L's input is ``h_in``.

    Args:
        L: the first layer that runs.
        h_in: (batch, seq, d_model), the input of layer L for the batch about to run.
        as_tuple: whether the model's decoder layers return a tuple (older transformers).

    The original layers are restored on exit, also on exceptions.
    """
    layers = adapter.layers()
    originals = [layers[i] for i in range(L)]

    def pre_hook(mod, args, kwargs):
        if args:
            return (h_in,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = h_in
        return args, kwargs

    handle = layers[L].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(L):
            layers[i] = _PassThrough(originals[i], as_tuple)
        yield
    finally:
        for i in range(L):
            layers[i] = originals[i]
        handle.remove()
