"""Choose the selection defaults by measurement: a resumable grid over lambda and the embedding.

The protocol runs on one configuration (one data set) in two phases:

1. For each lambda in ``lambdas`` (0, 0.5 and 1 by default), the facility selector with the
   configured difficulty and the TA hidden-state embedding.
2. At the best lambda of phase 1, the sentence-encoder embedding.

Every cell runs each seed through ``select`` and ``teach``, then trains the student with one
stage only (Stage B) and scores it by accuracy on the dev split. It also fine-tunes the TA on
the purchases (``train_ta``) and records the TA's dev accuracy after apprenticeship, the first
place where the subset shapes the method. Stage B learns from
``teacher_rationales`` (the bought rationales of the selected subset: the cheaper run, and the
one closest to the subset itself) or from ``rationales`` (after TA apprenticeship and tutoring,
the method as it runs). A cell's score is its student's mean dev accuracy by generation over
the seeds; ties are broken by the student's option scoring, then by the TA's dev accuracy after
apprenticeship, then by nearness to the configured lambda, then by the configured embedding.

All cells write into ``<output.runs_dir>/<name>-selection``. They share one ledger, so a prompt
two cells buy is paid once, and they copy the untuned TA's pool scores from the first cell that
computed them. Rerunning the same command skips every finished stage.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.compare import (
    SharedWork,
    _direct_stage,
    comparison_caps,
    link_finished_stages,
)
from bridge.config import BridgeConfig, dump_config
from bridge.errors import ConfigError
from bridge.rundir import atomic_write_json, atomic_write_text, ensure_dir, read_json

log = logging.getLogger(__name__)

PROTOCOL_FILE = "protocol.json"
TABLE_FILE = "protocol.md"
STAGE_B_DATA = ("teacher_rationales", "rationales")


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a phase, a lambda and an embedding."""

    phase: int
    lam: float
    embedding: str

    @property
    def label(self) -> str:
        return f"lam{self.lam:g}-{self.embedding}"


def selection_root(config: BridgeConfig) -> Path:
    """Return the protocol folder of a configuration: ``<output.runs_dir>/<name>-selection``."""
    return Path(config.output.runs_dir) / f"{config.name}-selection"


def cell_stages(student_data: str) -> tuple[str, ...]:
    if student_data == "rationales":
        return ("select", "teach", "train_ta", "tutor", "train_student")
    return ("select", "teach", "train_student")


#: The stages that give the TA's dev accuracy after apprenticeship; they run after the student's
#: stages, so leaving train_ta out of those keeps the student's fingerprints unchanged.
TA_STAGES = ("select", "teach", "train_ta")


def cell_config(config: BridgeConfig, cell: Cell, seed_index: int, student_data: str) -> BridgeConfig:
    """Return the configuration of one cell and seed, writing into the protocol folder."""
    raw = config.model_dump(mode="json")
    raw["selection"].update(selector="facility", lam=cell.lam, embedding=cell.embedding)
    stage = _direct_stage(raw)
    stage.update(name="stage-b", data=student_data)
    raw["student"]["stages"] = [stage]
    raw["student"]["curriculum"] = True
    raw["seed"] = config.seed + seed_index
    raw["ta_training"]["seed"] = config.ta_training.seed + seed_index
    raw["student"]["training"]["seed"] = config.student.training.seed + seed_index
    raw["name"] = f"{cell.label}-seed{raw['seed']}"
    raw["output"]["runs_dir"] = str(selection_root(config))
    return BridgeConfig.model_validate(raw)


def run_protocol(
    config: BridgeConfig,
    *,
    lambdas: Sequence[float] = (0.0, 0.5, 1.0),
    seeds: int = 2,
    student_data: str = "teacher_rationales",
    yes: bool = False,
) -> dict[str, Any]:
    """Run both phases of the protocol and return the content of ``protocol.json``."""
    from bridge.data import load_dataset
    from bridge.teacher.ledger import LEDGER_FILENAME, Ledger

    if student_data not in STAGE_B_DATA:
        raise ConfigError(
            f"--student-data {student_data!r} is not a Stage B data kind",
            hint=f"choose one of {', '.join(STAGE_B_DATA)}",
        )
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds} is invalid", hint="run at least one seed, such as --seeds 2")
    grid = sorted(set(float(lam) for lam in lambdas))
    if not grid or any(not 0.0 <= lam <= 1.0 for lam in grid):
        raise ConfigError(f"--lambdas {list(lambdas)} must be values between 0 and 1", hint="such as --lambdas 0,0.5,1")

    root = ensure_dir(selection_root(config))
    atomic_write_text(root / "config.yaml", dump_config(config))
    caps = comparison_caps(config, load_dataset(config.data))
    state: dict[str, Any] = {
        "name": config.name,
        "dataset": config.data.dataset,
        "lambdas": grid,
        "seeds": [config.seed + i for i in range(seeds)],
        "student_data": student_data,
        "difficulty": config.selection.difficulty,
        "configured": {"lam": config.selection.lam, "embedding": config.selection.embedding},
        "cells": {},
        "complete": False,
    }
    shared = SharedWork(root)
    started = time.monotonic()
    with Ledger(root / LEDGER_FILENAME) as ledger:
        phase1 = [Cell(1, lam, "ta_hidden") for lam in grid]
        for cell in phase1:
            state["cells"][cell.label] = _run_cell(config, cell, seeds, student_data, ledger, shared, caps, yes)
            _write(root, state)
        best_lam = _best(config, [(c, state["cells"][c.label]) for c in phase1]).lam
        state["best_lambda"] = best_lam
        encoder = Cell(2, best_lam, "encoder")
        state["cells"][encoder.label] = _run_cell(config, encoder, seeds, student_data, ledger, shared, caps, yes)
        finalists = [(c, state["cells"][c.label]) for c in (Cell(1, best_lam, "ta_hidden"), encoder)]
        chosen = _best(config, finalists)
    state["choice"] = {"lam": chosen.lam, "embedding": chosen.embedding}
    state["wall_seconds_last_invocation"] = round(time.monotonic() - started, 1)
    state["complete"] = True
    _write(root, state)
    return state


