"""A user's own JSONL, JSON, CSV or TSV files, read through the field mapping in the configuration."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bridge.config import DATA_DIR_ENV, DataConfig
from bridge.data.adapters.common import (
    parse_letter,
    parse_number,
    parse_options,
    parse_scale,
    parse_spans,
)
from bridge.data.io import RowChecker, iter_csv, iter_jsonl, missing_file_error, read_json
from bridge.data.source import IdRegistry, SourceData
from bridge.data.text import OPTION_LETTERS
from bridge.data.types import Example, TaskSpec
from bridge.errors import ConfigError, DataError

NAME = "generic"
YES_NO_MAYBE = ("yes", "no", "maybe")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
_MISSING = object()


def resolve_file(raw: str, cfg: DataConfig) -> Path:
    """Resolve a generic data file: absolute as given, relative to the data directory when one is set.

    Without data.data_dir and without $BRIDGE_DATA_DIR a relative path is read from the current
    directory.
    """
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    base = cfg.data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(base).expanduser() / path if base else path


def check_settings(cfg: DataConfig) -> None:
    """Raise :class:`ConfigError` for generic settings that cannot describe a data set."""
    problems = []
    if cfg.train_file is None:
        problems.append("data.train_file is not set")
    if cfg.format is None:
        problems.append("data.format is not set (multiple_choice, yes_no_maybe, classification, numeric or span)")
    if cfg.format == "classification" and not (cfg.labels or cfg.label_map):
        problems.append("data.labels is not set; classification needs its label names")
    if cfg.labels is not None and len(set(cfg.labels)) != len(cfg.labels):
        problems.append(f"data.labels {cfg.labels} repeats a label")
    if cfg.format == "multiple_choice" and cfg.fields.options is None and not cfg.fields.option_fields:
        problems.append("multiple choice needs data.fields.options or data.fields.option_fields")
    if cfg.fields.options is not None and cfg.fields.option_fields:
        problems.append("set only one of data.fields.options and data.fields.option_fields")
    if cfg.fields.option_fields and not 2 <= len(cfg.fields.option_fields) <= len(OPTION_LETTERS):
        problems.append(f"data.fields.option_fields names {len(cfg.fields.option_fields)} fields; expected 2 to 5")
    if problems:
        raise ConfigError(
            "the generic data set is not fully described: " + "; ".join(problems),
            hint="see the generic adapter section of docs/data.md for a complete example",
        )


def task_labels(cfg: DataConfig) -> tuple[str, ...]:
    """Return the valid labels of a closed generic task (empty for numeric and span)."""
    if cfg.format == "yes_no_maybe":
        return YES_NO_MAYBE
    if cfg.format == "classification":
        if cfg.labels:
            return tuple(cfg.labels)
        return tuple(dict.fromkeys((cfg.label_map or {}).values()))
    if cfg.format == "multiple_choice":
        count = len(cfg.fields.option_fields) if cfg.fields.option_fields else len(OPTION_LETTERS)
        return OPTION_LETTERS[:count]
    return ()


def load(cfg: DataConfig, root: Path | None, checker: RowChecker) -> SourceData:
    """Read the train file and the optional dev and test files."""
    check_settings(cfg)
    assert cfg.train_file is not None and cfg.format is not None
    task = TaskSpec(
        name=NAME,
        format=cfg.format,
        labels=task_labels(cfg),
        rel_tolerance=cfg.rel_tolerance,
        domain=cfg.domain or "",
    )

    reader = _RowReader(cfg, task, checker, IdRegistry(checker))
    files = {"train": cfg.train_file, "dev": cfg.dev_file, "test": cfg.test_file}
    loaded: dict[str, list[Example]] = {}
    for split, raw in files.items():
        if raw is not None:
            path = resolve_file(raw, cfg)
            rejected = len(checker.rejects)
            loaded[split] = list(reader.read(path, split))
            if not loaded[split] and len(checker.rejects) == rejected:
                raise DataError(
                    f"{path}: the {split} file holds no data rows",
                    hint=f"fill the file, or point data.{split}_file at another one",
                )

    carve = tuple(split for split in ("test", "dev") if split not in loaded)
    rules = ["train: the train file" + (f", minus the {' and '.join(carve)} split(s) carved from it" if carve else "")]
    for split in ("dev", "test"):
        if split in loaded:
            rules.append(f"{split}: the {split} file")
        else:
            share = "dev_fraction" if split == "dev" else "test_fraction"
            rules.append(f"{split}: {share} of the train file, seeded and stratified")

    notes = []
    if "test" not in loaded:
        notes.append("test split carved from the train file (no data.test_file set)")
    return SourceData(
        task=task,
        fixed={split: examples for split, examples in loaded.items() if split != "train"},
        pool=loaded["train"],
        carve=carve,
        split_rules="; ".join(rules) + ".",
        files=[str(resolve_file(raw, cfg)) for raw in files.values() if raw is not None],
        grouped=cfg.fields.group is not None,
        notes=notes,
    )


def _lookup(record: dict[str, Any], key: str) -> Any:
    """Return ``record[key]``, following dots into nested objects ("table.uid") when the key is absent."""
    if key in record:
        return record[key]
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _raw_text(value: Any) -> str:
    """Return the text form of a raw answer used to look up data.label_map ("0", "true", "B")."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class _RowReader:
    """Turns the rows of one file into examples, rejecting bad rows through the checker."""

    def __init__(self, cfg: DataConfig, task: TaskSpec, checker: RowChecker, ids: IdRegistry) -> None:
        self.cfg = cfg
        self.task = task
        self.checker = checker
        self.ids = ids
        self.fields = cfg.fields
        self._label_by_fold = {label.casefold(): label for label in task.labels}

    def read(self, path: Path, split: str) -> Iterator[Example]:
        kind = _SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"data file {path}: unknown file type '{path.suffix}'",
                hint="use a .jsonl, .json, .csv or .tsv file",
            )
        if not path.exists():
            raise missing_file_error(NAME, path, f"{split} file")
        for row, location, record in self._rows(path, kind):
            example = self._example(record, path, location, row, split)
            if example is not None:
                yield example

    def _rows(self, path: Path, kind: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
        if kind == "jsonl":
            for row, line, record in iter_jsonl(path, NAME, self.checker, encoding=self.cfg.encoding):
                if isinstance(record, dict):
                    yield row, f"line {line}", record
                else:
                    self.checker.reject(path, f"line {line}", "(record)", f"expected an object, found {type(record).__name__}", "write one JSON object per line", record)
            return
        if kind == "json":
            if self.cfg.encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
                raise DataError(f"{path}: JSON files must be UTF-8", hint="convert the file to UTF-8 or to JSONL")
            records = read_json(path, NAME)
            if not isinstance(records, list):
                raise DataError(f"{path}: expected a JSON list of objects, found {type(records).__name__}", hint="write a list of objects, or use JSONL")
            for row, record in enumerate(records):
                if isinstance(record, dict):
                    yield row, f"record {row}", record
                else:
                    self.checker.reject(path, f"record {row}", "(record)", f"expected an object, found {type(record).__name__}", "write a list of objects", record)
            return
        header, records = iter_csv(
            path, NAME, self.checker, encoding=self.cfg.encoding, delimiter="\t" if kind == "tsv" else ",", header=True
        )
        assert header is not None
        self._check_header(path, header)
        for record in records:
            if len(record.values) != len(header):
                self.checker.reject(
                    path,
                    record.location,
                    "(columns)",
                    f"{len(record.values)} columns; the header has {len(header)}",
                    "quote fields that contain the delimiter, quotes or newlines",
                    record.values,
                )
                continue
            yield record.row, record.location, dict(zip(header, record.values, strict=True))

    def _check_header(self, path: Path, header: list[str]) -> None:
        """Raise when a mapped column is missing from a CSV header: every row would fail."""
        mapped = {
            "question": self.fields.question,
            "answer": self.fields.answer,
            "id": self.fields.id,
            "context": self.fields.context,
            "options": self.fields.options,
            "explanation": self.fields.explanation,
            "group": self.fields.group,
            "scale": self.fields.scale,
        }
        for index, column in enumerate(self.fields.option_fields or []):
            mapped[f"option_fields.{index}"] = column
        for key, column in mapped.items():
            if column is not None and column not in header:
                raise DataError(
                    f"{path}: line 1: column '{column}' (data.fields.{key}) is not in the header {header}",
                    hint=f"set data.fields.{key} to one of the header's columns",
                )

    def _example(self, record: dict[str, Any], path: Path, location: str, row: int, split: str) -> Example | None:
        check = self.checker
        fields = self.fields

        question = _lookup(record, fields.question)
        if question is _MISSING:
            check.reject(path, location, fields.question, "missing field (question)", "add the field or set data.fields.question to the field that holds the question", record)
            return None
        if not isinstance(question, str):
            check.reject(
                path, location, fields.question,
                f"expected text, found {type(question).__name__} {_raw_text(question)[:80]}",
                "write the question as a JSON string, or set data.fields.question to the field that holds the question",
                record,
            )
            return None
        if not question.strip():
            check.reject(path, location, fields.question, "empty question", "write the question text, or remove the row", record)
            return None

        example_id = f"{NAME}/{path.stem}/{row}"
        if fields.id is not None:
            raw_id = _lookup(record, fields.id)
            if raw_id is _MISSING or raw_id is None or str(raw_id).strip() == "":
                check.reject(path, location, fields.id, "missing id", "give every row an id, or unset data.fields.id so that rows are numbered", record)
                return None
            example_id = str(raw_id).strip()

        context = self._optional_text(record, fields.context, path, location)
        if context is _MISSING:
            return None
        explanation = self._optional_text(record, fields.explanation, path, location)
        if explanation is _MISSING:
            return None
        group = self._optional_text(record, fields.group, path, location)
        if group is _MISSING:
            return None

        options = None
        if self.task.format == "multiple_choice":
            options = self._options(record, path, location)
            if options is None:
                return None

        answer = _lookup(record, fields.answer)
        if answer is _MISSING or answer is None or (isinstance(answer, str) and not answer.strip()):
            check.reject(path, location, fields.answer, "missing answer", f"give the gold answer in field '{fields.answer}', or set data.fields.answer", record)
            return None
        parsed = self._gold(answer, options, record, path, location)
        if parsed is None:
            return None
        gold, scale, answer_type = parsed

        if not self.ids.claim(example_id, path, location, record):
            return None
        return Example(
            id=example_id,
            question=question.strip(),
            gold=gold,
            context=context or None,
            options=options,
            explanation=explanation or None,
            group=group or None,
            scale=scale,
            answer_type=answer_type,
            meta={"source_file": path.name, "source_row": location, "source_split": split},
        )

    def _optional_text(self, record: dict[str, Any], key: str | None, path: Path, location: str) -> Any:
        """Return the text of an optional field, "" when unset or absent, or _MISSING after a reject."""
        if key is None:
            return ""
        value = _lookup(record, key)
        if value is _MISSING or value is None:
            return ""
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value).strip()
        self.checker.reject(path, location, key, f"expected text, found {type(value).__name__}", "write the field as text", record)
        return _MISSING

    def _options(self, record: dict[str, Any], path: Path, location: str) -> dict[str, str] | None:
        fields = self.fields
        if fields.option_fields:
            values = [_lookup(record, column) for column in fields.option_fields]
            for column, value in zip(fields.option_fields, values, strict=True):
                if value is _MISSING:
                    self.checker.reject(path, location, column, "missing field (option)", "add the option field or fix data.fields.option_fields", record)
                    return None
            return parse_options(values, path, location, ",".join(fields.option_fields), self.checker, record)
        assert fields.options is not None
        value = _lookup(record, fields.options)
        if value is _MISSING:
            self.checker.reject(path, location, fields.options, "missing field (options)", "add the options or set data.fields.options", record)
            return None
        return parse_options(value, path, location, fields.options, self.checker, record)

    def _gold(
        self, answer: Any, options: dict[str, str] | None, record: dict[str, Any], path: Path, location: str
    ) -> tuple[str, str, str] | None:
        """Return (gold, scale, answer type) in the canonical form of the task format."""
        check = self.checker
        key = self.fields.answer
        fmt = self.task.format
        if self.cfg.label_map is not None and not isinstance(answer, list):
            mapped = self.cfg.label_map.get(_raw_text(answer).strip())
            if mapped is not None:
                answer = mapped
        if fmt == "multiple_choice":
            assert options is not None
            letter = parse_letter(answer, options, path, location, key, check, record)
            return None if letter is None else (letter, "", "")
        if fmt in ("yes_no_maybe", "classification"):
            text = _raw_text(answer).strip()
            label = self._label_by_fold.get(text.casefold())
            if label is None:
                check.reject(
                    path,
                    location,
                    key,
                    f"label {answer!r} is outside the label set {', '.join(self.task.labels)}",
                    "correct the label, add it to data.labels, or map raw values with data.label_map",
                    record,
                )
                return None
            return label, "", ""
        if fmt == "numeric":
            parsed = parse_number(answer, path, location, key, check, record)
            if parsed is None:
                return None
            number, percent = parsed
            scale = ""
            if self.fields.scale is not None:
                raw_scale = _lookup(record, self.fields.scale)
                scale = parse_scale(None if raw_scale is _MISSING else raw_scale, path, location, self.fields.scale, check, record)
                if scale is None:
                    return None
            if percent and not scale:
                scale = "percent"
            return number, scale, "number"
        spans = parse_spans(answer, path, location, key, check, record)
        if spans is None:
            return None
        gold, count, _ = spans
        return gold, "", "multi-span" if count > 1 else "span"
