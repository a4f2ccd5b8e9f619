"""MMLU subjects in law, medicine, accounting and econometrics: headerless dev/val/test CSV files."""

from __future__ import annotations

from pathlib import Path

from bridge.config import DataConfig
from bridge.data.adapters.common import parse_letter
from bridge.data.io import RowChecker, iter_csv, missing_file_error
from bridge.data.source import IdRegistry, SourceData, relative_name
from bridge.data.text import OPTION_LETTERS
from bridge.data.types import Example, TaskSpec
from bridge.errors import ConfigError, DataError

NAME = "mmlu_law_med_fin"
#: Official split folders, each holding <subject>_<split>.csv.
FOLDERS = ("dev", "val", "test")
LETTERS = OPTION_LETTERS[:4]

SPLIT_RULES = (
    "fewshot: the 5-item dev file of each subject (the few-shot pool; copies of dev or test items dropped). "
    "Per subject, the val and test files together are split seeded and stratified by answer letter: "
    "test_fraction to test, dev_fraction to dev, the rest to train. Exact duplicates, which occur across "
    "subjects, stay together in one split. Training therefore uses part of an official test set."
)


def subjects_in(folder: Path) -> list[str]:
    """Return the subjects with a test file in an MMLU folder, sorted."""
    return sorted(p.name.removesuffix("_test.csv") for p in (folder / "test").glob("*_test.csv"))


def load(cfg: DataConfig, root: Path, checker: RowChecker) -> SourceData:
    """Read every subject's dev, val and test files (or the subjects in ``data.subjects``)."""
    folder = root / NAME
    available = subjects_in(folder)
    if not available:
        raise missing_file_error(NAME, folder / "test" / "<subject>_test.csv", "test files")
    subjects = available
    if cfg.subjects is not None:
        unknown = [s for s in cfg.subjects if s not in available]
        if unknown:
            raise ConfigError(
                f"data.subjects: unknown MMLU subject(s) {', '.join(unknown)}",
                hint=f"choose from: {', '.join(available)}",
            )
        subjects = sorted(set(cfg.subjects))

    ids = IdRegistry(checker)
    fewshot: list[Example] = []
    pool: list[Example] = []
    files: list[str] = []
    for subject in subjects:
        for split in FOLDERS:
            path = folder / split / f"{subject}_{split}.csv"
            if not path.is_file():
                raise missing_file_error(NAME, path)
            files.append(relative_name(path, root))
            examples = _read_file(path, subject, split, ids, checker)
            (fewshot if split == "dev" else pool).extend(examples)

    task = TaskSpec(
        name=NAME,
        format="multiple_choice",
        labels=LETTERS,
        rel_tolerance=cfg.rel_tolerance,
        domain="law, medicine, accounting and econometrics",
    )
    return SourceData(
        task=task,
        fixed={"fewshot": fewshot},
        pool=pool,
        carve=("test", "dev"),
        split_rules=SPLIT_RULES,
        files=files,
        partition=lambda example: example.meta["subject"],
        stratum=lambda example: f"{example.meta['subject']}/{example.gold}",
    )


def _read_file(path: Path, subject: str, split: str, ids: IdRegistry, checker: RowChecker) -> list[Example]:
    stem = path.stem
    source_file = f"{split}/{path.name}"
    examples: list[Example] = []
    _, records = iter_csv(path, NAME, checker, header=False)
    for record in records:
        values = record.values
        location = record.location
        if len(values) != 6:
            checker.reject(
                path,
                location,
                "(columns)",
                f"{len(values)} columns; expected 6 (question, A, B, C, D, answer letter)",
                "quote fields that contain commas or newlines",
                values,
            )
            continue
        question = values[0].strip()
        if not question:
            checker.reject(path, location, "question", "empty question", "write the question text in column 1", values)
            continue
        options = {letter: text.strip() for letter, text in zip(LETTERS, values[1:5], strict=True)}
        letter = parse_letter(values[5], options, path, location, "answer", checker, values)
        if letter is None:
            continue
        example_id = f"{NAME}/{stem}/{record.row}"
        if not ids.claim(example_id, path, location, values):
            continue
        examples.append(
            Example(
                id=example_id,
                question=question,
                gold=letter,
                options=options,
                meta={
                    "subject": subject,
                    "source_file": source_file,
                    "source_row": location,
                    "source_split": split,
                },
            )
        )
    if not examples and not checker.rejects:
        raise DataError(f"{path}: the file contains no rows", hint="restore the original MMLU file")
    return examples
