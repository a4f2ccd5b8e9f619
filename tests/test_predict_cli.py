"""``bridge predict`` on a tiny in-process model: data files, named splits, run directories, resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge import api
from bridge.cli import app
from bridge.config import BridgeConfig, dump_config, load_config
from bridge.data import load_dataset
from bridge.errors import ConfigError, DataError
from bridge.metrics import wilson_interval

ROWS = [
    {"qid": "q1", "question": "Does aspirin reduce the risk of heart attack?", "label": "yes"},
    {"qid": "q2", "question": "Does the drug increase mortality in patients?", "label": "no"},
    {"qid": "q3", "question": "Is the evidence for the treatment conclusive?", "label": "maybe"},
    {"qid": "q4", "question": "Is the treatment effective for kidney disease?", "label": "yes"},
    {"qid": "q5", "question": "Did the trial find a clear benefit?", "label": "no"},
]
FIELDS = {"id", "prompt_hash", "text", "pred", "gold", "correct", "finish_reason"}


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "claims.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return path


@pytest.fixture()
def config_file(tmp_path: Path) -> Path:
    config = {
        "data": {
            "dataset": "generic",
            "format": "yes_no_maybe",
            "fields": {"id": "qid", "question": "question", "answer": "label"},
        },
        "prompts": {"max_context_tokens": 64},
        "evaluation": {"max_new_tokens": 6, "batch_size": 2},
    }
    path = tmp_path / "predict.yaml"
    path.write_text(dump_config(BridgeConfig.model_validate(config)), encoding="utf-8")
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=True)


def test_predict_generation_writes_rows(tmp_path, tiny_model_dir, data_file, config_file):
    out = tmp_path / "out" / "predictions.jsonl"
    result = _invoke("predict", str(tiny_model_dir), str(data_file), "--config", str(config_file), "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert [r["id"] for r in rows] == [r["qid"] for r in ROWS]
    assert [r["gold"] for r in rows] == [r["label"] for r in ROWS]
    for row in rows:
        assert set(row) >= FIELDS
        assert row["finish_reason"] in ("stop", "length")
        assert len(row["prompt_hash"]) == 16
    correct = sum(r["correct"] for r in rows)
    low, high = wilson_interval(correct, len(rows))
    assert f"accuracy {correct / len(rows):.3f}" in result.output
    assert f"95% Wilson interval {low:.3f}-{high:.3f}" in result.output
    assert f"{correct}/{len(rows)} correct" in result.output
    assert not out.with_name(out.name + ".partial").exists()


def test_predict_scoring_mode(tmp_path, tiny_model_dir, data_file, config_file):
    out = tmp_path / "scores.jsonl"
    result = _invoke(
        "predict", str(tiny_model_dir), str(data_file), "--config", str(config_file), "--out", str(out), "--mode", "scoring"
    )
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == len(ROWS)
    for row in rows:
        assert row["pred"] in ("yes", "no", "maybe")
        assert sum(row["probs"].values()) == pytest.approx(1.0)
        assert row["pred"] == max(row["probs"], key=row["probs"].get)
        assert row["correct"] == (row["pred"] == row["gold"])


def test_predict_resumes_from_partial_rows(tmp_path, tiny_model_dir, data_file, config_file):
    config = api.prediction_config(str(tiny_model_dir), config_file)
    out = tmp_path / "predictions.jsonl"
    first = api.predict(str(tiny_model_dir), str(data_file), config, out=out, progress=False)["rows"]
    stored = dict(first[1], text="Answer: maybe", pred="maybe", correct=False)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(stored) + "\n", encoding="utf-8")

    again = api.predict(str(tiny_model_dir), str(data_file), config, out=out, progress=False)["rows"]
    assert again[1] == stored
    assert [r["text"] for i, r in enumerate(again) if i != 1] == [r["text"] for i, r in enumerate(first) if i != 1]
    assert _rows(out)[1]["text"] == "Answer: maybe"
    assert not partial.exists()


def test_predict_named_split(tmp_path, tiny_model_dir, data_dir):
    config = api.prediction_config(
        str(tiny_model_dir), None, ["data.dev_size=4", "evaluation.batch_size=4"]
    )
    result = api.predict(str(tiny_model_dir), "pubmedqa_pqal:dev", config, mode="scoring", progress=False)
    expected = [e.id for e in load_dataset(config.data).dev]
    assert [r["id"] for r in result["rows"]] == expected
    assert len(expected) == 4
    assert result["scores"].n == 4
    assert result["out"] is None


def test_predict_config_from_run_dir(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    stored = BridgeConfig.model_validate({"evaluation": {"max_new_tokens": 3}})
    (run / "config.yaml").write_text(dump_config(stored), encoding="utf-8")
    assert api.prediction_config(str(run)).evaluation.max_new_tokens == 3
    assert api.prediction_config(str(run), None, ["evaluation.max_new_tokens=5"]).evaluation.max_new_tokens == 5
    embedded = load_config(None).evaluation.max_new_tokens
    assert api.prediction_config(str(tiny_model_dir)).evaluation.max_new_tokens == embedded


def test_predict_rejects_bad_sources(tmp_path, tiny_model_dir, data_file, config_file):
    config = api.prediction_config(str(tiny_model_dir), config_file)
    with pytest.raises(DataError, match="not a data set split"):
        api.predict(str(tiny_model_dir), str(tmp_path / "missing.jsonl"), config)
    with pytest.raises(ConfigError, match="closed task format"):
        api.predict(str(tiny_model_dir), str(data_file), config.model_copy(update={"data": config.data.model_copy(update={"format": "span"})}), mode="scoring")
    with pytest.raises(ConfigError, match="unknown prediction mode"):
        api.predict(str(tiny_model_dir), str(data_file), config, mode="guess")
    without_format = api.prediction_config(str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"data\.format is not set"):
        api.predict(str(tiny_model_dir), str(data_file), without_format)


def test_predict_command_error_has_no_traceback(tmp_path, tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "predict", str(tiny_model_dir), str(tmp_path / "nope.csv")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "nope.csv not found" in result.stderr
    assert "DATASET:SPLIT" in result.stderr
    assert "Traceback" not in result.stderr
