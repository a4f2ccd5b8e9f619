"""Phase 5, part two: write ``report/report.md``, ``report/report.html``, PNG plots and the model card."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bridge.report.run_report import build_run_report, score_cells
from bridge.rundir import atomic_write_text, read_json

log = logging.getLogger(__name__)


def run(ctx: Any) -> dict[str, Any]:
    root = ctx.run.root
    out = ctx.stage_dir("report")
    document = build_run_report(root, out)
    atomic_write_text(out / "report.md", document.to_markdown(out))
    atomic_write_text(out / "report.html", document.to_html())
    card = write_model_card(ctx)
    log.info("report written to %s", out / "report.html")
    return {"report_md": str(out / "report.md"), "report_html": str(out / "report.html"), "model_card": str(card) if card else None}


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_model_card(ctx: Any) -> Path | None:
    """Write README.md into the final student folder: data, teacher, spend, metrics, size, latency, limits."""
    from bridge.prompts import render_all, render_text
    from bridge.report.latency import measure_in_subprocess

    root = ctx.run.root
    model_dir = root / "train_student" / "model"
    if not model_dir.is_dir():
        log.warning("no final student model in %s; skipping the model card", model_dir)
        return None
    cfg = ctx.config
    metrics = read_json(root / "eval" / "metrics.json")
    teach = read_json(root / "teach" / "summary.json") if (root / "teach" / "summary.json").exists() else {}
    mode = metrics.get("headline_mode", "generation")
    students = [n for n in metrics["models"] if n.startswith("student/")]
    final = metrics["models"][students[-1]] if students else {}

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered, _ = render_all(
        ctx.data.test[:5], ctx.data.task, style="rationale", system=cfg.prompts.system,
        tokenizer=tokenizer, max_context_tokens=cfg.prompts.max_context_tokens, skip_invalid=True,
    )
    latency = measure_in_subprocess(model_dir, [render_text(r, tokenizer) for r in rendered], cfg.evaluation.max_new_tokens)
    cells = score_cells(final.get(mode))
    notes = "\n".join(f"- {n}" for n in metrics.get("data_notes", []))
    text = f"""# Student model: {cfg.name}

Trained by bridge (budget-aware distillation through a teacher assistant).

## Data
- Data set: {cfg.data.dataset}; task format {metrics['task']['format']}; {len(ctx.data.train)} training examples.
{notes}

## Teacher and budget
- Teacher: {teach.get('backend', cfg.teacher.backend)} / {teach.get('model', cfg.teacher.model)}
- Teacher calls: {teach.get('total_calls', 0)}; tokens: {teach.get('total_tokens', 0)}; spent: ${teach.get('total_usd', 0.0):.4f}
- Teacher assistant: {cfg.models.ta.path}; student derived from {cfg.models.student.path} (layers {cfg.models.student.keep_layers})

## Test metrics ({metrics['n']} examples, {mode})
- Accuracy (95 % Wilson interval): {cells[0]} %
- Macro-F1: {cells[1]}; unparsable: {cells[2]} %; hit the token limit: {cells[3]} %

## Size and speed (CPU, measured in a fresh process)
- Parameters: {latency.get('parameters', 'n/a')}; size on disk: {_folder_size(model_dir) / 2**20:.1f} MiB
- Median latency per answer: {latency.get('median_seconds_per_answer', 'n/a')} s (up to {cfg.evaluation.max_new_tokens} new tokens); {latency.get('tokens_per_second', 'n/a')} tokens/s
- Peak resident memory: {latency.get('peak_rss_mib', 'n/a')} MiB

## Limits
- Evaluated on {metrics['n']} test examples only; the interval above shows the sampling uncertainty.
- The model answers in the format `Answer: <answer>` after a short rationale; rationales were written by a
  small teacher assistant and can be wrong even when the answer is right.
- Not a medical, legal or financial advisor: outputs need review by a qualified person.
"""
    path = model_dir / "README.md"
    atomic_write_text(path, text)
    return path
