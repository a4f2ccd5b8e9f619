"""Small helpers the stages share: models held by the run, example lookup, row files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge.data.types import Example
from bridge.errors import BridgeError
from bridge.rundir import read_json, read_rows

log = logging.getLogger(__name__)


def by_id(examples: Sequence[Example]) -> dict[str, Example]:
    return {e.id: e for e in examples}


def require_file(path: Path, stage: str) -> Path:
    """Return ``path``, or raise naming the stage that writes it."""
    if not path.exists():
        raise BridgeError(
            f"{path} is missing: the '{stage}' stage has not finished in this run directory",
            hint=f"run 'bridge {stage.replace('_', '-')}' (or 'bridge run') with the same configuration first",
        )
    return path


def subset_ids(run_root: Path) -> list[str]:
    """Return the selected example ids in pick order."""
    path = require_file(run_root / "select" / "subset.jsonl", "select")
    return [row["id"] for row in read_rows(path)]


def teacher_rows(run_root: Path) -> list[dict[str, Any]]:
    """Return the kept teacher rationales."""
    return list(read_rows(require_file(run_root / "teach" / "rows.jsonl", "teach")))


def difficulty_by_id(run_root: Path) -> dict[str, float]:
    """Return the Phase 1 difficulty of every scored example."""
    path = require_file(run_root / "select" / "scores.jsonl", "select")
    return {row["id"]: float(row["difficulty"]) for row in read_rows(path)}


def stage_summary(run_root: Path, stage: str) -> dict[str, Any]:
    path = run_root / stage / "summary.json"
    return read_json(path) if path.exists() else {}
