"""The one place where a default device and dtype are chosen ("auto")."""

from __future__ import annotations

import os

import torch

__all__ = [
    "resolve_device",
    "available_devices",
    "worker_device",
    "collective_backend",
    "resolve_dtype",
    "model_device",
    "free_memory",
    "model_dtype",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def available_devices() -> list[str]:
    """The devices this torch build can use here, e.g. ``["cpu"]`` or ``["cpu", "cuda:0", "cuda:1"]``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    for name in ("xpu", "npu", "hpu"):
        backend = getattr(torch, name, None)
        if backend is not None and hasattr(backend, "is_available") and backend.is_available():
            out += (
                [f"{name}:{i}" for i in range(backend.device_count())] if hasattr(backend, "device_count") else [name]
            )
    return out


_CHECKED_TYPES = ("cuda", "mps", "xpu", "npu", "hpu")  # others (xla, meta, ...) are passed through


def _require_available(dev: torch.device, given: object) -> torch.device:
    """``dev`` when this machine has it (or it is of a type not checked here), else a ValueError
    that says why and names the available devices."""
    if dev.type not in _CHECKED_TYPES:
        return dev
    avail = available_devices()
    if dev.type == "mps" or dev.index is None:
        found = any(a.split(":")[0] == dev.type for a in avail)
    else:
        found = str(dev) in avail
    if found:
        return dev
    n = sum(a.split(":")[0] == dev.type for a in avail)
    if dev.type == "cuda" and not n and torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        why = f"this torch build ({torch.__version__}) has no CUDA support"
    else:
        why = f"this machine has {n} {dev.type} device(s)"
    raise ValueError(
        f"device {str(given)!r} is not available: {why}; available here: {', '.join(avail)}. "
        f"Use 'auto' (the best available) or one of those"
    )


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Resolve ``"auto"`` (or None) to the best available accelerator, else the CPU. A named
    device must exist on this machine (else a ValueError that lists the available ones)."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return (
                torch.device(torch.accelerator.current_accelerator())
                if hasattr(torch, "accelerator") and torch.accelerator.current_accelerator() is not None
                else torch.device(type="cuda", index=0)
            )
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device {device!r} is not a valid torch device; expected 'auto', 'cpu' "
            f"or an accelerator name such as 'cuda:0' (available here: {', '.join(available_devices())})"
        ) from exc
    return _require_available(dev, device)


def worker_device(device: str | torch.device | None = "auto") -> torch.device:
    """:func:`resolve_device` for one worker of a multi-process launch (torchrun, accelerate
    launch): an accelerator named without an index gets the worker's ``LOCAL_RANK``."""
    dev = resolve_device(device)
    rank = os.environ.get("LOCAL_RANK")
    named_index = device not in (None, "auto") and torch.device(device).index is not None
    if rank is not None and dev.type != "cpu" and not named_index:
        dev = _require_available(torch.device(dev.type, int(rank)), f"{dev.type}:{rank} (LOCAL_RANK={rank})")
    return dev


def collective_backend(device: torch.device | None) -> str:
    """The torch.distributed backend for tensors on ``device``: nccl on CUDA, gloo otherwise."""
    return "nccl" if device is not None and device.type == "cuda" else "gloo"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": float32 on the CPU (fast and exact enough), bfloat16 on an accelerator
    that supports it, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    key = str(dtype).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; expected one of {sorted(set(_DTYPES))} or 'auto'")
    return _DTYPES[key]


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's input embedding (where inputs must go)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.device
    return next(model.parameters()).device


def free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` where the backend can say (CUDA); None elsewhere (the CPU, or an
    accelerator without a portable query)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