def _run_cell(
    config: BridgeConfig,
    cell: Cell,
    seeds: int,
    student_data: str,
    ledger: Any,
    shared: SharedWork,
    caps: Any,
    yes: bool,
) -> dict[str, Any]:
    from bridge.pipeline import compute_fingerprints, run_dir_for, run_pipeline
    from bridge.teacher.account import LedgerAccount

    stages = cell_stages(student_data)
    runs = []
    for index in range(seeds):
        cfg = cell_config(config, cell, index, student_data)
        run = run_dir_for(cfg)
        link_finished_stages(run.root.parent, run, compute_fingerprints(cfg, stages))
        log.info("selection protocol: %s, seed %d", cell.label, cfg.seed)
        started = time.monotonic()
        with LedgerAccount(ledger, run.root.name, caps) as account:
            run_pipeline(cfg, stages=stages, yes=yes, ledger=account, shared=shared)
            if "train_ta" not in stages:
                run_pipeline(cfg, stages=TA_STAGES, yes=yes, ledger=account, shared=shared)
        runs.append(_run_scores(run.root, cfg.seed, time.monotonic() - started))
    return _cell_summary(cell, runs)


def _run_scores(root: Path, seed: int, wall: float) -> dict[str, Any]:
    student = read_json(root / "train_student" / "summary.json")
    dev = student["stages"][-1]["dev"]
    select = read_json(root / "select" / "summary.json")
    ta = read_json(root / "train_ta" / "summary.json")
    return {
        "seed": seed,
        "run": root.name,
        "dev_accuracy": dev["accuracy"],
        "dev_scoring_accuracy": dev.get("scoring", {}).get("accuracy"),
        "dev_unparsable_rate": dev.get("unparsable_rate"),
        "dev_n": dev.get("n"),
        "ta_dev_accuracy": ta["dev_after"]["accuracy"],
        "ta_dev_accuracy_before": ta["dev_before"]["accuracy"],
        "subset_size": select.get("subset_size"),
        "wall_seconds": round(wall, 1),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _cell_summary(cell: Cell, runs: list[dict[str, Any]]) -> dict[str, Any]:
    generation = [r["dev_accuracy"] for r in runs]
    return {
        "phase": cell.phase,
        "lam": cell.lam,
        "embedding": cell.embedding,
        "runs": runs,
        "dev_accuracy_mean": _mean(generation),
        "dev_accuracy_std": statistics.stdev(generation) if len(generation) > 1 else 0.0,
        "dev_scoring_accuracy_mean": _mean([r["dev_scoring_accuracy"] for r in runs]),
        "ta_dev_accuracy_mean": _mean([r.get("ta_dev_accuracy") for r in runs]),
    }


def _best(config: BridgeConfig, cells: list[tuple[Cell, dict[str, Any]]]) -> Cell:
    """Return the cell with the highest mean dev accuracy, with the documented tie-breaks."""

    def key(item: tuple[Cell, dict[str, Any]]) -> tuple[float, float, float, float, int]:
        cell, summary = item
        scoring = summary["dev_scoring_accuracy_mean"]
        return (
            round(summary["dev_accuracy_mean"] or 0.0, 9),
            round(scoring if scoring is not None else 0.0, 9),
            round(summary.get("ta_dev_accuracy_mean") or 0.0, 9),
            -abs(cell.lam - config.selection.lam),
            int(cell.embedding == config.selection.embedding),
        )

    return max(cells, key=key)[0]


def _write(root: Path, state: dict[str, Any]) -> None:
    atomic_write_json(root / PROTOCOL_FILE, state)
    atomic_write_text(root / TABLE_FILE, format_protocol(state))


def format_protocol(state: dict[str, Any]) -> str:
    """Return the grid as a Markdown table, with the choice when the protocol has finished."""
    lines = [
        f"Selection protocol on {state['dataset']} ({state['name']}): Stage B data {state['student_data']}, "
        f"difficulty {state['difficulty']}, seeds {', '.join(map(str, state['seeds']))}.",
        "",
        "| phase | lambda | embedding | student dev accuracy (generation), mean ± sd | student (option scoring), "
        "mean | TA after apprenticeship (generation), mean | student per seed (generation) | wall time per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for summary in state["cells"].values():
        scoring = summary["dev_scoring_accuracy_mean"]
        scoring_text = "n/a" if scoring is None else f"{scoring:.3f}"
        ta = summary.get("ta_dev_accuracy_mean")
        ta_text = "n/a" if ta is None else f"{ta:.3f}"
        per_seed = ", ".join(f"{run['dev_accuracy']:.3f}" for run in summary["runs"])
        walls = ", ".join(f"{run['wall_seconds']:.0f} s" for run in summary["runs"])
        lines.append(
            f"| {summary['phase']} | {summary['lam']:g} | {summary['embedding']} "
            f"| {summary['dev_accuracy_mean']:.3f} ± {summary['dev_accuracy_std']:.3f} "
            f"| {scoring_text} | {ta_text} | {per_seed} | {walls} |"
        )
    if state.get("choice"):
        choice = state["choice"]
        lines += ["", f"Choice: lambda {choice['lam']:g} with the {choice['embedding']} embedding."]
    return "\n".join(lines) + "\n"
