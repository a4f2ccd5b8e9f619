"""Measure how much language a student derived by layer selection keeps before any training.

The benchmark keeps some of the 30 layers of the packaged SmolLM2-135M-Instruct, once per
layer selection. For each one it computes the mean negative log-likelihood per completion
token of reference rationales for the first N training examples. A reference rationale is a
PubMedQA long answer followed by the answer line, as the reference teacher writes it, after
the rationale prompt the pipeline uses. The baseline is the full 30-layer model, measured in
the same run. Each selection prints its NLL, its ratio to the baseline and its parameter count.
A uniform guess over the vocabulary scores ln(49152), about 10.8 nats.

Usage::

    BRIDGE_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_student_ladder.py

Prints a JSON summary; ``--output FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bridge.config import DataConfig, ModelRef
from bridge.data import load_dataset
from bridge.models import load_model
from bridge.models.loading import derive_layers
from bridge.prompts import format_target, render_messages, render_text, target_answer

FULL = list(range(30))
SELECTIONS: dict[str, list[int]] = {
    "full (30 layers)": FULL,
    "drop 3 deep (27)": [i for i in FULL if i not in (22, 24, 26)],
    "drop 6 deep (24)": [i for i in FULL if i not in (18, 20, 22, 24, 26, 27)],
    "every other + last (16)": [*range(0, 30, 2), 29],
    "first 12 + last 3 (15)": [*range(12), 27, 28, 29],
    "spread 10": [0, 3, 6, 9, 12, 16, 19, 22, 26, 29],
    "spread 7 (default student)": [0, 5, 10, 15, 20, 25, 29],
    "first 3 + last 4 (7)": [0, 1, 2, 26, 27, 28, 29],
}


def completion_nll(lm, texts: list[tuple[str, str]]) -> float:
    """Return the mean NLL per completion token over (prompt, completion) pairs."""
    total, count = 0.0, 0
    for prompt, completion in texts:
        prompt_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = lm.tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([full_ids])
        labels = ids.clone()
        labels[0, : len(prompt_ids)] = -100
        with torch.no_grad():
            loss = lm.model(input_ids=ids, labels=labels).loss.item()
        tokens = len(full_ids) - len(prompt_ids)
        total += loss * tokens
        count += tokens
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=32, help="Training examples to score (default 32).")
    parser.add_argument("--context-tokens", type=int, default=96, help="Context budget of each prompt (default 96).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--output", type=Path, default=None, help="Also write the JSON summary here.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_dataset(DataConfig(dataset="pubmedqa_pqal", train_size=args.examples, dev_size=10, test_size=10))
    full = load_model(ModelRef(path="packaged:smollm2-135m-instruct", dtype="float32", device="cpu"))
    end = "<|im_end|>"
    texts = []
    for example in data.train:
        rendered = render_messages(
            example, data.task, style="rationale", tokenizer=full.tokenizer, max_context_tokens=args.context_tokens
        )
        completion = format_target(example.explanation, target_answer(example, data.task)) + end
        texts.append((render_text(rendered, full.tokenizer), completion))

    results = []
    baseline = None
    for name, keep in SELECTIONS.items():
        lm = load_model(ModelRef(path="packaged:smollm2-135m-instruct", dtype="float32", device="cpu"))
        if keep != FULL:
            derive_layers(lm.model, keep)
        started = time.perf_counter()
        nll = completion_nll(lm, texts)
        seconds = time.perf_counter() - started
        baseline = nll if baseline is None else baseline
        params = sum(p.numel() for p in lm.model.parameters())
        results.append(
            {
                "selection": name,
                "layers": keep,
                "parameters_m": round(params / 1e6, 1),
                "nll": round(nll, 3),
                "nll_ratio_to_full": round(nll / baseline, 2),
                "seconds": round(seconds, 1),
            }
        )
        print(f"{name:28s} {params / 1e6:6.1f}M  NLL {nll:6.3f}  x{nll / baseline:5.2f} of full", file=sys.stderr)
        del lm

    summary = {
        "benchmark": "student_ladder",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "examples": len(texts),
        "completion_tokens": sum(len(full.tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in texts),
        "uniform_nll": round(math.log(len(full.tokenizer)), 3),
        "results": results,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
