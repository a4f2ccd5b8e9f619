"""TAT-QA: questions over a financial table and its paragraphs, with numeric and span answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge.config import DataConfig
from bridge.data.adapters.common import parse_number, parse_scale, parse_spans
from bridge.data.io import RowChecker, read_json
from bridge.data.source import IdRegistry, SourceData, relative_name, text_field
from bridge.data.types import Example, TaskSpec
from bridge.errors import ConfigError, DataError

NAME = "tatqa"
DEV_FILE = "tatqa_dataset_dev.json"
TEST_FILE = "tatqa_dataset_test_gold.json"
#: Source answer types and the answer format each is compared in.
ANSWER_TYPES = {"arithmetic": "numeric", "count": "numeric", "span": "span", "multi-span": "span"}

SPLIT_RULES = (
    "test: the official test file (tatqa_dataset_test_gold.json). train and dev: the official dev file "
    "(the training file is not in the data folder), split seeded by document: all questions about one "
    "table (table.uid) stay in one split, dev_fraction of the questions to dev. "
    "data.answer_types filters after splitting, so a document's split does not depend on the filter."
)


def load(cfg: DataConfig, root: Path, checker: RowChecker) -> SourceData:
    """Read the official dev and test files."""
    if cfg.answer_types is not None:
        unknown = sorted(set(cfg.answer_types) - set(ANSWER_TYPES))
        if unknown:
            raise ConfigError(
                f"data.answer_types: unknown TAT-QA answer type(s) {', '.join(unknown)}",
                hint=f"choose from: {', '.join(ANSWER_TYPES)}",
            )

    folder = root / NAME
    ids = IdRegistry(checker)
    empty_spans = 0
    parts: dict[str, list[Example]] = {}
    for split, file in (("dev", DEV_FILE), ("test", TEST_FILE)):
        path = folder / file
        documents = read_json(path, NAME)
        if not isinstance(documents, list):
            raise DataError(f"{path}: expected a JSON list of documents, found {type(documents).__name__}")
        examples: list[Example] = []
        for index, document in enumerate(documents):
            found, removed = _read_document(document, index, path, file, split, ids, checker)
            examples.extend(found)
            empty_spans += removed
        parts[split] = examples

    notes = []
    if empty_spans:
        notes.append(f"{empty_spans} empty part(s) of multi-span answers removed (the source lists empty strings)")

    kept_types = set(cfg.answer_types or ANSWER_TYPES)
    formats = {ANSWER_TYPES[t] for t in kept_types}
    task = TaskSpec(
        name=NAME,
        # A mixed task is "span"; numeric examples carry answer_format="numeric".
        format="numeric" if formats == {"numeric"} else "span",
        rel_tolerance=cfg.rel_tolerance,
        domain="financial reports (tables and text)",
    )
    return SourceData(
        task=task,
        fixed={"test": parts["test"]},
        pool=parts["dev"],
        carve=("dev",),
        split_rules=SPLIT_RULES,
        files=[relative_name(folder / DEV_FILE, root), relative_name(folder / TEST_FILE, root)],
        grouped=True,
        stratum=lambda example: "",
        notes=notes,
        extra={"empty_spans_removed": empty_spans},
        keep=None if cfg.answer_types is None else (lambda example: example.answer_type in kept_types),
    )


def render_table(rows: list[list[Any]]) -> str:
    """Render a table as one line per row with cells separated by " | "."""
    lines = []
    for row in rows:
        cells = [str(cell).strip() for cell in row]
        if any(cells):
            lines.append(" | ".join(cells))
    return "\n".join(lines)


def _read_document(
    document: Any, index: int, path: Path, file: str, split: str, ids: IdRegistry, checker: RowChecker
) -> tuple[list[Example], int]:
    location = f"document {index}"
    if not isinstance(document, dict):
        checker.reject(path, location, "(document)", f"expected an object, found {type(document).__name__}", "restore the original file", document)
        return [], 0
    table = document.get("table")
    if not isinstance(table, dict) or not isinstance(table.get("uid"), str) or not isinstance(table.get("table"), list):
        checker.reject(path, location, "table", "missing table, table.uid or table.table", "restore the original document", document.get("table"))
        return [], 0
    if not all(isinstance(row, list) for row in table["table"]):
        checker.reject(path, location, "table.table", "expected a list of rows (lists of cells)", "restore the original document", table)
        return [], 0
    paragraphs = document.get("paragraphs")
    if not isinstance(paragraphs, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in paragraphs):
        checker.reject(path, location, "paragraphs", "expected a list of objects with text", "restore the original document", paragraphs)
        return [], 0
    questions = document.get("questions")
    if not isinstance(questions, list):
        checker.reject(path, location, "questions", "missing or not a list", "restore the original document", questions)
        return [], 0
    ordered = sorted(paragraphs, key=lambda p: p.get("order", 0) if isinstance(p.get("order"), int) else 0)
    context = render_table(table["table"])
    text = "\n".join(p["text"].strip() for p in ordered if p["text"].strip())
    context = f"{context}\n\n{text}" if text else context
    examples: list[Example] = []
    removed = 0
    for number, question in enumerate(questions):
        where = f"{location} (table {table['uid']}) question {number}"
        example, empty = _read_question(question, where, context, table["uid"], path, file, split, checker)
        removed += empty
        if example is not None and ids.claim(example.id, path, where, question):
            examples.append(example)
    return examples, removed


def _read_question(
    record: Any, location: str, context: str, group: str, path: Path, file: str, split: str, checker: RowChecker
) -> tuple[Example | None, int]:
    if not isinstance(record, dict):
        checker.reject(path, location, "(question)", f"expected an object, found {type(record).__name__}", "restore the original document", record)
        return None, 0
    uid = text_field(record, "uid")
    if not uid:
        checker.reject(path, location, "uid", "missing or empty", "restore the original question", record)
        return None, 0
    location = f"{location} (uid {uid})"

    question = text_field(record, "question")
    if question is None:
        checker.reject(path, location, "question", "missing or not a string", "restore the original question", record)
        return None, 0
    if not question.strip():
        checker.reject(path, location, "question", "empty question", "restore the original question or remove it", record)
        return None, 0

    answer_type = record.get("answer_type")
    if answer_type not in ANSWER_TYPES:
        checker.reject(
            path, location, "answer_type", f"unknown answer type {answer_type!r}", f"use one of: {', '.join(ANSWER_TYPES)}", record
        )
        return None, 0
    scale = parse_scale(record.get("scale"), path, location, "scale", checker, record)
    if scale is None:
        return None, 0
    if "answer" not in record:
        checker.reject(path, location, "answer", "missing", "restore the original question", record)
        return None, 0

    answer = record["answer"]
    removed = 0
    if ANSWER_TYPES[answer_type] == "numeric":
        parsed = parse_number(answer, path, location, "answer", checker, record)
        if parsed is None:
            return None, 0
        gold, percent = parsed
        if percent and not scale:
            scale = "percent"
    else:
        spans = parse_spans(answer, path, location, "answer", checker, record)
        if spans is None:
            return None, 0
        gold, count, removed = spans
        if answer_type == "span" and count != 1:
            checker.reject(path, location, "answer", f"a span answer with {count} parts", "mark it multi-span or keep one part", record)
            return None, 0

    derivation = (text_field(record, "derivation") or "").strip()
    gold_meta = {"answer_from": str(record.get("answer_from", ""))}
    if derivation:
        gold_meta["derivation"] = derivation
    if isinstance(record.get("rel_paragraphs"), list):
        gold_meta["rel_paragraphs"] = ", ".join(str(p) for p in record["rel_paragraphs"])
    if isinstance(record.get("req_comparison"), bool):
        gold_meta["req_comparison"] = "true" if record["req_comparison"] else "false"
    meta = {"source_file": file, "source_row": location, "source_split": split, "document": group}
    if isinstance(record.get("order"), int):
        meta["question_order"] = str(record["order"])
    return (
        Example(
            id=uid,
            question=question.strip(),
            gold=gold,
            context=context,
            # Count derivations list the counted items separated by "##".
            explanation=derivation.replace("##", "; ") or None,
            group=group,
            scale=scale,
            answer_type=answer_type,
            answer_format=ANSWER_TYPES[answer_type],  # type: ignore[arg-type]
            gold_meta=gold_meta,
            meta=meta,
        ),
        removed,
    )
