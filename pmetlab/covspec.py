"""What a covariance statistic is computed from (method.md §2 step 4), separate from the
method hyperparameters: the corpus, the token budget, the chunk length, the accumulation dtype
and the seed (which only matters for corpora sampled from the model).

The method hyperparameters still carry the ``cov_*`` fields a preset sets (λ is only meaningful
with the C it was tuned against), but they are assembled into a :class:`CovarianceSpec` in one
place, :attr:`pmetlab.EditHyperParams.covariance`; everything that computes or caches statistics
takes the spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["CovarianceSpec", "COV_DTYPES", "MIN_SEQ_LEN"]

COV_DTYPES = ("float32", "float64")

#: The shortest chunk length: the corpus is cut into chunks of ``seq_len`` tokens (BOS included)
#: and pieces under 8 tokens are dropped, so much shorter chunks would keep little or none of it.
MIN_SEQ_LEN = 16


@dataclass(frozen=True)
class CovarianceSpec:
    """Settings of the key second moment C_l = E[k kᵀ].

    Attributes:
        corpus: "default" (the English text in the data dir), a path, or a registered corpus name.
        n_tokens: token budget (tokens accumulated per layer). It must be at least the key
            dimension d of every layer collected (d_ff for the FFN keys; :meth:`check_key_dim`,
            applied by :func:`pmetlab.stats.layer_covariances`): from fewer tokens C has rank < d,
            is singular, and leaves the edit unregularised along the missing directions.
        seq_len: length of the corpus chunks fed to the model, at least :data:`MIN_SEQ_LEN`.
        dtype: accumulation dtype, "float32" or "float64".
        seed: seeds corpora sampled from the model (ignored otherwise).
    """

    corpus: str = "default"
    n_tokens: int = 100_000
    seq_len: int = 256
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ValueError(f"corpus must be a non-empty string, got {self.corpus!r}")
        if isinstance(self.n_tokens, bool) or not isinstance(self.n_tokens, int) or self.n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive int, got {self.n_tokens!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < MIN_SEQ_LEN:
            raise ValueError(
                f"seq_len must be an int >= {MIN_SEQ_LEN}, got {self.seq_len!r}: the corpus is cut into chunks "
                f"of seq_len tokens and pieces under 8 tokens are dropped, so shorter chunks keep little or "
                f"none of it; use seq_len >= {MIN_SEQ_LEN} (the presets use 256)"
            )
        if self.dtype not in COV_DTYPES:
            raise ValueError(f"dtype must be one of {list(COV_DTYPES)}, got {self.dtype!r}")

    def check_key_dim(self, d: int, module: str, *, yielded: int | None = None) -> None:
        """Refuse a token budget, or a corpus that ``yielded`` fewer tokens, below the key
        dimension ``d`` of ``module``: C = E[k kᵀ] summed over n < d tokens has rank at most n, so
        it is singular (the update of method.md §2 step 4 is then unregularised along the rest)."""
        if yielded is not None and yielded < d:
            raise ValueError(
                f"corpus {self.corpus!r} yields only {yielded} usable tokens (n_tokens={self.n_tokens} asked), "
                f"fewer than the key dimension {d} of {module}, so the covariance would be singular; documents "
                f"are cut into chunks of seq_len={self.seq_len} tokens and pieces under 8 tokens are dropped: "
                f"use a larger corpus"
            )
        if self.n_tokens < d:
            raise ValueError(
                f"n_tokens={self.n_tokens} is fewer than the key dimension {d} of {module}: the covariance "
                f"C = E[k kᵀ] would have rank at most {self.n_tokens} of {d} (singular), leaving the edit "
                f"unregularised; use n_tokens >= {d} (10x that or more for a well-conditioned C; the "
                f"presets use 100000 or more)"
            )

    def replace(self, **changes: Any) -> CovarianceSpec:
        """A copy with ``changes`` (``None`` values are ignored, so CLI options can be passed as is)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
