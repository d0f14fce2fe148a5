"""Second-moment ("covariance") statistics of module inputs, cached on disk.

C_l = E[k kᵀ] over the tokens of a generic corpus, where k is the input of a module (the FFN
output projection for the key covariance, the MHSA output projection for the attention
ablation). All requested layers are collected in ONE forward pass that stops after the deepest
of them. Statistics are kept as a sum plus a count, so partial results (several processes,
or an interrupted run) merge exactly; the cache stores its own key and is rejected when the
key does not match.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .cache import atomic_path, cache_dir, stable_hash
from .corpus import Corpus, resolve_corpus
from .devices import model_device
from .distributed import Shard, all_reduce_moments, barrier, consensus, current_shard
from .models.adapters import get_adapter
from .tokens import tokenizer_identity
from .tracing import TraceDict, get_module

logger = logging.getLogger(__name__)

__all__ = ["SecondMoment", "collect_second_moments", "layer_covariances", "stats_key", "tokenize_corpus",
           "symmetric_accumulate_", "symmetrize", "tokenizer_identity"]

FORMAT_VERSION = 1
_BLOCK = 256


def symmetric_accumulate_(acc: torch.Tensor, x: torch.Tensor, block: int = _BLOCK) -> None:
    """``acc += xᵀ x`` on the upper block triangle only (about half the FLOPs of a full GEMM).

    ``acc`` (d, d) holds valid values on and above the diagonal; :func:`symmetrize` fills the
    rest. ``x`` (n_tokens, d) must have acc's dtype.
    """
    d = x.shape[1]
    for i in range(0, d, block):
        j = min(i + block, d)
        acc[i:j, i:].addmm_(x[:, i:j].T, x[:, i:])


def symmetrize(acc: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from an upper-triangle-valid accumulator."""
    return torch.triu(acc) + torch.triu(acc, 1).T


@dataclass
class SecondMoment:
    """Uncentered second moment of one module's input: ``sum`` (d, d) of k kᵀ and ``count``."""

    sum: torch.Tensor
    count: int
    key: dict = field(default_factory=dict)

    @property
    def mom2(self) -> torch.Tensor:
        """E[k kᵀ] = sum / count, (d, d)."""
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        return self.sum / self.count

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Combine partial statistics of the same quantity (e.g. from two workers)."""
        if self.key and other.key and _key_without_budget(self.key) != _key_without_budget(other.key):
            raise ValueError("cannot merge second moments with different keys: "
                             f"{_key_without_budget(self.key)} vs {_key_without_budget(other.key)}")
        return SecondMoment(self.sum + other.sum.to(self.sum.dtype), self.count + other.count, dict(self.key))

    def save(self, path: str | Path) -> None:
        t = self.sum.detach().contiguous().cpu()
        meta = {"key": stable_hash(self.key, 32), "key_json": _json(self.key), "count": str(self.count),
                "format": str(FORMAT_VERSION), "checksum": _checksum(t, self.count)}
        with atomic_path(path) as tmp:
            save_file({"sum": t}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, expect_key: dict | None = None) -> "SecondMoment":
        """Load and check: a file whose stored key differs from ``expect_key`` or whose content
        is unreadable raises ValueError."""
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = f.get_tensor("sum")
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise ValueError(f"statistics file {path} is unreadable ({type(exc).__name__}: {exc})") from None
        import json
        try:
            key = json.loads(meta.get("key_json", "{}"))
            count = int(meta["count"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"statistics file {path} has a damaged header") from None
        if meta.get("format") != str(FORMAT_VERSION) or stable_hash(key, 32) != meta.get("key"):
            raise ValueError(f"statistics file {path} has a damaged or old header")
        if expect_key is not None and stable_hash(expect_key, 32) != meta.get("key"):
            raise ValueError(f"statistics file {path} was computed for a different setting")
        if t.ndim != 2 or t.shape[0] != t.shape[1]:
            raise ValueError(f"statistics file {path} holds an invalid matrix {tuple(t.shape)}")
        # the header check cannot see flipped bytes in the tensor data; the checksum can
        if meta.get("checksum") != _checksum(t, count):
            raise ValueError(f"statistics file {path} is damaged (checksum mismatch or missing)")
        if not torch.isfinite(t).all():
            raise ValueError(f"statistics file {path} holds non-finite values")
        return cls(t, count, key)


def _checksum(t: torch.Tensor, count: int) -> str:
    """Digest of a CPU tensor's dtype, shape, bytes and the token count."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}:{tuple(t.shape)}:{count}".encode())
    t = t.contiguous()
    if t.numel():
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def _json(obj) -> str:
    import json
    return json.dumps(obj, sort_keys=True, default=str)


