"""Supervised fine-tuning of a local causal LM, with LoRA adapters or all weights.

trl's ``SFTTrainer`` (on transformers' ``Trainer``) runs the loop: AdamW, cosine schedule with
warm-up, gradient accumulation, checkpoints with optimizer, scheduler and RNG state, resume
from the latest checkpoint with the same data order and optimizer-step count, and
padding-free packing. This module prepares the data and adds what the trainer lacks:

* rows in OpenAI messages form are tokenised with the chat template and labelled so that only
  the final assistant message and the end-of-turn token that closes it are trained;
* input checks that name the row: no trained token, too long, template not a prefix;
* a check of the first two optimizer steps (finite loss, finite non-zero gradient norm), and a
  stop with an error at any later non-finite loss;
* dev evaluation with an optional callback metric, early stopping and best-weights choice;
* the resolved configuration, logged first and saved with each checkpoint, and a refusal to
  resume from a checkpoint written with another configuration;
* the trained row ids of every optimizer step (``sample_order.jsonl``) and a metrics file;
* under ``accelerate launch`` (DDP, see :mod:`bridge.distributed`), files written by rank 0
  alone, with the sample order gathered from every process.

Layout of ``out_dir``::

    checkpoints/checkpoint-<step>/   Trainer checkpoints (the latest two are kept)
    best/step-<step>/                weights of the best dev evaluation so far
    sample_order.jsonl               {"step": s, "rows": [ids]} per optimizer step
    training_config.json             the resolved configuration
    adapter/ or model/               the result: a LoRA adapter or a Hugging Face folder
    metrics.json                     loss curve, dev evaluations, steps, tokens, seconds

``metrics.json`` is written after the result, and ``checkpoints/`` and ``best/`` are deleted
after ``metrics.json``, so a kill at any point leaves a run that the next call resumes or returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.distributed import barrier, gather_objects, is_main_process, world_size
from bridge.errors import BridgeError, ConfigError, DataError
from bridge.rundir import (
    RowWriter,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    fingerprint,
    package_versions,
    read_json,
    read_rows,
    storage_errors,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bridge.config import ModelRef, TrainingConfig
    from bridge.models.loading import LocalModel

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (transformers and trl convention)

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "training_config.json"
SAMPLE_ORDER_FILE = "sample_order.jsonl"
#: Written into a checkpoint folder after the Trainer has written everything else, so a folder
#: without it was cut short by a kill.
CHECKPOINT_MARKER = "bridge_checkpoint.json"
#: Written into a LoRA adapter folder: the base model the adapter belongs to.
BASE_FILE = "bridge_base.json"

#: Metric key of the optional dev callback in the Trainer's logs.
DEV_METRIC_KEY = "eval_dev_metric"

_ROW_INDEX = "row_index"  # dataset column and batch key with the position of each token's row
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_BEST_RE = re.compile(r"^step-(\d+)$")
_SHOWN_IDS = 10  # row ids listed in one error message


class TrainingError(BridgeError):
    """Fine-tuning failed: a non-finite loss, an inconsistent checkpoint or unusable weights."""


@dataclass
class TrainExample:
    """One tokenised row: the ids of the chat-templated conversation and their labels."""

    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TrainResult:
    """Result of :func:`train_sft`.

    ``output_dir`` is a LoRA adapter folder (method lora) or a Hugging Face model folder (method
    full). ``model`` is the trained model in memory, holding the same weights as ``output_dir``:
    the best dev evaluation's when dev rows were given, else the last step's.
    """

    output_dir: Path
    method: str
    metrics_path: Path
    metrics: dict[str, Any]
    model: Any
    tokenizer: Any

    @property
    def global_step(self) -> int:
        return int(self.metrics["global_step"])


# --------------------------------------------------------------------------------------------
# Tokenisation and labels


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Tokenise rendered chat text, adding special tokens only when it does not start with BOS.

    A chat template that starts with the BOS token would otherwise get a second one in front.
    """
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def tokenize_rows(
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    end_of_turn: str,
    max_seq_len: int,
    split: str = "train",
) -> list[TrainExample]:
    """Tokenise rows ``{"id", "messages"}`` with the chat template and label the completion.

    The completion is the final assistant message. Its tokens and the end-of-turn token that
    closes it keep their ids as labels, and every other token gets ``IGNORE_INDEX``. Tokens that
    the template adds after the end-of-turn token are dropped. Raises :class:`DataError` naming
    every row that is malformed, has no trained token, or is longer than ``max_seq_len``.
    """
    end_of_turn_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if end_of_turn_id is None or (end_of_turn_id == tokenizer.unk_token_id and end_of_turn != tokenizer.unk_token):
        raise DataError(
            f"end-of-turn token {end_of_turn!r} is not in the tokenizer's vocabulary",
            hint="load the model with bridge.models.load_model, which finds the chat template's end-of-turn token",
        )

    examples: list[TrainExample] = []
    malformed: list[str] = []
    untrained: list[str] = []
    too_long: list[str] = []
    for index, row in enumerate(rows):
        row_id = str(row.get("id", f"#{index}")) if isinstance(row, dict) else f"#{index}"
        problem = _row_problem(row)
        if problem:
            malformed.append(f"{row_id} ({problem})")
            continue
        messages = row["messages"]
        if messages[-1]["role"] != "assistant":
            untrained.append(f"{row_id} (last message is from {messages[-1]['role']!r}, not the assistant)")
            continue
        example, problem = _label_row(row_id, messages, tokenizer, end_of_turn_id, end_of_turn)
        if problem:
            malformed.append(f"{row_id} ({problem})")
            continue
        if example.trained_tokens == 0:
            untrained.append(f"{row_id} (the completion renders to no tokens)")
            continue
        if len(example.input_ids) > max_seq_len:
            too_long.append(f"{row_id} ({len(example.input_ids)} tokens)")
            continue
        examples.append(example)

    if malformed:
        raise DataError(
            f"{len(malformed)} {split} row(s) cannot be used for fine-tuning: {_show(malformed)}",
            hint="each row needs an 'id' and 'messages': a list of {'role', 'content'} ending with the assistant's reply",
        )
    if untrained:
        raise DataError(
            f"{len(untrained)} {split} row(s) have no trained token: {_show(untrained)}",
            hint="end every row's messages with the assistant reply that the model should learn",
        )
    if too_long:
        raise DataError(
            f"{len(too_long)} {split} row(s) are longer than max_seq_len={max_seq_len}: {_show(too_long)}",
            hint="raise training.max_seq_len, or shorten the prompts (prompts.max_context_tokens)",
        )
    if not examples:
        raise DataError(f"no {split} rows were given", hint="pass at least one row to fine-tune on")
    return examples


