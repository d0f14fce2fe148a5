"""Target optimisation on all cores: requests sharded over worker processes (``torch.distributed``).

Requests do not interact in the target optimisation (method.md §2), so several processes can fill
the per-request target cache together: every worker plans the same chunks, takes chunks ``rank,
rank + world, ...`` and writes their entries; afterwards one process runs the edit as usual and
finds every target in the cache (:func:`pmetlab.editing.target_cache.fill_cache_sharded`). Each
chunk is computed exactly as one process computes it, so the edit is bit-identical to one
process's.

Two ways to start the workers:

* ``torchrun --nproc-per-node 2 -m pmetlab targets --model smollm2-135m --n-edits 512`` (the
  launcher sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; :func:`pmetlab.distributed.init_from_env`
  joins the gloo group on the CPU), then ``pmetlab run`` with the same arguments;
* ``--workers N`` on ``pmetlab run`` / ``pmetlab tune`` (``workers=N`` in :func:`run_sweep`,
  :func:`run_experiment`), which launches the same command as N local processes
  (:func:`launch_target_workers`) before the runs start.

Only the edit of the unedited model is sharded: in "sequential" mode the first batch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..editing.prefixes import context_templates
from ..editing.targets import fill_targets_sharded
from .batches import plan_records
from .context import ModelSource
from .spec import RunSpec

logger = logging.getLogger(__name__)

__all__ = ["spec_arguments", "fill_spec_targets", "launch_target_workers", "worker_threads"]

#: The RunSpec arguments that decide which targets a run needs (sent to the workers).
_SPEC_ARGS = ("model", "method", "dataset", "n_edits", "batch_size", "mode", "seed", "subset", "split")


def spec_arguments(spec: RunSpec) -> dict[str, Any]:
    """The :meth:`RunSpec.build` arguments that rebuild ``spec``'s targets (JSON-able)."""
    return {**{k: getattr(spec, k) for k in _SPEC_ARGS}, "hparams": dict(spec.overrides)}


def edited_first(spec: RunSpec) -> list:
    """The requests whose targets are read on the unedited model: every batch's in "batch" mode,
    the first batch's in "sequential" mode."""
    batches = plan_records(spec).requests(spec.dataset)
    batches = batches if spec.mode == "batch" else batches[:1]
    return [r for b in batches for r in b]


def fill_spec_targets(
    specs: Sequence[RunSpec], models: ModelSource, *, rank: int, world: int, barrier, chunk_size: int | None = None
) -> int:
    """This worker's share of the targets of every spec that edits (in order); returns the number
    of requests it optimised. Every worker must call it with the same specs and ``chunk_size``
    (requests optimised together; None: the device's budget as the edit uses it,
    :func:`pmetlab.editing.chunking.chunk_budget`)."""
    done = 0
    for spec in specs:
        if spec.hp is None:
            continue
        model, tok = models.get(spec.model)
        templates = context_templates(model, tok, spec.hp, use_cache=True)
        requests = edited_first(spec)
        done += fill_targets_sharded(
            model,
            tok,
            requests,
            spec.hp,
            templates,
            rank=rank,
            world=world,
            barrier=barrier,
            progress=rank == 0,
            chunk_size=chunk_size,
        )
    return done


def worker_threads(workers: int) -> int:
    """Torch threads per worker: ``$OMP_NUM_THREADS`` when set, else the cores shared out."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // workers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_env(rank: int, world: int, port: int, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    return env


def launch_target_workers(
    specs: Sequence[RunSpec], workers: int, *, device: str = "auto", chunk_size: int | None = None
) -> None:
    """Fill the target cache of ``specs`` with ``workers`` local processes (``python -m pmetlab
    targets --specs FILE``, one gloo group), and wait for them.

    Raises:
        ValueError: ``workers`` is not a positive integer.
        RuntimeError: a worker failed (its exit status and the end of its log are in the message;
            the other workers are stopped). Entries already written stay valid in the cache.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    todo = [spec_arguments(s) for s in specs if s.hp is not None]
    if not todo:
        return
    with tempfile.TemporaryDirectory(prefix="pmetlab-workers-") as tmp:
        path = Path(tmp) / "specs.json"
        path.write_text(json.dumps(todo))
        cmd = [sys.executable, "-m", "pmetlab", "targets", "--specs", str(path), "--device", device, "-q"]
        cmd += ["--chunk-size", str(chunk_size)] if chunk_size is not None else []
        port, threads = _free_port(), worker_threads(workers)
        logger.info("target optimisation: %d workers x %d thread(s) for %d run(s)", workers, threads, len(todo))
        logs = [open(Path(tmp) / f"worker{r}.log", "w+") for r in range(workers)]
        procs = [
            subprocess.Popen(cmd, env=_worker_env(r, workers, port, threads), stdout=logs[r], stderr=subprocess.STDOUT)
            for r in range(workers)
        ]
        _wait_all(procs, logs)


def _wait_all(procs: list[subprocess.Popen], logs: list) -> None:
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    failed = [(r, c) for r, c in enumerate(codes) if c != 0]
    tails = []
    for f in logs:
        f.seek(0)
        tails.append(f.read()[-2000:])
        f.close()
    if failed:
        r, c = failed[0]
        raise RuntimeError(f"target worker {r} of {len(procs)} exited with status {c}; its log ends:\n{tails[r]}")


def specs_from_arguments(items: Sequence[Mapping[str, Any]]) -> list[RunSpec]:
    """Rebuild the specs a launcher sent (:func:`spec_arguments`)."""
    return [RunSpec.build(**dict(a), generation=False) for a in items]
