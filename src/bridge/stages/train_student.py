"""Student curriculum: train the student stage by stage, each stage from the previous one's weights.

The stages come from ``student.stages`` in order (:mod:`bridge.curriculum` builds their rows and
losses); ``student.curriculum: false`` runs only the first rationales stage. The first stage
starts from ``models.student``. After each stage the student is evaluated on the dev split by
generation, as deployed, and for closed formats also by option scoring.

Outputs in ``train_student/``:

* ``<stage name>/``: the fine-tuning output (``model/`` or ``adapter/``, ``metrics.json``,
  ``sample_order.jsonl``), ``dev_predictions.jsonl`` and ``dev.json`` (dev accuracy by generation, with
  the option-scoring result under ``scoring`` for closed formats);
* ``model/``: the final student as a Hugging Face folder;
* ``summary.json``: every stage in order.

A stage folder whose inputs or settings changed is cleared before its stage trains again. In a
comparison, a stage whose key another run has finished is copied from that run, not trained again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from bridge.curriculum import (
    StageData,
    active_stages,
    build_stage_data,
    label_rows,
    prepare_stage_dir,
    save_final_model,
    shares_tokenizer,
    train_stage,
)
from bridge.errors import ConfigError
from bridge.predict import (
    accuracy_metric,
    as_local_model,
    predict_generation,
    predict_scoring,
    summarise,
)
from bridge.rundir import atomic_write_json, fingerprint, read_rows
from bridge.stages.common import difficulty_by_id, require_file, teacher_rows

log = logging.getLogger(__name__)

FINAL_MODEL_DIR = "model"
#: Kind under which a finished curriculum stage folder is shared between the runs of a comparison.
STAGE_KIND = "student_stage"


def run(ctx: Any) -> dict[str, Any]:
    cfg = ctx.config
    data = ctx.data
    out = ctx.stage_dir("train_student")
    stages = active_stages(cfg.student)
    root = ctx.run.root

    tutor_rows = None
    if any(stage.data in ("rationales", "distill") for stage in stages):
        tutor_rows = list(read_rows(require_file(root / "tutor" / "rows.jsonl", "tutor")))
    bought = teacher_rows(root) if any(stage.data == "teacher_rationales" for stage in stages) else None
    difficulty = difficulty_by_id(root) if any(stage.order == "easy_to_hard" for stage in stages) else None

    ta = None
    if any(stage.loss == "gkd" for stage in stages):
        ta = ctx.refined_ta()
    else:
        ctx.models.pop("ta_refined", None)
    lm = ctx.student_model()
    ctx.models.pop("student", None)  # trained in place below, so it is no longer the untrained student
    if ta is not None and not shares_tokenizer(ta.tokenizer, lm.tokenizer):
        raise ConfigError(
            "a gkd stage is configured, but the TA and the student do not share a tokenizer",
            hint="derive the student from the TA (models.student.keep_layers on the TA's path) or remove the gkd stage",
        )

    previous = fingerprint(cfg.models.student.model_dump(mode="json"))
    summaries = []
    reused_seconds = 0.0
    for stage in stages:
        stage_data = build_stage_data(
            stage,
            examples=data.train,
            task=data.task,
            prompts=cfg.prompts,
            tokenizer=lm.tokenizer,
            tutor_rows=tutor_rows,
            teacher_rows=bought,
            difficulty=difficulty,
            seed=cfg.seed,
            skip_invalid=cfg.data.skip_invalid,
        )
        key = fingerprint(
            previous,
            stage.model_dump(mode="json"),
            cfg.student.training.model_dump(mode="json"),
            cfg.evaluation.model_dump(mode="json"),
            stage_data.fingerprint(),
        )
        reused = ctx.reuse(STAGE_KIND, key)
        if reused is not None:
            reused_seconds += reused
            log.info("student stage %s: reusing the stage trained with the same key in another run", stage.name)
        folder = prepare_stage_dir(out / stage.name, key)
        log.info("student stage %s: %d rows of %s, loss %s, order %s", stage.name, len(stage_data.rows), stage.data, stage.loss, stage.order)
        started = time.monotonic()

        dev_rows, metric = _model_choice(ctx, stage, stage_data, lm.tokenizer)
        result = train_stage(
            stage,
            stage_data,
            base=lm,
            training=cfg.student.training,
            out_dir=folder,
            teacher=ta,
            dev_rows=dev_rows,
            dev_metric=metric,
            max_new_tokens=cfg.tutoring.max_new_tokens,  # longest completion a gkd stage samples
        )
        model = result.model.merge_and_unload() if hasattr(result.model, "merge_and_unload") else result.model
        lm = as_local_model(model, result.tokenizer)

        predictions = predict_generation(
            lm,
            data.dev,
            data.task,
            cfg.prompts,
            max_new_tokens=cfg.evaluation.max_new_tokens,
            batch_size=cfg.evaluation.batch_size,
            skip_invalid=cfg.data.skip_invalid,
            rows_path=folder / "dev_predictions.jsonl",
        )
        scores = summarise(predictions, data.task).as_dict()
        if data.task.is_closed:
            scored = predict_scoring(
                lm, data.dev, data.task, cfg.prompts,
                batch_size=cfg.evaluation.batch_size, skip_invalid=cfg.data.skip_invalid,
            )
            scores["scoring"] = summarise(scored, data.task).as_dict()
        atomic_write_json(folder / "dev.json", scores)
        log.info(
            "student dev accuracy after stage %s: %.3f by generation%s",
            stage.name,
            scores["accuracy"],
            f", {scores['scoring']['accuracy']:.3f} by option scoring" if "scoring" in scores else "",
        )
        seconds = reused if reused is not None else time.monotonic() - started
        ctx.publish(STAGE_KIND, key, [folder], seconds)
        summaries.append(
            {
                "name": stage.name,
                "data": stage.data,
                "loss": stage.loss,
                "order": stage.order,
                "rows": stage_data.counts,
                "optimizer_steps": result.global_step,
                "output_dir": str(result.output_dir),
                "dev": scores,
                "seconds": round(seconds, 1),
            }
        )
        previous = key

    final = save_final_model(lm.model, lm.tokenizer, out / FINAL_MODEL_DIR)
    ctx.models["student_trained"] = lm
    summary = {
        "curriculum": cfg.student.curriculum,
        "stages": summaries,
        "final_model": str(final),
        "dev_accuracy": summaries[-1]["dev"]["accuracy"],
    }
    if reused_seconds:
        summary["reused_seconds"] = round(reused_seconds, 1)
    return summary


def _model_choice(ctx: Any, stage: Any, stage_data: StageData, tokenizer: Any) -> tuple[Any, Any]:
    """Return dev rows and the dev accuracy metric when the training settings evaluate during training."""
    cfg = ctx.config
    training = cfg.student.training
    if stage.loss == "gkd" or (training.early_stopping_patience is None and training.eval_every is None):
        return None, None
    data = ctx.data
    metric = accuracy_metric(
        data.dev, data.task, cfg.prompts, max_new_tokens=cfg.evaluation.max_new_tokens, batch_size=cfg.evaluation.batch_size
    )
    # The dev loss is logged on answer-only gold targets.
    rows = label_rows(data.dev, data.task, cfg.prompts, tokenizer, skip_invalid=cfg.data.skip_invalid)
    return [{"id": r["id"], "messages": r["messages"]} for r in rows], metric