def _key_without_budget(key: dict) -> dict:
    return {k: v for k, v in key.items() if k not in ("tokens", "shard")}


def tokenize_corpus(tok, corpus: Corpus, n_tokens: int, seq_len: int, *, model=None, seed: int = 0
                    ) -> list[list[int]]:
    """Chunks of at most ``seq_len`` tokens (documents split, never joined) totalling ``n_tokens``."""
    bos = _bos_prefix(tok)
    chunks: list[list[int]] = []
    total = 0
    body = seq_len - len(bos)
    for doc in _documents(corpus, model, tok, seed):
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), body):
            piece = ids[i:i + body]
            if len(piece) < 8:
                continue
            room = n_tokens - total - len(bos)
            piece = bos + piece[: max(room, 1)]
            chunks.append(piece)
            total += len(piece)
            if total >= n_tokens:
                return chunks
    if total < n_tokens:
        logger.warning("corpus %s has only %d tokens (asked for %d); using all of it", corpus.name, total, n_tokens)
    return chunks


def _bos_prefix(tok) -> list[int]:
    with_sp = tok("a")["input_ids"]
    without = tok("a", add_special_tokens=False)["input_ids"]
    if len(with_sp) > len(without) and with_sp[-len(without):] == without:
        return list(with_sp[: len(with_sp) - len(without)])
    return []


def _documents(corpus: Corpus, model, tok, seed: int) -> Iterator[str]:
    if corpus.model_samples:
        if model is None:
            raise ValueError("a 'model:<n>' corpus needs the model to sample from")
        yield from _sample_documents(model, tok, corpus.model_samples, seed)
    else:
        yield from corpus.documents()


@torch.no_grad()
def _sample_documents(model, tok, n: int, seed: int, length: int = 128) -> Iterator[str]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = model_device(model)
    starts = ["The", "In", "A", "It", "He", "She", "This", "On"]
    for i in range(n):
        ids = tok(starts[i % len(starts)], return_tensors="pt")["input_ids"].to(dev)
        for _ in range(length):
            logits = model(input_ids=ids).logits[0, -1].float().cpu()
            top = torch.topk(logits, 40)
            probs = torch.softmax(top.values, -1)
            nxt = top.indices[torch.multinomial(probs, 1, generator=g)]
            ids = torch.cat([ids, nxt.view(1, 1).to(dev)], 1)
        yield tok.decode(ids[0], skip_special_tokens=True)


def _layer_fingerprints(model, adapter) -> list[str]:
    """fp[l]: digest of the parameters layer l's input depends on (embeddings + layers 0..l)."""
    layers_prefix = adapter.spec.layers + "."
    downstream = (adapter.final_norm_name + ".", adapter.unembed_name + ".")
    per_layer: dict[int, hashlib.blake2b] = {}
    base = hashlib.blake2b(digest_size=16)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        t = p.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        if name.startswith(layers_prefix):
            idx = int(name[len(layers_prefix):].split(".")[0])
            h = per_layer.setdefault(idx, hashlib.blake2b(digest_size=16))
        elif name.startswith(downstream):
            continue  # final norm / head: downstream of every layer
        else:
            h = base  # embeddings and anything else upstream of the layers (e.g. OPT's project_in)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(memoryview(t.numpy()).cast("B"))
    out, acc = [], hashlib.blake2b(base.digest(), digest_size=16)
    for l in range(adapter.n_layers):
        acc.update(per_layer[l].digest() if l in per_layer else b"")
        out.append(acc.hexdigest())
    return out


def stats_key(model, module_name: str, layer_fp: str, corpus: Corpus, n_tokens: int, seq_len: int,
              dtype: str, *, tokenizer: dict | None = None, seed: int | None = None) -> dict:
    """Everything that changes a statistic; stored in the file and checked on load.

    ``tokenizer``: :func:`tokenizer_identity` of the tokenizer that cut the corpus; ``seed``
    only matters (and is only recorded) for corpora sampled from the model.
    """
    key = {"model_class": type(model).__name__, "weights": layer_fp, "module": module_name,
           "corpus": corpus.identity, "tokens": int(n_tokens), "seq_len": int(seq_len), "dtype": dtype,
           "format": FORMAT_VERSION}
    if tokenizer is not None:
        key["tokenizer"] = tokenizer
    if corpus.model_samples:
        key["seed"] = int(seed or 0)
    return key


def _batches(chunks: list[list[int]], tokens_per_batch: int) -> Iterator[list[list[int]]]:
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i]))  # similar lengths together
    batch: list[list[int]] = []
    for i in order:
        if batch and (len(batch) + 1) * len(chunks[order[0]] if not batch else batch[0]) > tokens_per_batch:
            yield batch
            batch = []
        batch.append(chunks[i])
    if batch:
        yield batch


