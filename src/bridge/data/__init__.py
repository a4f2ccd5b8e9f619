"""Data sets, task formats, splits and the leakage guard.

``load_dataset(cfg.data)`` returns :class:`DatasetSplits`: the task, train/dev/test splits, the
few-shot pool and a report. Prompts are built from :func:`prompt_view` only, and
:func:`check_leakage` verifies that no gold text reached a prompt.
"""

from bridge.data.inspection import format_inspection, inspect_dataset, list_datasets
from bridge.data.io import Reject
from bridge.data.leakage import (
    PROMPT_FIELDS,
    LeakageError,
    check_demonstrations,
    check_disjoint,
    check_leakage,
    gold_texts,
    prompt_view,
)
from bridge.data.loading import REJECTS_FILE, DatasetSplits, load_dataset
from bridge.data.registry import ADAPTERS
from bridge.data.text import SCALES, canonical_number, duplicate_key, normalize_for_duplicates
from bridge.data.types import MULTI_SPAN_SEPARATOR, Example, TaskFormat, TaskSpec

__all__ = [
    "ADAPTERS",
    "MULTI_SPAN_SEPARATOR",
    "PROMPT_FIELDS",
    "REJECTS_FILE",
    "SCALES",
    "DatasetSplits",
    "Example",
    "LeakageError",
    "Reject",
    "TaskFormat",
    "TaskSpec",
    "canonical_number",
    "check_demonstrations",
    "check_disjoint",
    "check_leakage",
    "duplicate_key",
    "format_inspection",
    "gold_texts",
    "inspect_dataset",
    "list_datasets",
    "load_dataset",
    "normalize_for_duplicates",
    "prompt_view",
]
