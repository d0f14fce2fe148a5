"""Covariance statistics sharded over two CPU processes (gloo): the all-reduced sums and counts
equal a single process's, the main worker writes the cache, and every worker agrees."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pmetlab.distributed import Shard, all_reduce_moments, consensus, current_shard
from pmetlab.stats import layer_covariances
from tests.test_stats import write_corpus
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
KW = dict(n_tokens=600, seq_len=32, progress=False, tokens_per_batch=128, dtype="float64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, corpus: str, cache: str, out: str) -> None:
    os.environ["PMETLAB_CACHE_DIR"] = cache
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shard = current_shard()
        assert (shard.rank, shard.world) == (rank, world)
        model, tok = make_tiny_model("LlamaForCausalLM"), make_tiny_tokenizer()
        covs = layer_covariances(model, tok, [0, 1], corpus=corpus, **KW)
        agreed = consensus([rank == 0, True])
        torch.save(
            {"covs": {l: (c.sum, c.count) for l, c in covs.items()}, "agreed": agreed}, Path(out) / f"rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_shard_takes_every_world_th_item():
    items = list(range(10))
    parts = [Shard(r, 3).take(items) for r in range(3)]
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4, 7]
    with pytest.raises(ValueError, match="rank=3 world=2"):
        Shard(3, 2)


def test_without_a_process_group_nothing_is_reduced():
    s = {"a": torch.ones(2, 2)}
    assert all_reduce_moments(s, {"a": 3}) == (s, {"a": 3})
    assert current_shard() == Shard(0, 1) and consensus([True, False]) == [True, False]


def test_two_gloo_workers_merge_to_the_single_process_statistics(tmp_path, monkeypatch):
    corpus = str(write_corpus(tmp_path / "corpus.txt"))
    out = tmp_path / "out"
    out.mkdir()
    dist_cache = tmp_path / "dist-cache"
    mp.spawn(_worker, args=(2, _free_port(), corpus, str(dist_cache), str(out)), nprocs=2, join=True)
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(tmp_path / "single-cache"))
    model, tok = make_tiny_model("LlamaForCausalLM"), make_tiny_tokenizer()
    single = layer_covariances(model, tok, [0, 1], corpus=corpus, **KW)
    results = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    for res in results:
        assert res["agreed"] == [False, True]  # AND over the workers
        for l, (s, count) in res["covs"].items():
            assert count == single[l].count  # every token counted exactly once
            torch.testing.assert_close(s, single[l].sum, rtol=1e-10, atol=1e-9)
    # only the main worker wrote the cache; its files load as a normal single-process cache
    files = sorted(p.name for p in (dist_cache / "stats" / "LlamaForCausalLM").glob("*.safetensors"))
    assert len(files) == 2 and not list((dist_cache / "stats" / "LlamaForCausalLM").glob("partial-*"))
    monkeypatch.setenv("PMETLAB_CACHE_DIR", str(dist_cache))
    again = layer_covariances(model, tok, [0, 1], corpus=corpus, **KW)
    for l in (0, 1):
        torch.testing.assert_close(again[l].sum, single[l].sum, rtol=1e-10, atol=1e-9)


def test_pmetlab_stats_under_torchrun(tmp_path):
    """The CLI entry point: ``torchrun --nproc-per-node 2 -m pmetlab stats`` on a saved tiny model."""
    model, tok = make_tiny_model("LlamaForCausalLM"), make_tiny_tokenizer()
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = str(write_corpus(tmp_path / "corpus.txt"))
    env = {**os.environ, "PMETLAB_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "pmetlab",
        "stats",
        "--model",
        str(model_dir),
        "--layers",
        "0-1",
        "--corpus",
        corpus,
        "--tokens",
        "600",
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "--no-progress",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "merged the statistics of 2 workers" in res.stdout
    assert res.stdout.count("layer ") == 2  # printed once, by the main worker
    files = list((tmp_path / "cache" / "stats" / "LlamaForCausalLM").glob("ffn-*.safetensors"))
    assert len(files) == 2


def test_worker_device_and_backend(monkeypatch):
    from pmetlab.devices import collective_backend, resolve_device, worker_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert worker_device("cpu") == torch.device("cpu")  # the CPU has no per-worker index
    assert worker_device("auto") == (
        resolve_device("auto") if resolve_device("auto").type == "cpu" else torch.device(resolve_device("auto").type, 1)
    )
    monkeypatch.delenv("LOCAL_RANK")
    assert worker_device("auto") == resolve_device("auto")
    assert collective_backend(torch.device("cpu")) == "gloo" and collective_backend(None) == "gloo"
    assert collective_backend(torch.device("cuda", 0)) == "nccl"
