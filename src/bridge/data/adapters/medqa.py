"""MedQA-USMLE with four options: the official test split only (1273 questions)."""

from __future__ import annotations

from pathlib import Path

from bridge.config import DataConfig
from bridge.data.adapters.common import parse_options
from bridge.data.io import RowChecker, iter_jsonl
from bridge.data.source import IdRegistry, SourceData, relative_name, text_field
from bridge.data.text import OPTION_LETTERS
from bridge.data.types import Example, TaskSpec

NAME = "medqa_usmle4_test"
DATA_FILE = "test.jsonl"

SPLIT_RULES = (
    "The folder holds only the official test file, so train, dev and test are all carved from it: "
    "seeded and stratified by answer letter, test_fraction to test, dev_fraction to dev, the rest to train. "
    "Training therefore uses part of an official test set."
)


def load(cfg: DataConfig, root: Path, checker: RowChecker) -> SourceData:
    """Read test.jsonl (question, options A-D, answer_idx, answer text, meta_info, realidx)."""
    path = root / NAME / DATA_FILE
    ids = IdRegistry(checker)
    pool: list[Example] = []
    letters_seen: set[str] = set()
    for row, line, record in iter_jsonl(path, NAME, checker):
        location = f"line {line}"
        if not isinstance(record, dict):
            checker.reject(path, location, "(record)", f"expected an object, found {type(record).__name__}", "write one JSON object per line", record)
            continue
        question = text_field(record, "question")
        if question is None:
            checker.reject(path, location, "question", "missing or not a string", "restore the original row", record)
            continue
        if not question.strip():
            checker.reject(path, location, "question", "empty question", "restore the original row or remove it", record)
            continue
        options = parse_options(record.get("options"), path, location, "options", checker, record)
        if options is None:
            continue
        letter = record.get("answer_idx")
        if not isinstance(letter, str) or letter.strip().upper() not in options:
            checker.reject(
                path,
                location,
                "answer_idx",
                f"unknown option letter {letter!r}; the options are {', '.join(options)}",
                "set answer_idx to the letter of the correct option",
                record,
            )
            continue
        letter = letter.strip().upper()
        answer_text = text_field(record, "answer")
        if answer_text is not None and answer_text.strip() != options[letter].strip():
            checker.reject(
                path,
                location,
                "answer",
                f"answer text {answer_text!r} differs from option {letter} {options[letter]!r}",
                "make answer_idx name the option whose text is the answer",
                record,
            )
            continue
        realidx = record.get("realidx")
        example_id = f"{NAME}/test/{realidx if isinstance(realidx, int) else row}"
        if not ids.claim(example_id, path, location, record):
            continue
        letters_seen.update(options)
        meta = {"source_file": DATA_FILE, "source_row": location, "source_split": "test"}
        if isinstance(record.get("meta_info"), str):
            meta["step"] = record["meta_info"]
        pool.append(
            Example(
                id=example_id,
                question=question.strip(),
                gold=letter,
                options=options,
                gold_meta={"answer_text": options[letter]},
                meta=meta,
            )
        )
    labels = tuple(letter for letter in OPTION_LETTERS if letter in letters_seen) or OPTION_LETTERS[:4]
    task = TaskSpec(
        name=NAME,
        format="multiple_choice",
        labels=labels,
        rel_tolerance=cfg.rel_tolerance,
        domain="clinical medicine (US medical licensing examination)",
    )
    return SourceData(
        task=task,
        fixed={},
        pool=pool,
        carve=("test", "dev"),
        split_rules=SPLIT_RULES,
        files=[relative_name(path, root)],
    )
