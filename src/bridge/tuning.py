"""Choose the selection defaults by measurement: a resumable grid over lambda and the embedding.

The protocol runs on one configuration (one data set) in two phases:

1. For each lambda in ``lambdas`` (0, 0.5 and 1 by default), the facility selector with the
   configured difficulty and the TA hidden-state embedding.
2. At the best lambda of phase 1, the sentence-encoder embedding.

Every cell uses the facility selector and ignores ``selection.selector``. It runs each seed
through ``select`` and ``teach``, then trains the student with one stage only (Stage B) and
scores it by accuracy on the dev split. The facility selector is deterministic, so the seeds of
a cell buy the same subset and differ only in training. The exception is a difficulty score that
samples generations, such as ``answer_entropy``, whose samples depend on the seed. Each cell
also fine-tunes the TA on the purchases (``train_ta``) and records the TA's dev accuracy after
apprenticeship, the first place where the subset shapes the method.

Stage B learns from ``teacher_rationales`` (the bought rationales of the selected subset: the
cheaper run, and the one closest to the subset itself) or from ``rationales`` (after TA
apprenticeship and tutoring, the method as it runs). A cell's score is its student's mean dev
accuracy by generation over the seeds. Ties are broken by the student's option scoring, then by
the TA's dev accuracy after apprenticeship, then by nearness to the configured lambda, then by
the configured embedding, and last by the lower lambda. The result names the criterion that
decided, so a choice made by a tie-break is visible as one.

All cells write into ``<output.runs_dir>/<name>-selection`` (``<name>-selection-rationales``
for the ``rationales`` variant). They share one ledger, capped like a comparison's
(``compare.max_calls`` and ``compare.max_cost_usd``), so a prompt that two cells buy is paid
once. They copy the untuned TA's pool scores from the first cell that computed them. Rerunning
the same command skips every finished stage.
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
#: Lambda values of phase 1 when the caller gives none.
DEFAULT_LAMBDAS = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a phase, a lambda and an embedding."""

    phase: int
    lam: float
    embedding: str

    @property
    def label(self) -> str:
        return f"lam{self.lam:g}-{self.embedding}"


def selection_root(config: BridgeConfig, student_data: str = "teacher_rationales") -> Path:
    """Return the protocol folder: ``<output.runs_dir>/<name>-selection``, with ``-rationales`` for that variant."""
    suffix = "" if student_data == "teacher_rationales" else f"-{student_data}"
    return Path(config.output.runs_dir) / f"{config.name}-selection{suffix}"


def cell_stages(student_data: str) -> tuple[str, ...]:
    if student_data == "rationales":
        return ("select", "teach", "train_ta", "tutor", "train_student")
    return ("select", "teach", "train_student")


#: The stages that give the TA's dev accuracy after apprenticeship. They run after the student's
#: stages. Leaving train_ta out of those keeps the student's fingerprints unchanged.
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
    raw["output"]["runs_dir"] = str(selection_root(config, student_data))
    return BridgeConfig.model_validate(raw)


def run_protocol(
    config: BridgeConfig,
    *,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
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
    if not grid:
        raise ConfigError("--lambdas is empty", hint="give at least one value between 0 and 1, such as --lambdas 0,0.5,1")
    outside = [lam for lam in grid if not 0.0 <= lam <= 1.0]
    if outside:
        raise ConfigError(
            f"--lambdas has {', '.join(f'{lam:g}' for lam in outside)} outside 0 to 1",
            hint="lambda weighs difficulty against coverage, so give values between 0 and 1, such as --lambdas 0,0.5,1",
        )

    root = ensure_dir(selection_root(config, student_data))
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
        best, decided = _best(config, [(c, state["cells"][c.label]) for c in phase1])
        best_lam = best.lam
        state["best_lambda"] = best_lam
        state["best_lambda_decided_by"] = decided
        encoder = Cell(2, best_lam, "encoder")
        state["cells"][encoder.label] = _run_cell(config, encoder, seeds, student_data, ledger, shared, caps, yes)
        finalists = [(c, state["cells"][c.label]) for c in (Cell(1, best_lam, "ta_hidden"), encoder)]
        chosen, decided = _best(config, finalists)
    state["choice"] = {"lam": chosen.lam, "embedding": chosen.embedding, "embedding_decided_by": decided}
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
        with LedgerAccount(ledger, run.root.name, caps) as account:
            run_pipeline(cfg, stages=stages, yes=yes, ledger=account, shared=shared)
            if "train_ta" not in stages:
                run_pipeline(cfg, stages=TA_STAGES, yes=yes, ledger=account, shared=shared)
        runs.append(_run_scores(run.root, cfg.seed, (*stages, *TA_STAGES)))
    return _cell_summary(cell, runs)


def _run_scores(root: Path, seed: int, stages: Sequence[str]) -> dict[str, Any]:
    """Return one finished run's scores; compute time adds the stages' own seconds and copied work."""
    summaries = {stage: read_json(root / stage / "summary.json") for stage in dict.fromkeys(stages)}
    student = summaries["train_student"]
    dev = student["stages"][-1]["dev"]
    select = summaries["select"]
    ta = summaries["train_ta"]
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
        "compute_seconds": round(
            sum(float(s.get("seconds", 0.0)) + float(s.get("reused_seconds", 0.0)) for s in summaries.values()), 1
        ),
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
        "dev_accuracy_std": statistics.stdev(generation) if len(generation) > 1 else None,
        "dev_scoring_accuracy_mean": _mean([r["dev_scoring_accuracy"] for r in runs]),
        "ta_dev_accuracy_mean": _mean([r.get("ta_dev_accuracy") for r in runs]),
    }


