"""The Python API behind the command line: the functions a notebook user calls.

Each function takes a :class:`~bridge.config.BridgeConfig` (see :func:`load_config`) and returns
plain data or paths, so everything the ``bridge`` command does can be scripted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge.config import BridgeConfig, DataConfig, dump_config, load_config
from bridge.errors import ConfigError

__all__ = [
    "BridgeConfig",
    "data_config",
    "dump_config",
    "estimate",
    "inspect_data",
    "ledger",
    "list_data",
    "load_config",
    "merge",
    "run",
    "run_stage",
]


def run(
    config: BridgeConfig,
    *,
    from_stage: str | None = None,
    until_stage: str | None = None,
    yes: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run the pipeline stages in order into ``<output.runs_dir>/<name>``, skipping current ones.

    Returns each stage's summary (``{"skipped": True}`` for a stage whose outputs were current).
    ``yes`` confirms sending data to a teacher endpoint that is not on this machine.
    """
    from bridge.pipeline import run_pipeline

    return run_pipeline(config, from_stage=from_stage, until_stage=until_stage, yes=yes)


def run_stage(config: BridgeConfig, stage: str, *, yes: bool = False) -> dict[str, Any]:
    """Run one stage (select, teach, train-ta, tutor, train-student, eval or report) and return its summary."""
    from bridge.pipeline import run_pipeline, stage_name

    summaries = run_pipeline(config, only=stage, yes=yes)
    return summaries[stage_name(stage)]


# --------------------------------------------------------------------------------------------
# Data sets


def list_data(data_dir: str | None = None) -> list[dict[str, Any]]:
    """Describe every data set adapter, with split sizes for those whose files are present.

    ``data_dir`` falls back to ``$BRIDGE_DATA_DIR``.
    """
    from bridge.data import list_datasets

    return list_datasets(data_dir)


def data_config(name: str, overrides: list[str] | None = None) -> DataConfig:
    """Build the data settings for data set ``name`` with ``key=value`` overrides.

    Keys may be written with or without the ``data.`` prefix (``train_size=100`` or
    ``data.train_size=100``). Defaults are the schema's, not those of a run configuration.
    """
    from pydantic import ValidationError

    from bridge.config import apply_overrides, format_validation_error

    prefixed = [text if text.startswith("data.") else f"data.{text}" for text in overrides or []]
    raw = apply_overrides({"data": {"dataset": name}}, prefixed)
    try:
        return BridgeConfig.model_validate(raw).data
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "data settings")) from None


def inspect_data(
    name: str, *, tokenizer: str | None = None, overrides: list[str] | None = None, examples: int = 2
) -> dict[str, Any]:
    """Load data set ``name`` and return its report, length statistics and rendered examples.

    Lengths are in tokens of ``tokenizer`` (a local model folder) when given, else in characters
    and words.
    """
    from bridge.data import inspect_dataset

    return inspect_dataset(data_config(name, overrides), tokenizer=tokenizer, examples=examples)


# --------------------------------------------------------------------------------------------
# Models


def merge(adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None) -> Path:
    """Merge a LoRA adapter into its base model and write a verified Hugging Face folder.

    ``base`` is a model reference (folder, hub id or ``packaged:...``); by default the base
    that fine-tuning recorded in the adapter folder. Returns ``out_dir``.
    """
    from bridge.models.merge import merge_adapter

    return merge_adapter(Path(adapter_dir), Path(out_dir), base=base)


# --------------------------------------------------------------------------------------------
# Teacher


def estimate(config: BridgeConfig) -> Any:
    """Estimate the teacher stage's calls, tokens and cost and check the budget, without any network call.

    Returns a :class:`bridge.teacher.estimate.Estimate`. The prompts are those of the first
    examples of the training pool, since the selected subset is known only after selection.
    """
    from bridge.data import load_dataset
    from bridge.prompts import select_demos
    from bridge.teacher.estimate import estimate_teacher_cost

    splits = load_dataset(config.data)
    demos = select_demos(
        splits.fewshot or splits.train, config.prompts.few_shot, splits.task, seed=config.seed, need_explanation=True
    )
    return estimate_teacher_cost(splits.train, splits.task, config.teacher, config.budget, config.prompts, demos=demos)


def ledger(run_dir: str | Path) -> Any:
    """Summarize a run's teacher ledger: spent, reserved, cached, failed, retried, by status and model.

    Returns a :class:`bridge.teacher.ledger.LedgerSummary`; reading is safe while a run writes.
    """
    from bridge.teacher.ledger import summarize_ledger

    return summarize_ledger(Path(run_dir))
