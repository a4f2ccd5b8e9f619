"""`bridge run`: the stage order, fingerprints, skip and resume, ``--from`` and ``--until``.

Each stage is a function ``run(ctx) -> dict`` in :mod:`bridge.stages`, returning a small
summary. A stage is skipped when its folder contains a complete fingerprint equal to the one
computed now from the stage's configuration sections and the fingerprints of the stages it
reads; otherwise it runs, resuming whatever partial work its folder contains.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from bridge.config import BridgeConfig, dump_config
from bridge.errors import BridgeError
from bridge.rundir import STAGES, RunDir, atomic_write_json, fingerprint, read_json

log = logging.getLogger(__name__)

#: Command names (as typed after ``bridge`` and accepted by --from/--until) to stage folders.
STAGE_COMMANDS = {
    "select": "select",
    "teach": "teach",
    "train-ta": "train_ta",
    "tutor": "tutor",
    "train-student": "train_student",
    "eval": "eval",
    "report": "report",
}

#: Configuration sections each stage depends on, besides the stages it reads.
_STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "select": ("data", "prompts", "models.ta", "selection", "budget", "seed"),
    "teach": ("data", "prompts", "teacher", "budget"),
    "train_ta": ("models.ta", "ta_training", "prompts"),
    "tutor": ("tutoring", "prompts", "models.ta"),
    "train_student": ("student", "models.student", "prompts", "seed"),
    "eval": ("evaluation", "prompts", "models"),
    "report": ("output",),
}

#: Stages whose outputs each stage reads.
_STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "select": (),
    "teach": ("select",),
    "train_ta": ("teach",),
    "tutor": ("train_ta", "teach", "select"),
    "train_student": ("tutor", "select"),
    "eval": ("train_student", "train_ta"),
    "report": ("eval", "train_student", "tutor", "teach", "select"),
}


#: Stage folders whose module has another name.
_STAGE_MODULES = {"eval": "evaluate"}


def stage_name(name: str) -> str:
    """Map a command name (``train-ta``) or folder name (``train_ta``) to the folder name."""
    if name in STAGE_COMMANDS:
        return STAGE_COMMANDS[name]
    if name in STAGES:
        return name
    raise BridgeError(
        f"unknown stage '{name}'",
        hint=f"use one of: {', '.join(STAGE_COMMANDS)}",
    )


def _section(config: BridgeConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


@dataclass
class RunContext:
    """Inputs of a stage: the configuration, the run directory and shared lazily loaded resources."""

    config: BridgeConfig
    run: RunDir
    yes: bool = False
    fingerprints: dict[str, str] = field(default_factory=dict)
    #: An open ledger (or ledger account) the teach stage buys through instead of ``ledger.sqlite``
    #: in the run directory; ``bridge compare`` shares one ledger between all its runs.
    ledger: Any = None
    #: Work shared between the runs of one comparison (:class:`bridge.compare.SharedWork`); None in a single run.
    shared: Any = None

    models: dict[str, Any] = field(default_factory=dict)

    def reuse(self, kind: str, key: str) -> float | None:
        """Copy finished work of ``kind`` with ``key`` from another run into this run directory.

        Returns the seconds the work took where it was computed, or None when no other run
        offers it (always None outside a comparison).
        """
        if self.shared is None:
            return None
        return self.shared.restore(kind, key, self.run.root)

    def publish(self, kind: str, key: str, paths: list[Path], seconds: float) -> None:
        """Offer finished work (files or folders inside this run directory) to the other runs of a comparison."""
        if self.shared is not None:
            self.shared.record(kind, key, self.run.root, paths, seconds)

    @cached_property
    def data(self) -> Any:
        """The loaded data set splits (loaded once per process); rejects go to the run directory."""
        from bridge.data import load_dataset

        splits = load_dataset(self.config.data, rejects_dir=self.run.root)
        splits.require_examples("train", "test")
        return splits

    def ta_model(self) -> Any:
        """Return the untuned teacher assistant on the configured engine (``models.ta_engine``), loaded once per process.

        The transformers engine returns a ``LocalModel``; the others return an engine object
        from :mod:`bridge.engines`, which loads the weights here only when a stage trains them.
        """
        if "ta" not in self.models:
            from bridge.engines import load_engine
            from bridge.errors import naming_setting

            with naming_setting("models.ta.path", self.config.models.ta.path):
                self.models["ta"] = load_engine(self.config.models)
        return self.models["ta"]

    def refined_ta(self) -> Any:
        """Return the TA after apprenticeship: in memory from train-ta, else loaded from ``train_ta/``."""
        if "ta_refined" not in self.models:
            from bridge.models.run_models import load_refined_ta

            trained = load_refined_ta(self.run.root, self.config, base=self.ta_model())
            if trained is None:
                raise BridgeError(
                    f"no trained TA in {self.run.root / 'train_ta'}",
                    hint="run 'bridge train-ta' (or 'bridge run') with the same configuration first",
                )
            self.models["ta_refined"] = trained
            self.models.pop("ta", None)
        return self.models["ta_refined"]

    def student_model(self) -> Any:
        """Return the untrained student (``models.student``, layers kept as configured), loaded once per process."""
        if "student" not in self.models:
            from bridge.models.loading import load_model

            self.models["student"] = load_model(self.config.models.student)
        return self.models["student"]

    def release_models(self) -> None:
        """Drop loaded models so the next stage has the memory."""
        self.models.clear()

    def stage_dir(self, stage: str) -> Path:
        return self.run.stage(stage)


def run_dir_for(config: BridgeConfig) -> RunDir:
    """Return the run directory of a configuration: ``<output.runs_dir>/<name>``."""
    return RunDir(Path(config.output.runs_dir) / config.name)


def compute_fingerprints(config: BridgeConfig, stages: Sequence[str] | None = None) -> dict[str, str]:
    """Fingerprint every stage from its configuration sections and its inputs' fingerprints.

    ``stages`` limits the run to some stages (all when None). A stage that is left out passes
    its own inputs on to the stages that read it, so a student trained without tutoring depends
    on the teacher and selection stages that tutoring would have read.
    """
    result: dict[str, str] = {}
    for stage, inputs in stage_inputs(stages).items():
        sections = {name: _section(config, name) for name in _STAGE_SECTIONS[stage]}
        result[stage] = fingerprint(stage, sections, {name: result[name] for name in inputs})
    return result


def stage_inputs(stages: Sequence[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Return, for each stage that runs, the stages it reads once left-out stages are passed through."""
    chosen = _chosen_stages(stages)
    resolved: dict[str, tuple[str, ...]] = {}
    for stage in STAGES:
        inputs: list[str] = []
        for name in _STAGE_INPUTS[stage]:
            for source in (name,) if name in chosen else resolved[name]:
                if source not in inputs:
                    inputs.append(source)
        resolved[stage] = tuple(inputs)
    return {stage: resolved[stage] for stage in STAGES if stage in chosen}


