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

__all__ = ["CovarianceSpec", "COV_DTYPES"]

COV_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class CovarianceSpec:
    """Settings of the key second moment C_l = E[k kᵀ].

    Attributes:
        corpus: "default" (the English text in the data dir), a path, or a registered corpus name.
        n_tokens: token budget (tokens accumulated per layer).
        seq_len: length of the corpus chunks fed to the model.
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
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 16:
            raise ValueError(f"seq_len must be an int >= 16 (shorter chunks are skipped), got {self.seq_len!r}")
        if self.dtype not in COV_DTYPES:
            raise ValueError(f"dtype must be one of {list(COV_DTYPES)}, got {self.dtype!r}")

    def replace(self, **changes: Any) -> CovarianceSpec:
        """A copy with ``changes`` (``None`` values are ignored, so CLI options can be passed as is)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
