"""Apprenticeship, part two: fine-tune the TA (LoRA by default) on the teacher's rationales.

The subset is too small to hold out from, so model choice uses the dev split. The TA's dev
accuracy (generation, as deployed) is recorded before and after. Outputs in ``train_ta/``: the
adapter or model folder, ``metrics.json`` from training, ``dev_before.jsonl`` and
``dev_after.jsonl`` predictions.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from bridge.predict import accuracy_metric, as_local_model, predict_generation, summarise
from bridge.prompts import format_target, render_messages, target_answer
from bridge.rundir import fingerprint, keyed_rows
from bridge.stages.common import by_id, teacher_rows

log = logging.getLogger(__name__)

#: Kind under which the untuned TA's dev predictions are shared between the runs of a comparison.
DEV_BEFORE_KIND = "ta_dev_before"


def chat_rows(
    ctx: Any, rows: list[dict[str, Any]], tokenizer: Any, *, target_key: str = "target", split: str = "train"
) -> list[dict[str, Any]]:
    """Turn rows with an example id and a target into chat training rows (prompt without hint)."""
    cfg = ctx.config
    examples = by_id(ctx.data.split(split))
    out = []
    for row in rows:
        rendered = render_messages(
            examples[row["id"]],
            ctx.data.task,
            style="rationale",
            system=cfg.prompts.system,
            tokenizer=tokenizer,
            max_context_tokens=cfg.prompts.max_context_tokens,
            truncation_side=cfg.prompts.truncation_side,
        )
        out.append({"id": row["id"], "messages": [*rendered.messages, {"role": "assistant", "content": row[target_key]}]})
    return out


def run(ctx: Any) -> dict[str, Any]:
    from bridge.models.training import train_sft

    cfg = ctx.config
    data = ctx.data
    out = ctx.stage_dir("train_ta")
    rows = teacher_rows(ctx.run.root)
    if not rows:
        from bridge.errors import BridgeError

        raise BridgeError(
            "the teacher stage kept no rationale, so the TA has nothing to learn from",
            hint="check teach/outcomes.jsonl for why, raise the budget, or use teacher.policy=keep_all",
        )
    lm = ctx.ta_model()
    eval_cfg = cfg.evaluation
    # The untuned TA's dev predictions are the same in every run of a comparison.
    before_key = fingerprint(
        DEV_BEFORE_KIND, cfg.data.model_dump(mode="json"), cfg.prompts.model_dump(mode="json"),
        cfg.models.ta.model_dump(mode="json"), cfg.models.ta_engine, eval_cfg.max_new_tokens,
    )
    keyed_rows(out / "dev_before.jsonl", before_key)
    reused_seconds = ctx.reuse(DEV_BEFORE_KIND, before_key)
    started = time.monotonic()
    before = predict_generation(
        lm, data.dev, data.task, cfg.prompts,
        max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size,
        rows_path=out / "dev_before.jsonl",
    )
    before_seconds = reused_seconds if reused_seconds is not None else time.monotonic() - started
    ctx.publish(DEV_BEFORE_KIND, before_key, [out / "dev_before.jsonl"], before_seconds)
    before_scores = summarise(before, data.task)
    log.info("TA dev accuracy before apprenticeship: %.3f", before_scores.accuracy)

    train = chat_rows(ctx, rows, lm.tokenizer)
    metric = dev_rows = None
    if cfg.ta_training.early_stopping_patience is not None or cfg.ta_training.eval_every is not None:
        # Model choice by dev accuracy; the dev loss is logged on answer-only gold targets.
        metric = accuracy_metric(
            data.dev, data.task, cfg.prompts, max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size
        )
        dev_rows = chat_rows(ctx, [{"id": e.id, "target": gold_target(e, data.task)} for e in data.dev], lm.tokenizer, split="dev")
    result = train_sft(train, base=lm, config=cfg.ta_training, out_dir=out, dev_rows=dev_rows, dev_metric=metric)

    # The model in memory now carries the adapter: it is the refined TA for later stages. Folding
    # the adapter into the weights (it is saved already) makes generation as fast as the base's.
    model = result.model.merge_and_unload() if hasattr(result.model, "merge_and_unload") else result.model
    refined = as_local_model(model, result.tokenizer)
    ctx.models.pop("ta", None)
    ctx.models["ta_refined"] = refined
    after_key = fingerprint("ta_dev_after", before_key, ctx.fingerprints.get("train_ta"), eval_cfg.batch_size)
    after = predict_generation(
        refined, data.dev, data.task, cfg.prompts,
        max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size,
        rows_path=keyed_rows(out / "dev_after.jsonl", after_key),
    )
    after_scores = summarise(after, data.task)
    log.info("TA dev accuracy after apprenticeship: %.3f", after_scores.accuracy)
    summary = {
        "train_rows": len(train),
        "method": cfg.ta_training.method,
        "output_dir": str(result.output_dir),
        "optimizer_steps": result.global_step,
        "dev_before": before_scores.as_dict(),
        "dev_after": after_scores.as_dict(),
    }
    if reused_seconds is not None:
        summary["reused_seconds"] = round(reused_seconds, 1)
    return summary


def gold_target(example: Any, task: Any) -> str:
    """Return the answer-only target for an example: ``Answer: <gold>``."""
    return format_target(None, target_answer(example, task))
