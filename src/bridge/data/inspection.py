"""``bridge data list`` and ``bridge data inspect``: sizes, labels, lengths and sample examples."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from bridge.config import DATA_DIR_ENV, DataConfig
from bridge.data.loading import DatasetSplits, load_dataset
from bridge.data.registry import ADAPTERS
from bridge.data.types import Example
from bridge.errors import BridgeError, ModelLoadError

log = logging.getLogger(__name__)

#: Characters of context shown per sample example.
SHOWN_CONTEXT_CHARS = 600


def list_datasets(data_dir: str | Path | None = None, *, sizes: bool = True) -> list[dict[str, Any]]:
    """Describe every adapter: format, folder, missing files and, when the files exist, split sizes.

    ``data_dir`` falls back to ``$BRIDGE_DATA_DIR``. Loading errors are returned in ``error``
    rather than raised, so one broken folder does not hide the others.
    """
    raw = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    root = Path(raw).expanduser() if raw else None
    rows = []
    for name, info in ADAPTERS.items():
        row: dict[str, Any] = {"name": name, "format": info.format, "description": info.description}
        if not info.needs_folder:
            row.update(folder=None, present=None, missing=[])
            rows.append(row)
            continue
        folder = root / name if root is not None else None
        missing = [pattern for pattern in info.files if folder is None or not any(folder.glob(pattern))]
        row.update(folder=str(folder) if folder else None, present=not missing, missing=missing)
        if sizes and not missing and root is not None:
            try:
                splits = load_dataset(DataConfig(dataset=name, data_dir=str(root)))
                row["sizes"] = dict(splits.report["sizes"])
            except BridgeError as exc:
                row["error"] = str(exc)
        rows.append(row)
    return rows


def format_listing(rows: list[dict[str, Any]]) -> str:
    """Render :func:`list_datasets` as text for the terminal."""
    lines = []
    for row in rows:
        lines.append(f"{row['name']}  ({row['format']})")
        lines.append(f"  {row['description']}")
        if row["present"] is None:
            lines.append("  files: named by data.train_file, data.dev_file and data.test_file")
        elif row["present"]:
            lines.append(f"  folder: {row['folder']}")
        else:
            where = row["folder"] or f"(no data directory: set {DATA_DIR_ENV})"
            lines.append(f"  missing: {', '.join(row['missing'])} in {where}")
        if "sizes" in row:
            lines.append("  sizes: " + ", ".join(f"{split} {n}" for split, n in row["sizes"].items()))
        if "error" in row:
            lines.append(f"  error: {row['error']}")
    return "\n".join(lines) + "\n"


def _stats(values: list[int]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    n = len(ordered)
    middle = n // 2
    median = ordered[middle] if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    p95 = ordered[max(0, math.ceil(0.95 * n) - 1)]
    return {
        "count": n,
        "min": ordered[0],
        "mean": round(sum(ordered) / n, 1),
        "median": median,
        "p95": p95,
        "max": ordered[-1],
    }


def _field_texts(example: Example) -> dict[str, str]:
    options = "\n".join(f"{k}. {v}" for k, v in (example.options or {}).items())
    inputs = "\n".join(part for part in (example.question, example.context or "", options) if part)
    return {
        "question": example.question,
        "context": example.context or "",
        "options": options,
        "prompt_input": inputs,
        "explanation": example.explanation or "",
    }


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load a tokenizer from '{path}': {exc}",
            hint="pass --tokenizer a local Hugging Face model folder (with tokenizer.json or tokenizer_config.json)",
        ) from None


def length_statistics(splits: DatasetSplits, tokenizer: str | None = None) -> dict[str, Any]:
    """Return length statistics per split and field, in tokens with ``tokenizer``, else in characters and words."""
    tok = _load_tokenizer(tokenizer) if tokenizer else None
    result: dict[str, Any] = {"unit": "tokens" if tok is not None else "characters and words"}
    for split, examples in splits.by_split().items():
        if not examples:
            continue
        per_field: dict[str, Any] = {}
        texts = [_field_texts(e) for e in examples]
        for name in ("question", "context", "options", "prompt_input", "explanation"):
            values = [t[name] for t in texts if t[name]]
            if not values:
                continue
            if tok is not None:
                ids = tok(values, add_special_tokens=False)["input_ids"]
                per_field[name] = {"tokens": _stats([len(x) for x in ids])}
            else:
                per_field[name] = {
                    "characters": _stats([len(v) for v in values]),
                    "words": _stats([len(v.split()) for v in values]),
                }
        result[split] = per_field
    return result


def render_example(example: Example, split: str) -> str:
    """Render one example as its prompt input followed by its gold fields, for inspection."""
    lines = [f"--- {split} example {example.id} ---", f"Question: {example.question}"]
    if example.context:
        context = example.context
        if len(context) > SHOWN_CONTEXT_CHARS:
            context = context[:SHOWN_CONTEXT_CHARS] + f" [... {len(example.context) - SHOWN_CONTEXT_CHARS} more characters]"
        lines.append(f"Context: {context}")
    if example.options:
        lines.append("Options:")
        lines += [f"  {letter}. {text}" for letter, text in example.options.items()]
    gold = f"Gold: {example.gold}"
    if example.scale:
        gold += f" (scale: {example.scale})"
    if example.answer_type:
        gold += f" [answer type: {example.answer_type}]"
    lines.append(gold)
    if example.explanation:
        lines.append(f"Explanation: {example.explanation}")
    return "\n".join(lines)


def inspect_dataset(cfg: DataConfig, *, tokenizer: str | None = None, examples: int = 2) -> dict[str, Any]:
    """Load a data set and return its report, length statistics and ``examples`` rendered examples.

    The samples are the first training example and the first test example (then further
    training examples when ``examples`` is larger than 2).
    """
    splits = load_dataset(cfg)
    samples: list[tuple[str, Example]] = []
    order = [("train", 0), ("test", 0)] + [("train", i) for i in range(1, examples)]
    for split, index in order:
        if len(samples) >= examples:
            break
        part = splits.split(split)
        if index < len(part):
            samples.append((split, part[index]))
    return {
        "report": splits.report,
        "lengths": length_statistics(splits, tokenizer),
        "examples": [render_example(example, split) for split, example in samples],
    }


def _format_stats(stats: dict[str, Any]) -> str:
    if not stats.get("count"):
        return "none"
    return f"min {stats['min']}, median {stats['median']}, mean {stats['mean']}, p95 {stats['p95']}, max {stats['max']}"


def format_inspection(result: dict[str, Any]) -> str:
    """Render :func:`inspect_dataset` output as text for the terminal."""
    report = result["report"]
    task = report["task"]
    lines = [f"data set: {report['dataset']}  format: {task['format']}  domain: {task['domain'] or '-'}"]
    if task["labels"]:
        lines.append(f"labels: {', '.join(task['labels'])}")
    lines.append(f"split rules: {report['split_rules']}")

    lines.append("")
    lines.append("sizes and " + ("labels" if task["labels"] else "answer types") + ":")
    for split, n in report["sizes"].items():
        counts = ", ".join(f"{label} {count}" for label, count in report["labels"][split].items())
        lines.append(f"  {split:8} {n:6}   {counts}")
    duplicates = report["duplicates"]
    lines.append(
        f"duplicates: {duplicates['groups']} group(s) of exact copies ({duplicates['copies']} extra), "
        f"dropped {duplicates['dropped']}, conflicting labels {duplicates['conflicting_labels']}"
    )
    rejects = report["rejects"]
    lines.append(f"rejected rows: {rejects['count']}" + (f" (file {rejects['file']})" if rejects["file"] else ""))
    for note in report["notes"]:
        lines.append(f"note: {note}")

    lengths = result["lengths"]
    lines.append("")
    lines.append(f"lengths ({lengths['unit']}):")
    for split, fields in lengths.items():
        if split == "unit":
            continue
        for name, measures in fields.items():
            for unit, stats in measures.items():
                lines.append(f"  {split:8} {name:13} {unit:10} {_format_stats(stats)}")

    for text in result["examples"]:
        lines.append("")
        lines.append(text)
    return "\n".join(lines) + "\n"
