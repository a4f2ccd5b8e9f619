"""The Python API behind the command line: the functions a notebook user calls.

Each function takes a :class:`~bridge.config.BridgeConfig` (see :func:`load_config`) and returns
plain data or paths, so everything the ``bridge`` command does can be scripted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.config import BridgeConfig, DataConfig, dump_config, load_config
from bridge.errors import ConfigError, DataError

__all__ = [
    "BridgeConfig",
    "compare",
    "data_config",
    "dump_config",
    "estimate",
    "inspect_data",
    "ledger",
    "list_data",
    "load_config",
    "merge",
    "predict",
    "prediction_config",
    "run",
    "run_stage",
    "serve",
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


def compare(
    config: BridgeConfig,
    *,
    seeds: int | None = None,
    methods: list[str] | None = None,
    yes: bool = False,
) -> dict[str, Any]:
    """Run BRIDGE and its baselines for several seeds into ``<output.runs_dir>/<name>-compare``.

    ``seeds`` and ``methods`` default to ``compare.seeds`` and ``compare.methods``; the
    methods are described in :mod:`bridge.compare`. Rerunning resumes an interrupted
    comparison. Returns the content of ``comparison.json``; the report is in its ``report/``
    folder.
    """
    from bridge.compare import run_comparison

    return run_comparison(config, seeds=seeds, methods=methods, yes=yes)


def tune_selection(
    config: BridgeConfig,
    *,
    lambdas: list[float] | None = None,
    seeds: int = 2,
    student_data: str = "teacher_rationales",
    yes: bool = False,
) -> dict[str, Any]:
    """Run the selection protocol into ``<output.runs_dir>/<name>-selection`` and return its result.

    Phase 1 tries each lambda (0, 0.5 and 1 when ``lambdas`` is None) with the TA hidden-state
    embedding. Phase 2 tries the sentence-encoder embedding at the best lambda. :mod:`bridge.tuning`
    describes the scoring. Rerunning resumes.
    """
    from bridge.tuning import DEFAULT_LAMBDAS, run_protocol

    grid = DEFAULT_LAMBDAS if lambdas is None else lambdas
    return run_protocol(config, lambdas=grid, seeds=seeds, student_data=student_data, yes=yes)


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
    splits.require_examples("train")
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


# --------------------------------------------------------------------------------------------
# Serving and prediction


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    max_tokens_limit: int = 1024,
    max_request_bytes: int = 1_048_576,
    on_ready: Any = None,
) -> None:
    """Serve a model reference or a run directory's model over an OpenAI-compatible API until interrupted.

    :mod:`bridge.serve` lists the endpoints. ``on_ready`` is called with the base URL once the
    server accepts connections.
    """
    from bridge.serve import ServeLimits
    from bridge.serve import serve as run_server

    limits = ServeLimits(max_tokens_limit=max_tokens_limit, max_request_bytes=max_request_bytes)
    run_server(model, host=host, port=port, model_name=model_name, limits=limits, on_ready=on_ready)


def prediction_config(model: str, config: str | Path | None = None, overrides: list[str] | None = None) -> BridgeConfig:
    """Load the configuration for :func:`predict` and apply ``overrides`` to it.

    The configuration is ``config`` when given, else the run's own when ``model`` is a run
    directory, else the embedded default.
    """
    from bridge.models.run_models import RUN_CONFIG_FILE, is_run_dir

    if config is None and is_run_dir(model):
        config = Path(model).expanduser() / RUN_CONFIG_FILE
    return load_config(config, overrides)


def predict(
    model: str,
    source: str,
    config: BridgeConfig,
    *,
    out: str | Path | None = None,
    mode: str = "generation",
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every example of a data file or a named split with a model, score them, and write the rows.

    ``model`` is a model reference or a run directory (its student, else its refined TA).
    ``source`` is a JSONL, JSON, CSV or TSV file read by the generic adapter with the format,
    labels and fields of ``config.data``, or ``DATASET:SPLIT`` such as ``pubmedqa_pqal:test``.
    ``mode`` is "generation" (rationale and answer line, as deployed) or "scoring" (option
    log-probabilities, closed formats only). Prompts are zero-shot, as in the stages'
    predictions. With ``out`` the rows are written there as JSONL; an interrupted generation
    resumes from ``<out>.partial``. Returns ``{"rows", "scores", "task", "out"}``.
    """
    from bridge.models.run_models import load_model_or_run
    from bridge.predict import predict_generation, predict_scoring, summarise
    from bridge.rundir import atomic_write_text

    if mode not in ("generation", "scoring"):
        raise ConfigError(f"unknown prediction mode {mode!r}", hint="use --mode generation or --mode scoring")
    task, examples = _prediction_examples(source, config.data)
    if mode == "scoring" and not task.is_closed:
        raise ConfigError(
            f"option scoring needs a closed task format, but {source} has format {task.format}",
            hint="use --mode generation",
        )
    if not examples:
        raise DataError(f"{source} contains no examples to predict", hint="check the file or the split name")

    lm = load_model_or_run(model)
    out_path = Path(out) if out is not None else None
    evaluation = config.evaluation
    if mode == "generation":
        partial = out_path.with_name(out_path.name + ".partial") if out_path is not None else None
        rows = predict_generation(
            lm, examples, task, config.prompts,
            max_new_tokens=evaluation.max_new_tokens, batch_size=evaluation.batch_size,
            skip_invalid=config.data.skip_invalid, rows_path=partial, progress=progress,
        )
    else:
        partial = None
        rows = predict_scoring(
            lm, examples, task, config.prompts,
            batch_size=evaluation.batch_size, skip_invalid=config.data.skip_invalid, progress=progress,
        )
    if out_path is not None:
        atomic_write_text(out_path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows))
        if partial is not None:
            partial.unlink(missing_ok=True)
    return {"rows": rows, "scores": summarise(rows, task), "task": task, "out": out_path}


def _prediction_examples(source: str, data: DataConfig) -> tuple[Any, list[Any]]:
    """Return the task and examples of a data file (generic adapter) or of ``DATASET:SPLIT``."""
    from bridge.data import load_dataset

    path = Path(source).expanduser()
    if path.is_file():
        return _read_data_file(path, data)
    name, separator, split = source.rpartition(":")
    if separator and name and split in ("train", "dev", "test", "fewshot"):
        # The configuration's data settings apply to its own data set; another one gets the defaults.
        settings = data if name == data.dataset else DataConfig(dataset=name, data_dir=data.data_dir)
        splits = load_dataset(settings)
        return splits.task, splits.split(split)
    raise DataError(
        f"data file {source} not found, and {source!r} is not a data set split",
        hint="pass an existing .jsonl, .json, .csv or .tsv file, or DATASET:SPLIT such as pubmedqa_pqal:test "
        "(split train, dev, test or fewshot)",
    )


def _read_data_file(path: Path, data: DataConfig) -> tuple[Any, list[Any]]:
    """Read every row of one file through the generic adapter, with the format and fields of ``data``."""
    import logging

    from bridge.data.adapters import generic
    from bridge.data.io import RowChecker
    from bridge.data.registry import check_settings_apply

    settings = data.model_copy(
        update={"dataset": generic.NAME, "train_file": str(path.resolve()), "dev_file": None, "test_file": None}
    )
    check_settings_apply(settings)
    checker = RowChecker(settings.skip_invalid)
    loaded = generic.load(settings, None, checker)
    if checker.rejects:
        logging.getLogger(__name__).warning(
            "%s: skipped %d invalid row(s) (by field: %s)", path, len(checker.rejects), checker.counts()
        )
    return loaded.task, loaded.pool