def _show(items: list[str]) -> str:
    listed = ", ".join(items[:_SHOWN_IDS])
    return listed if len(items) <= _SHOWN_IDS else f"{listed} and {len(items) - _SHOWN_IDS} more"


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a dict, found {type(row).__name__}"
    if "id" not in row:
        return "missing 'id'"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{position}] has no 'role'"
        if message["role"] not in ("system", "user", "assistant"):
            return f"messages[{position}] has role {message['role']!r}; expected system, user or assistant"
        if not isinstance(message.get("content"), str):
            return f"messages[{position}] has no text 'content'"
    return None


def _label_row(
    row_id: str,
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    end_of_turn_id: int,
    end_of_turn: str,
) -> tuple[TrainExample, str | None]:
    from bridge.prompts import control_tokens, defuse_control_tokens

    # Message text is data: control-token text in it (a rationale that quotes "<|im_end|>") must
    # not end the turn early or open a new one, so only the template adds real control tokens.
    specials = control_tokens(tokenizer)
    messages = [{**m, "content": defuse_control_tokens(m["content"], specials)} for m in messages]
    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    empty = TrainExample(row_id, [], [])
    if not full_text.startswith(prompt_text):
        return empty, "the chat template renders the prompt differently when the reply follows it"
    prompt_ids = encode_text(tokenizer, prompt_text)
    full_ids = encode_text(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        return empty, "the prompt's tokens are not a prefix of the prompt and reply's tokens"
    completion = full_ids[len(prompt_ids) :]
    if end_of_turn_id not in completion:
        return empty, f"the chat template does not close the assistant turn with {end_of_turn!r}"
    completion = completion[: completion.index(end_of_turn_id) + 1]
    input_ids = prompt_ids + completion
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion
    return TrainExample(row_id, input_ids, labels), None


def _data_fingerprint(examples: Iterable[TrainExample]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.id, example.input_ids, example.labels]).encode("utf-8"))
    return digest.hexdigest()[:16]


def _to_dataset(examples: Sequence[TrainExample], *, pack_length: int | None) -> Any:
    """Build a ``datasets.Dataset`` with input ids, labels and each token's row position.

    With ``pack_length``, trl's best-fit-decreasing packer puts rows into sequences of at most
    that many tokens. Its ``seq_lengths`` column keeps the row boundaries, which the
    padding-free collator turns into position ids so that rows do not attend to each other.
    transformers 5.25 builds that block-diagonal mask only when no key-value cache is passed,
    which holds in training because trl's ``SFTTrainer.compute_loss`` sets ``use_cache=False``.
    """
    from datasets import Dataset

    dataset = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "labels": [e.labels for e in examples],
            _ROW_INDEX: [[position] * len(e.input_ids) for position, e in enumerate(examples)],
        }
    )
    if pack_length is None:
        return dataset
    from trl import pack_dataset

    return pack_dataset(dataset, pack_length, strategy="bfd")


