"""Load a data set into train, dev, test and few-shot splits with a report of what was done."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config import DATA_DIR_ENV, DataConfig
from bridge.data.io import Reject, RowChecker, missing_file_error
from bridge.data.leakage import check_disjoint
from bridge.data.registry import check_settings_apply, get_adapter
from bridge.data.source import EVAL_SPLITS, SourceData, default_stratum
from bridge.data.splitting import allocate, build_units, members, round_half_up
from bridge.data.text import duplicate_key
from bridge.data.types import Example, TaskSpec
from bridge.errors import DataError
from bridge.rundir import atomic_write_text, fingerprint

log = logging.getLogger(__name__)

#: Name of the rejects file written under the caller's folder.
REJECTS_FILE = "data_rejects.jsonl"


@dataclass
class DatasetSplits:
    """A loaded data set: its task, the splits, the few-shot pool and the loading report."""

    task: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    #: Demonstrations for few-shot prompts, from the training side only (MMLU's dev files).
    fewshot: list[Example]
    #: Counts per split and label, duplicates, rejects, slices and notes (JSON-serialisable).
    report: dict[str, Any]
    #: Rows skipped with ``skip_invalid``, also written to ``report["rejects"]["file"]`` when set.
    rejects: list[Reject] = field(default_factory=list)

    def by_split(self) -> dict[str, list[Example]]:
        """Return the splits by name, few-shot pool included."""
        return {"train": self.train, "dev": self.dev, "test": self.test, "fewshot": self.fewshot}

    def split_ids(self) -> dict[str, list[str]]:
        """Return the example ids of each split, in split order, so a run can store its splits."""
        return {name: [e.id for e in examples] for name, examples in self.by_split().items()}

    def require_examples(self, *names: str) -> None:
        """Raise :class:`DataError` naming the data files when one of the named splits is empty."""
        empty = [name for name in names if not self.split(name)]
        if not empty:
            return
        files = ", ".join(self.report.get("files") or []) or "its files"
        raise DataError(
            f"data set '{self.task.name}': the {' and '.join(empty)} split(s) are empty after loading {files}",
            hint="check that the files hold data rows, lower data.dev_fraction and data.test_fraction, "
            "or give more rows (rejected rows are listed in the loading report)",
        )

    def split(self, name: str) -> list[Example]:
        """Return one split by name (train, dev, test or fewshot)."""
        splits = self.by_split()
        if name not in splits:
            raise KeyError(f"unknown split '{name}'; expected one of {', '.join(splits)}")
        return splits[name]


def load_dataset(cfg: DataConfig, *, rejects_dir: Path | None = None) -> DatasetSplits:
    """Load ``cfg.dataset`` and return its splits.

    The result depends only on the files and the configuration: splits the source does not ship
    are carved with ``cfg.split_seed``, and the same seed gives the same splits on every machine.
    With ``cfg.skip_invalid`` bad rows are skipped; they are written to
    ``<rejects_dir>/data_rejects.jsonl`` when ``rejects_dir`` is given, and are always kept in
    :attr:`DatasetSplits.rejects` and counted in the report.
    """
    info = get_adapter(cfg.dataset)
    check_settings_apply(cfg)
    root = _data_root(cfg, info.needs_folder)
    checker = RowChecker(cfg.skip_invalid)
    source = info.load(cfg, root, checker)  # type: ignore[arg-type]
    splits = _build_splits(cfg, source)
    report = splits.report
    report["data_dir"] = str(root) if root is not None else None
    report["files"] = source.files
    report["rejects"] = _store_rejects(checker, rejects_dir, report["notes"], cfg.dataset)
    splits.rejects = list(checker.rejects)
    check_disjoint(splits.by_split(), grouped=source.grouped)
    return splits


def _data_root(cfg: DataConfig, needs_folder: bool) -> Path | None:
    if not needs_folder:
        return None
    if not (cfg.data_dir or os.environ.get(DATA_DIR_ENV)):
        raise DataError(
            f"data set '{cfg.dataset}': no data directory is set",
            hint=f"set data.data_dir in the configuration or export {DATA_DIR_ENV}=/path/to/data "
            f"(the folder that holds the '{cfg.dataset}' folder)",
        )
    root = cfg.resolved_data_dir()
    if not root.is_dir():
        raise DataError(
            f"data set '{cfg.dataset}': data directory not found: {root}",
            hint=f"set data.data_dir or export {DATA_DIR_ENV} to the folder that holds the data set folders",
        )
    if not (root / cfg.dataset).is_dir():
        raise missing_file_error(cfg.dataset, root / cfg.dataset, "data set folder")
    return root


def _store_rejects(checker: RowChecker, rejects_dir: Path | None, notes: list[str], dataset: str) -> dict[str, Any]:
    count = len(checker.rejects)
    path: Path | None = None
    if count:
        if rejects_dir is not None:
            path = Path(rejects_dir) / REJECTS_FILE
            lines = "".join(json.dumps(r.as_dict(), ensure_ascii=False, sort_keys=True) + "\n" for r in checker.rejects)
            atomic_write_text(path, lines)
            notes.append(f"{count} invalid row(s) skipped; see {path}")
        else:
            notes.append(f"{count} invalid row(s) skipped; no rejects folder was given, so they are only in this report")
        log.warning("data set %s: skipped %d invalid row(s) (by field: %s)", dataset, count, checker.counts())
    return {
        "count": count,
        "by_field": checker.counts(),
        "file": str(path) if path is not None else None,
        "first": [r.as_dict() for r in checker.rejects[:5]],
    }


def _build_splits(cfg: DataConfig, source: SourceData) -> DatasetSplits:
    task = source.task
    stratum = source.stratum or default_stratum(task)
    everything = [e for part in source.fixed.values() for e in part] + source.pool
    order = {e.id: index for index, e in enumerate(everything)}
    if len(order) != len(everything):
        repeated = sorted(i for i, n in Counter(e.id for e in everything).items() if n > 1)
        raise DataError(
            f"data set '{cfg.dataset}': the adapter returned more than one example with id(s) {', '.join(repeated[:5])}",
            hint="this is a bug in the adapter: its id registry must reject repeated ids",
        )
    keys = {e.id: duplicate_key(e) for e in everything}
    notes = list(source.notes)
    duplicates = _duplicate_figures(everything, keys)

    fixed, pool, dropped = _drop_evaluation_copies(source, keys)
    carved = _carve(cfg, source, pool, keys, stratum)
    result = {split: fixed.get(split, []) + carved.get(split, []) for split in ("train", "dev", "test")}
    fewshot = fixed.get("fewshot", [])
    if fewshot:
        fewshot, count = _drop_copies(fewshot, result["dev"] + result["test"], keys, source.grouped)
        dropped["fewshot"] += count
    result["fewshot"] = fewshot
    duplicates["dropped"] = {split: dropped[split] for split in ("train", "dev", "fewshot")}
    duplicates["within_split"] = {split: _extra_copies(result[split], keys) for split in result}
    if sum(dropped.values()):
        parts = ", ".join(f"{n} from {split}" for split, n in duplicates["dropped"].items() if n)
        notes.append(f"{sum(dropped.values())} training-side copies of dev or test examples dropped ({parts})")

    filtered: dict[str, int] = {}
    if source.keep is not None:
        for split, examples in result.items():
            kept = [e for e in examples if source.keep(e)]
            filtered[split] = len(examples) - len(kept)
            result[split] = kept

    slices = _take_slices(cfg, source, result, stratum, keys, notes)

    for split in result:
        result[split] = sorted(result[split], key=lambda e: order[e.id])
    for split in ("train", "dev", "test"):
        if not result[split]:
            notes.append(f"the {split} split is empty")
    notes.extend(_official_test_notes(cfg.dataset, result["train"]))
    loaded = _loaded_counts(task, everything)
    report = _report(cfg, source, result, loaded, duplicates, filtered, slices, notes)
    return DatasetSplits(
        task=task,
        train=result["train"],
        dev=result["dev"],
        test=result["test"],
        fewshot=result["fewshot"],
        report=report,
    )


def _drop_evaluation_copies(
    source: SourceData, keys: dict[str, str]
) -> tuple[dict[str, list[Example]], list[Example], Counter[str]]:
    """Drop copies of shipped evaluation items from the dev file, the train file and the pool.

    Evaluation splits the source ships win over everything else: their items (and, for grouped
    data, their groups) are removed wherever else they occur. Test wins over dev.
    """
    fixed = {name: list(part) for name, part in source.fixed.items()}
    dropped: Counter[str] = Counter()
    protected: list[Example] = []
    for split in ("test", "dev", "train"):
        if split not in fixed:
            continue
        if protected:
            fixed[split], count = _drop_copies(fixed[split], protected, keys, source.grouped)
            dropped[split] += count
        if split in EVAL_SPLITS:
            protected += fixed[split]
    pool, count = _drop_copies(source.pool, protected, keys, source.grouped)
    dropped["train"] += count
    return fixed, pool, dropped


def _take_slices(
    cfg: DataConfig,
    source: SourceData,
    result: dict[str, list[Example]],
    stratum: Callable[[Example], str],
    keys: dict[str, str],
    notes: list[str],
) -> dict[str, dict[str, int]]:
    """Replace each split by its seeded, stratified slice of data.<split>_size examples, in place."""
    slices = {}
    for split, size in (("train", cfg.train_size), ("dev", cfg.dev_size), ("test", cfg.test_size)):
        available = len(result[split])
        if size is None:
            continue
        if size < available:
            units = build_units(result[split], stratum, grouped=source.grouped, keys=keys)
            chosen = allocate(units, {"keep": size}, cfg.split_seed, f"slice/{cfg.dataset}/{split}")
            result[split] = members(chosen["keep"])
        elif size > available:
            notes.append(f"{split}_size {size} exceeds the {available} {split} examples; all are used")
        slices[split] = {"requested": size, "available": available, "kept": len(result[split])}
    return slices


def _drop_copies(
    examples: list[Example], protected: Iterable[Example], keys: dict[str, str], grouped: bool
) -> tuple[list[Example], int]:
    """Remove examples that copy a protected example (same duplicate key, or same group)."""
    protected = list(protected)
    taken_keys = {keys[e.id] for e in protected}
    taken_groups = {e.group for e in protected if e.group} if grouped else set()
    kept = [
        e for e in examples if keys[e.id] not in taken_keys and not (grouped and e.group and e.group in taken_groups)
    ]
    return kept, len(examples) - len(kept)


def _carve(
    cfg: DataConfig,
    source: SourceData,
    pool: list[Example],
    keys: dict[str, str],
    stratum: Callable[[Example], str],
) -> dict[str, list[Example]]:
    """Split the pool into train and the splits in ``source.carve``, per partition."""
    result: dict[str, list[Example]] = {"train": []}
    for split in source.carve:
        result[split] = []
    if not source.carve:
        result["train"] = list(pool)
        return result
    units = build_units(pool, stratum, grouped=source.grouped, keys=keys)
    partitions: dict[str, list] = {}
    for unit in units:
        name = source.partition(unit.members[0]) if source.partition else ""
        partitions.setdefault(name, []).append(unit)
    fractions = {"dev": cfg.dev_fraction, "test": cfg.test_fraction}
    for name in sorted(partitions):
        part = partitions[name]
        size = sum(unit.size for unit in part)
        targets = {split: round_half_up(fractions[split] * size) for split in source.carve}
        chosen = allocate(part, targets, cfg.split_seed, f"carve/{cfg.dataset}/{name}")
        for split in source.carve:
            result[split] += members(chosen[split])
        result["train"] += members(chosen["rest"])
    return result


def _duplicate_figures(examples: list[Example], keys: dict[str, str]) -> dict[str, Any]:
    by_key: dict[str, list[Example]] = {}
    for example in examples:
        by_key.setdefault(keys[example.id], []).append(example)
    groups = [group for group in by_key.values() if len(group) > 1]
    return {
        "groups": len(groups),
        "copies": sum(len(group) - 1 for group in groups),
        "conflicting_labels": sum(1 for group in groups if len({e.gold for e in group}) > 1),
    }


def _extra_copies(examples: list[Example], keys: dict[str, str]) -> int:
    counts = Counter(keys[e.id] for e in examples)
    return sum(n - 1 for n in counts.values() if n > 1)


def _official_test_notes(dataset: str, train: list[Example]) -> list[str]:
    origins = Counter(e.meta.get("source_split", "") for e in train)
    if not origins.get("test"):
        return []
    breakdown = ", ".join(f"{name or 'unknown'} {n}" for name, n in sorted(origins.items()))
    return [
        f"training used part of an official test set ({dataset}: {origins['test']} of the {len(train)} "
        f"training examples come from official test files; by source split: {breakdown})"
    ]


def _label_counts(task: TaskSpec, examples: list[Example]) -> dict[str, int]:
    counts = Counter(e.gold for e in examples) if task.is_closed else Counter(e.answer_type for e in examples)
    if task.is_closed:
        return {label: counts.get(label, 0) for label in task.labels} | {
            label: n for label, n in sorted(counts.items()) if label not in task.labels
        }
    return dict(sorted(counts.items()))


def _loaded_counts(task: TaskSpec, examples: list[Example]) -> dict[str, Any]:
    by_split: dict[str, list[Example]] = {}
    for example in examples:
        by_split.setdefault(example.meta.get("source_split", ""), []).append(example)
    return {
        "total": len(examples),
        "sizes": {split: len(part) for split, part in sorted(by_split.items())},
        "labels": {split: _label_counts(task, part) for split, part in sorted(by_split.items())},
    }


def _report(
    cfg: DataConfig,
    source: SourceData,
    result: dict[str, list[Example]],
    loaded: dict[str, Any],
    duplicates: dict[str, Any],
    filtered: dict[str, int],
    slices: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    task = source.task
    report: dict[str, Any] = {
        "dataset": cfg.dataset,
        "task": {"name": task.name, "format": task.format, "labels": list(task.labels), "domain": task.domain},
        "split_seed": cfg.split_seed,
        "split_rules": source.split_rules,
        # Valid rows read per official split, before duplicates were dropped.
        "loaded": loaded,
        "sizes": {split: len(examples) for split, examples in result.items()},
        # Closed formats count gold labels; numeric and span tasks count source answer types.
        "labels": {split: _label_counts(task, examples) for split, examples in result.items()},
        "source_splits": {
            split: dict(sorted(Counter(e.meta.get("source_split", "") for e in examples).items()))
            for split, examples in result.items()
        },
        # A short SHA-256 of each split's sorted ids: equal fingerprints mean equal splits.
        "fingerprints": {split: fingerprint(sorted(e.id for e in examples)) for split, examples in result.items()},
        "duplicates": duplicates,
        "notes": notes,
    }
    if any(e.scale for examples in result.values() for e in examples):
        report["scales"] = {
            split: dict(sorted(Counter(e.scale for e in examples).items())) for split, examples in result.items()
        }
    if source.grouped:
        report["groups"] = {split: len({e.group or e.id for e in examples}) for split, examples in result.items()}
    if filtered:
        report["filtered"] = filtered
    if slices:
        report["slices"] = slices
    report.update({f"extra_{key}": value for key, value in source.extra.items()})
    return report
