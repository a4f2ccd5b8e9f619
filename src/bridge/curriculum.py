"""Student curriculum: the rows of each training stage and the losses that train on them.

A stage (:class:`~bridge.config.CurriculumStage`) names a data source, a loss and an order:

``labels``
    answer-only targets (``Answer: <gold>``) after the answer-only instruction, on the training
    pool, optionally mixed with rows of a general instruction set (``mix_file``).
``rationales``
    the tutoring rows (``tutor/rows.jsonl``): TA rationales and the teacher's own.
``teacher_rationales``
    the bought teacher rows only (``teach/rows.jsonl``).
``distill``
    the tutoring rows as the off-policy half of generalised knowledge distillation (``gkd``).

Prompts are rendered here with the student's tokenizer, without hints or demonstrations, so
training prompts equal the prompts the student is evaluated on.

Losses:

``sft``
    plain fine-tuning on the completion (:func:`bridge.models.training.train_sft`).
``step_by_step``
    distilling step-by-step (Hsieh et al., 2023): every rationale row becomes two rows, a label
    task (answer-only instruction, target ``Answer: <gold>``) and a rationale task (the
    deployed rationale instruction, target rationale + answer line). Each task's instruction is
    its prefix. The loss is a weighted mean of per-row mean token losses, with weight ``alpha``
    on label rows and ``1 - alpha`` on rationale rows, times 2 so that alpha 0.5 weighs an
    example's two rows equally. ``train_sft`` applies it through its ``row_weights``
    argument.
``gkd``
    generalised Jensen-Shannon divergence to the refined TA with TRL's ``GKDTrainer``
    (``trl.experimental.gkd``, trl 1.16), only when the TA and the student share a tokenizer.

Order ``easy_to_hard`` sorts rows by Phase 1 difficulty (``select/scores.jsonl``) and trains
them in that order every epoch; ``shuffled`` lets the Trainer shuffle with the training seed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.config import CurriculumStage, PromptConfig, StudentConfig, TrainingConfig
from bridge.data.types import Example, TaskSpec
from bridge.errors import ConfigError, DataError
from bridge.prompts import format_target, render_all, target_answer
from bridge.rundir import atomic_write_json, ensure_dir, fingerprint, read_json, storage_errors

log = logging.getLogger(__name__)

#: Suffixes of the two row ids that step_by_step makes from one example.
LABEL_TASK, RATIONALE_TASK = "label", "rationale"

STAGE_KEY_FILE = "stage_key.json"
GKD_METRICS_FILE = "metrics.json"
GKD_MODEL_DIR = "model"


def active_stages(config: StudentConfig) -> list[CurriculumStage]:
    """Return the stages to run: all in order, or the first rationales stage without the curriculum."""
    if config.curriculum:
        return list(config.stages)
    return [next(stage for stage in config.stages if stage.data == "rationales")]


# --------------------------------------------------------------------------------------------
# Rows


@dataclass
class StageData:
    """The training rows of one stage, with per-row loss weights for step_by_step."""

    rows: list[dict[str, Any]]
    weights: list[float] | None
    counts: dict[str, int]

    def fingerprint(self) -> str:
        return fingerprint([r["id"] for r in self.rows], [r["messages"] for r in self.rows], self.weights)


def _chat_rows(
    examples: Sequence[Example],
    completions: Mapping[str, str],
    task: TaskSpec,
    prompts: PromptConfig,
    tokenizer: Any,
    *,
    style: str,
    id_suffix: str = "",
    skip_invalid: bool = False,
) -> list[dict[str, Any]]:
    """Render unguided prompts for ``examples`` and append each one's completion as the reply."""
    rendered, _ = render_all(
        [e for e in examples if e.id in completions],
        task,
        style=style,  # type: ignore[arg-type]
        system=prompts.system,
        tokenizer=tokenizer,
        max_context_tokens=prompts.max_context_tokens,
        truncation_side=prompts.truncation_side,
        skip_invalid=skip_invalid,
    )
    rows = []
    for prompt in rendered:
        messages = [*prompt.messages, {"role": "assistant", "content": completions[prompt.example_id]}]
        rows.append({"id": prompt.example_id + id_suffix, "example_id": prompt.example_id, "messages": messages})
    return rows


