"""`bridge run` through the real command line, from selection to the report, on tiny models.

The run uses the same tiny overfit TA and 40-example PubMedQA slice as the stage tests. A second
invocation of the same command must find every stage current and skip it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bridge.config import dump_config
from test_stages_e2e import make_config, overfit_ta

STAGE_NAMES = ("select", "teach", "train_ta", "tutor", "train_student", "eval", "report")


def _bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_run_command_end_to_end(tmp_path: Path, data_dir: Path):
    started = time.monotonic()
    ta = overfit_ta(tmp_path / "ta", data_dir)
    mix_file = tmp_path / "general.jsonl"
    mix_file.write_text(json.dumps({"instruction": "Repeat the word alpha.", "output": "alpha"}) + "\n")
    config = make_config(ta, tmp_path / "runs", data_dir, mix_file)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(dump_config(config), encoding="utf-8")

    first = _bridge("run", str(config_path))
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in STAGE_NAMES:
        assert f"{stage:>14}: done in" in first.stdout

    run = tmp_path / "runs" / "e2e"
    for stage in STAGE_NAMES:
        marker = json.loads((run / stage / "fingerprint.json").read_text())
        assert marker["complete"] is True
    assert (run / "config.yaml").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["name"] == "e2e"
    assert set(json.loads((run / "timings.json").read_text())) == set(STAGE_NAMES)

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 8
    for name in ("majority", "teacher", "ta/before", "ta/after", "student/stage-a", "student/stage-b"):
        assert name in metrics["models"], name
    student = metrics["models"]["student/stage-b"]
    assert student["generation"]["n"] == 8
    assert "scoring" in student
    assert metrics["gains"]["floor"] == "student/stage-a"

    report = run / "report"
    markdown = (report / "report.md").read_text()
    assert "| student/stage-b |" in markdown
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert (report / "accuracy.png").stat().st_size > 1000
    card = (run / "train_student" / "model" / "README.md").read_text()
    assert "Median latency per answer" in card
    assert "Teacher calls: 10" in card

    second = _bridge("run", str(config_path))
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in STAGE_NAMES:
        assert f"{stage:>14}: current, skipped" in second.stdout
    elapsed = time.monotonic() - started
    print(f"bridge run end to end on tiny models: {elapsed:.0f} s")
    assert elapsed < 300
