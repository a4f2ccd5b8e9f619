"""Configuration schema, strict parsing, overrides and the generated reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bridge.config import BridgeConfig, apply_overrides, dump_config, load_config
from bridge.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _bridge_configs() -> list[Path]:
    # Subfolders (configs/accelerate/ and others) hold other tools' files.
    return sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    assert _bridge_configs(), "configs/ holds no bridge configuration"


@pytest.mark.parametrize("path", _bridge_configs(), ids=lambda p: p.name)
def test_shipped_config_loads(path: Path):
    config = load_config(path)
    assert isinstance(config, BridgeConfig)


def test_embedded_default_loads():
    config = load_config(None)
    assert config.data.dataset == "pubmedqa_pqal"
    assert config.teacher.backend == "reference"
    assert config.budget.fraction == 0.05


def test_misspelt_key_named_with_suggestion(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  datset: pubmedqa_pqal\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "data.datset" in message
    assert "did you mean 'dataset'" in message


def test_all_problems_reported_at_once(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"train_size": -3},
                "teacher": {"backend": "magic"},
                "selection": {"lamda": 0.3},
                "budget": {"max_cost_usd": -1},
            }
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "4 invalid setting(s)" in message
    assert "data.train_size = -3" in message
    assert "teacher.backend = 'magic'" in message
    assert "'openai', 'reference' or 'local'" in message
    assert "selection.lamda" in message
    assert "did you mean 'lam'" in message
    assert "budget.max_cost_usd = -1" in message
    assert str(path) in message


def test_unknown_top_level_section(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("tutor:\n  mode: free\n")
    with pytest.raises(ConfigError, match="did you mean 'tutoring'"):
        load_config(path)


def test_fraction_and_count_exclusive():
    with pytest.raises(ConfigError, match=r"only one of budget\.fraction and budget\.count"):
        load_config(None, ["budget.count=10"])
    config = load_config(None, ["budget.count=10", "budget.fraction=null"])
    assert config.budget.count == 10


def test_overrides_typed_and_nested():
    config = load_config(None, ["selection.lam=0.25", "data.subjects=[a, b]", "student.stages.0.epochs=3"])
    assert config.selection.lam == 0.25
    assert config.data.subjects == ["a", "b"]
    assert config.student.stages[0].epochs == 3


def test_override_without_equals_rejected():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["selection.lam"])


def test_override_into_value_rejected():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"seed": 3}, ["seed.x=1"])


def test_missing_file_names_path(tmp_path: Path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_named(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_dump_round_trips():
    config = load_config(None)
    again = BridgeConfig.model_validate(yaml.safe_load(dump_config(config)))
    assert again == config


def test_configuration_reference_is_current():
    from bridge.config_docs import render_reference

    current = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert current == render_reference(), (
        "docs/configuration.md is stale: run python -m bridge.config_docs docs/configuration.md"
    )
