"""Held-out corpus text for the beyond-teacher-forcing evaluation (issue #23): unrelated prefix
passages (long-prefix robustness) and perplexity chunks (general ability).

The covariance statistics read the corpus from its start: :func:`pmetlab.corpus.tokenize_corpus`
cuts the documents, in a fixed order, into chunks of ``seq_len`` tokens until ``n_tokens`` tokens
(:class:`pmetlab.covspec.CovarianceSpec`). The held-out pool is the same chunking continued: the
chunks after the first ``skip`` tokens (whole chunks are dropped until at least ``skip`` tokens are
passed), so with ``skip >= n_tokens`` of the covariance no held-out token was used for it. ``skip``
is a fixed number (:data:`HELDOUT_SKIP`, above every preset's budget), not the run's budget, so
every method on a model sees the same passages; :func:`heldout_pool` refuses a covariance budget
above it. Passages and perplexity chunks are drawn from the pool with a seed.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from ..corpus import _bos_prefix, resolve_corpus, tokenize_corpus
from ..devices import model_device
from ..progress import tqdm
from .generation import derive_seed
from .scoring import pad_id_of, position_ids_from_mask

logger = logging.getLogger(__name__)

__all__ = ["HELDOUT_SKIP", "heldout_pool", "prefix_passages", "perplexity_chunks", "chunk_nll"]

#: Corpus tokens skipped before the held-out pool: above the covariance budget of every preset (1e5).
HELDOUT_SKIP = 200_000


def _positive(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {type(v).__name__}: {v!r}")
    return int(v)


def heldout_pool(
    tok,
    *,
    corpus: str = "default",
    skip: int = HELDOUT_SKIP,
    seq_len: int = 256,
    n_chunks: int = 64,
    covariance_tokens: int | None = None,
) -> list[list[int]]:
    """``n_chunks`` token chunks (each up to ``seq_len`` ids, BOS first where the tokenizer adds one)
    of ``corpus`` that follow its first ``skip`` tokens, cut exactly as the covariance cuts it.

    Raises:
        ValueError: ``covariance_tokens`` (the run's covariance budget) above ``skip``, so the pool
            could overlap the covariance text; a ``model:<n>`` corpus (sampled, no fixed text); the
            corpus is too short to leave ``n_chunks`` chunks after ``skip`` tokens.
    """
    skip = _positive("skip", skip, 0)
    n_chunks = _positive("n_chunks", n_chunks)
    seq_len = _positive("seq_len", seq_len, 16)
    if covariance_tokens is not None and covariance_tokens > skip:
        raise ValueError(
            f"the covariance reads the first {covariance_tokens} corpus tokens but the held-out text starts "
            f"after {skip}; pass heldout_skip >= {covariance_tokens} so held-out text never overlaps it"
        )
    if str(corpus).startswith("model:"):
        raise ValueError(f"corpus {corpus!r} is sampled from the model; held-out text needs a fixed corpus")
    chunks = tokenize_corpus(tok, resolve_corpus(corpus), skip + n_chunks * seq_len, seq_len)
    total, i = 0, 0
    while i < len(chunks) and total < skip:
        total += len(chunks[i])
        i += 1
    pool = chunks[i : i + n_chunks]
    if len(pool) < n_chunks:
        raise ValueError(
            f"corpus {corpus!r} leaves {len(pool)} chunks of {seq_len} tokens after the first {skip} tokens, "
            f"{n_chunks} needed; use a larger corpus or fewer held-out chunks"
        )
    return pool


def prefix_passages(
    tok, pool: Sequence[Sequence[int]], keys: Sequence[object], *, n_tokens: int = 50, seed: int = 0
) -> tuple[list[str], list[int]]:
    """One passage of ``n_tokens`` pool tokens per key (e.g. a record's case_id): the start of the
    pool chunk at ``derive_seed(seed, "prefix", key) % len(pool)``, BOS dropped, decoded and stripped.

    The same (tokenizer, pool, key, n_tokens, seed) give the same passage in every call and run.

    Returns:
        (passages, chunk indices), one per key.
    """
    n_tokens = _positive("prefix n_tokens", n_tokens)
    if not pool:
        raise ValueError("the held-out pool is empty; prefix passages need at least one chunk")
    bos = len(_bos_prefix(tok))
    idx = [derive_seed(seed, "prefix", k) % len(pool) for k in keys]
    texts = [tok.decode(list(pool[i][bos : bos + n_tokens]), skip_special_tokens=True).strip() for i in idx]
    return texts, idx


def perplexity_chunks(pool: Sequence[Sequence[int]], n: int, *, seed: int = 0) -> list[int]:
    """Indices (sorted) of ``n`` distinct pool chunks drawn with ``numpy.random.default_rng(seed)``."""
    n = _positive("perplexity chunks", n)
    if n > len(pool):
        raise ValueError(f"{n} perplexity chunks asked from a held-out pool of {len(pool)}")
    return sorted(int(i) for i in np.random.default_rng(seed).choice(len(pool), n, replace=False))


def chunk_nll(
    model, tok, chunks: Sequence[Sequence[int]], *, batch_size: int = 2, progress: bool = False
) -> np.ndarray:
    """(n_chunks, 2): the summed next-token NLL (nats) of each chunk's tokens after its first, and
    the number of tokens predicted. Perplexity = exp(sum of column 0 / sum of column 1).

    Chunks are right-padded ``batch_size`` at a time (full logits: (batch, seq_len, vocab) floats)."""
    batch_size = _positive("batch_size", batch_size)
    out = np.zeros((len(chunks), 2), dtype=np.float64)
    device = model_device(model)
    pad = pad_id_of(tok)
    with torch.no_grad():
        for a in tqdm(range(0, len(chunks), batch_size), desc="perplexity", disable=not progress, leave=False):
            part = chunks[a : a + batch_size]
            T = max(len(c) for c in part)
            ids = torch.full((len(part), T), pad, dtype=torch.long)
            mask = torch.zeros((len(part), T), dtype=torch.long)
            for r, c in enumerate(part):
                ids[r, : len(c)] = torch.tensor(list(c))
                mask[r, : len(c)] = 1
            ids, mask = ids.to(device), mask.to(device)
            res = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
            logp = torch.log_softmax(res.logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
            out[a : a + len(part), 0] = nll.sum(-1).double().cpu().numpy()
            out[a : a + len(part), 1] = mask[:, 1:].sum(-1).cpu().numpy()
    return out
