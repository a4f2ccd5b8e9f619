"""Phase 5: evaluate every model of the run on the test split.

Generation is the headline mode (rationale then answer line, as the student is deployed);
option scoring is reported beside it for closed formats. Rows: the majority-class baseline,
the teacher, the TA before and after apprenticeship, and the student after each curriculum
stage. The floor for gains is the label-only student (the first ``labels`` stage).

Outputs in ``eval/``: ``predictions/<model>.<mode>.jsonl`` (resumable) and ``metrics.json``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.metrics import gap_closure, majority_baseline, relative_gain
from bridge.predict import predict_generation, predict_scoring, summarise
from bridge.rundir import atomic_write_json, ensure_dir, fingerprint, keyed_rows, read_json
from bridge.stages.common import require_file, stage_summary

log = logging.getLogger(__name__)


def run(ctx: Any) -> dict[str, Any]:
    cfg = ctx.config
    data = ctx.data
    task = data.task
    out = ctx.stage_dir("eval")
    predictions = ensure_dir(out / "predictions")
    test = data.test
    modes = _modes(cfg.evaluation.mode, task.is_closed)

    results: dict[str, dict[str, Any]] = {}
    if task.is_closed:
        label, scores = majority_baseline([e.gold for e in data.train], [e.gold for e in test])
        results["majority"] = {"kind": "baseline", "note": f"always '{label}'", "generation": scores.as_dict()}
    results["teacher"] = _teacher_row(ctx)

    for name, load in _models_to_evaluate(ctx):
        lm = load()
        row: dict[str, Any] = {"kind": name.split("/")[0]}
        for mode in modes:
            path = predictions / f"{name.replace('/', '_')}.{mode}.jsonl"
            keyed_rows(path, _prediction_key(ctx, name, mode))
            log.info("evaluating %s (%s) on %d test examples", name, mode, len(test))
            if mode == "generation":
                rows = predict_generation(
                    lm, test, task, cfg.prompts,
                    max_new_tokens=cfg.evaluation.max_new_tokens,
                    batch_size=cfg.evaluation.batch_size,
                    skip_invalid=cfg.data.skip_invalid,
                    rows_path=path,
                )
            else:
                rows = predict_scoring(
                    lm, test, task, cfg.prompts, batch_size=cfg.evaluation.batch_size, skip_invalid=cfg.data.skip_invalid
                )
                atomic_write_json(path.with_suffix(".json"), rows)
            row[mode] = summarise(rows, task).as_dict()
        results[name] = row
        ctx.release_models()
        del lm
        gc.collect()

    headline = modes[0]
    metrics = {
        "split": "test",
        "n": len(test),
        "task": {"name": task.name, "format": task.format, "labels": list(task.labels)},
        "headline_mode": headline,
        "models": results,
        # The floor for gains is the first student stage, which only "all" evaluates.
        "gains": _gains(results, headline) if cfg.evaluation.models == "all" else {},
        "data_notes": data.report.get("notes", []),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return {
        "n": len(test),
        "accuracy": {name: r[headline]["accuracy"] for name, r in results.items() if headline in r},
        "gains": metrics["gains"],
    }


def _modes(mode: str, closed: bool) -> list[str]:
    if mode == "generation" or (mode == "both" and not closed):
        return ["generation"]
    if mode == "scoring":
        if not closed:
            from bridge.errors import ConfigError

            raise ConfigError(
                "evaluation.mode = scoring needs answer options",
                hint="use evaluation.mode=generation for numeric and span answers",
            )
        return ["scoring"]
    return ["generation", "scoring"]


def _teacher_row(ctx: Any) -> dict[str, Any]:
    """Teacher accuracy: gold by construction for the reference backend, else its label-check rate.

    A measured test accuracy for an API teacher would spend money outside the budget, so the
    report gives the share of first answers on the bought subset that matched gold instead.
    """
    teach = stage_summary(ctx.run.root, "teach")
    n = len(ctx.data.test)
    if ctx.config.teacher.backend == "reference":
        return {"kind": "teacher", "note": "reference rationales: correct by construction", "generation": _fixed(1.0, n)}
    asked = teach.get("examples") or 0
    correct = teach.get("correct_first") or 0
    if not asked:
        return {"kind": "teacher", "note": "no teacher call was made"}
    from bridge.metrics import wilson_interval

    low, high = wilson_interval(correct, asked)
    return {
        "kind": "teacher",
        "note": f"first-answer agreement with gold on the {asked} bought examples (not the test split)",
        "generation": {"n": asked, "correct": correct, "accuracy": correct / asked, "ci_low": low, "ci_high": high,
                       "unparsable": teach.get("unparsable", 0), "unparsable_rate": teach.get("unparsable", 0) / asked,
                       "truncated": teach.get("truncated", 0), "truncated_rate": teach.get("truncated", 0) / asked},
    }


def _fixed(accuracy: float, n: int) -> dict[str, Any]:
    return {"n": n, "correct": round(accuracy * n), "accuracy": accuracy, "ci_low": accuracy, "ci_high": accuracy,
            "unparsable": 0, "unparsable_rate": 0.0, "truncated": 0, "truncated_rate": 0.0}


def _prediction_key(ctx: Any, name: str, mode: str) -> str:
    """Return the key of one model's stored test predictions: the model's own key and the settings.

    A student stage is named by the key its training stored, the TA after apprenticeship by the
    train_ta fingerprint, and the untuned TA by its reference. Rows written under another key are
    discarded, so a retrained model never inherits the predictions of the one it replaced.
    """
    cfg = ctx.config
    if name.startswith("student/"):
        key_file = ctx.run.root / "train_student" / name.split("/", 1)[1] / "stage_key.json"
        model = read_json(key_file).get("key") if key_file.exists() else ctx.fingerprints.get("train_student")
    elif name == "ta/after":
        model = ctx.fingerprints.get("train_ta")
    else:
        model = [cfg.models.ta.model_dump(mode="json"), cfg.models.ta_engine]
    return fingerprint(
        "eval", name, mode, model, cfg.evaluation.model_dump(mode="json"), cfg.prompts.model_dump(mode="json"),
        cfg.data.model_dump(mode="json"),
    )


def _models_to_evaluate(ctx: Any) -> list[tuple[str, Callable[[], Any]]]:
    """Return (name, loader) for the TA before and after apprenticeship and each student stage.

    With ``evaluation.models: final_student`` only the last student stage is returned.
    """
    from bridge.models.loading import load_model

    root = ctx.run.root
    entries: list[tuple[str, Callable[[], Any]]] = []
    if ctx.config.evaluation.models == "all":
        entries += [("ta/before", ctx.ta_model), ("ta/after", ctx.refined_ta)]
    summary_path = require_file(root / "train_student" / "summary.json", "train_student")
    stages = read_json(summary_path)["stages"]
    if ctx.config.evaluation.models == "final_student":
        stages = stages[-1:]
    for stage in stages:
        folder = Path(stage["output_dir"])
        # A stage folder copied from another run records that run's path; the copy here is used.
        local = root / "train_student" / stage["name"] / folder.name
        if local.exists() or not folder.is_absolute():
            folder = local
        ref = ctx.config.models.student.model_copy(update={"path": str(folder), "keep_layers": None})
        entries.append((f"student/{stage['name']}", lambda ref=ref: load_model(ref)))
    return entries


def _gains(results: dict[str, dict[str, Any]], mode: str) -> dict[str, Any]:
    """Relative gain and gap closure of each student stage over the label-only floor."""
    students = [name for name in results if name.startswith("student/")]
    if not students:
        return {}
    floor_name = students[0]
    floor = results[floor_name][mode]["accuracy"]
    teacher = results.get("teacher", {}).get(mode, {}).get("accuracy")
    gains = {"floor": floor_name, "floor_accuracy": floor}
    for name in students[1:]:
        value = results[name][mode]["accuracy"]
        gains[name] = {
            "accuracy": value,
            "relative_gain": relative_gain(value, floor),
            "gap_closure": gap_closure(value, floor, teacher) if teacher is not None else None,
        }
    return gains
