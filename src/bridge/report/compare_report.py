"""Build the report of a comparison (``bridge compare``) from its ``comparison.json`` content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge.report.document import Document, Heading, Image, Paragraph, Table
from bridge.report.plots import plot_accuracy_bars, plot_frontier
from bridge.report.run_report import score_cells

#: Marker the data adapters put in a note when training examples come from an official test split.
OFFICIAL_TEST_MARKER = "official test set"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _mean_sd(stats: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    mean = f"{scale * stats['mean']:.{digits}f}"
    return mean if stats["std"] is None else f"{mean} ± {scale * stats['std']:.{digits}f}"


def build_comparison_report(state: dict[str, Any], out: Path) -> Document:
    """Collect the comparison table, the cost-accuracy plots and the runs into a document.

    Plots are written into ``out`` as PNG files.
    """
    from bridge.compare import METHODS

    runs = state.get("runs", {})
    summary = state.get("summary", {})
    first = next(iter(runs.values()), {})
    mode = first.get("headline_mode", "generation")
    task = first.get("task", {})

    doc = Document(title=f"bridge comparison: {state.get('name', '?')}")
    doc.add(
        Paragraph(
            f"Data set {task.get('name', '?')} ({task.get('format', '?')}), {first.get('test_examples', '?')} test "
            f"examples, seeds {', '.join(str(s) for s in state.get('seeds', []))}. Every method uses the same teacher, "
            f"data and student. Accuracy is the final student's test accuracy in the headline mode ({mode}), in "
            "percent: the mean over seeds ± the sample standard deviation. Teacher calls and money are each run's "
            "own ledger account, in which a response reused from another run's purchase counts at what it cost. "
            "Local compute time adds the seconds of every stage of the method, and work copied from another run "
            "counts the seconds it took there."
        )
    )
    for note in _data_notes(runs):
        prefix = "Note: training used part of an official test set. " if OFFICIAL_TEST_MARKER in note else "Note: "
        doc.add(Paragraph(prefix + note))
    if not state.get("complete"):
        doc.add(Paragraph("The comparison is incomplete: rerun the same 'bridge compare' command to finish it."))

    doc.add(Heading("Methods side by side"))
    header = [
        "method", "budget", "seeds", f"accuracy % ({mode})", "gain over label_only (points)", "teacher calls",
        "money (USD)", "local compute (min)",
    ]
    rows = []
    for method, stats in summary.items():
        gain = stats.get("gain_over_label_only")
        rows.append(
            [
                method,
                _budget_label(runs, method),
                str(len(stats["seeds"])),
                _mean_sd(stats["accuracy"], 100),
                "n/a" if gain is None else f"{100 * gain:+.1f}",
                _mean_sd(stats["teacher_calls"]),
                _mean_sd(stats["teacher_usd"], digits=4),
                _mean_sd(stats["compute_seconds"], 1 / 60),
            ]
        )
    for name, row in first.get("baselines", {}).items():
        scores = row.get(mode)
        if scores:
            rows.append([f"({name})", "-", "-", _pct(scores["accuracy"]), "-", "-", "-", "-"])
    doc.add(Table(header, rows))
    for name, row in first.get("baselines", {}).items():
        if row.get("note"):
            doc.add(Paragraph(f"({name}): {row['note']}."))

    _add_plots(doc, summary, runs, mode, out)

    doc.add(Heading("Runs"))
    run_rows = []
    for name, run in sorted(runs.items(), key=lambda item: (item[1]["method"], item[1]["seed"])):
        cells = score_cells(run["scores"].get(mode))
        copied = [stage for stage, status in run.get("stages", {}).items() if status.startswith("copied")]
        run_rows.append(
            [
                name, run["model"], cells[0], cells[1], str(run["teacher_calls"]), f"{run['teacher_usd']:.4f}",
                f"{run['compute_seconds']:.0f}", ", ".join(copied) or "-",
            ]
        )
    doc.add(
        Table(
            ["run", "model", f"accuracy % [95 % CI] ({mode})", "macro-F1", "teacher calls", "money (USD)",
             "compute (s)", "stages copied from another run"],
            run_rows,
        )
    )

    doc.add(Heading("Teacher caps and ledger"))
    caps = state.get("caps", {})
    ledger = state.get("ledger", {})
    doc.add(
        Table(
            ["item", "value"],
            [
                ["cap on calls over the comparison", str(caps.get("calls"))],
                ["cap on money over the comparison (USD)", "none" if caps.get("usd") is None else f"{caps['usd']:.4f}"],
                ["calls charged in the shared ledger", str(ledger.get("calls", 0))],
                ["money charged in the shared ledger (USD)", f"{ledger.get('usd', 0.0):.4f}"],
            ],
        )
    )
    reached = [name for name, run in runs.items() if run.get("comparison_cap_reached")]
    if reached:
        doc.add(Paragraph(f"The comparison's caps rejected teacher calls in: {', '.join(sorted(reached))}."))

    doc.add(Heading("Methods"))
    doc.add(
        Table(
            ["method", "stages", "what it is"],
            [[m.name, ", ".join(m.stages), m.description] for m in METHODS.values() if m.name in summary],
        )
    )
    return doc


def _budget_label(runs: dict[str, Any], method: str) -> str:
    """Return the teacher budget of a method as its mean number of bought rationales."""
    rows = [r["teacher_rows"] for r in runs.values() if r["method"] == method]
    if not rows or not any(rows):
        return "none"
    return f"{sum(rows) / len(rows):.0f} rationales"


def _data_notes(runs: dict[str, Any]) -> list[str]:
    notes: list[str] = []
    for run in runs.values():
        for note in run.get("data_notes", []):
            if note not in notes:
                notes.append(note)
    return notes


def _add_plots(doc: Document, summary: dict[str, Any], runs: dict[str, Any], mode: str, out: Path) -> None:
    if not summary:
        return
    points = []
    for method, stats in summary.items():
        accuracy = stats["accuracy"]
        spread = accuracy["std"] or 0.0
        points.append(
            {
                "label": f"{method} ({_budget_label(runs, method)})",
                "accuracy": accuracy["mean"],
                "ci_low": accuracy["mean"] - spread,
                "ci_high": accuracy["mean"] + spread,
                "calls": stats["teacher_calls"]["mean"],
                "usd": stats["teacher_usd"]["mean"],
                "minutes": stats["compute_seconds"]["mean"] / 60,
            }
        )
    views = (
        ("calls", "teacher calls (mean over seeds)", "frontier_calls.png", "Student accuracy against teacher calls"),
        ("usd", "teacher money in USD (mean over seeds)", "frontier_usd.png", "Student accuracy against teacher money"),
        ("minutes", "local compute time in minutes (mean over seeds)", "frontier_compute.png",
         "Student accuracy against local compute time"),
    )
    doc.add(Heading("Cost and accuracy"))
    for key, label, file_name, title in views:
        path = plot_frontier(points, key, label, out / file_name, title)
        if path:
            doc.add(Image(path, f"{title}: one point per method and budget; bars show one standard deviation over seeds"))
    models = {
        method: {mode: {"accuracy": p["accuracy"], "ci_low": p["ci_low"], "ci_high": p["ci_high"]}}
        for method, p in zip(summary, points, strict=True)
    }
    bars = plot_accuracy_bars(models, mode, out / "accuracy.png", "Final student test accuracy by method")
    doc.add(Image(bars, "Mean test accuracy by method; bars show one standard deviation over seeds"))
