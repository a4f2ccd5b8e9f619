"""Each adapter on the real data sets: sizes, label counts, official splits and gold forms."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from bridge.config import DataConfig
from bridge.data import MULTI_SPAN_SEPARATOR, DatasetSplits, load_dataset

NAMES = ("pubmedqa_pqal", "medqa_usmle4_test", "mmlu_law_med_fin", "tatqa", "twitter_fin_sentiment")


@pytest.fixture(scope="module")
def loaded(data_dir: Path) -> dict[str, DatasetSplits]:
    return {name: load_dataset(DataConfig(dataset=name, data_dir=str(data_dir))) for name in NAMES}


def _all(splits: DatasetSplits) -> list:
    return splits.train + splits.dev + splits.test + splits.fewshot


def _by_id(splits: DatasetSplits) -> dict:
    return {e.id: e for e in _all(splits)}


# --- PubMedQA -------------------------------------------------------------------------------


def test_pubmedqa_sizes_and_labels(loaded):
    splits = loaded["pubmedqa_pqal"]
    assert len(_all(splits)) == 1000
    assert Counter(e.gold for e in _all(splits)) == {"yes": 552, "no": 338, "maybe": 110}
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (450, 50, 500)
    assert splits.fewshot == []


def test_pubmedqa_official_test_split(loaded, data_dir):
    splits = loaded["pubmedqa_pqal"]
    truth = json.loads((data_dir / "pubmedqa_pqal" / "test_ground_truth.json").read_text())
    assert {e.id for e in splits.test} == set(truth)
    assert Counter(e.gold for e in splits.test) == {"yes": 276, "no": 169, "maybe": 55}
    assert Counter(e.gold for e in splits.train + splits.dev) == {"yes": 276, "no": 169, "maybe": 55}
    assert all(truth[e.id] == e.gold for e in splits.test)


def test_pubmedqa_dev_is_stratified(loaded):
    splits = loaded["pubmedqa_pqal"]
    assert Counter(e.gold for e in splits.dev) == {"yes": 28, "no": 17, "maybe": 5}


def test_pubmedqa_gold_fields(loaded, data_dir):
    splits = loaded["pubmedqa_pqal"]
    records = json.loads((data_dir / "pubmedqa_pqal" / "ori_pqal.json").read_text())
    example = _by_id(splits)["21645374"]
    record = records["21645374"]
    assert example.question == record["QUESTION"]
    assert example.explanation == record["LONG_ANSWER"]
    assert example.gold == record["final_decision"]
    assert example.gold_meta == {
        "final_decision": record["final_decision"],
        "reasoning_required_pred": record["reasoning_required_pred"],
        "reasoning_free_pred": record["reasoning_free_pred"],
    }
    assert example.context == "\n".join(record["CONTEXTS"])
    assert example.meta["year"] == record["YEAR"]


# --- MedQA ----------------------------------------------------------------------------------


def test_medqa_sizes_and_letters(loaded):
    splits = loaded["medqa_usmle4_test"]
    assert len(_all(splits)) == 1273
    assert Counter(e.gold for e in _all(splits)) == {"A": 353, "B": 309, "C": 346, "D": 265}
    assert splits.task.labels == ("A", "B", "C", "D")
    assert all(list(e.options) == ["A", "B", "C", "D"] for e in _all(splits))


def test_medqa_carved_split_sizes(loaded):
    splits = loaded["medqa_usmle4_test"]
    # test_fraction 0.3 and dev_fraction 0.1 of 1273, rounded half up.
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (764, 127, 382)


def test_medqa_reports_official_test_in_training(loaded):
    notes = loaded["medqa_usmle4_test"].report["notes"]
    assert any(note.startswith("training used part of an official test set") for note in notes)


def test_medqa_gold_matches_answer_text(loaded, data_dir):
    rows = [json.loads(line) for line in (data_dir / "medqa_usmle4_test" / "test.jsonl").open()]
    by_id = _by_id(loaded["medqa_usmle4_test"])
    for row in rows[:50]:
        example = by_id[f"medqa_usmle4_test/test/{row['realidx']}"]
        assert example.gold == row["answer_idx"]
        assert example.options[example.gold] == row["answer"]


# --- MMLU -----------------------------------------------------------------------------------


def test_mmlu_has_nine_subjects(loaded):
    subjects = {e.meta["subject"] for e in _all(loaded["mmlu_law_med_fin"])}
    assert len(subjects) == 9
    assert {"professional_law", "professional_medicine", "professional_accounting", "econometrics"} <= subjects


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("professional_law", {"dev": 5, "val": 170, "test": 1534}),
        ("professional_medicine", {"dev": 5, "val": 31, "test": 282}),
        ("professional_accounting", {"dev": 5, "val": 31, "test": 282}),
    ],
)
def test_mmlu_file_sizes_per_subject(loaded, subject, expected):
    report = loaded["mmlu_law_med_fin"]
    counts = Counter(e.meta["source_split"] for e in _all(report) if e.meta["subject"] == subject)
    assert counts == expected


def test_mmlu_quoted_newlines_kept(loaded, data_dir):
    path = data_dir / "mmlu_law_med_fin" / "test" / "econometrics_test.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    multiline = next(i for i, row in enumerate(rows) if "\n" in row[0])
    assert sum(1 for row in rows if "\n" in row[0]) == 41
    example = _by_id(loaded["mmlu_law_med_fin"])[f"mmlu_law_med_fin/econometrics_test/{multiline}"]
    assert "\n" in example.question
    assert example.question == rows[multiline][0].strip()
    assert example.gold == rows[multiline][5]


def test_mmlu_fewshot_only_dev_files(loaded):
    splits = loaded["mmlu_law_med_fin"]
    assert {e.meta["source_split"] for e in splits.fewshot} == {"dev"}
    assert not any(e.meta["source_split"] == "dev" for e in splits.train + splits.dev + splits.test)
    # 45 dev items; one is a copy of an item carved into dev or test and is dropped.
    assert len(splits.fewshot) + splits.report["duplicates"]["dropped"]["fewshot"] == 45


def test_mmlu_split_per_subject(loaded):
    splits = loaded["mmlu_law_med_fin"]
    for subject in {e.meta["subject"] for e in splits.test}:
        test = sum(1 for e in splits.test if e.meta["subject"] == subject)
        pool = sum(1 for e in splits.train + splits.dev + splits.test if e.meta["subject"] == subject)
        assert abs(test - 0.3 * pool) <= 3, subject


def test_mmlu_duplicates_grouped(loaded):
    report = loaded["mmlu_law_med_fin"].report
    assert report["duplicates"]["groups"] == 99
    assert report["duplicates"]["conflicting_labels"] == 0


def test_mmlu_subject_filter(data_dir):
    splits = load_dataset(
        DataConfig(dataset="mmlu_law_med_fin", data_dir=str(data_dir), subjects=["professional_accounting"])
    )
    assert {e.meta["subject"] for e in _all(splits)} == {"professional_accounting"}
    assert len(splits.train) + len(splits.dev) + len(splits.test) == 31 + 282


# --- TAT-QA ---------------------------------------------------------------------------------


def test_tatqa_sizes_and_documents(loaded):
    splits = loaded["tatqa"]
    assert len(splits.train) + len(splits.dev) == 1668
    assert len({e.group for e in splits.train + splits.dev}) == 278
    assert len(splits.test) == 1663
    assert len({e.group for e in splits.test}) == 277


def test_tatqa_documents_stay_together(loaded):
    splits = loaded["tatqa"]
    train_docs = {e.group for e in splits.train}
    dev_docs = {e.group for e in splits.dev}
    test_docs = {e.group for e in splits.test}
    assert not train_docs & dev_docs
    assert not (train_docs | dev_docs) & test_docs
    assert abs(len(splits.dev) - 167) <= 6


def test_tatqa_answer_forms(loaded):
    by_id = _by_id(loaded["tatqa"])
    arithmetic = by_id["eb787966-fa02-401f-bfaf-ccabf3828b23"]
    assert (arithmetic.gold, arithmetic.scale, arithmetic.answer_format) == ("-12.6", "million", "numeric")
    assert arithmetic.explanation == "44.1-56.7"
    multi = by_id["593c4388-5209-4462-8b83-b429c8612c25"]
    assert multi.gold == MULTI_SPAN_SEPARATOR.join(["fixed-price type", "cost-plus type", "time-and-material type"])
    assert multi.answer_format == "span"
    span = by_id["4960801d-277d-4f79-8eca-c4d0200fa9d6"]
    assert (span.gold, span.scale, span.answer_type) == ("$1,496.5", "million", "span")


def test_tatqa_types_and_scales(loaded):
    examples = _all(loaded["tatqa"])
    assert {e.answer_type for e in examples} == {"arithmetic", "span", "multi-span", "count"}
    assert {e.scale for e in examples} == {"", "thousand", "million", "billion", "percent"}
    for e in examples:
        if e.answer_type in ("arithmetic", "count"):
            assert e.answer_format == "numeric"
            float(e.gold)
            assert "," not in e.gold
        if e.answer_type == "arithmetic":
            assert e.explanation
        if e.answer_type == "count":
            assert e.gold.isdigit()


def test_tatqa_context_has_table_and_text(loaded):
    example = _by_id(loaded["tatqa"])["eb787966-fa02-401f-bfaf-ccabf3828b23"]
    assert "Fixed Price | $  1,452.4 | $  1,146.2 | $  1,036.9" in example.context
    assert "Sales by Contract Type" in example.context


def test_tatqa_answer_type_filter_keeps_splits(data_dir, loaded):
    full = loaded["tatqa"]
    only = load_dataset(DataConfig(dataset="tatqa", data_dir=str(data_dir), answer_types=["arithmetic"]))
    assert only.task.format == "numeric"
    assert {e.answer_type for e in _all(only)} == {"arithmetic"}
    assert {e.id for e in only.dev} == {e.id for e in full.dev if e.answer_type == "arithmetic"}
    assert len(only.test) == 699


# --- Twitter --------------------------------------------------------------------------------


def test_twitter_train_file_labels(loaded):
    report = loaded["twitter_fin_sentiment"].report
    assert report["loaded"]["sizes"] == {"train": 9543, "valid": 2388}
    assert report["loaded"]["labels"]["train"] == {"bearish": 1442, "bullish": 1923, "neutral": 6178}


def test_twitter_test_is_valid_file(loaded):
    splits = loaded["twitter_fin_sentiment"]
    assert len(splits.test) == 2388
    assert {e.meta["source_file"] for e in splits.test} == {"sent_valid.csv"}
    assert {e.meta["source_file"] for e in splits.train + splits.dev} == {"sent_train.csv"}


def test_twitter_copies_of_test_dropped(loaded):
    splits = loaded["twitter_fin_sentiment"]
    assert splits.report["duplicates"]["dropped"]["train"] == 12
    assert len(splits.train) + len(splits.dev) == 9543 - 12
    assert len(splits.dev) == round(0.1 * (9543 - 12))


def test_twitter_label_names(loaded):
    splits = loaded["twitter_fin_sentiment"]
    assert splits.task.labels == ("bearish", "bullish", "neutral")
    example = _by_id(splits)["twitter_fin_sentiment/sent_train/0"]
    assert example.question.startswith("$BYND - JPMorgan reels in expectations on Beyond Meat")
    assert example.gold == "bearish"


# --- All ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_ids_unique(loaded, name):
    ids = [e.id for e in _all(loaded[name])]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("name", NAMES)
def test_report_is_json(loaded, name):
    report = loaded[name].report
    assert json.loads(json.dumps(report)) == report
    assert report["sizes"]["test"] == len(loaded[name].test)
    assert report["rejects"]["count"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_closed_golds_in_labels(loaded, name):
    splits = loaded[name]
    if splits.task.is_closed:
        assert {e.gold for e in _all(splits)} <= set(splits.task.labels)
    for e in _all(splits):
        assert e.question.strip() == e.question
        assert e.question