def label_rows(
    examples: Sequence[Example], task: TaskSpec, prompts: PromptConfig, tokenizer: Any, *, skip_invalid: bool = False
) -> list[dict[str, Any]]:
    """Return answer-only rows: the answer-only instruction, then ``Answer: <gold>``."""
    targets = {e.id: format_target(None, target_answer(e, task)) for e in examples}
    return _chat_rows(examples, targets, task, prompts, tokenizer, style="answer_only", skip_invalid=skip_invalid)


def rationale_rows(
    source: Sequence[dict[str, Any]],
    examples: Sequence[Example],
    task: TaskSpec,
    prompts: PromptConfig,
    tokenizer: Any,
    *,
    skip_invalid: bool = False,
) -> list[dict[str, Any]]:
    """Return rationale rows from tutoring or teacher rows (``id`` and ``target``), in example order."""
    targets = {row["id"]: row["target"] for row in source}
    known = {e.id for e in examples}
    missing = sorted(set(targets) - known)
    if missing:
        raise DataError(
            f"{len(missing)} rationale row(s) name examples outside the training split: {missing[:5]}",
            hint="the rows come from a run with other data settings; rerun 'bridge run --from tutor'",
        )
    return _chat_rows(examples, targets, task, prompts, tokenizer, style="rationale", skip_invalid=skip_invalid)


def step_by_step_rows(
    source: Sequence[dict[str, Any]],
    examples: Sequence[Example],
    task: TaskSpec,
    prompts: PromptConfig,
    tokenizer: Any,
    *,
    alpha: float,
    skip_invalid: bool = False,
) -> tuple[list[dict[str, Any]], list[float]]:
    """Return the label and rationale rows of every rationale row, with their loss weights.

    The two rows of one example are adjacent; a task with weight 0 is left out.
    """
    with_rationale = {row["id"] for row in source}
    chosen = [e for e in examples if e.id in with_rationale]
    labels = {r["example_id"]: r for r in label_rows(chosen, task, prompts, tokenizer, skip_invalid=skip_invalid)}
    rationales = rationale_rows(source, chosen, task, prompts, tokenizer, skip_invalid=skip_invalid)
    rows: list[dict[str, Any]] = []
    weights: list[float] = []
    for rationale in rationales:
        example_id = rationale["example_id"]
        label = labels.get(example_id)
        if alpha > 0 and label is not None:
            rows.append({**label, "id": f"{example_id}#{LABEL_TASK}", "task": LABEL_TASK})
            weights.append(alpha)
        if alpha < 1:
            rows.append({**rationale, "id": f"{example_id}#{RATIONALE_TASK}", "task": RATIONALE_TASK})
            weights.append(1.0 - alpha)
    return rows, weights


def read_mix_file(path: Path, *, limit: int | None, seed: int) -> list[dict[str, Any]]:
    """Read a general instruction set as chat rows; with ``limit``, a seeded sample of that many.

    Each line is ``{"messages": [...]}`` ending with the assistant reply, or an instruction row
    ``{"instruction", "input" (optional), "output"}``, or ``{"prompt", "response"}``.
    """
    if not path.is_file():
        raise ConfigError(f"mix_file {path} not found", hint="set student.stages[i].mix_file to a JSONL file")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg})", hint="write one JSON object per line") from None
            rows.append({"id": f"mix/{number}", "example_id": None, "messages": _mix_messages(item, where)})
    if limit is not None and limit < len(rows):
        rows = sorted(random.Random(seed).sample(rows, limit), key=lambda r: int(r["id"].split("/")[1]))
    return rows


def _mix_messages(item: Any, where: str) -> list[dict[str, str]]:
    fix = 'each line needs "messages" (ending with the assistant), "instruction" and "output", or "prompt" and "response"'
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(item).__name__}", hint=fix)
    if "messages" in item:
        messages = item["messages"]
        valid = (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") for m in messages)
            and all(isinstance(m.get("content"), str) for m in messages)
        )
        if not valid or messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'messages' must be a list of role/content objects ending with the assistant", hint=fix)
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(item.get("instruction"), str) and isinstance(item.get("output"), str):
        user = item["instruction"]
        if isinstance(item.get("input"), str) and item["input"].strip():
            user = f"{user}\n\n{item['input']}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": item["output"]}]
    if isinstance(item.get("prompt"), str) and isinstance(item.get("response"), str):
        return [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["response"]}]
    raise DataError(f"{where}: unrecognised row with keys {sorted(item)}", hint=fix)