class _RowIndexCollator:
    """Wrap trl's collator, passing the positions of a batch's rows on as a tensor."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        positions: list[int] = []
        for feature in features:
            for position in feature.pop(_ROW_INDEX):
                if not positions or positions[-1] != position:
                    positions.append(position)
        batch = self.inner(features)
        batch[_ROW_INDEX] = torch.tensor(positions, dtype=torch.long)
        return batch


# --------------------------------------------------------------------------------------------
# Model preparation


def _resolve_base(base: Any) -> tuple[Any, Any, str, dict[str, Any]]:
    """Return (model, tokenizer, end-of-turn token, description) for a LocalModel, ModelRef or path."""
    from bridge.config import ModelRef
    from bridge.models.loading import find_end_of_turn, load_model, repair_tokenizer

    ref: ModelRef | None = None
    if isinstance(base, str | Path):
        ref = ModelRef(path=str(base))
    elif isinstance(base, ModelRef):
        ref = base
    if ref is not None:
        base = load_model(ref, padding_side="right")

    model = getattr(base, "model", None)
    tokenizer = getattr(base, "tokenizer", None)
    if model is None or tokenizer is None:
        raise TypeError(f"base must be a LocalModel, a ModelRef or a model path, not {type(base).__name__}")
    if _is_peft_model(model):
        raise ConfigError(
            "the base model already carries a LoRA adapter",
            hint="merge it first with 'bridge merge ADAPTER_DIR OUT_DIR' and train from the merged folder",
        )
    end_of_turn = getattr(base, "end_of_turn_token", None)
    if tokenizer.pad_token is None or tokenizer.pad_token in (tokenizer.eos_token, end_of_turn):
        end_of_turn = repair_tokenizer(tokenizer, model)
    end_of_turn = end_of_turn or find_end_of_turn(tokenizer)
    # padding_side stays as the caller set it, such as left for generation in a dev metric,
    # because trl's collator pads training batches on the right regardless of the tokenizer.

    source_path = Path(getattr(base, "path", None) or model.config._name_or_path or "")
    description = {
        "name": str(getattr(base, "name", None) or source_path),
        "path": str(source_path),
        "keep_layers": list(ref.keep_layers) if ref is not None and ref.keep_layers is not None else None,
        "num_hidden_layers": int(getattr(model.config, "num_hidden_layers", 0) or 0),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
    }
    return model, tokenizer, end_of_turn, description


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _attach_lora(model: Any, config: TrainingConfig) -> tuple[Any, dict[str, Any]]:
    """Wrap ``model`` with LoRA adapters on the configured modules; every target must exist."""
    import torch
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    leaf_names: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            leaf_names[leaf] = leaf_names.get(leaf, 0) + 1
    missing = [target for target in lora.target_modules if target not in leaf_names]
    if missing:
        raise ConfigError(
            f"LoRA target module(s) {missing} match no linear layer of {type(model).__name__}",
            hint=f"set lora.target_modules to names among: {', '.join(sorted(leaf_names))}",
        )
    peft_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 reads model.is_gradient_checkpointing, which transformers 5.25 deprecates.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, peft_config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    details = {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
        "adapted_layers": {target: leaf_names[target] for target in lora.target_modules},
        "trainable_parameters": trainable,
    }
    return peft_model, details


# --------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """Return the newest complete checkpoint folder, deleting newer ones that a kill cut short."""
    latest = None
    for _step, path in _checkpoint_steps(checkpoints):
        if (path / CHECKPOINT_MARKER).is_file():
            latest = path
        elif is_main_process():
            log.warning("removing checkpoint %s: it was not completely written (no %s)", path, CHECKPOINT_MARKER)
            shutil.rmtree(path)
    return latest


def _check_resume_config(checkpoint: Path, trajectory: dict[str, Any]) -> None:
    stored = read_json(checkpoint / CHECKPOINT_MARKER).get("trajectory", {})
    changed = sorted(key for key in set(stored) | set(trajectory) if stored.get(key) != trajectory.get(key))
    if changed:
        details = "; ".join(f"{key}: {stored.get(key)!r} -> {trajectory.get(key)!r}" for key in changed)
        raise TrainingError(
            f"checkpoint {checkpoint} was written with a different training setup ({details})",
            hint=f"restore the previous settings and data to resume, or delete {checkpoint.parent} to start over",
        )


def _unsafe_checkpoint_error(checkpoint: Path) -> TrainingError:
    """Build the error for a checkpoint whose state files ``torch.load(weights_only=True)`` rejects."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    rejected = []
    for path in sorted(checkpoint.iterdir()):
        if path.suffix not in (".pt", ".pth", ".bin") or path.name == "training_args.bin":
            continue  # the Trainer never loads training_args.bin when it resumes
        try:
            # The same allowlist as the Trainer's: the RNG state holds numpy arrays.
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # any failure marks the file as one the Trainer cannot load
            rejected.append(path.name)
    return TrainingError(
        f"checkpoint {checkpoint}: {', '.join(rejected) or 'a state file'} contains pickled objects other than "
        "tensors, which bridge does not load because unpickling can run arbitrary code",
        hint=f"bridge writes only tensors there, so treat the run directory as tampered with; delete {checkpoint} "
        f"to resume from an earlier checkpoint, or {checkpoint.parent} to start over",
    )


