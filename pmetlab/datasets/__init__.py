"""Evaluation datasets: CounterFact, multi-CounterFact, zsRE and known facts (method.md §6).

Every loader returns a :class:`Records` list of validated dicts in the dataset's original schema,
with a :class:`DatasetInfo` (name, path, sha256, number of records) attached as ``.info`` for run
records. A file is looked for, in order:

1. an explicit ``path=`` (an error if it does not exist; nothing else is tried);
2. ``$PMETLAB_DATA_DIR`` (the shared layout, e.g. ``counterfact/counterfact_filtered.json``, or the
   canonical file names directly in the directory or in its ``counterfact/``, ``zsre/``,
   ``knowns/`` sub-directories); set to a path that is not a directory, it is an error (a typo
   must not make the loaders fall back to other copies);
3. the project's ``data/`` directory (next to the ``pmetlab`` package), same names;
4. a copy downloaded earlier into ``cache_dir("data")``;
5. a download of the canonical file from https://rome.baulab.info/data/dsets/ (mirror:
   memit.baulab.info), verified (JSON parses, record count and schema, sha256 where known) before
   it is renamed into the cache.

Nothing found and no download possible: one :class:`DatasetNotFoundError` naming the file and every
place looked; no other dataset ever stands in for a missing one. No download is attempted when
``download=False`` or any offline switch is set (:data:`OFFLINE_ENVS`: ``PMETLAB_OFFLINE``,
``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE`` = 1/true/yes/on).

``multi_counterfact.json`` is not in the shared data. The derived dataset
``"counterfact+conflict_filter"`` (:data:`CONFLICT_FILTERED`, :func:`load_conflict_filtered`) is
CounterFact with the multi-CounterFact rule applied (:func:`drop_conflicting`: the first record for
each (subject, relation_id)); it is only used when asked for by that name, and that name is what run
records, summaries and tables show. Runs on CounterFact data also apply the rule to each edit batch
(:func:`drop_conflicting_per_batch`).

Every editing dataset has a tuning split (its last 200 records) and an evaluation split (the records
before them): :mod:`.splits`. Runs evaluate the evaluation split unless told otherwise, so
hyperparameters chosen on the tuning split (``pmetlab tune``) are never scored on their own records.

The TF-IDF consistency reference (``attribute_snippets.json``, ``idf.npy``, ``tfidf_vocab.json``)
is looked for in the same places but is never downloaded unless asked (926 MB); its loaders return
``None`` when it is not available, never a stand-in.
"""

from __future__ import annotations

import urllib.request  # noqa: F401  (tests stub the network through pmetlab.datasets.urllib)

from .files import (
    CONFLICT_FILTERED,
    DATA_DIR_ENV,
    OFFLINE_ENV,
    OFFLINE_ENVS,
    REMOTE_ROOTS,
    env_data_dir,
    load_conflict_filtered,
    load_counterfact,
    load_dataset,
    load_known_facts,
    load_multi_counterfact,
    load_zsre,
    locate_dataset_file,
    offline_switch,
)
from .records import (
    DatasetInfo,
    DatasetNotFoundError,
    Records,
    validate_counterfact_record,
    validate_known_record,
    validate_records,
    validate_zsre_record,
)
from .reference import (
    ConsistencyReference,
    load_attribute_snippets,
    load_consistency_reference,
    load_idf,
    load_tfidf_vocab,
)
from .selection import (
    Batches,
    Conflicts,
    Selection,
    counterfact_requests,
    drop_conflicting,
    drop_conflicting_per_batch,
    select,
    split_conflicting,
    zsre_requests,
)
from .splits import SPLITS, TUNE_SIZE, split_bounds, split_records, split_rule

__all__ = [
    "DatasetInfo",
    "Records",
    "Selection",
    "DatasetNotFoundError",
    "ConsistencyReference",
    "DATA_DIR_ENV",
    "OFFLINE_ENV",
    "OFFLINE_ENVS",
    "CONFLICT_FILTERED",
    "REMOTE_ROOTS",
    "env_data_dir",
    "offline_switch",
    "load_conflict_filtered",
    "load_counterfact",
    "load_multi_counterfact",
    "load_zsre",
    "load_known_facts",
    "load_dataset",
    "locate_dataset_file",
    "select",
    "drop_conflicting",
    "split_conflicting",
    "drop_conflicting_per_batch",
    "Conflicts",
    "Batches",
    "counterfact_requests",
    "zsre_requests",
    "SPLITS",
    "TUNE_SIZE",
    "split_bounds",
    "split_records",
    "split_rule",
    "validate_counterfact_record",
    "validate_zsre_record",
    "validate_known_record",
    "validate_records",
    "load_attribute_snippets",
    "load_idf",
    "load_tfidf_vocab",
    "load_consistency_reference",
]
