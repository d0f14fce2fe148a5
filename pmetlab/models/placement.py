"""Layers split over an accelerator and the CPU, every module resident where it runs.

accelerate's dispatch treats a ``"cpu"`` entry of a ``device_map`` next to an accelerator as
*offload*: the weights wait on the "meta" device and are copied to the accelerator for each
forward. pmetlab edits weights in place, so that cannot work. :func:`place_modules` instead
moves each named module to its device and lets a forward pre-hook move the module's inputs
there: a ``"cpu"`` entry then runs on the CPU, with the weights that the edit changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..devices import resolve_device

__all__ = ["apply_device_map", "place_modules", "needs_own_placement", "check_resident"]

DeviceLike = str | int | torch.device


def _device(value: DeviceLike) -> torch.device:
    """A map entry as a device; an integer is an index of this machine's accelerator (as in
    transformers' device maps), whose type the one device resolver decides."""
    if not isinstance(value, int):
        return torch.device(value)
    accelerator = resolve_device("auto")
    if accelerator.type == "cpu":
        raise ValueError(f"device_map entry {value} names accelerator {value}, but this machine has none")
    return torch.device(accelerator.type, value)


def _kind(value: DeviceLike) -> str:
    return "accelerator" if isinstance(value, int) else torch.device(value).type


def needs_own_placement(device_map: Any) -> bool:
    """True for a dict ``device_map`` that puts some modules on the CPU and others on an
    accelerator: the case accelerate would offload rather than run on the CPU."""
    if not isinstance(device_map, Mapping):
        return False
    kinds = {_kind(v) for v in device_map.values() if v != "disk"}
    return "cpu" in kinds and len(kinds) > 1


def _move_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move_to(v, device) for v in value)
    if isinstance(value, list):
        return [_move_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move_to(v, device) for k, v in value.items()}
    return value


def _inputs_hook(device: torch.device):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _move_to(args, device), _move_to(kwargs, device)

    return hook


def _check_map(model: torch.nn.Module, device_map: Mapping[str, DeviceLike]) -> None:
    names = dict(model.named_modules())
    missing = [n for n in device_map if n not in names]
    if missing:
        raise ValueError(f"device_map names module(s) {missing} that the model does not have")
    if any(v == "disk" for v in device_map.values()):
        raise ValueError(
            "device_map sends modules to 'disk' (offload); pmetlab edits weights in place and needs "
            "every module resident: give them 'cpu' or an accelerator"
        )
    covers = lambda p, n: n == "" or p == n or p.startswith(n + ".")  # noqa: E731
    uncovered = [p for p, _ in model.named_parameters() if not any(covers(p, n) for n in device_map)]
    if uncovered:
        raise ValueError(f"device_map leaves parameter(s) {uncovered[:5]} without a device; name their modules too")


def _check_tied(model: torch.nn.Module, device_map: Mapping[str, DeviceLike]) -> None:
    """Refuse a map that puts one shared parameter (tied embeddings) on two devices."""
    where: dict[int, tuple[str, torch.device]] = {}
    for name in sorted(device_map, key=len):
        dev = _device(device_map[name])
        for pname, p in model.get_submodule(name).named_parameters(recurse=True):
            seen = where.get(id(p))
            if seen is not None and seen[1] != dev:
                raise ValueError(
                    f"{seen[0]!r} and {name}.{pname!r} share one tensor (tied weights) but the device_map "
                    f"puts them on {seen[1]} and {dev}; map both modules to the same device"
                )
            where[id(p)] = (f"{name}.{pname}" if name else pname, dev)


def place_modules(model: torch.nn.Module, device_map: Mapping[str, DeviceLike]) -> torch.nn.Module:
    """Move each module named in ``device_map`` to its device (longest names last, so a
    submodule's entry wins over its parent's) and move every mapped module's inputs to its
    device before it runs; outputs stay where they were computed.

    Raises:
        ValueError: a name the model lacks, a parameter no entry covers, a ``"disk"`` entry, or
            tied weights mapped to two devices.
    """
    _check_map(model, device_map)
    _check_tied(model, device_map)
    for name in sorted(device_map, key=len):
        module = model.get_submodule(name)
        dev = _device(device_map[name])
        module.to(dev)
        module.register_forward_pre_hook(_inputs_hook(dev), with_kwargs=True)
    model.pmetlab_device_map = {k: str(_device(v)) for k, v in device_map.items()}
    return model


def check_resident(model: torch.nn.Module, name: str) -> None:
    """Refuse a model with weights left on the "meta" device (offloaded by accelerate).

    Raises:
        ValueError: naming the first offloaded parameters and what to do instead.
    """
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"loading {name!r} with this device_map offloaded {len(meta)} parameter(s) (e.g. {meta[:3]}) to "
            f"the 'meta' device; pmetlab edits weights in place and needs every module resident. Give the "
            f"model more memory (max_memory) or a dict device_map whose 'cpu' entries run on the CPU"
        )


def apply_device_map(
    model: torch.nn.Module, name: str, device_map: Any, *, error: type[Exception] = ValueError
) -> None:
    """After loading with ``device_map``: place CPU + accelerator maps here (resident, run on the
    CPU; accelerate placed the others) and refuse weights left offloaded, raising ``error``."""
    try:
        if needs_own_placement(device_map):
            place_modules(model, device_map)
        check_resident(model, name)
    except ValueError as exc:
        raise error(str(exc)) from None
