"""The adapter result: examples by official split, the pool to carve, and the split rules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.data.io import RowChecker
from bridge.data.types import Example, TaskSpec

#: Names of the splits that :func:`bridge.data.load_dataset` returns.
SPLITS = ("train", "dev", "test")
#: Splits an evaluation reads; training-side copies of their examples are dropped.
EVAL_SPLITS = ("dev", "test")


def default_stratum(task: TaskSpec) -> Callable[[Example], str]:
    """Stratify closed formats by gold label and open formats by source answer type."""
    if task.is_closed:
        return lambda example: example.gold
    return lambda example: example.answer_type


@dataclass
class SourceData:
    """The examples of one data set before duplicate handling, carving and slicing."""

    task: TaskSpec
    #: Splits used as the source ships them: "train", "dev", "test" and "fewshot".
    fixed: dict[str, list[Example]]
    #: Examples without a split of their own, carved into train and the splits in ``carve``.
    pool: list[Example]
    #: Splits carved from the pool besides train, such as ("dev",) or ("test", "dev").
    carve: tuple[str, ...]
    #: Human-readable split rules, copied into the report.
    split_rules: str
    #: Data files read, relative to the data directory where possible.
    files: list[str] = field(default_factory=list)
    #: Keep examples with the same ``Example.group`` in one split.
    grouped: bool = False
    #: Partition (such as an MMLU subject) that is carved on its own; one partition when None.
    partition: Callable[[Example], str] | None = None
    #: Stratum of an example for stratified carving and slicing; the task's default when None.
    stratum: Callable[[Example], str] | None = None
    #: Filter applied after carving (TAT-QA answer types), so splits do not depend on it.
    keep: Callable[[Example], bool] | None = None
    notes: list[str] = field(default_factory=list)
    #: Adapter-specific figures for the report (such as empty spans removed).
    extra: dict[str, Any] = field(default_factory=dict)


class IdRegistry:
    """Reject a second example with an id already used in this data set."""

    def __init__(self, checker: RowChecker) -> None:
        self._checker = checker
        self._seen: dict[str, str] = {}

    def claim(self, example_id: str, file: Path | str, location: str, raw: Any = None) -> bool:
        """Return True when ``example_id`` is new; otherwise report the row and return False."""
        first = self._seen.get(example_id)
        if first is None:
            self._seen[example_id] = f"{file}: {location}"
            return True
        self._checker.reject(
            file,
            location,
            "id",
            f"duplicate id '{example_id}' (first used at {first})",
            "give every row a unique id, or unset data.fields.id so that rows are numbered",
            raw,
        )
        return False


def relative_name(path: Path, root: Path) -> str:
    """Return ``path`` relative to ``root`` when it lies inside it, else the full path."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def text_field(record: dict[str, Any], key: str) -> str | None:
    """Return ``record[key]`` when it is a string, else None."""
    value = record.get(key)
    return value if isinstance(value, str) else None