def order_easy_to_hard(
    rows: list[dict[str, Any]], weights: list[float] | None, difficulty: Mapping[str, float]
) -> tuple[list[dict[str, Any]], list[float] | None]:
    """Sort rows by the Phase 1 difficulty of their example (ties by id), keeping weights aligned.

    Rows without an example (mixed-in instruction rows) are spread evenly through the order.
    """
    missing = sorted({r["example_id"] for r in rows if r["example_id"] is not None and r["example_id"] not in difficulty})
    if missing:
        raise DataError(
            f"{len(missing)} row(s) have no Phase 1 difficulty in select/scores.jsonl: {missing[:5]}",
            hint="rerun the select stage for this data, or use order: shuffled",
        )
    paired = list(zip(rows, weights if weights is not None else [1.0] * len(rows), strict=True))
    scored = sorted(
        (p for p in paired if p[0]["example_id"] is not None),
        key=lambda p: (difficulty[p[0]["example_id"]], p[0]["example_id"], p[0]["id"]),
    )
    extra = [p for p in paired if p[0]["example_id"] is None]
    merged = list(scored)
    for k, item in enumerate(extra):
        merged.insert(round((k + 1) * len(scored) / (len(extra) + 1)) + k, item)
    return [p[0] for p in merged], ([p[1] for p in merged] if weights is not None else None)


def build_stage_data(
    stage: CurriculumStage,
    *,
    examples: Sequence[Example],
    task: TaskSpec,
    prompts: PromptConfig,
    tokenizer: Any,
    tutor_rows: Sequence[dict[str, Any]] | None = None,
    teacher_rows: Sequence[dict[str, Any]] | None = None,
    difficulty: Mapping[str, float] | None = None,
    seed: int = 0,
    skip_invalid: bool = False,
) -> StageData:
    """Build the rows of ``stage`` from the training pool and the rationale files."""
    settings = dict(skip_invalid=skip_invalid)
    source: Sequence[dict[str, Any]] | None = None
    if stage.data in ("rationales", "distill"):
        source = tutor_rows
    elif stage.data == "teacher_rationales":
        source = teacher_rows
    if stage.data != "labels" and not source:
        raise DataError(
            f"stage {stage.name}: there are no {stage.data.replace('_', ' ')} rows to train on",
            hint="check tutor/yield.json and teach/outcomes.jsonl for why every row was dropped",
        )

    weights: list[float] | None = None
    if stage.data == "labels":
        rows = label_rows(examples, task, prompts, tokenizer, **settings)
    elif stage.loss == "step_by_step":
        rows, weights = step_by_step_rows(source or [], examples, task, prompts, tokenizer, alpha=stage.alpha, **settings)
    else:
        rows = rationale_rows(source or [], examples, task, prompts, tokenizer, **settings)
    pool_rows = len(rows)

    if stage.mix_file is not None:
        mixed = read_mix_file(Path(stage.mix_file), limit=stage.mix_rows, seed=seed)
        rows = rows + mixed
    if stage.order == "easy_to_hard":
        if difficulty is None:
            raise ValueError("easy_to_hard needs the Phase 1 difficulty of every example")
        rows, weights = order_easy_to_hard(rows, weights, difficulty)
    counts = {"rows": len(rows), "pool_rows": pool_rows, "mixed_rows": len(rows) - pool_rows}
    if weights is not None:
        counts["label_rows"] = sum(1 for r in rows if r.get("task") == LABEL_TASK)
        counts["rationale_rows"] = sum(1 for r in rows if r.get("task") == RATIONALE_TASK)
    return StageData(rows=rows, weights=weights, counts=counts)


# --------------------------------------------------------------------------------------------
# Trainer extensions


