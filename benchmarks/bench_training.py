"""Time LoRA fine-tuning with and without sequence packing, in tokens per second.

Fine-tunes the packaged SmolLM2-135M-Instruct with :func:`bridge.models.training.train_sft` on
the first N PubMedQA (PQA-L) rows of ``$BRIDGE_DATA_DIR/pubmedqa_pqal/ori_pqal.json``. The
user message contains the context (cut to ``--context-tokens``) and the question. The
assistant message, which is the trained completion, contains the long answer and the decision.
A one-step warm-up run comes first and is not reported. Each measured run is one epoch over
the same rows, once with padded batches and once with packed sequences.

Tokens per second counts the rows' tokens (prompt and completion, no padding) over the
seconds spent in the training loop, so both runs are measured on the same work.

Usage::

    BRIDGE_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_training.py

Prints a JSON summary; ``--output FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

from bridge.config import ModelRef, TrainingConfig
from bridge.models import load_model
from bridge.models.training import train_sft

SYSTEM = "You are a biomedical expert. Answer research questions from the given abstract."


def load_rows(lm, data_dir: Path, count: int, context_tokens: int) -> list[dict]:
    """Return the first ``count`` PubMedQA items in file order as chat rows for fine-tuning."""
    path = data_dir / "pubmedqa_pqal" / "ori_pqal.json"
    items = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for pmid, item in list(items.items())[:count]:
        context_ids = lm.tokenizer(" ".join(item["CONTEXTS"]), add_special_tokens=False)["input_ids"]
        context = lm.tokenizer.decode(context_ids[:context_tokens])
        user = f"Context: {context}\n\nQuestion: {item['QUESTION']}"
        answer = f"{item['LONG_ANSWER']}\nAnswer: {item['final_decision']}"
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
        rows.append({"id": pmid, "messages": messages})
    return rows


def run_once(ref: ModelRef, rows: list[dict], config: TrainingConfig, out_dir: Path, max_steps: int | None) -> dict:
    lm = load_model(ref, padding_side="right")
    result = train_sft(rows, base=lm, config=config, out_dir=out_dir, max_steps=max_steps)
    metrics = result.metrics
    return {
        "packing": config.packing,
        "optimizer_steps": metrics["global_step"],
        "tokens": metrics["tokens"],
        "trained_tokens": metrics["trained_tokens"],
        "seconds": metrics["train_seconds"],
        "tokens_per_second": metrics["tokens_per_second"],
        "first_loss": metrics["loss_curve"][0]["loss"],
        "last_loss": metrics["loss_curve"][-1]["loss"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct", help="Model reference to fine-tune.")
    parser.add_argument("--rows", type=int, default=16, help="PubMedQA rows to train on.")
    parser.add_argument("--context-tokens", type=int, default=128, help="Context tokens kept per row.")
    parser.add_argument("--batch-size", type=int, default=4, help="Rows (or packed sequences) per step.")
    parser.add_argument("--max-seq-len", type=int, default=768, help="Maximum row length and packed sequence length, in tokens.")
    parser.add_argument("--output", type=Path, help="Also write the JSON summary to this file.")
    args = parser.parse_args()

    data_dir = os.environ.get("BRIDGE_DATA_DIR")
    if not data_dir:
        parser.error("set BRIDGE_DATA_DIR to the folder that holds pubmedqa_pqal/")
    ref = ModelRef(path=args.model)
    rows = load_rows(load_model(ref), Path(data_dir), args.rows, args.context_tokens)

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        for name, packing, max_steps in (("warm-up", False, 1), ("padded", False, None), ("packed", True, None)):
            config = TrainingConfig(
                method="lora", epochs=1.0, batch_size=args.batch_size, grad_accum=1,
                max_seq_len=args.max_seq_len, packing=packing, save_every=1000,
            )
            measured = run_once(ref, rows, config, Path(scratch) / name, max_steps)
            if name != "warm-up":
                runs.append(measured)

    padded, packed = runs
    summary = {
        "command": " ".join(["benchmarks/bench_training.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "model": args.model,
        "rows": len(rows),
        "method": "lora",
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "runs": runs,
        "packed_over_padded_tokens_per_second": round(packed["tokens_per_second"] / padded["tokens_per_second"], 2),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
