"""bridge tune-selection: cell configurations, the choice rule, and the protocol end to end on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import BridgeConfig
from bridge.errors import ConfigError
from bridge.rundir import read_json
from bridge.tuning import (
    Cell,
    _best,
    _cell_summary,
    cell_config,
    cell_stages,
    format_protocol,
    run_protocol,
)
from test_compare import tiny_config


def small_config(**changes) -> BridgeConfig:
    raw = {
        "name": "sel",
        "seed": 3,
        "data": {"dataset": "pubmedqa_pqal", "train_size": 16, "dev_size": 4, "test_size": 4},
        "teacher": {"backend": "reference", "model": "reference", "price_per_call": 0.01},
        "selection": {"lam": 0.5, "embedding": "ta_hidden", "selector": "kcenter"},
        "student": {
            "stages": [
                {"name": "a", "data": "labels", "epochs": 1.0, "learning_rate": 1e-4},
                {"name": "b", "data": "rationales", "epochs": 3.0, "learning_rate": 3e-4},
            ]
        },
    }
    raw.update(changes)
    return BridgeConfig.model_validate(raw)


def test_cell_config_stage_b_only():
    config = small_config()
    cell = cell_config(config, Cell(1, 0.0, "encoder"), 1, "teacher_rationales")
    assert cell.selection.selector == "facility"
    assert cell.selection.lam == 0.0
    assert cell.selection.embedding == "encoder"
    assert [(s.name, s.data, s.epochs, s.learning_rate) for s in cell.student.stages] == [
        ("stage-b", "teacher_rationales", 3.0, 3e-4)
    ]
    assert cell.seed == 4
    assert cell.name == "lam0-encoder-seed4"
    assert cell.output.runs_dir == str(Path("runs") / "sel-selection")
    assert cell.data == config.data
    tutored = cell_config(config, Cell(1, 1.0, "ta_hidden"), 0, "rationales")
    assert tutored.student.stages[0].data == "rationales"
    # The two Stage B variants never share folders.
    assert tutored.output.runs_dir == str(Path("runs") / "sel-selection-rationales")
    assert cell_stages("teacher_rationales") == ("select", "teach", "train_student")
    assert cell_stages("rationales") == ("select", "teach", "train_ta", "tutor", "train_student")


def _summary(
    lam: float, embedding: str, generation: list[float], scoring: list[float | None], ta: float = 0.5
) -> tuple[Cell, dict]:
    runs = [
        {"seed": i, "dev_accuracy": g, "dev_scoring_accuracy": s, "ta_dev_accuracy": ta, "compute_seconds": 1.0}
        for i, (g, s) in enumerate(zip(generation, scoring, strict=True))
    ]
    cell = Cell(1, lam, embedding)
    return cell, _cell_summary(cell, runs)


def test_best_cell_tie_break_order():
    config = small_config()

    def best(cells):
        cell, decided = _best(config, cells)
        return cell, decided

    cell, decided = best([_summary(0.0, "ta_hidden", [0.5, 0.7], [0.1, 0.1]), _summary(1.0, "ta_hidden", [0.5, 0.6], [0.9, 0.9])])
    assert (cell.lam, decided) == (0.0, "student dev accuracy by generation")
    # Equal generation accuracy: option scoring decides.
    cell, decided = best([_summary(0.0, "ta_hidden", [0.5, 0.5], [0.4, 0.4]), _summary(1.0, "ta_hidden", [0.5, 0.5], [0.6, 0.6])])
    assert (cell.lam, decided) == (1.0, "student dev accuracy by option scoring")
    # Equal for the student: the TA after apprenticeship decides.
    pair = [_summary(0.0, "ta_hidden", [0.0, 0.0], [0.3, 0.3], ta=0.6), _summary(0.5, "ta_hidden", [0.0, 0.0], [0.3, 0.3], ta=0.4)]
    assert best(pair) == (pair[0][0], "TA dev accuracy after apprenticeship")
    # Equal on all three: the lambda nearest the configured 0.5 wins.
    tied = [_summary(lam, "ta_hidden", [0.0, 0.0], [None, None]) for lam in (0.0, 0.5, 1.0)]
    assert best(tied) == (tied[1][0], "nearness to the configured lambda")
    # Equally near on both sides, in either order: the lower lambda.
    for order in ((0.0, 1.0), (1.0, 0.0)):
        cells = [_summary(lam, "ta_hidden", [0.0, 0.0], [None, None]) for lam in order]
        assert best(cells)[0].lam == 0.0
        assert best(cells)[1] == "the lower lambda"
    # Float error in the distance does not decide: 0.1 and 0.3 are equally near 0.2.
    near = small_config(selection={"lam": 0.2, "embedding": "ta_hidden"})
    cells = [_summary(lam, "ta_hidden", [0.0, 0.0], [None, None]) for lam in (0.3, 0.1)]
    assert _best(near, cells) == (cells[1][0], "the lower lambda")
    # Equal at the same lambda: the configured embedding wins.
    pair = [_summary(0.5, "encoder", [0.2, 0.2], [0.3, 0.3]), _summary(0.5, "ta_hidden", [0.2, 0.2], [0.3, 0.3])]
    assert best(pair) == (pair[1][0], "the configured embedding")
    assert best(pair[:1]) == (pair[0][0], "the only cell")


def test_table_flags_tie_break_choice():
    cells = {label: summary for label, summary in (
        ("lam0-ta_hidden", _summary(0.0, "ta_hidden", [0.1, 0.2], [0.3, 0.3])[1]),
        ("lam0-encoder", _summary(0.0, "encoder", [0.0], [None])[1]),
    )}
    state = {
        "dataset": "d", "name": "n", "student_data": "teacher_rationales", "difficulty": "auto", "seeds": [0, 1],
        "cells": cells, "best_lambda_decided_by": "the only cell",
        "choice": {"lam": 0.0, "embedding": "ta_hidden", "embedding_decided_by": "student dev accuracy by generation"},
    }
    table = format_protocol(state)
    assert "| 1 | 0 | ta_hidden | 0.150 ± 0.071 | 0.300 | 0.500 | 0.100, 0.200 | 1 s, 1 s |" in table
    # One seed has no spread to show.
    assert "| 1 | 0 | encoder | 0.000 | n/a | 0.500 | 0.000 | 1 s |" in table
    assert "tie-break" not in table
    state["choice"]["embedding_decided_by"] = "the configured embedding"
    assert "a tie-break decided" in format_protocol(state)


def test_summary_reports_mean_and_spread():
    _, summary = _summary(0.5, "ta_hidden", [0.25, 0.75], [0.5, None])
    assert summary["dev_accuracy_mean"] == pytest.approx(0.5)
    assert summary["dev_accuracy_std"] == pytest.approx(0.3535534, rel=1e-6)
    assert summary["dev_scoring_accuracy_mean"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"student_data": "labels"}, "not a Stage B data kind"),
        ({"seeds": 0}, "--seeds 0 is invalid"),
        ({"lambdas": [0.5, 1.5, -1]}, "--lambdas has -1, 1.5 outside 0 to 1"),
        ({"lambdas": []}, "--lambdas is empty"),
    ],
)
def test_protocol_bad_arguments(kwargs, message, tmp_path):
    config = small_config(output={"runs_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=message):
        run_protocol(config, **kwargs)
    assert not (tmp_path / "sel-selection").exists()


def test_api_rejects_empty_grid(tmp_path):
    from bridge import api

    with pytest.raises(ConfigError, match="--lambdas is empty"):
        api.tune_selection(small_config(output={"runs_dir": str(tmp_path)}), lambdas=[])


def test_cli_rejects_lambdas_that_are_not_numbers(tmp_path):
    from test_bad_inputs import run_cli

    result = run_cli("tune-selection", "--lambdas", "0,half", "--set", f"output.runs_dir={tmp_path}")
    assert result.code == 2
    assert "--lambdas '0,half' is not a comma-separated list of numbers" in result.stderr
    assert "Traceback" not in result.stderr


def test_protocol_resumes_and_shares_scoring(tmp_path, tiny_model_dir, data_dir):
    import bridge.pipeline as pipeline

    config = tiny_config(tiny_model_dir, tmp_path / "runs", data_dir)
    executions: list[tuple[str, str]] = []
    original = pipeline._stage_function

    def counted(stage):
        function = original(stage)

        def run(ctx):
            executions.append((ctx.run.root.name, stage))
            return function(ctx)

        return run

    patch = pytest.MonkeyPatch()
    patch.setattr(pipeline, "_stage_function", counted)
    try:
        state = run_protocol(config, lambdas=[0.0, 1.0], seeds=2)
        first = list(executions)
        again = run_protocol(config, lambdas=[0.0, 1.0], seeds=2)
    finally:
        patch.undo()

    root = tmp_path / "runs" / "tiny-selection"
    assert state["complete"] is True
    assert list(state["cells"]) == ["lam0-ta_hidden", "lam1-ta_hidden", f"lam{state['best_lambda']:g}-encoder"]
    for summary in state["cells"].values():
        assert [r["seed"] for r in summary["runs"]] == [0, 1]
        for r in summary["runs"]:
            assert 0.0 <= r["dev_accuracy"] <= 1.0
            assert r["dev_scoring_accuracy"] is not None
            assert r["subset_size"] == 4
            assert 0.0 <= r["ta_dev_accuracy"] <= 1.0
            assert (root / r["run"] / "train_ta" / "summary.json").is_file()
            dev = read_json(root / r["run"] / "train_student" / "stage-b" / "dev.json")
            assert dev["accuracy"] == r["dev_accuracy"]
            assert dev["scoring"]["n"] == 4
    assert state["choice"]["lam"] == state["best_lambda"]
    assert len(first) == 6 * 4
    assert {stage for _, stage in first} == {"select", "teach", "train_student", "train_ta"}
    # The second invocation finds every stage current.
    assert executions[len(first):] == []
    assert again["choice"] == state["choice"]
    # Scores of the pool were computed by one run and copied into the others.
    select_summaries = [read_json(root / r["run"] / "select" / "summary.json") for c in state["cells"].values() for r in c["runs"]]
    assert sum("reused_seconds" in s for s in select_summaries) == len(select_summaries) - 1
    table = (root / "protocol.md").read_text()
    assert "| 1 | 0 | ta_hidden |" in table
    assert "Choice: lambda" in table
    assert "decided by" in table
    assert all(r["compute_seconds"] > 0 for c in state["cells"].values() for r in c["runs"])
    assert (root.parent / "tiny-selection").is_dir()
    assert not (root.parent / "tiny-selection-rationales").exists()
    ledger = read_json(root / "protocol.json")
    assert ledger["choice"] == state["choice"]


def test_protocol_tutored_stage_b(tmp_path, tiny_model_dir, data_dir):
    config = tiny_config(tiny_model_dir, tmp_path / "runs", data_dir)
    state = run_protocol(config, lambdas=[0.5], seeds=1, student_data="rationales")
    root = tmp_path / "runs" / "tiny-selection-rationales"
    assert state["complete"] is True
    assert state["best_lambda_decided_by"] == "the only cell"
    assert list(state["cells"]) == ["lam0.5-ta_hidden", "lam0.5-encoder"]
    for summary in state["cells"].values():
        (run,) = summary["runs"]
        student = read_json(root / run["run"] / "train_student" / "summary.json")
        assert [s["data"] for s in student["stages"]] == ["rationales"]
        assert (root / run["run"] / "tutor" / "rows.jsonl").is_file()
        assert 0.0 <= run["dev_accuracy"] <= 1.0
    assert not (tmp_path / "runs" / "tiny-selection").exists()