def _chosen_stages(stages: Sequence[str] | None) -> set[str]:
    if stages is None:
        return set(STAGES)
    return {stage_name(name) for name in stages}


def _stage_function(stage: str) -> Callable[[RunContext], dict[str, Any]]:
    try:
        module = importlib.import_module(f"bridge.stages.{_STAGE_MODULES.get(stage, stage)}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bridge.stages.{stage}":
            raise BridgeError(f"the '{stage}' stage is not available in this version of bridge") from None
        raise
    return module.run


def run_pipeline(
    config: BridgeConfig,
    *,
    from_stage: str | None = None,
    until_stage: str | None = None,
    only: str | None = None,
    yes: bool = False,
    stages: Sequence[str] | None = None,
    ledger: Any = None,
    shared: Any = None,
) -> dict[str, dict[str, Any]]:
    """Run the stages in order, skipping those whose outputs are current.

    ``from_stage`` reruns that stage and every later one even when current; ``until_stage``
    stops after it; ``only`` runs one stage (after checking that its inputs are complete).
    ``stages`` runs only those stages (``bridge compare`` runs baselines that skip some);
    ``ledger`` and ``shared`` set the :class:`RunContext` fields of the same names.
    Returns each executed or skipped stage's summary.
    """
    if config.threads is not None:
        import torch

        # Results on CPU depend on the thread count, so a resumed run must use the same one.
        torch.set_num_threads(config.threads)
    run = run_dir_for(config)
    run.write_metadata(dump_config(config), {"seed": config.seed})
    ctx = RunContext(
        config=config, run=run, yes=yes, fingerprints=compute_fingerprints(config, stages), ledger=ledger, shared=shared
    )
    inputs = stage_inputs(stages)

    order = [stage for stage in STAGES if stage in inputs]
    for name in (from_stage, until_stage, only):
        if name is not None and stage_name(name) not in inputs:
            raise BridgeError(f"stage '{name}' is not among the stages of this run: {', '.join(order)}")
    first = order.index(stage_name(from_stage)) if from_stage else 0
    last = order.index(stage_name(until_stage)) if until_stage else len(order) - 1
    if only is not None:
        first = last = order.index(stage_name(only))
        for needed in inputs[order[first]]:
            if not run.is_done(needed, ctx.fingerprints[needed]):
                command = next(k for k, v in STAGE_COMMANDS.items() if v == needed)
                raise BridgeError(
                    f"stage '{order[first]}' needs the outputs of '{needed}', which are missing or stale in {run.root}",
                    hint=f"run 'bridge {command}' with the same configuration first, or 'bridge run' for everything",
                )
    if first > last:
        raise BridgeError(f"--from {from_stage} comes after --until {until_stage}", hint="swap the two stages")

    summaries: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for index, stage in enumerate(order[: last + 1]):
        expected = ctx.fingerprints[stage]
        forced = (index >= first and from_stage is not None) or only is not None
        if index < first or (not forced and run.is_done(stage, expected)):
            if not run.is_done(stage, expected):
                raise BridgeError(
                    f"stage '{stage}' has no current outputs in {run.root}, so later stages cannot start from it",
                    hint=f"rerun without --from, or with --from {stage}",
                )
            log.info("stage %s is current, skipping", stage)
            summaries[stage] = {"skipped": True}
            continue
        log.info("stage %s starting", stage)
        started = time.monotonic()
        summary = _stage_function(stage)(ctx) or {}
        timings[stage] = time.monotonic() - started
        summary["seconds"] = round(timings[stage], 1)
        atomic_write_json(run.stage(stage) / "summary.json", summary)
        run.mark_done(stage, expected, {name: ctx.fingerprints[name] for name in inputs[stage]})
        summaries[stage] = summary
        log.info("stage %s finished in %.1f s", stage, timings[stage])
    # Seconds per stage across invocations: a resumed run keeps the times of stages it skipped.
    timings_path = run.root / "timings.json"
    recorded = read_json(timings_path) if timings_path.exists() else {}
    atomic_write_json(timings_path, {**recorded, **timings})
    return summaries
