"""Twitter financial news sentiment: bearish, bullish or neutral, from sent_train.csv and sent_valid.csv."""

from __future__ import annotations

from pathlib import Path

from bridge.config import DataConfig
from bridge.data.io import RowChecker, iter_csv
from bridge.data.source import IdRegistry, SourceData, relative_name
from bridge.data.types import Example, TaskSpec
from bridge.errors import DataError

NAME = "twitter_fin_sentiment"
TRAIN_FILE = "sent_train.csv"
VALID_FILE = "sent_valid.csv"
#: Source label values and their names, as the original data set card defines them.
LABEL_NAMES = {"0": "bearish", "1": "bullish", "2": "neutral"}

SPLIT_RULES = (
    "test: the official validation file sent_valid.csv (the source ships no test file). "
    "train and dev: sent_train.csv, split seeded and stratified by label, dev_fraction to dev. "
    "Copies of test tweets in sent_train.csv (equal after normalising case, spacing and punctuation) "
    "are dropped."
)


def load(cfg: DataConfig, root: Path, checker: RowChecker) -> SourceData:
    """Read both CSV files (columns text, label)."""
    folder = root / NAME
    ids = IdRegistry(checker)
    parts: dict[str, list[Example]] = {}
    for split, file in (("train", TRAIN_FILE), ("valid", VALID_FILE)):
        path = folder / file
        header, records = iter_csv(path, NAME, checker, header=True)
        assert header is not None
        if "text" not in header or "label" not in header:
            raise DataError(
                f"{path}: line 1: the header {header} lacks the column 'text' or 'label'",
                hint="restore the original file, whose first line is: text,label",
            )
        text_at, label_at = header.index("text"), header.index("label")
        examples: list[Example] = []
        for record in records:
            values = record.values
            location = record.location
            if len(values) != len(header):
                checker.reject(
                    path, location, "(columns)", f"{len(values)} columns; the header has {len(header)}", "quote fields that contain commas", values
                )
                continue
            text = values[text_at].strip()
            if not text:
                checker.reject(path, location, "text", "empty question (the tweet text is empty)", "remove the row", values)
                continue
            label = LABEL_NAMES.get(values[label_at].strip())
            if label is None:
                checker.reject(
                    path,
                    location,
                    "label",
                    f"label {values[label_at]!r} is outside the label set 0, 1, 2",
                    "use 0 (bearish), 1 (bullish) or 2 (neutral)",
                    values,
                )
                continue
            example_id = f"{NAME}/{path.stem}/{record.row}"
            if not ids.claim(example_id, path, location, values):
                continue
            examples.append(
                Example(
                    id=example_id,
                    question=text,
                    gold=label,
                    meta={"source_file": file, "source_row": location, "source_split": split},
                )
            )
        parts[split] = examples
    task = TaskSpec(
        name=NAME,
        format="classification",
        labels=tuple(LABEL_NAMES.values()),
        rel_tolerance=cfg.rel_tolerance,
        domain="financial news headlines (market sentiment)",
    )
    return SourceData(
        task=task,
        fixed={"test": parts["valid"]},
        pool=parts["train"],
        carve=("dev",),
        split_rules=SPLIT_RULES,
        files=[relative_name(folder / TRAIN_FILE, root), relative_name(folder / VALID_FILE, root)],
    )
