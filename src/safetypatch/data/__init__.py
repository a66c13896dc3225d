"""Named datasets in one normalised schema: catalog, readers, seeded splits and contamination checks."""

from __future__ import annotations

from safetypatch.data.catalog import DatasetInfo, list_datasets, load_dataset
from safetypatch.data.schema import Dataset, Example
from safetypatch.data.spec import DatasetSpec
from safetypatch.data.splits import (
    Split,
    canonical_split,
    check_no_overlap,
    count_ngram_overlap,
    development_split,
    normalize_prompt,
    split_dataset,
    training_split,
)

__all__ = [
    "Dataset",
    "DatasetInfo",
    "DatasetSpec",
    "Example",
    "Split",
    "canonical_split",
    "check_no_overlap",
    "count_ngram_overlap",
    "development_split",
    "list_datasets",
    "load_dataset",
    "normalize_prompt",
    "split_dataset",
    "training_split",
]
