"""Build the report of one run from the files its stages wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bridge.report.document import Code, Document, Heading, Image, Paragraph, Table
from bridge.report.plots import (
    plot_accuracy_bars,
    plot_frontier,
    plot_learning_curves,
    plot_per_class,
)
from bridge.rundir import read_json, read_rows


def _load(path: Path) -> Any:
    return read_json(path) if path.exists() else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _money(value: float | None) -> str:
    return "n/a" if value is None else f"${value:.4f}"


def _in_report_order(models: dict[str, Any], student_summary: dict[str, Any]) -> dict[str, Any]:
    """Order rows as baselines, teacher, TA before and after, then students in curriculum order.

    The metrics file stores its keys sorted, so the order is rebuilt here.
    """
    order = ["majority", "teacher", "ta/before", "ta/after"]
    order += [f"student/{stage['name']}" for stage in student_summary.get("stages", [])]
    ranked = sorted(models, key=lambda name: (order.index(name) if name in order else len(order), name))
    return {name: models[name] for name in ranked}


def score_cells(scores: dict[str, Any] | None) -> list[str]:
    """Return table cells: accuracy with interval, macro-F1, unparsable and truncated rates."""
    if not scores:
        return ["n/a", "n/a", "n/a", "n/a"]
    f1 = scores.get("macro_f1")
    return [
        f"{_pct(scores['accuracy'])} [{_pct(scores['ci_low'])}, {_pct(scores['ci_high'])}]",
        "n/a" if f1 is None else f"{f1:.3f}",
        _pct(scores.get("unparsable_rate")),
        _pct(scores.get("truncated_rate")),
    ]


def build_run_report(root: Path, out: Path) -> Document:
    """Collect metrics, costs, curves and settings of the run at ``root`` into a document.

    Plots are written into ``out`` as PNG files.
    """
    metrics = _load(root / "eval" / "metrics.json") or {}
    teach = _load(root / "teach" / "summary.json") or {}
    select = _load(root / "select" / "summary.json") or {}
    tutor_yield = _load(root / "tutor" / "yield.json") or {}
    timings = _load(root / "timings.json") or {}
    versions = _load(root / "versions.json") or {}
    config_text = (root / "config.yaml").read_text(encoding="utf-8") if (root / "config.yaml").exists() else ""
    models = _in_report_order(metrics.get("models", {}), _load(root / "train_student" / "summary.json") or {})
    mode = metrics.get("headline_mode", "generation")

    doc = Document(title=f"bridge run report: {root.name}")
    task = metrics.get("task", {})
    doc.add(
        Paragraph(
            f"Data set {task.get('name', '?')} ({task.get('format', '?')}), {metrics.get('n', '?')} test examples. "
            f"Teacher: {teach.get('backend', '?')} model {teach.get('model', '?')}; "
            f"{teach.get('total_calls', 0)} teacher calls for {_money(teach.get('total_usd'))}. "
            f"Accuracy in percent with 95 % Wilson intervals; headline mode: {mode}."
        )
    )
    for note in metrics.get("data_notes", []):
        doc.add(Paragraph(f"Note: {note}"))

    doc.add(Heading("Results"))
    header = ["model", f"accuracy ({mode})", "macro-F1", "unparsable %", "hit token limit %"]
    rows = []
    for name, result in models.items():
        rows.append([name, *score_cells(result.get(mode))])
    doc.add(Table(header, rows))
    if any("scoring" in r for r in models.values()) and mode != "scoring":
        doc.add(Table(["model", "accuracy (option scoring)", "macro-F1", "unparsable %", "-"],
                      [[n, *score_cells(r.get("scoring"))] for n, r in models.items() if "scoring" in r]))
    for name, result in models.items():
        if result.get("note"):
            doc.add(Paragraph(f"{name}: {result['note']}."))
    gains = metrics.get("gains") or {}
    if gains:
        gain_rows = [
            [name, _pct(g["accuracy"]), _pct(g["relative_gain"]), _pct(g["gap_closure"])]
            for name, g in gains.items()
            if isinstance(g, dict)
        ]
        doc.add(Paragraph(f"Floor for gains: {gains['floor']} (label-only student), accuracy {_pct(gains['floor_accuracy'])} %."))
        doc.add(Table(["student", "accuracy %", "relative gain over floor %", "gap closure %"], gain_rows))

    if models:
        doc.add(Image(plot_accuracy_bars(models, mode, out / "accuracy.png", "Test accuracy by model"), "Test accuracy by model"))
        labels = task.get("labels") or []
        per_class = plot_per_class(models, mode, labels, out / "per_class.png")
        if per_class:
            doc.add(Image(per_class, "Per-class test accuracy"))
        students = [
            {"label": n.split("/", 1)[1], "accuracy": r[mode]["accuracy"], "ci_low": r[mode]["ci_low"],
             "ci_high": r[mode]["ci_high"], "calls": teach.get("total_calls", 0), "usd": teach.get("total_usd", 0.0)}
            for n, r in models.items() if n.startswith("student/") and mode in r
        ]
        frontier = plot_frontier(students, "calls", "teacher calls", out / "frontier_calls.png", "Cost and accuracy (this run)")
        if frontier:
            doc.add(Image(frontier, "Student accuracy against teacher calls (run bridge compare for baselines)"))

    doc.add(Heading("Teacher spending"))
    doc.add(Table(["item", "value"], [[k, str(teach[k])] for k in (
        "backend", "model", "endpoint", "price", "examples", "requests", "cache_hits", "retries", "correct_first",
        "wrong_first", "reasked", "reask_correct", "unparsable", "truncated", "failed", "not_asked_budget", "rows",
        "label_conditioned_rows", "budget_exhausted", "caps", "total_calls", "total_tokens", "total_usd",
    ) if k in teach]))

    doc.add(Heading("Selection"))
    doc.add(Table(["item", "value"], [[k, str(v)] for k, v in select.items() if k != "plots"]))
    for plot in select.get("plots", []):
        source = root / "select" / plot
        if source.exists():
            target = out / f"select_{Path(plot).name}"
            shutil.copyfile(source, target)
            doc.add(Image(target, f"Selection: {Path(plot).stem.replace('_', ' ')}"))

    if tutor_yield:
        doc.add(Heading("Tutoring yield"))
        doc.add(Code(json.dumps(tutor_yield, indent=2, sort_keys=True)))

    curves = {}
    ta_metrics = _load(root / "train_ta" / "metrics.json")
    if ta_metrics:
        curves["TA apprenticeship"] = ta_metrics
    student_stages = _load(root / "train_student" / "summary.json") or {}
    for stage in student_stages.get("stages", []):
        stage_metrics = _load(root / "train_student" / stage["name"] / "metrics.json")
        if stage_metrics:
            curves[f"student {stage['name']}"] = stage_metrics
    curve_plot = plot_learning_curves(curves, out / "learning_curves.png")
    if curve_plot:
        doc.add(Heading("Learning curves"))
        doc.add(Image(curve_plot, "Training loss per optimizer step"))

    doc.add(Heading("Time per stage"))
    doc.add(Table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()]))
    doc.add(Heading("Configuration"))
    doc.add(Code(config_text))
    doc.add(Heading("Package versions"))
    doc.add(Table(["package", "version"], [[k, str(v)] for k, v in versions.items()]))
    rejected = root / "tutor" / "rejected.jsonl"
    if rejected.exists():
        doc.add(Paragraph(f"Rejected tutoring rationales: {sum(1 for _ in read_rows(rejected))} (see tutor/rejected.jsonl)."))
    return doc