def sequential_order_callback() -> Any:
    """Return a callback that makes the Trainer read rows in the given order (no shuffling).

    ``train_sft`` has no order option, so the callback switches transformers'
    ``train_sampling_strategy`` to "sequential" when the Trainer is built, before the data
    loader exists. A resumed run skips the rows already seen in the same order.
    """
    from transformers import TrainerCallback

    class SequentialOrder(TrainerCallback):
        def on_init_end(self, args, state, control, **kwargs):
            args.train_sampling_strategy = "sequential"

    return SequentialOrder()


# --------------------------------------------------------------------------------------------
# Training one stage


def stage_training(training: TrainingConfig, stage: CurriculumStage) -> TrainingConfig:
    """Return the student's fine-tuning settings with the stage's epochs and learning rate."""
    return training.model_copy(update={"epochs": stage.epochs, "learning_rate": stage.learning_rate})


def prepare_stage_dir(folder: Path, key: str) -> Path:
    """Return ``folder``, emptied first when it contains work for another stage key."""
    stored = read_json(folder / STAGE_KEY_FILE).get("key") if (folder / STAGE_KEY_FILE).exists() else None
    if folder.exists() and stored != key:
        log.info("clearing %s: it contains a stage trained with other settings or inputs", folder)
        shutil.rmtree(folder)
    ensure_dir(folder)
    atomic_write_json(folder / STAGE_KEY_FILE, {"key": key})
    return folder


def train_stage(
    stage: CurriculumStage,
    data: StageData,
    *,
    base: Any,
    training: TrainingConfig,
    out_dir: Path,
    teacher: Any = None,
    dev_rows: Sequence[dict[str, Any]] | None = None,
    dev_metric: Any = None,
    max_new_tokens: int = 128,
) -> Any:
    """Train one stage from ``base`` (a LocalModel, trained in place) and return the result.

    sft and step_by_step return :class:`bridge.models.training.TrainResult`; gkd returns a
    :class:`GkdResult` with the same fields.
    """
    from bridge.models.training import train_sft

    config = stage_training(training, stage)
    rows = [{"id": r["id"], "messages": r["messages"]} for r in data.rows]
    if stage.loss == "gkd":
        if teacher is None:
            raise ValueError("a gkd stage needs the refined TA as teacher")
        return train_gkd(
            rows, student=base, teacher=teacher, config=config, stage=stage, out_dir=out_dir, max_new_tokens=max_new_tokens
        )
    callbacks = [sequential_order_callback()] if stage.order == "easy_to_hard" else []
    return train_sft(
        rows,
        base=base,
        config=config,
        out_dir=out_dir,
        dev_rows=dev_rows,
        dev_metric=dev_metric,
        callbacks=callbacks,
        row_weights=data.weights,
    )


def shares_tokenizer(first: Any, second: Any) -> bool:
    """Return True when two tokenizers map the same strings to the same ids (logits are comparable)."""
    return first.get_vocab() == second.get_vocab() and len(first) == len(second)


# --------------------------------------------------------------------------------------------
# Generalised knowledge distillation


@dataclass
class GkdResult:
    """Result of :func:`train_gkd`, with the fields of ``TrainResult`` that stages read."""

    output_dir: Path
    method: str
    metrics_path: Path
    metrics: dict[str, Any]
    model: Any
    tokenizer: Any

    @property
    def global_step(self) -> int:
        return int(self.metrics["global_step"])


