"""The generic adapter on a user's files, bad rows in every adapter, and the rejects file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.config import DataConfig, FieldMapping
from bridge.data import REJECTS_FILE, LeakageError, check_leakage, load_dataset, prompt_view
from bridge.errors import ConfigError, DataError

BAD = Path(__file__).parent / "bad_data"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _yes_no_rows(n: int, offset: int = 0) -> list[dict]:
    answers = ["yes", "No", "maybe", "YES"]
    return [
        {
            "uid": f"r{offset + i}",
            "q": f"Does intervention {offset + i} improve outcome?",
            "ctx": f"Trial {offset + i} enrolled patients.",
            "a": answers[i % 4],
            "why": f"Because trial {offset + i} found an effect on the primary outcome measure.",
        }
        for i in range(n)
    ]


def _cfg(tmp_path: Path, **kwargs) -> DataConfig:
    return DataConfig(dataset="generic", data_dir=str(tmp_path), **kwargs)


def test_jsonl_yes_no_with_mapping(tmp_path: Path):
    _write_jsonl(tmp_path / "train.jsonl", _yes_no_rows(40))
    fields = FieldMapping(id="uid", question="q", context="ctx", answer="a", explanation="why")
    splits = load_dataset(_cfg(tmp_path, train_file="train.jsonl", format="yes_no_maybe", fields=fields))
    assert splits.task.labels == ("yes", "no", "maybe")
    everything = splits.train + splits.dev + splits.test
    assert len(everything) == 40
    assert {e.gold for e in everything} == {"yes", "no", "maybe"}
    example = next(e for e in everything if e.id == "r1")
    assert (example.gold, example.context) == ("no", "Trial 1 enrolled patients.")
    assert example.explanation.startswith("Because trial 1")
    # Without a test file, test and dev are carved from the train file, and a note records it.
    assert (len(splits.test), len(splits.dev)) == (12, 4)
    assert any("test split carved from the train file" in note for note in splits.report["notes"])
    for e in everything:
        check_leakage(prompt_view(e), e, task=splits.task)
    with pytest.raises(LeakageError, match="explanation"):
        check_leakage(f"{example.question}\n{example.explanation}", example, task=splits.task)


def test_rows_numbered_without_id(tmp_path: Path):
    _write_jsonl(tmp_path / "mine.jsonl", _yes_no_rows(10))
    fields = FieldMapping(question="q", answer="a")
    splits = load_dataset(_cfg(tmp_path, train_file="mine.jsonl", format="yes_no_maybe", fields=fields))
    ids = sorted(e.id for e in splits.train + splits.dev + splits.test)
    assert ids == sorted(f"generic/mine/{i}" for i in range(10))


def test_split_independent_of_row_order(tmp_path: Path):
    rows = _yes_no_rows(60)
    _write_jsonl(tmp_path / "a.jsonl", rows)
    _write_jsonl(tmp_path / "b.jsonl", list(reversed(rows)))
    fields = FieldMapping(id="uid", question="q", answer="a")
    first = load_dataset(_cfg(tmp_path, train_file="a.jsonl", format="yes_no_maybe", fields=fields))
    second = load_dataset(_cfg(tmp_path, train_file="b.jsonl", format="yes_no_maybe", fields=fields))
    for split in ("train", "dev", "test"):
        assert {e.id for e in first.split(split)} == {e.id for e in second.split(split)}


def test_csv_multiple_choice_option_columns(tmp_path: Path):
    path = tmp_path / "mc.csv"
    path.write_text(
        "id,question,A,B,C,D,answer\n"
        + "".join(f'm{i},"Question {i}, with a comma?",w{i},x{i},y{i},z{i},{"ABCD"[i % 4]}\n' for i in range(20))
        + 'm20,"Pick the text answer",red,green,blue,black,green\n',
        encoding="utf-8",
    )
    fields = FieldMapping(id="id", question="question", answer="answer", option_fields=["A", "B", "C", "D"])
    splits = load_dataset(_cfg(tmp_path, train_file="mc.csv", format="multiple_choice", fields=fields))
    by_id = {e.id: e for e in splits.train + splits.dev + splits.test}
    assert by_id["m2"].options == {"A": "w2", "B": "x2", "C": "y2", "D": "z2"}
    assert by_id["m2"].gold == "C"
    assert by_id["m2"].question == "Question 2, with a comma?"
    assert by_id["m20"].gold == "B"
    assert splits.task.labels == ("A", "B", "C", "D")


def test_jsonl_options_list(tmp_path: Path):
    rows = [{"question": f"Q{i}?", "choices": ["one", "two", "three"], "answer": "(b)"} for i in range(5)]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    fields = FieldMapping(options="choices")
    splits = load_dataset(_cfg(tmp_path, train_file="train.jsonl", format="multiple_choice", fields=fields))
    example = (splits.train + splits.dev + splits.test)[0]
    assert example.options == {"A": "one", "B": "two", "C": "three"}
    assert example.gold == "B"


def test_tsv_label_map_and_encoding(tmp_path: Path):
    path = tmp_path / "sent.tsv"
    rows = ["text\tlabel"] + [f"Caf\u00e9 chain {i} reports results\t{i % 3}" for i in range(30)]
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    cfg = _cfg(
        tmp_path,
        train_file="sent.tsv",
        format="classification",
        label_map={"0": "bearish", "1": "bullish", "2": "neutral"},
        labels=["bearish", "bullish", "neutral"],
        encoding="latin-1",
        fields=FieldMapping(question="text", answer="label"),
    )
    splits = load_dataset(cfg)
    everything = splits.train + splits.dev + splits.test
    assert {e.gold for e in everything} == {"bearish", "bullish", "neutral"}
    first = next(e for e in everything if e.id == "generic/sent/0")
    assert (first.question, first.gold) == ("Caf\u00e9 chain 0 reports results", "bearish")


@pytest.mark.parametrize(("encoding", "data"), [("utf-8", "\ufeff"), ("utf-16", "")])
def test_bom_and_utf16_files(tmp_path: Path, encoding: str, data: str):
    text = data + "question,answer\nIs the café open?,yes\nIs it\u2028late?,no\n"
    path = tmp_path / "enc.csv"
    path.write_bytes(text.encode(encoding))
    splits = load_dataset(_cfg(tmp_path, train_file="enc.csv", format="yes_no_maybe", encoding=encoding))
    questions = {e.id: e.question for e in splits.train + splits.dev + splits.test}
    assert questions == {"generic/enc/0": "Is the café open?", "generic/enc/1": "Is it\u2028late?"}


def test_wrong_encoding_names_line(tmp_path: Path):
    path = tmp_path / "sent.csv"
    path.write_bytes("question,answer\nIs it fine?,yes\nCaf\u00e9 open?,no\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"line 3: field '\(bytes\)': undecodable bytes"):
        load_dataset(_cfg(tmp_path, train_file="sent.csv", format="yes_no_maybe"))


def test_numeric_answers_canonical(tmp_path: Path):
    rows = [
        {"question": "Revenue?", "answer": "$1,496.50", "scale": "million"},
        {"question": "Growth?", "answer": "12.5%"},
        {"question": "Loss?", "answer": "(3.20)", "scale": "thousand"},
        {"question": "Count?", "answer": 7},
        {"question": "Ratio?", "answer": 0.25},
    ]
    _write_jsonl(tmp_path / "num.jsonl", rows)
    cfg = _cfg(tmp_path, train_file="num.jsonl", format="numeric", fields=FieldMapping(scale="scale"), test_fraction=0.2, dev_fraction=0.2)
    splits = load_dataset(cfg)
    by_question = {e.question: e for e in splits.train + splits.dev + splits.test}
    assert (by_question["Revenue?"].gold, by_question["Revenue?"].scale) == ("1496.5", "million")
    assert (by_question["Growth?"].gold, by_question["Growth?"].scale) == ("12.5", "percent")
    assert (by_question["Loss?"].gold, by_question["Loss?"].scale) == ("-3.2", "thousand")
    assert by_question["Count?"].gold == "7"
    assert by_question["Ratio?"].gold == "0.25"


def test_multi_span_answers_joined(tmp_path: Path):
    _write_jsonl(tmp_path / "s.jsonl", [{"question": "Which years?", "answer": ["2019", " 2018 ", ""]}, {"question": "Who?", "answer": "The CEO"}])
    splits = load_dataset(_cfg(tmp_path, train_file="s.jsonl", format="span"))
    by_question = {e.question: e for e in splits.train + splits.dev + splits.test}
    assert (by_question["Which years?"].gold, by_question["Which years?"].answer_type) == ("2019 | 2018", "multi-span")
    assert (by_question["Who?"].gold, by_question["Who?"].answer_type) == ("The CEO", "span")


def test_test_file_copies_dropped_from_train(tmp_path: Path):
    train = _yes_no_rows(30)
    test = [*_yes_no_rows(10, offset=100), dict(train[0], uid="t-copy", q=train[0]["q"].upper() + "!!")]
    _write_jsonl(tmp_path / "train.jsonl", train)
    _write_jsonl(tmp_path / "test.jsonl", test)
    fields = FieldMapping(id="uid", question="q", answer="a")
    splits = load_dataset(_cfg(tmp_path, train_file="train.jsonl", test_file="test.jsonl", format="yes_no_maybe", fields=fields))
    assert len(splits.test) == 11
    assert "r0" not in {e.id for e in splits.train + splits.dev}
    assert splits.report["duplicates"]["dropped"]["train"] == 1


def test_group_field_keeps_rows_together(tmp_path: Path):
    rows = [dict(row, doc=f"d{i // 4}") for i, row in enumerate(_yes_no_rows(80))]
    _write_jsonl(tmp_path / "g.jsonl", rows)
    fields = FieldMapping(id="uid", question="q", answer="a", group="doc")
    splits = load_dataset(_cfg(tmp_path, train_file="g.jsonl", format="yes_no_maybe", fields=fields))
    sides = [{e.group for e in splits.split(s)} for s in ("train", "dev", "test")]
    assert not sides[0] & sides[1]
    assert not sides[0] & sides[2]
    assert not sides[1] & sides[2]
    assert splits.report["groups"]["test"] == len(splits.test) // 4


def test_missing_file_names_path_and_variable(tmp_path: Path):
    with pytest.raises(DataError, match="BRIDGE_DATA_DIR") as info:
        load_dataset(_cfg(tmp_path, train_file="absent.jsonl", format="span"))
    assert str(tmp_path / "absent.jsonl") in str(info.value)


def test_named_dataset_missing_folder(tmp_path: Path):
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="tatqa", data_dir=str(tmp_path)))
    message = str(info.value)
    assert "tatqa" in message
    assert str(tmp_path / "tatqa") in message
    assert "BRIDGE_DATA_DIR" in message


def test_no_data_dir_names_variable(monkeypatch):
    monkeypatch.delenv("BRIDGE_DATA_DIR", raising=False)
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="pubmedqa_pqal"))
    message = str(info.value)
    assert "pubmedqa_pqal" in message
    assert "export BRIDGE_DATA_DIR=" in message


def test_incomplete_generic_settings(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"data\.format is not set"):
        load_dataset(_cfg(tmp_path, train_file="x.jsonl"))
    with pytest.raises(ConfigError, match="classification needs its label names"):
        load_dataset(_cfg(tmp_path, train_file="x.jsonl", format="classification"))


def test_setting_for_other_adapter_rejected(data_dir: Path):
    with pytest.raises(ConfigError, match=r"data.subjects \(read only by mmlu_law_med_fin\)"):
        load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir), subjects=["anatomy"]))
    with pytest.raises(ConfigError, match="unknown MMLU subject"):
        load_dataset(DataConfig(dataset="mmlu_law_med_fin", data_dir=str(data_dir), subjects=["astrology"]))
    with pytest.raises(ConfigError, match="unknown data set"):
        load_dataset(DataConfig(dataset="pubmedqa", data_dir=str(data_dir)))


# --- Bad rows -------------------------------------------------------------------------------

GENERIC_BAD = [
    # file, format, fields, expected message parts
    ("missing_field.jsonl", "yes_no_maybe", {"id": "id"}, ["missing_field.jsonl", "line 3", "field 'answer'", "missing answer"]),
    ("empty_question.jsonl", "yes_no_maybe", {"id": "id"}, ["line 2", "field 'question'", "empty question"]),
    ("duplicate_id.jsonl", "yes_no_maybe", {"id": "id"}, ["line 3", "field 'id'", "duplicate id 'q1'", "line 1"]),
    (
        "bad_letter.csv",
        "multiple_choice",
        {"option_fields": ["A", "B", "C", "D"]},
        ["bad_letter.csv", "line 5 (row 2)", "field 'answer'", "unknown option letter 'F'"],
    ),
    ("label_outside.tsv", "classification", {"question": "text", "answer": "label"}, ["line 4", "field 'label'", "'sideways' is outside the label set"]),
    ("bad_bytes.csv", "yes_no_maybe", {}, ["bad_bytes.csv", "line 4", "undecodable bytes"]),
    ("not_a_number.csv", "numeric", {}, ["line 4", "field 'answer'", "'about ten' is not a number"]),
]


def _generic_bad_cfg(file: str, fmt: str, fields: dict, **kwargs) -> DataConfig:
    labels = ["bearish", "bullish", "neutral"] if fmt == "classification" else None
    return DataConfig(
        dataset="generic", data_dir=str(BAD), train_file=file, format=fmt, labels=labels, fields=FieldMapping(**fields), **kwargs
    )


@pytest.mark.parametrize(("file", "fmt", "fields", "parts"), GENERIC_BAD, ids=[case[0] for case in GENERIC_BAD])
def test_bad_row_stops_loading(file, fmt, fields, parts):
    with pytest.raises(DataError) as info:
        load_dataset(_generic_bad_cfg(file, fmt, fields))
    message = str(info.value)
    for part in parts:
        assert part in message
    assert "fix:" in message
    assert "data.skip_invalid=true" in message


@pytest.mark.parametrize(("file", "fmt", "fields", "parts"), GENERIC_BAD, ids=[case[0] for case in GENERIC_BAD])
def test_bad_row_skipped_into_rejects(tmp_path, file, fmt, fields, parts):
    splits = load_dataset(_generic_bad_cfg(file, fmt, fields, skip_invalid=True), rejects_dir=tmp_path)
    assert splits.report["rejects"]["count"] == 1
    rejects = [json.loads(line) for line in (tmp_path / REJECTS_FILE).read_text().splitlines()]
    assert len(rejects) == 1
    assert rejects[0]["file"].endswith(file)
    assert parts[-1] in rejects[0]["problem"] + rejects[0]["field"]
    assert splits.report["rejects"]["file"] == str(tmp_path / REJECTS_FILE)
    total = len(splits.train) + len(splits.dev) + len(splits.test)
    assert total >= 2


NAMED_BAD = [
    ("pubmedqa_pqal", ["ori_pqal.json", "record 2 (id 1003)", "field 'final_decision'", "'perhaps'"], {"QUESTION": 1, "final_decision": 1}),
    ("medqa_usmle4_test", ["test.jsonl", "line 2", "field 'answer_idx'", "unknown option letter 'E'"], {"answer_idx": 1}),
    ("mmlu_law_med_fin", ["anatomy_val.csv", "line 4 (row 2)", "field 'answer'", "'E'"], {"(columns)": 1, "answer": 1}),
    ("tatqa", ["tatqa_dataset_dev.json", "uid q3", "field 'scale'", "'gazillion'"], {"answer_type": 1, "scale": 1}),
    ("twitter_fin_sentiment", ["sent_train.csv", "line 5 (row 3)", "field 'label'", "'3'"], {"label": 1, "text": 1}),
]


@pytest.mark.parametrize(("name", "parts", "by_field"), NAMED_BAD, ids=[case[0] for case in NAMED_BAD])
def test_named_adapter_bad_rows(tmp_path, name, parts, by_field):
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset=name, data_dir=str(BAD)))
    for part in parts:
        assert part in str(info.value)
    splits = load_dataset(DataConfig(dataset=name, data_dir=str(BAD), skip_invalid=True), rejects_dir=tmp_path)
    assert splits.report["rejects"]["by_field"] == by_field
    lines = (tmp_path / REJECTS_FILE).read_text().splitlines()
    assert len(lines) == sum(by_field.values())
    assert len(splits.rejects) == len(lines)


def test_rejects_kept_without_folder():
    splits = load_dataset(DataConfig(dataset="medqa_usmle4_test", data_dir=str(BAD), skip_invalid=True))
    assert splits.report["rejects"]["file"] is None
    assert splits.report["rejects"]["count"] == 1
    assert splits.rejects[0].field == "answer_idx"
    assert any("only in this report" in note for note in splits.report["notes"])
