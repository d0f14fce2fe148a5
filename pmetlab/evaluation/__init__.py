"""Evaluation: teacher-forced scoring, CounterFact and zsRE metrics, summaries (method.md §6), and the
families beyond teacher forcing (issue #23: :mod:`.beyond`)."""

from .beyond import BEYOND_FAMILIES, BeyondResult, BeyondSettings, evaluate_beyond
from .beyond_summary import summarize_beyond
from .counterfact import (
    COUNTERFACT_METRICS,
    counterfact_prompt_sets,
    evaluate_counterfact,
    evaluate_counterfact_reference,
    preference_metrics,
)
from .generation import derive_seed, generate_ids, generate_texts, sample_top_k
from .paired import PAIRED_RULE, PairedDifference, paired_difference, paired_rule, paired_table
from .scoring import PairScores, score_pairs, score_pairs_reference
from .summary import SUMMARY_METRICS, harmonic_mean, relative_specificity, summarize
from .text import mean_text_entropy, ngram_entropy, text_entropy_score, tfidf_cosine, word_tokenize
from .zsre import ZSRE_METRICS, evaluate_zsre, evaluate_zsre_reference, zsre_pairs

__all__ = [
    "evaluate_beyond",
    "BeyondSettings",
    "BeyondResult",
    "BEYOND_FAMILIES",
    "summarize_beyond",
    "PairScores",
    "score_pairs",
    "score_pairs_reference",
    "generate_texts",
    "generate_ids",
    "derive_seed",
    "sample_top_k",
    "word_tokenize",
    "ngram_entropy",
    "text_entropy_score",
    "mean_text_entropy",
    "tfidf_cosine",
    "evaluate_counterfact",
    "evaluate_counterfact_reference",
    "preference_metrics",
    "counterfact_prompt_sets",
    "COUNTERFACT_METRICS",
    "evaluate_zsre",
    "evaluate_zsre_reference",
    "zsre_pairs",
    "ZSRE_METRICS",
    "summarize",
    "harmonic_mean",
    "relative_specificity",
    "SUMMARY_METRICS",
    "PairedDifference",
    "paired_difference",
    "paired_table",
    "paired_rule",
    "PAIRED_RULE",
]