def _truncate_sample_order(path: Path, last_step: int) -> None:
    """Drop the sample-order lines of steps after ``last_step``, which a resumed run repeats."""
    if not path.exists():
        return
    earlier = [row for row in read_rows(path) if row["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in earlier))


def _save_folder(model: Any, tokenizer: Any, folder: Path, extra: dict[str, Any] | None = None) -> Path:
    """Save weights (safetensors) and tokenizer into ``folder`` atomically through a staging folder."""
    ensure_dir(folder.parent)
    with storage_errors(folder, "save the model to"):
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            model.save_pretrained(staging, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            for name, payload in (extra or {}).items():
                atomic_write_json(staging / name, payload)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return folder


def _load_weights(model: Any, folder: Path, *, lora: bool) -> None:
    """Load weights saved by :func:`_save_folder` into ``model`` in place."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TrainingError(f"no safetensors weights in {folder}", hint=f"delete {folder.parent} and train again")
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(file))
    if lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = list(result.unexpected_keys)
        missing: list[str] = []
    else:
        result = model.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
        tied = _tied_parameter_names(model)
        missing = [key for key in result.missing_keys if key not in tied]
    if unexpected or missing:
        raise TrainingError(
            f"weights in {folder} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
            hint=f"delete {folder.parent} and train again",
        )


def _tied_parameter_names(model: Any) -> set[str]:
    """Names of parameters that share storage with an earlier parameter (saved once)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        else:
            seen[id(parameter)] = name
    return tied


# --------------------------------------------------------------------------------------------
# Trainer and callbacks


def _make_trainer_class() -> type:
    """Return an ``SFTTrainer`` subclass that records row order and adds the dev callback metric.

    Built in a function so that importing this module does not import trl.
    """
    from trl import SFTTrainer

    class BridgeSFTTrainer(SFTTrainer):
        def __init__(
            self,
            *args: Any,
            recorder: _SampleRecorder,
            dev_metric: Callable | None,
            row_weights: Any = None,
            **kwargs: Any,
        ):
            self._recorder = recorder
            self._dev_metric = dev_metric
            self._row_weights = row_weights
            if row_weights is not None:
                # The weighted loss is a per-micro-batch mean, so the Trainer divides it by the
                # gradient accumulation steps itself.
                self.loss_is_scaled_for_ga = False
            super().__init__(*args, **kwargs)
            if row_weights is not None and self.args.packing:
                raise ConfigError(
                    "row weights apply to whole rows, which packing merges",
                    hint="set packing: false in the training settings",
                )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self._row_weights is not None and model.training and not return_outputs and _ROW_INDEX in inputs:
                return self._weighted_loss(model, inputs)
            positions = inputs.pop(_ROW_INDEX, None)
            if positions is not None and self.model.training:
                # Under DDP each process gets one slice of the global batch, so rank 0 records every slice.
                for part in gather_objects(positions.tolist()):
                    self._recorder.add(part)
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        def _weighted_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
            """Return 2 * sum(weight * mean token loss of the row) / rows for one micro-batch."""
            inputs = dict(inputs)
            positions = inputs.pop(_ROW_INDEX)
            for part in gather_objects(positions.tolist()):
                self._recorder.add(part)
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            per_row = (-outputs.log_probs).sum(-1) / outputs.label_mask.sum(-1).clamp(min=1)
            weights = self._row_weights[positions.cpu()].to(per_row.device, per_row.dtype)
            return 2 * (weights * per_row).sum() / len(per_row)

        def evaluation_loop(self, *args: Any, **kwargs: Any):
            output = super().evaluation_loop(*args, **kwargs)
            if self._dev_metric is not None:
                import torch

                prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
                self.model.eval()
                with torch.no_grad():
                    value = float(self._dev_metric(self.model, self.processing_class))
                output.metrics[f"{prefix}_dev_metric"] = value
            return output

    return BridgeSFTTrainer


class _SampleRecorder:
    """Collect the rows of each micro-batch and append them per optimizer step to a JSONL file."""

    def __init__(self, path: Path, row_ids: list[str]) -> None:
        self.path = path
        self.row_ids = row_ids
        self.pending: list[str] = []
        self.writer: RowWriter | None = None

    def add(self, positions: list[int]) -> None:
        self.pending.extend(self.row_ids[p] for p in positions)

    def flush(self, step: int) -> None:
        if not is_main_process():
            self.pending = []
            return
        if self.writer is None:
            self.writer = RowWriter(self.path)
        self.writer.append({"step": step, "rows": self.pending})
        self.pending = []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _make_callbacks(
    *,
    recorder: _SampleRecorder,
    out_dir: Path,
    resolved: dict[str, Any],
    trajectory: dict[str, Any],
    method: str,
    greater_is_better: bool,
    patience: int | None,
    prior_seconds: float,
) -> list[Any]:
    """Build the callbacks that record, check, checkpoint and report the run."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    metric_key = DEV_METRIC_KEY if greater_is_better else "eval_loss"
    started = time.perf_counter()

    class StepRecorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            recorder.flush(state.global_step)

    class FiniteCheck(TrainerCallback):
        """Stop at a non-finite loss; on the first two optimizer steps also at a zero gradient."""

        def __init__(self) -> None:
            self.checked = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            for key in ("loss", "grad_norm", "eval_loss"):
                value = logs.get(key)
                if value is not None and not math.isfinite(value):
                    raise TrainingError(
                        f"{key} is {value} at optimizer step {state.global_step} "
                        f"(learning rate {logs.get('learning_rate', 'n/a')})",
                        hint="lower training.learning_rate or check the rows; then delete "
                        f"{out_dir} or rerun to resume from the last good checkpoint",
                    )
            if "loss" in logs and self.checked < 2:
                self.checked += 1
                if logs.get("grad_norm") == 0:
                    raise TrainingError(
                        f"the gradient is zero at optimizer step {state.global_step}: no weight would change",
                        hint="check that the rows have trained tokens and the model has trainable weights",
                    )
                if self.checked == 2:
                    log.info(
                        "two-step check passed: finite loss and non-zero gradient norm up to step %d (loss %.4f)",
                        state.global_step,
                        logs["loss"],
                    )

    class BestAndCheckpoints(TrainerCallback):
        """Keep the best dev weights, stop early, and mark each checkpoint complete."""

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            metrics = metrics or {}
            value = metrics.get(metric_key)
            if value is None:
                return
            log.info(
                "dev evaluation at step %d: %s",
                state.global_step,
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("eval_loss", DEV_METRIC_KEY)),
            )
            best_step, _best, bad = _best_eval(state.log_history, metric_key, greater_is_better)
            if best_step == state.global_step and is_main_process():
                _save_folder(model, None, out_dir / BEST_DIR / f"step-{state.global_step}")
            if patience is not None and bad >= patience:
                log.info("early stopping at step %d: %d evaluations without improvement", state.global_step, bad)
                control.should_training_stop = True
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            # Every process writes its own RNG state into the checkpoint before it is marked complete.
            barrier()
            if not is_main_process():
                return
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            best_step, _best, _bad = _best_eval(state.log_history, metric_key, greater_is_better)
            _prune_best(out_dir / BEST_DIR, keep=best_step, after=state.global_step)
            atomic_write_json(
                checkpoint / CHECKPOINT_MARKER,
                {
                    "global_step": state.global_step,
                    "train_seconds": prior_seconds + time.perf_counter() - started,
                    "trajectory": trajectory,
                    "resolved": resolved,
                },
            )

    class Progress(TrainerCallback):
        """tqdm bar over optimizer steps with loss and tokens/s; an info log every 5 % of the run."""

        def __init__(self) -> None:
            self.bar: Any = None
            self.start_step = 0
            self.start_tokens = 0
            self.start_time = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = state.global_step
            self.start_tokens = state.num_input_tokens_seen
            self.start_time = time.perf_counter()
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc=f"fine-tuning ({method})",
                unit="step",
                disable=not is_main_process(),
            )

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            elapsed = max(time.perf_counter() - self.start_time, 1e-9)
            tokens_per_s = (state.num_input_tokens_seen - self.start_tokens) / elapsed
            if self.bar is not None:
                self.bar.set_postfix({"loss": f"{logs['loss']:.4f}", "tok/s": f"{tokens_per_s:.0f}"}, refresh=False)
            every = max(1, state.max_steps // 20)
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                done = max(state.global_step - self.start_step, 1)
                log.info(
                    "step %d/%d: loss %.4f, %.0f tokens/s, about %.0f s left",
                    state.global_step,
                    state.max_steps,
                    logs["loss"],
                    tokens_per_s,
                    (state.max_steps - state.global_step) * elapsed / done,
                )

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return [StepRecorder(), FiniteCheck(), BestAndCheckpoints(), Progress()]


def _best_eval(history: list[dict[str, Any]], key: str, greater_is_better: bool) -> tuple[int | None, float | None, int]:
    """Return (best step, best value, evaluations since the best) from the Trainer's log history."""
    best_step = None
    best = None
    since = 0
    for entry in history:
        if key not in entry:
            continue
        value = entry[key]
        better = best is None or (value > best if greater_is_better else value < best)
        if better:
            best, best_step, since = value, entry["step"], 0
        else:
            since += 1
    return best_step, best, since


def _prune_best(folder: Path, *, keep: int | None, after: int) -> None:
    """Delete saved best weights other than step ``keep``, except those newer than step ``after``."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _BEST_RE.match(path.name)
        if match is None:
            continue
        step = int(match.group(1))
        if step != keep and step <= after:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Entry point


@dataclass
class _Prepared:
    """Tokenised data, the model ready to train, and the run's resolved configuration."""

    model: Any
    tokenizer: Any
    train_examples: list[TrainExample]
    dev_examples: list[TrainExample]
    train_dataset: Any
    dev_dataset: Any
    total_steps: int
    trajectory: dict[str, Any]  # what must match for a checkpoint to be resumed
    resolved: dict[str, Any]  # everything logged first and saved with each checkpoint


def train_sft(
    rows: Sequence[dict[str, Any]],
    *,
    base: LocalModel | ModelRef | str | Path,
    config: TrainingConfig,
    out_dir: Path,
    dev_rows: Sequence[dict[str, Any]] | None = None,
    dev_metric: Callable[[Any, Any], float] | None = None,
    max_steps: int | None = None,
    callbacks: Sequence[Any] = (),
    row_weights: Sequence[float] | None = None,
) -> TrainResult:
    """Fine-tune ``base`` on chat rows with the loss on the final assistant message only.

    ``rows`` and ``dev_rows`` are dicts ``{"id", "messages"}`` in OpenAI messages form whose
    last message is the assistant reply to learn. ``base`` is a loaded model (trained in
    place: LoRA layers are injected into it, or all its weights change), a ``ModelRef`` or a
    model path. ``dev_metric(model, tokenizer)`` returns a score where higher is better, such as
    dev accuracy. The best weights are chosen by that score when it is given, else by dev loss.
    ``max_steps`` caps the optimizer steps (the schedule then spans ``max_steps``).
    ``callbacks`` are extra transformers ``TrainerCallback`` objects. ``row_weights``, one per
    row in the order of ``rows``, turns the training loss into ``2 * sum(weight * mean token loss
    of the row) / rows`` per micro-batch (used by step-by-step distillation; packing must be off);
    the dev loss stays unweighted.

    The run resumes from the newest complete checkpoint in ``out_dir/checkpoints`` and raises
    :class:`TrainingError` when that checkpoint was written with a different setup. A run whose
    ``metrics.json`` shows it finished with the same setup is not repeated: its weights are
    loaded into the model and its result returned.
    """
    out_dir = ensure_dir(Path(out_dir))
    if row_weights is not None and len(row_weights) != len(rows):
        raise ValueError(f"got {len(row_weights)} row weights for {len(rows)} rows; expected one weight per row")
    prepared = _prepare(rows, base, config, dev_rows, dev_metric, max_steps)
    if row_weights is not None:
        # Different weights make a different run, so a checkpoint written with others is not resumed.
        prepared.trajectory["row_weights"] = fingerprint([float(w) for w in row_weights])
    lora = config.method == "lora"
    output_dir = out_dir / (ADAPTER_DIR if lora else MODEL_DIR)
    log.info("training configuration: %s", json.dumps(prepared.resolved, sort_keys=True))

    finished = read_json(out_dir / METRICS_FILE) if (out_dir / METRICS_FILE).is_file() else None
    if finished is not None and finished.get("trajectory") == prepared.trajectory and output_dir.is_dir():
        log.info("fine-tuning in %s already finished with this setup; loading %s", out_dir, output_dir)
        _load_weights(prepared.model, output_dir, lora=lora)
        if is_main_process():
            _remove_intermediates(out_dir)
        prepared.model.eval()
        return TrainResult(output_dir, config.method, out_dir / METRICS_FILE, finished, prepared.model, prepared.tokenizer)
    if is_main_process():
        atomic_write_json(out_dir / CONFIG_FILE, prepared.resolved)

    checkpoints = out_dir / CHECKPOINTS_DIR
    resume = latest_checkpoint(checkpoints)
    prior_seconds = 0.0
    resumed_step = None
    if resume is not None:
        _check_resume_config(resume, prepared.trajectory)
        marker = read_json(resume / CHECKPOINT_MARKER)
        resumed_step = int(marker["global_step"])
        prior_seconds = float(marker.get("train_seconds", 0.0))
        log.info("resuming from %s (optimizer step %d of %d)", resume, resumed_step, prepared.total_steps)
    if is_main_process():
        _truncate_sample_order(out_dir / SAMPLE_ORDER_FILE, resumed_step or 0)

    recorder = _SampleRecorder(out_dir / SAMPLE_ORDER_FILE, [e.id for e in prepared.train_examples])
    greater_is_better = dev_metric is not None
    trainer = _build_trainer(
        prepared,
        args=_training_args(prepared, config, checkpoints, max_steps),
        recorder=recorder,
        dev_metric=dev_metric,
        row_weights=row_weights,
        callbacks=[
            *_make_callbacks(
                recorder=recorder,
                out_dir=out_dir,
                resolved=prepared.resolved,
                trajectory=prepared.trajectory,
                method=config.method,
                greater_is_better=greater_is_better,
                patience=config.early_stopping_patience,
                prior_seconds=prior_seconds,
            ),
            *callbacks,
        ],
    )

    started = time.perf_counter()
    try:
        # A checkpoint cut short by a full disk has no marker, so the next run resumes from the one before.
        with storage_errors(checkpoints, "write a checkpoint in"):
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except pickle.UnpicklingError:
        # The Trainer loads optimizer, scheduler and RNG state with torch.load(weights_only=True),
        # which rejects pickled objects other than tensors and containers without running them.
        if resume is None:
            raise
        raise _unsafe_checkpoint_error(resume) from None
    finally:
        recorder.close()
    # The other processes read rank 0's sample order and best weights below.
    barrier()
    state = trainer.state
    train_seconds = prior_seconds + time.perf_counter() - started

    metric_key = DEV_METRIC_KEY if greater_is_better else "eval_loss"
    best_step, best_value, _ = _best_eval(state.log_history, metric_key, greater_is_better)
    trained_model = trainer.model
    if best_step is not None and best_step != state.global_step:
        best_folder = out_dir / BEST_DIR / f"step-{best_step}"
        if not best_folder.is_dir():
            raise TrainingError(
                f"the weights of the best dev evaluation (step {best_step}) are missing from {best_folder}",
                hint=f"delete {out_dir} and train again",
            )
        log.info("loading the best dev weights from step %d (%s %.4f)", best_step, metric_key, best_value)
        _load_weights(trained_model, best_folder, lora=lora)
    if is_main_process():
        _save_folder(
            trained_model, prepared.tokenizer, output_dir, {BASE_FILE: prepared.resolved["base"]} if lora else None
        )

    metrics = _summarise(
        state.log_history,
        sample_order=out_dir / SAMPLE_ORDER_FILE,
        examples=prepared.train_examples,
        global_step=state.global_step,
        total_steps=prepared.total_steps,
        best=(best_step, best_value, metric_key),
        resumed_step=resumed_step,
        train_seconds=train_seconds,
    )
    metrics.update(
        method=config.method,
        output_dir=str(output_dir),
        tokens_seen=state.num_input_tokens_seen,
        trajectory=prepared.trajectory,
    )
    if is_main_process():
        atomic_write_json(out_dir / METRICS_FILE, metrics)
    # Rank 0 deletes the best weights only after every process has loaded them.
    barrier()
    if is_main_process():
        _remove_intermediates(out_dir)
    log.info(
        "fine-tuning finished: %d optimizer steps, %d tokens in %.0f s; %s written to %s",
        state.global_step,
        metrics["tokens"],
        train_seconds,
        "adapter" if lora else "model",
        output_dir,
    )
    trained_model.eval()
    return TrainResult(output_dir, config.method, out_dir / METRICS_FILE, metrics, trained_model, prepared.tokenizer)


def _prepare(
    rows: Sequence[dict[str, Any]],
    base: Any,
    config: TrainingConfig,
    dev_rows: Sequence[dict[str, Any]] | None,
    dev_metric: Callable | None,
    max_steps: int | None,
) -> _Prepared:
    """Load the base, tokenise and check the rows, attach LoRA, and resolve the configuration."""
    from transformers import set_seed

    model, tokenizer, end_of_turn, base_info = _resolve_base(base)
    train_examples = tokenize_rows(rows, tokenizer, end_of_turn=end_of_turn, max_seq_len=config.max_seq_len)
    dev_examples = (
        tokenize_rows(dev_rows, tokenizer, end_of_turn=end_of_turn, max_seq_len=config.max_seq_len, split="dev")
        if dev_rows
        else []
    )
    if dev_metric is not None and not dev_examples:
        raise ConfigError("dev_metric was given without dev rows", hint="pass dev_rows, or drop dev_metric")
    counts = Counter(e.id for e in train_examples)
    duplicates = sorted(row_id for row_id, count in counts.items() if count > 1)
    if duplicates:
        raise DataError(f"training row ids repeat: {_show(duplicates)}", hint="give every row a unique 'id'")

    train_dataset = _to_dataset(train_examples, pack_length=config.max_seq_len if config.packing else None)
    dev_dataset = _to_dataset(dev_examples, pack_length=None) if dev_examples else None

    # LoRA's A matrices are drawn from torch's generator, so it is seeded first.
    set_seed(config.seed)
    lora_info = None
    if config.method == "lora":
        model, lora_info = _attach_lora(model, config)

    # The same step count as transformers' Trainer.set_initial_training_values. Under DDP,
    # accelerate deals each process every world_size-th batch, padding the last round.
    sequences = len(train_dataset)
    processes = world_size()
    batches_per_process = math.ceil(math.ceil(sequences / config.batch_size) / processes)
    steps_per_epoch = max(math.ceil(batches_per_process / config.grad_accum), 1)
    total_steps = max_steps if max_steps else math.ceil(config.epochs * steps_per_epoch)
    trajectory = {
        "training": config.model_dump(mode="json", exclude={"save_every"}),
        "max_steps": max_steps,
        "world_size": processes,
        "base": {k: base_info[k] for k in ("name", "keep_layers", "num_hidden_layers", "parameters", "dtype")},
        "data": _data_fingerprint(train_examples),
        "dev_data": _data_fingerprint(dev_examples) if dev_examples else None,
        "dev_metric": dev_metric is not None,
    }
    best_by = None
    if dev_metric is not None:
        best_by = "dev_metric"
    elif dev_examples:
        best_by = "dev_loss"
    resolved = {
        "method": config.method,
        "base": base_info,
        "training": config.model_dump(mode="json"),
        "lora": lora_info,
        "rows": len(train_examples),
        "dev_rows": len(dev_examples),
        "sequences": sequences,
        "tokens": sum(len(e.input_ids) for e in train_examples),
        "trained_tokens": sum(e.trained_tokens for e in train_examples),
        "longest_row_tokens": max(len(e.input_ids) for e in train_examples),
        "rows_per_optimizer_step": config.batch_size * config.grad_accum * processes,
        "world_size": processes,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "end_of_turn": end_of_turn,
        "pad_token": tokenizer.pad_token,
        "best_by": best_by,
        "versions": package_versions(),
    }
    return _Prepared(
        model, tokenizer, train_examples, dev_examples, train_dataset, dev_dataset, total_steps, trajectory, resolved
    )


def _training_args(prepared: _Prepared, config: TrainingConfig, checkpoints: Path, max_steps: int | None) -> Any:
    import torch
    from trl import SFTConfig

    parameter = next(prepared.model.parameters())
    eval_strategy = "no"
    if prepared.dev_examples:
        eval_strategy = "steps" if config.eval_every else "epoch"
    return SFTConfig(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=max_steps or -1,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # a value below 1 is a fraction of all optimizer steps
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must reach FiniteCheck, not be averaged away
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=2,
        eval_strategy=eval_strategy,
        eval_steps=config.eval_every,
        seed=config.seed,
        data_seed=config.seed,
        bf16=parameter.dtype == torch.bfloat16,
        fp16=False,
        use_cpu=parameter.device.type == "cpu",
        activation_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,  # the collator needs the row_index column
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        max_length=config.max_seq_len,
        packing=config.packing,
        packing_strategy="bfd",
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenised, labelled and packed here
    )


def _build_trainer(
    prepared: _Prepared,
    *,
    args: Any,
    recorder: _SampleRecorder,
    dev_metric: Callable | None,
    callbacks: list[Any],
    row_weights: Sequence[float] | None = None,
) -> Any:
    import torch
    from transformers import PrinterCallback, ProgressCallback
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trainer = _make_trainer_class()(
        model=prepared.model,
        args=args,
        train_dataset=prepared.train_dataset,
        eval_dataset=prepared.dev_dataset,
        processing_class=prepared.tokenizer,
        recorder=recorder,
        dev_metric=dev_metric,
        row_weights=None if row_weights is None else torch.tensor(list(row_weights), dtype=torch.float32),
        callbacks=callbacks,
    )
    # The Progress callback replaces these; PrinterCallback would print every log line.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    # SFTTrainer rejects a custom collator in padding-free mode, so its own one is wrapped afterwards.
    if not isinstance(trainer.data_collator, DataCollatorForLanguageModeling):
        raise TrainingError(f"unexpected collator {type(trainer.data_collator).__name__} from trl's SFTTrainer")
    trainer.data_collator = _RowIndexCollator(trainer.data_collator)
    return trainer


def _remove_intermediates(out_dir: Path) -> None:
    """Delete checkpoints and saved best weights once the result and metrics.json are written."""
    for name in (CHECKPOINTS_DIR, BEST_DIR):
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name, ignore_errors=True)


def _summarise(
    history: list[dict[str, Any]],
    *,
    sample_order: Path,
    examples: Sequence[TrainExample],
    global_step: int,
    total_steps: int,
    best: tuple[int | None, float | None, str],
    resumed_step: int | None,
    train_seconds: float,
) -> dict[str, Any]:
    """Collect the loss curve, dev evaluations and token counts into the metrics file's content."""
    by_id = {e.id: e for e in examples}
    steps = list(read_rows(sample_order))
    tokens = sum(len(by_id[row].input_ids) for entry in steps for row in entry["rows"])
    trained = sum(by_id[row].trained_tokens for entry in steps for row in entry["rows"])
    loss_curve = [
        {"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"), "grad_norm": e.get("grad_norm")}
        for e in history
        if "loss" in e
    ]
    evaluations = [
        {"step": e["step"], "dev_loss": e.get("eval_loss"), "dev_metric": e.get(DEV_METRIC_KEY)}
        for e in history
        if "eval_loss" in e
    ]
    best_step, best_value, best_key = best
    return {
        "global_step": global_step,
        "planned_steps": total_steps,
        "stopped_early": global_step < total_steps,
        "rows_trained": sum(len(entry["rows"]) for entry in steps),
        "tokens": tokens,
        "trained_tokens": trained,
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
        "loss_curve": loss_curve,
        "dev_evaluations": evaluations,
        "best_step": best_step,
        "best": {best_key: best_value} if best_step is not None else None,
        "resumed_from_step": resumed_step,
    }