@torch.no_grad()
def collect_second_moments(model, tok, module_names: Sequence[str], chunks: list[list[int]], *,
                           dtype: torch.dtype = torch.float32, tokens_per_batch: int = 4096,
                           start: int = 0, init: dict[str, SecondMoment] | None = None,
                           checkpoint=None, checkpoint_every: int = 20, progress: bool = True,
                           shard: Shard | None = None) -> dict[str, SecondMoment]:
    """Accumulate E[k kᵀ] of each named module's input over ``chunks`` in one forward per batch,
    stopping after the deepest module. ``start``/``init`` resume from a checkpoint;
    ``checkpoint(stats, next_batch_index)`` is called every ``checkpoint_every`` batches.

    With ``shard`` only this worker's batches are run (indices refer to them) and the result
    is a partial sum: merge the workers' results with :func:`pmetlab.distributed.all_reduce_moments`
    or :meth:`SecondMoment.merge`."""
    if not chunks:
        raise ValueError("no corpus chunks to collect statistics from (every document was shorter than 8 "
                         "tokens, or the corpus is empty); use a larger corpus")
    dev = model_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = (shard or Shard()).take(list(_batches(chunks, tokens_per_batch)))
    if not 0 <= start <= len(batches):
        raise ValueError(f"start={start} is outside the {len(batches)} batches of this run")
    acc: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in module_names}
    if init:
        for n in module_names:
            acc[n] = init[n].sum.to(dev, dtype).clone()
            counts[n] = init[n].count
    total = sum(len(c) for b in batches[start:] for c in b)
    bar = tqdm(total=total, disable=not progress, desc="covariance", unit="tok", unit_scale=True)
    t0 = time.perf_counter()
    done = 0
    try:
        for bi in range(start, len(batches)):
            batch = batches[bi]
            T = max(len(c) for c in batch)
            ids = torch.full((len(batch), T), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for r, c in enumerate(batch):
                ids[r, : len(c)] = torch.tensor(c)
                mask[r, : len(c)] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            keep = mask.reshape(-1).bool()
            with TraceDict(model, module_names, retain_output=False, retain_input=True, stop=True) as td:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            for n in module_names:
                x = td[n].input  # on this module's device (layers may be spread over devices)
                x = x.reshape(-1, x.shape[-1])[keep.to(x.device)].to(dtype)
                if n not in acc:
                    acc[n] = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
                elif acc[n].device != x.device:
                    acc[n] = acc[n].to(x.device)
                symmetric_accumulate_(acc[n], x)
                counts[n] += x.shape[0]
            ntok = int(keep.sum())
            done += ntok
            bar.update(ntok)
            bar.set_postfix(tok_s=f"{done / max(time.perf_counter() - t0, 1e-9):.0f}")
            if checkpoint is not None and (bi + 1) % checkpoint_every == 0 and bi + 1 < len(batches):
                checkpoint({n: SecondMoment(symmetrize(acc[n]).cpu(), counts[n]) for n in module_names}, bi + 1)
    finally:
        bar.close()
    for n in module_names:  # a worker whose shard is empty contributes zeros
        if n not in acc:
            d = _input_dim(model, n)
            acc[n] = torch.zeros(d, d, dtype=dtype, device=dev)
    return {n: SecondMoment(symmetrize(acc[n]).cpu(), counts[n]) for n in module_names}


def _input_dim(model, name: str) -> int:
    """Input width of a projection module (nn.Linear ``in_features``, GPT-2 Conv1D ``nx``)."""
    mod = get_module(model, name)
    for attr in ("in_features", "nx"):
        if isinstance(getattr(mod, attr, None), int):
            return getattr(mod, attr)
    raise TypeError(f"cannot tell the input width of {name} ({type(mod).__name__})")


def layer_covariances(model, tok, layers: Sequence[int], *, kind: str = "ffn", corpus: str | Corpus = "default",
                      n_tokens: int = 100_000, seq_len: int = 256, dtype: str = "float32",
                      use_cache: bool = True, progress: bool = True, seed: int = 0,
                      tokens_per_batch: int = 4096, checkpoint_every: int = 20,
                      shard: Shard | None = None) -> dict[int, SecondMoment]:
    """E[k kᵀ] for the FFN keys (``kind="ffn"``) or MHSA-projection inputs (``kind="attn"``) of
    ``layers``: cached per layer; the missing ones computed together in one pass.

    Returns ``{layer: SecondMoment}``; ``.mom2`` is the (d, d) matrix C_l of method.md §2 step 4.
    With ``use_cache``, a checkpoint is written every ``checkpoint_every`` batches and an
    interrupted run resumes from it.

    Under ``torch.distributed`` (``shard`` defaults to this process's rank and world size),
    every worker runs its share of the batches, the sums and counts are all-reduced, the main
    worker writes the cache and all workers return the same merged statistics.
    """
    if kind not in ("ffn", "attn"):
        raise ValueError(f"kind must be 'ffn' or 'attn', got {kind!r}")
    adapter = get_adapter(model)
    for l in layers:
        adapter.layer_name(l)  # range check with a clear message
    corp = corpus if isinstance(corpus, Corpus) else resolve_corpus(corpus)
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    fps = _layer_fingerprints(model, adapter)
    names = {l: adapter.ffn_out_name(l) if kind == "ffn" else adapter.attn_out_name(l) for l in layers}
    tok_id = tokenizer_identity(tok)
    keys = {l: stats_key(model, names[l], fps[l], corp, n_tokens, seq_len, dtype, tokenizer=tok_id, seed=seed)
            for l in layers}
    folder = cache_dir("stats", type(model).__name__)
    paths = {l: folder / f"{kind}-L{l:03d}-{stable_hash(keys[l])}.safetensors" for l in layers}
    out: dict[int, SecondMoment] = {}
    shard = shard if shard is not None else current_shard()
    if use_cache:
        for l in layers:
            if paths[l].is_file():
                try:
                    out[l] = SecondMoment.load(paths[l], keys[l])
                    logger.info("covariance for %s loaded from cache %s", names[l], paths[l])
                except ValueError as exc:
                    logger.warning("%s; recomputing", exc)
    # every worker must agree on what to compute (their caches may differ)
    agreed = consensus([l in out for l in layers])
    out = {l: out[l] for l, ok in zip(layers, agreed) if ok}
    missing = [l for l in layers if l not in out]
    if not missing:
        return out
    chunks = tokenize_corpus(tok, corp, n_tokens, seq_len, model=model, seed=seed)
    n_batches = sum(1 for _ in _batches(chunks, tokens_per_batch))
    # the batch plan (tokens_per_batch) is part of the key: a checkpoint's batch index means
    # nothing under another plan
    run_key = {"layers": missing, "keys": [keys[l] for l in missing], "tokens_per_batch": int(tokens_per_batch),
               "n_batches": n_batches, **({"shard": [shard.rank, shard.world]} if shard.world > 1 else {})}
    n_batches = len(shard.take(list(range(n_batches))))
    ckpt = folder / f"partial-{kind}-{stable_hash(run_key)}"
    start, init = 0, None
    if use_cache and (ckpt / "progress.json").is_file():
        try:
            import json
            prog = json.loads((ckpt / "progress.json").read_text())
            if prog.get("run_key") != stable_hash(run_key, 32):
                raise ValueError("the checkpoint belongs to another run")
            init = {names[l]: SecondMoment.load(ckpt / f"L{l}.safetensors", keys[l]) for l in missing}
            start = int(prog["next_batch"])
            if not 0 < start <= n_batches:
                raise ValueError(f"next_batch {start} outside 1..{n_batches}")
            logger.info("resuming covariance collection at batch %d of %d from %s", start, n_batches, ckpt)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            logger.warning("ignoring unusable checkpoint %s (%s)", ckpt, exc)
            start, init = 0, None

    def checkpoint(stats: dict[str, SecondMoment], next_batch: int) -> None:
        if not use_cache:
            return
        # the statistics and the batch index are replaced together (one directory rename), so an
        # interruption while writing can never pair new sums with an old index
        with atomic_path(ckpt, is_dir=True) as tmp:
            for l in missing:
                SecondMoment(stats[names[l]].sum, stats[names[l]].count, keys[l]).save(tmp / f"L{l}.safetensors")
            (tmp / "progress.json").write_text(_json({"next_batch": next_batch,
                                                       "run_key": stable_hash(run_key, 32)}))

    res = collect_second_moments(model, tok, [names[l] for l in missing], chunks, dtype=tdtype,
                                 tokens_per_batch=tokens_per_batch, start=start, init=init,
                                 checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                                 progress=progress and shard.is_main, shard=shard)
    sums, counts = all_reduce_moments({n: r.sum for n, r in res.items()}, {n: r.count for n, r in res.items()})
    for l in missing:
        sm = SecondMoment(sums[names[l]], counts[names[l]], keys[l])
        if use_cache and shard.is_main:
            sm.save(paths[l])
        out[l] = sm
    barrier()  # the main worker's files exist before anyone returns
    if ckpt.is_dir():
        import shutil
        shutil.rmtree(ckpt, ignore_errors=True)
    return {l: out[l] for l in layers}
