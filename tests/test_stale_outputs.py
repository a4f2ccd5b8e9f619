"""A changed model never inherits the stored predictions of the model it replaced."""

from __future__ import annotations

import json
from pathlib import Path

from bridge.pipeline import run_pipeline
from bridge.rundir import keyed_rows, read_rows
from test_compare import tiny_config

MARKER = "STORED-BY-THE-EARLIER-MODEL"


def test_keyed_rows_same_key_only(tmp_path: Path):
    rows = tmp_path / "predictions.jsonl"
    rows.write_text('{"id": "a"}\n', encoding="utf-8")
    # A file with no key beside it is treated as another key's.
    keyed_rows(rows, "k1")
    assert not rows.exists()
    assert (tmp_path / "predictions.jsonl.key").read_text(encoding="utf-8") == "k1\n"
    rows.write_text('{"id": "a"}\n', encoding="utf-8")
    assert keyed_rows(rows, "k1") == rows
    assert rows.read_text(encoding="utf-8") == '{"id": "a"}\n'
    keyed_rows(rows, "k2")
    assert not rows.exists()
    assert (tmp_path / "predictions.jsonl.key").read_text(encoding="utf-8") == "k2\n"


def _poison(path: Path) -> None:
    """Replace every stored row's text with a marker that only a reused row can carry forward."""
    rows = list(read_rows(path))
    assert rows, path
    for row in rows:
        row["text"] = MARKER
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_retrained_models_are_evaluated_again(tmp_path: Path, tiny_model_dir: Path, data_dir: Path):
    config = tiny_config(tiny_model_dir, tmp_path / "runs", data_dir)
    run_pipeline(config, until_stage="eval")
    root = tmp_path / "runs" / "tiny"
    student = root / "eval" / "predictions" / "student_stage-b.generation.jsonl"
    ta_after = root / "eval" / "predictions" / "ta_after.generation.jsonl"
    ta_before = root / "eval" / "predictions" / "ta_before.generation.jsonl"
    dev_after = root / "train_ta" / "dev_after.jsonl"
    for path in (student, ta_after, ta_before, dev_after):
        _poison(path)

    raw = config.model_dump(mode="json")
    raw["student"]["stages"][1]["learning_rate"] = 3e-4
    raw["ta_training"]["learning_rate"] = 3e-4
    changed = type(config).model_validate(raw)
    summaries = run_pipeline(changed, until_stage="eval")
    assert summaries["train_ta"].get("skipped") is not True
    assert summaries["eval"].get("skipped") is not True

    # The retrained TA and student are evaluated again. The untuned TA's rows are still valid.
    for path in (student, ta_after, dev_after):
        assert all(row["text"] != MARKER for row in read_rows(path)), path
    assert all(row["text"] == MARKER for row in read_rows(ta_before))
