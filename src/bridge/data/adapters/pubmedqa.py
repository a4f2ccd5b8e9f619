"""PubMedQA PQA-L: 1000 expert-labelled yes/no/maybe questions over abstract contexts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge.config import DataConfig
from bridge.data.io import RowChecker, read_json
from bridge.data.source import IdRegistry, SourceData, relative_name, text_field
from bridge.data.types import Example, TaskSpec
from bridge.errors import DataError

NAME = "pubmedqa_pqal"
LABELS = ("yes", "no", "maybe")
DATA_FILE = "ori_pqal.json"
TEST_FILE = "test_ground_truth.json"
#: Source fields derived from the gold answer; kept in ``gold_meta``, never shown in a prompt.
GOLD_META_FIELDS = ("final_decision", "reasoning_required_pred", "reasoning_free_pred")

SPLIT_RULES = (
    "test: the 500 ids listed in test_ground_truth.json (the official test split). "
    "train and dev: the other 500 items, split seeded and stratified by label into "
    "(1 - dev_fraction) and dev_fraction (450 and 50 by default)."
)


def load(cfg: DataConfig, root: Path, checker: RowChecker) -> SourceData:
    """Read ori_pqal.json and the official test id list."""
    folder = root / NAME
    data_path, test_path = folder / DATA_FILE, folder / TEST_FILE
    records = read_json(data_path, NAME)
    truth = read_json(test_path, NAME)
    if not isinstance(records, dict):
        raise DataError(f"{data_path}: expected a JSON object mapping PubMed ids to records, found {type(records).__name__}")
    if not isinstance(truth, dict):
        raise DataError(f"{test_path}: expected a JSON object mapping PubMed ids to labels, found {type(truth).__name__}")
    ids = IdRegistry(checker)
    examples: dict[str, Example] = {}
    for index, (pmid, record) in enumerate(records.items()):
        location = f"record {index} (id {pmid})"
        example = _example(pmid, record, data_path, location, checker, test_ids=truth)
        if example is not None and ids.claim(example.id, data_path, location):
            examples[example.id] = example

    test: list[Example] = []
    for index, (pmid, label) in enumerate(truth.items()):
        location = f"record {index} (id {pmid})"
        example = examples.get(pmid)
        if example is None:
            if pmid not in records:
                raise DataError(
                    f"{test_path}: {location}: id {pmid} is not in {DATA_FILE}",
                    hint="restore the original pair of files: every test id must have a record",
                )
            continue  # the record itself was rejected above
        if label != example.gold:
            checker.reject(
                test_path,
                location,
                "final_decision",
                f"test label '{label}' disagrees with final_decision '{example.gold}' in {DATA_FILE}",
                "restore the original files; the two must agree",
                {pmid: label},
            )
            del examples[pmid]
            continue
        test.append(example)
    test_ids = {e.id for e in test}
    pool = [e for e in examples.values() if e.id not in test_ids]
    task = TaskSpec(
        name=NAME,
        format="yes_no_maybe",
        labels=LABELS,
        rel_tolerance=cfg.rel_tolerance,
        domain="biomedical research abstracts",
    )
    return SourceData(
        task=task,
        fixed={"test": test},
        pool=pool,
        carve=("dev",),
        split_rules=SPLIT_RULES,
        files=[relative_name(data_path, root), relative_name(test_path, root)],
    )


def _example(
    pmid: str, record: Any, path: Path, location: str, checker: RowChecker, *, test_ids: dict[str, Any]
) -> Example | None:
    if not isinstance(record, dict):
        checker.reject(path, location, "(record)", f"expected an object, found {type(record).__name__}", "restore the original file", record)
        return None
    question = text_field(record, "QUESTION")
    if question is None:
        checker.reject(path, location, "QUESTION", "missing or not a string", "restore the original record", record)
        return None
    if not question.strip():
        checker.reject(path, location, "QUESTION", "empty question", "restore the original record or remove it", record)
        return None
    contexts = record.get("CONTEXTS")
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
        checker.reject(path, location, "CONTEXTS", "missing or not a non-empty list of strings", "restore the original record", record)
        return None
    decision = record.get("final_decision")
    if decision not in LABELS:
        problem = "missing" if decision is None else f"label {decision!r} is outside the label set yes, no, maybe"
        checker.reject(path, location, "final_decision", problem, "restore the original record", record)
        return None
    long_answer = text_field(record, "LONG_ANSWER")
    if long_answer is None:
        checker.reject(path, location, "LONG_ANSWER", "missing or not a string", "restore the original record", record)
        return None
    gold_meta = {key: str(record[key]) for key in GOLD_META_FIELDS if isinstance(record.get(key), str)}
    labels = record.get("LABELS")
    meshes = record.get("MESHES")
    meta = {
        "source_file": DATA_FILE,
        "source_row": location,
        "source_split": "test" if pmid in test_ids else "train_dev",
    }
    if isinstance(record.get("YEAR"), str):
        meta["year"] = record["YEAR"]
    if isinstance(labels, list):
        meta["context_labels"] = "; ".join(str(x) for x in labels)
    if isinstance(meshes, list):
        meta["meshes"] = "; ".join(str(x) for x in meshes)
    return Example(
        id=str(pmid),
        question=question.strip(),
        gold=decision,
        context="\n".join(c.strip() for c in contexts),
        explanation=long_answer.strip() or None,
        gold_meta=gold_meta,
        meta=meta,
    )