def train_gkd(
    rows: Sequence[dict[str, Any]],
    *,
    student: Any,
    teacher: Any,
    config: TrainingConfig,
    stage: CurriculumStage,
    out_dir: Path,
    max_new_tokens: int = 128,
) -> GkdResult:
    """Distil ``teacher`` into ``student`` (both LocalModels) with TRL's GKDTrainer, resumably.

    Rows are chat rows whose assistant reply is the off-policy completion. With probability
    ``stage.gkd_lambda`` a step trains on completions of up to ``max_new_tokens`` tokens that the
    student samples itself instead. All student weights are trained. Checkpoints go to ``out_dir/checkpoints`` and a rerun resumes
    from the newest complete one; a finished run is loaded, not repeated.
    """
    from transformers import TrainerCallback

    from bridge.models.training import CHECKPOINT_MARKER, latest_checkpoint

    if config.method != "full":
        raise ConfigError(
            f"stage {stage.name}: gkd trains all student weights, but student.training.method is {config.method}",
            hint="set student.training.method: full",
        )
    if not shares_tokenizer(student.tokenizer, teacher.tokenizer):
        raise ConfigError(
            f"stage {stage.name}: gkd compares the TA's and the student's next-token distributions, "
            "but their tokenizers differ",
            hint="derive the student from the TA (models.student.keep_layers) or remove the gkd stage",
        )
    out_dir = ensure_dir(Path(out_dir))
    model_dir = out_dir / GKD_MODEL_DIR
    key = fingerprint(
        config.model_dump(mode="json", exclude={"save_every"}),
        stage.model_dump(mode="json"),
        [r["id"] for r in rows],
        [r["messages"] for r in rows],
    )
    metrics_path = out_dir / GKD_METRICS_FILE
    finished = read_json(metrics_path) if metrics_path.is_file() else None
    if finished is not None and finished.get("key") == key and model_dir.is_dir():
        log.info("gkd stage %s already finished; loading %s", stage.name, model_dir)
        _load_full_weights(student.model, model_dir)
        student.model.eval()
        return GkdResult(model_dir, "full", metrics_path, finished, student.model, student.tokenizer)

    checkpoints = out_dir / "checkpoints"
    resume = latest_checkpoint(checkpoints)
    if resume is not None and read_json(resume / CHECKPOINT_MARKER).get("key") != key:
        log.info("removing %s: its checkpoints were written with other settings", checkpoints)
        shutil.rmtree(checkpoints)
        resume = None

    class MarkCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_write_json(folder / CHECKPOINT_MARKER, {"global_step": state.global_step, "key": key})

    trainer = _gkd_trainer(rows, student, teacher, config, stage, checkpoints, [MarkCheckpoint()], max_new_tokens)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    _save_full_folder(trainer.model, student.tokenizer, model_dir)
    metrics = {
        "key": key,
        "method": "gkd",
        "global_step": state.global_step,
        "train_seconds": round(time.perf_counter() - started, 3),
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else None,
        "loss_curve": [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e],
        "output_dir": str(model_dir),
        "beta": stage.gkd_beta,
        "lambda": stage.gkd_lambda,
        "rows": len(rows),
    }
    atomic_write_json(metrics_path, metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    trainer.model.eval()
    return GkdResult(model_dir, "full", metrics_path, metrics, trainer.model, student.tokenizer)


def _gkd_trainer(
    rows: Sequence[dict[str, Any]],
    student: Any,
    teacher: Any,
    config: TrainingConfig,
    stage: CurriculumStage,
    checkpoints: Path,
    callbacks: list[Any],
    max_new_tokens: int,
) -> Any:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    parameter = next(student.model.parameters())
    args = GKDConfig(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # a value below 1 is a fraction of all optimizer steps
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        bf16=parameter.dtype == torch.bfloat16,
        use_cpu=parameter.device.type == "cpu",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=config.max_seq_len,
        lmbda=stage.gkd_lambda,
        beta=stage.gkd_beta,
        temperature=stage.gkd_temperature,
        max_new_tokens=max_new_tokens,
    )
    teacher.model.eval()
    trainer = GKDTrainer(
        model=student.model,
        teacher_model=teacher.model,
        args=args,
        train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
        processing_class=student.tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    # Stop sampling at the chat template's end-of-turn token as well as at eos.
    trainer.generation_config.eos_token_id = list(student.eos_token_ids)
    return trainer


def _save_full_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save weights and tokenizer into ``folder`` through a staging folder renamed into place."""
    ensure_dir(folder.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        with storage_errors(folder, "save the model to"):
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_full_weights(model: Any, folder: Path) -> None:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise DataError(
            f"weights in {folder} do not fit the student: unexpected {result.unexpected_keys[:5]}",
            hint=f"delete {folder.parent} and rerun",
        )


def save_final_model(model: Any, tokenizer: Any, folder: Path) -> Path:
    """Save the student after its last stage as a Hugging Face folder (LoRA adapters merged)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    _save_full_folder(model, tokenizer, folder)
    return folder
