"""`bridge data list` and `bridge data inspect`, and the API functions behind them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge import api
from bridge.data import list_datasets
from bridge.errors import ConfigError

BRIDGE = [sys.executable, "-m", "bridge.cli"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BRIDGE, *args], capture_output=True, text=True, timeout=120, env=env)


def test_list_shows_every_dataset(data_dir: Path):
    result = _run("data", "list", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    for name in ("pubmedqa_pqal", "medqa_usmle4_test", "mmlu_law_med_fin", "tatqa", "twitter_fin_sentiment", "generic"):
        assert name in result.stdout
    assert "sizes: train 450, dev 50, test 500, fewshot 0" in result.stdout


def test_list_without_data_dir_names_variable(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "BRIDGE_DATA_DIR"}
    rows = list_datasets(tmp_path)
    assert all(row["present"] is False for row in rows if row["name"] != "generic")
    result = _run("data", "list", env=env)
    assert result.returncode == 0
    assert "no data directory: set BRIDGE_DATA_DIR" in result.stdout


def test_inspect_prints_report_and_examples(data_dir: Path):
    result = _run("data", "inspect", "pubmedqa_pqal", "--set", "train_size=20", "--set", f"data_dir={data_dir}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "data set: pubmedqa_pqal  format: yes_no_maybe" in out
    assert "train        20   yes 11, no 7, maybe 2" in out
    assert "test        500   yes 276, no 169, maybe 55" in out
    assert "lengths (characters and words):" in out
    assert "--- train example" in out
    assert "--- test example" in out
    assert "Explanation:" in out


def test_inspect_unknown_dataset_one_message():
    result = _run("data", "inspect", "pubmed")
    assert result.returncode == 2
    assert "unknown data set 'pubmed'" in result.stderr
    assert "Traceback" not in result.stderr


def test_inspect_bad_setting_named():
    result = _run("data", "inspect", "pubmedqa_pqal", "--set", "train_sise=3")
    assert result.returncode == 2
    assert "data.train_sise" in result.stderr
    assert "did you mean 'train_size'" in result.stderr


def test_data_config_prefixes():
    cfg = api.data_config("tatqa", ["train_size=5", "data.dev_size=3"])
    assert (cfg.dataset, cfg.train_size, cfg.dev_size) == ("tatqa", 5, 3)
    with pytest.raises(ConfigError, match="dev_fraction"):
        api.data_config("tatqa", ["dev_fraction=0.9"])


def test_inspect_counts_tokens(data_dir: Path, tiny_tokenizer, tmp_path: Path):
    folder = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(folder)
    result = api.inspect_data(
        "twitter_fin_sentiment", tokenizer=str(folder), overrides=[f"data_dir={data_dir}", "test_size=50"]
    )
    lengths = result["lengths"]
    assert lengths["unit"] == "tokens"
    stats = lengths["test"]["question"]["tokens"]
    assert stats["count"] == 50
    expected = max(len(tiny_tokenizer(e, add_special_tokens=False)["input_ids"]) for e in _test_questions(data_dir))
    assert stats["max"] == expected
    assert len(result["examples"]) == 2


def _test_questions(data_dir: Path) -> list[str]:
    from bridge.data import load_dataset

    splits = load_dataset(api.data_config("twitter_fin_sentiment", [f"data_dir={data_dir}", "test_size=50"]))
    return [e.question for e in splits.test]
