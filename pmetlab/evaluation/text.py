"""Text metrics on generated text: n-gram entropy (fluency) and TF-IDF cosine (consistency).

Both follow ROME's ``eval_utils_counterfact`` (method.md §6) without nltk or scikit-learn:

- words: a regex approximating nltk's Treebank ``word_tokenize`` (words, hyphenated words,
  clitics such as ``'s`` and punctuation as separate tokens);
- H_n: entropy in bits of the n-gram frequency distribution of one text;
  text score = mean(2/3 · H_2, 4/3 · H_3) = (2/3·H_2 + 4/3·H_3) / 2;
- TF-IDF: scikit-learn's default analyser (lower-case, ``\\b\\w\\w+\\b``), raw counts of in-vocabulary
  words times the idf, cosine of the two vectors.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["word_tokenize", "ngram_entropy", "text_entropy_score", "mean_text_entropy", "tfidf_cosine"]

_WORD_RE = re.compile(r"\w+(?:-\w+)*|'\w+|[^\w\s]", re.UNICODE)
_TFIDF_RE = re.compile(r"(?u)\b\w\w+\b")


def word_tokenize(text: str) -> list[str]:
    """Split ``text`` into words and punctuation, e.g. "Paris's mayor, today." ->
    ["Paris", "'s", "mayor", ",", "today", "."]."""
    return _WORD_RE.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the distribution of the n-grams of ``tokens`` (0.0 when there are none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return float(-sum(c / total * math.log2(c / total) for c in counts.values()))


def text_entropy_score(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: mean over n of ``weight_n · H_n`` (bits)."""
    if len(ns) != len(weights):
        raise ValueError(f"ns and weights must have the same length, got {ns} and {weights}")
    toks = word_tokenize(text)
    return float(np.mean([w * ngram_entropy(toks, n) for n, w in zip(ns, weights)]))


def mean_text_entropy(texts: Sequence[str]) -> float:
    """Mean text score over ``texts`` (one record's generations); NaN for no texts."""
    if not texts:
        return float("nan")
    return float(np.mean([text_entropy_score(t) for t in texts]))


def _tfidf_vector(text: str, idf: np.ndarray, vocab: Mapping[str, int]) -> dict[int, float]:
    counts = Counter(vocab[w] for w in _TFIDF_RE.findall(text.lower()) if w in vocab)
    return {j: c * float(idf[j]) for j, c in counts.items()}


def tfidf_cosine(text_a: str, text_b: str, idf: np.ndarray, vocab: Mapping[str, int]) -> float:
    """Cosine similarity of the TF-IDF vectors of two texts; NaN when either has no vocabulary word
    (the similarity is undefined, as in ROME, where it is 0/0)."""
    a, b = _tfidf_vector(text_a, idf, vocab), _tfidf_vector(text_b, idf, vocab)
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float(sum(v * b.get(j, 0.0) for j, v in a.items()) / (na * nb))
