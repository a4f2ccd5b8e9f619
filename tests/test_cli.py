"""The command line as a user runs it: help, exit codes and error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BRIDGE = [sys.executable, "-m", "bridge.cli"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BRIDGE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_help_lists_commands():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("run", "config", "data"):
        assert command in result.stdout


def test_misspelt_key_one_message_no_traceback(tmp_path: Path):
    path = tmp_path / "typo.yaml"
    path.write_text("selection:\n  lamda: 0.3\n")
    result = _run("config", "show", str(path))
    assert result.returncode == 2
    assert "selection.lamda" in result.stderr
    assert "did you mean 'lam'" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_traceback(tmp_path: Path):
    path = tmp_path / "typo.yaml"
    path.write_text("selection:\n  lamda: 0.3\n")
    result = _run("--debug", "config", "show", str(path))
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_config_show_applies_override():
    result = _run("config", "show", "--set", "budget.fraction=0.1")
    assert result.returncode == 0
    assert "fraction: 0.1" in result.stdout
