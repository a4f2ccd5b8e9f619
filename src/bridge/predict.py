"""Predictions of a local model on examples: generation as deployed, and option scoring.

Both paths render prompts without a hint (the leakage guard), read answers with the shared
extractor and grade them with the shared comparison, so every stage reports the same numbers.
Rows are joined by example id and carry the prompt hash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from bridge.answers import UNPARSABLE, extract_for, is_correct_for
from bridge.config import PromptConfig
from bridge.data.types import Example, TaskSpec
from bridge.metrics import Scores, score_predictions
from bridge.prompts import (
    option_continuations,
    option_labels,
    prompt_hash,
    render_all,
    render_text,
    require_unconditioned,
    scoring_prompt,
)
from bridge.rundir import RowWriter, read_rows

log = logging.getLogger(__name__)

PredictionMode = Literal["generation", "scoring"]


def _render(
    lm: Any,
    examples: Sequence[Example],
    task: TaskSpec,
    prompts: PromptConfig,
    style: Literal["rationale", "answer_only"],
    demos: Sequence[Example],
    skip_invalid: bool,
) -> tuple[list[Any], list[str]]:
    rendered, skipped = render_all(
        examples,
        task,
        style=style,
        demos=demos,
        system=prompts.system,
        tokenizer=lm.tokenizer,
        max_context_tokens=prompts.max_context_tokens,
        truncation_side=prompts.truncation_side,
        skip_invalid=skip_invalid,
    )
    return [require_unconditioned(r) for r in rendered], skipped


def predict_generation(
    lm: Any,
    examples: Sequence[Example],
    task: TaskSpec,
    prompts: PromptConfig,
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    demos: Sequence[Example] = (),
    skip_invalid: bool = False,
    rows_path: Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate a rationale and answer line for each example and grade it.

    With ``rows_path`` each finished batch is appended to that JSONL file, and rows already in it
    (same id and prompt hash) are reused, so an interrupted prediction resumes.
    """
    from bridge.models.inference import GenerationRequest, generate

    rendered, skipped = _render(lm, examples, task, prompts, "rationale", demos, skip_invalid)
    by_id = {e.id: e for e in examples}
    texts = {r.example_id: render_text(r, lm.tokenizer) for r in rendered}
    requests = [GenerationRequest(id=i, prompt=t) for i, t in texts.items()]
    done = _stored(rows_path, texts)

    def to_row(generation: Any) -> dict[str, Any]:
        example = by_id[generation.id]
        pred = extract_for(generation.text, task, example)
        return {
            "id": generation.id,
            "prompt_hash": generation.prompt_hash,
            "mode": "generation",
            "text": generation.text,
            "pred": pred,
            "gold": example.gold,
            "correct": is_correct_for(pred, task, example),
            "finish_reason": generation.finish_reason,
            "completion_tokens": generation.completion_tokens,
        }

    writer = RowWriter(rows_path) if rows_path is not None else None
    try:
        def store(batch: list[Any]) -> None:
            for generation in batch:
                row = to_row(generation)
                done[row["id"]] = row
                if writer is not None:
                    writer.append(row)

        generate(
            lm,
            requests,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            skip_ids=set(done),
            on_batch=store,
            progress=progress,
        )
    finally:
        if writer is not None:
            writer.close()
    rows = [done[i] for i in texts]
    rows += [_skipped_row(by_id[i], "generation") for i in skipped]
    return rows


def predict_scoring(
    lm: Any,
    examples: Sequence[Example],
    task: TaskSpec,
    prompts: PromptConfig,
    *,
    batch_size: int = 8,
    demos: Sequence[Example] = (),
    skip_invalid: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Predict each example's answer as the option with the highest log-probability."""
    from bridge.models.inference import score_options

    if not task.is_closed:
        raise ValueError(f"option scoring needs a closed task format, not {task.format}")
    rendered, skipped = _render(lm, examples, task, prompts, "answer_only", demos, skip_invalid)
    by_id = {e.id: e for e in examples}
    texts = [scoring_prompt(r, lm.tokenizer) for r in rendered]
    chosen = [by_id[r.example_id] for r in rendered]
    scores = score_options(
        lm,
        texts,
        [option_continuations(task, e) for e in chosen],
        batch_size=batch_size,
        progress=progress,
    )
    rows = []
    for example, text, score in zip(chosen, texts, scores, strict=True):
        labels = option_labels(task, example)
        pred = labels[score.predicted]
        rows.append(
            {
                "id": example.id,
                "prompt_hash": prompt_hash(text),
                "mode": "scoring",
                "pred": pred,
                "gold": example.gold,
                "correct": is_correct_for(pred, task, example),
                "probs": dict(zip(labels, score.probs, strict=True)),
                "entropy": score.entropy,
                "finish_reason": "stop",
            }
        )
    rows += [_skipped_row(by_id[i], "scoring") for i in skipped]
    return rows


def _skipped_row(example: Example, mode: str) -> dict[str, Any]:
    return {
        "id": example.id,
        "prompt_hash": "",
        "mode": mode,
        "pred": UNPARSABLE,
        "gold": example.gold,
        "correct": False,
        "finish_reason": "skipped",
    }


def _stored(rows_path: Path | None, texts: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Return stored rows whose prompt hash matches the prompt rendered now."""
    if rows_path is None:
        return {}
    expected = {i: prompt_hash(t) for i, t in texts.items()}
    return {row["id"]: row for row in read_rows(rows_path) if expected.get(row["id"]) == row["prompt_hash"]}


def summarise(rows: Sequence[dict[str, Any]], task: TaskSpec) -> Scores:
    """Score prediction rows: accuracy with a Wilson interval, parse failures, truncations, per class."""
    return score_predictions(
        [r["gold"] for r in rows],
        [r["pred"] for r in rows],
        [bool(r["correct"]) for r in rows],
        labels=task.labels if task.is_closed else (),
        truncated=[r.get("finish_reason") == "length" for r in rows],
    )


def accuracy_metric(
    examples: Sequence[Example], task: TaskSpec, prompts: PromptConfig, *, max_new_tokens: int, batch_size: int
) -> Callable[[Any, Any], float]:
    """Return ``metric(model, tokenizer) -> dev accuracy`` by generation, for model choice in training."""

    def metric(model: Any, tokenizer: Any) -> float:
        rows = predict_generation(
            as_local_model(model, tokenizer),
            examples,
            task,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=False,
        )
        accuracy = summarise(rows, task).accuracy
        log.info("dev accuracy %.3f on %d examples", accuracy, len(rows))
        return accuracy

    return metric


def as_local_model(model: Any, tokenizer: Any) -> Any:
    """Wrap a model being trained (possibly a PEFT model) and its tokenizer for inference."""
    import torch

    from bridge.models.loading import LocalModel, eos_token_ids, find_end_of_turn

    parameter = next(model.parameters())
    end_of_turn = find_end_of_turn(tokenizer)
    eos_ids = eos_token_ids(tokenizer, model, end_of_turn)
    return LocalModel(
        model=model,
        tokenizer=tokenizer,
        device=parameter.device,
        dtype=parameter.dtype if parameter.is_floating_point() else torch.float32,
        name=getattr(model, "name_or_path", "model in training"),
        path=Path(getattr(model.config, "_name_or_path", ".") or "."),
        end_of_turn_token=end_of_turn,
        eos_token_ids=eos_ids,
    )