#: The criteria of :func:`_best`, in order.
CRITERIA = (
    "student dev accuracy by generation",
    "student dev accuracy by option scoring",
    "TA dev accuracy after apprenticeship",
    "nearness to the configured lambda",
    "the configured embedding",
    "the lower lambda",
)


def _best(config: BridgeConfig, cells: list[tuple[Cell, dict[str, Any]]]) -> tuple[Cell, str]:
    """Return the best cell by :data:`CRITERIA` and the criterion that set it apart from the runner-up."""

    def key(item: tuple[Cell, dict[str, Any]]) -> tuple[float, ...]:
        cell, summary = item
        scoring = summary["dev_scoring_accuracy_mean"]
        return (
            round(summary["dev_accuracy_mean"] or 0.0, 9),
            round(scoring if scoring is not None else 0.0, 9),
            round(summary.get("ta_dev_accuracy_mean") or 0.0, 9),
            -round(abs(cell.lam - config.selection.lam), 9),
            float(cell.embedding == config.selection.embedding),
            -cell.lam,
        )

    ranked = sorted(cells, key=key, reverse=True)
    if len(ranked) == 1:
        return ranked[0][0], "the only cell"
    first, second = key(ranked[0]), key(ranked[1])
    decided = next((name for name, a, b in zip(CRITERIA, first, second, strict=True) if a != b), CRITERIA[-1])
    return ranked[0][0], decided


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
        "mean | TA after apprenticeship (generation), mean | student per seed (generation) | compute time per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for summary in state["cells"].values():
        scoring = summary["dev_scoring_accuracy_mean"]
        scoring_text = "n/a" if scoring is None else f"{scoring:.3f}"
        ta = summary.get("ta_dev_accuracy_mean")
        ta_text = "n/a" if ta is None else f"{ta:.3f}"
        per_seed = ", ".join(f"{run['dev_accuracy']:.3f}" for run in summary["runs"])
        walls = ", ".join(f"{run['compute_seconds']:.0f} s" for run in summary["runs"])
        spread = summary["dev_accuracy_std"]
        spread_text = "" if spread is None else f" ± {spread:.3f}"
        lines.append(
            f"| {summary['phase']} | {summary['lam']:g} | {summary['embedding']} "
            f"| {summary['dev_accuracy_mean']:.3f}{spread_text} "
            f"| {scoring_text} | {ta_text} | {per_seed} | {walls} |"
        )
    if state.get("choice"):
        choice = state["choice"]
        lines += [
            "",
            f"Choice: lambda {choice['lam']:g} (decided by {state['best_lambda_decided_by']}) with the "
            f"{choice['embedding']} embedding (decided by {choice['embedding_decided_by']}).",
        ]
        reasons = (state["best_lambda_decided_by"], choice["embedding_decided_by"])
        if any(reason not in (CRITERIA[0], "the only cell") for reason in reasons):
            lines.append(
                "The student's generation accuracy did not separate the cells, so a tie-break decided; "
                "treat the choice as unmeasured unless that criterion separated them by more than noise."
            )
    return "\n".join(lines) + "\n"
