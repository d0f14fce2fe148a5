"""Covariance statistics across processes (``torch.distributed``).

Second moments are sums and counts, so partial statistics merge exactly: each worker runs the
batches ``rank, rank + world, ...`` of the same deterministic batch plan, then one all-reduce
adds the sums and counts. Launch with ``torchrun`` (or ``accelerate launch``), which sets
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; :func:`init_from_env` joins the group (gloo on the
CPU, nccl on CUDA; chosen by :func:`pmetlab.devices.collective_backend`).

    torchrun --nproc-per-node 2 -m pmetlab stats --model smollm2-135m --layers 3-8
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .devices import collective_backend, resolve_device

logger = logging.getLogger(__name__)

__all__ = ["Shard", "current_shard", "init_from_env", "all_reduce_moments", "consensus", "barrier"]


@dataclass(frozen=True)
class Shard:
    """This process's part of a job: batches ``i`` with ``i % world == rank``."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"invalid shard rank={self.rank} world={self.world}; expected 0 <= rank < world")

    def take(self, items: list) -> list:
        return items[self.rank :: self.world]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def current_shard() -> Shard:
    """The shard of this process: (rank, world) of the initialised process group, else (0, 1)."""
    dist = _dist()
    if dist is None:
        return Shard()
    return Shard(dist.get_rank(), dist.get_world_size())


def init_from_env(device: torch.device | None = None) -> Shard:
    """Join the process group described by the launcher's environment (``WORLD_SIZE`` > 1);
    a single process (no launcher) returns ``Shard(0, 1)`` and initialises nothing."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _dist() is not None:
        return current_shard()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    backend = collective_backend(device)
    dist.init_process_group(backend=backend)
    _COMM["device"] = device if backend != "gloo" else torch.device("cpu")
    shard = current_shard()
    logger.info("joined %s process group: rank %d of %d", backend, shard.rank, shard.world)
    return shard


_COMM: dict[str, torch.device] = {}


def _comm_device() -> torch.device:
    """Where collective tensors live: the CPU for gloo, else this worker's accelerator."""
    dist = _dist()
    if dist is None or dist.get_backend() == "gloo":
        return torch.device("cpu")
    return _COMM.get("device") or resolve_device("auto")


def all_reduce_moments(
    sums: dict[str, torch.Tensor], counts: dict[str, int]
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Add every worker's sums and counts (in float64, so the merge adds no rounding of its
    own); without a process group the inputs are returned unchanged."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return sums, counts
    names = sorted(sums)
    out_s: dict[str, torch.Tensor] = {}
    for n in names:
        t = sums[n].to(_comm_device(), torch.float64).contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out_s[n] = t.to(sums[n].device, sums[n].dtype)
    c = torch.tensor([counts[n] for n in names], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(c, op=dist.ReduceOp.SUM)
    return out_s, {n: int(v) for n, v in zip(names, c.tolist())}


def consensus(flags: list[bool]) -> list[bool]:
    """Element-wise AND of boolean flags over all workers (e.g. "found in my cache")."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1 or not flags:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.cpu().tolist()]


def barrier() -> None:
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()
