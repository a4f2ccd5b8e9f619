"""Time option scoring against generate-and-parse, and batched against one-at-a-time generation.

Runs the packaged SmolLM2-135M-Instruct on the first N PubMedQA (PQA-L) questions of
``$BRIDGE_DATA_DIR/pubmedqa_pqal/ori_pqal.json`` with contexts cut to a token budget:

1. option scoring of " yes", " no", " maybe" after ``Answer:``, one prompt at a time;
2. generating up to ``--max-new-tokens`` tokens and parsing the first yes/no/maybe, one prompt at a time;
3. the same generation in length-sorted batches of ``--batch-size``.

Usage::

    BRIDGE_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_inference.py

Prints a JSON summary; ``--output FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bridge.config import ModelRef
from bridge.models import GenerationRequest, generate, load_model, score_options

OPTIONS = [" yes", " no", " maybe"]
LABELS = ["yes", "no", "maybe"]
SYSTEM = "You are a biomedical expert. Answer research questions from the given abstract."
_ANSWER = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


def load_questions(data_dir: Path, count: int) -> list[dict[str, str]]:
    """Return the first ``count`` PubMedQA questions in file order, with contexts joined."""
    path = data_dir / "pubmedqa_pqal" / "ori_pqal.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    questions = []
    for pmid, row in list(rows.items())[:count]:
        contexts = row["CONTEXTS"]
        if isinstance(contexts, str):
            contexts = ast.literal_eval(contexts)
        questions.append(
            {"id": pmid, "question": row["QUESTION"], "context": " ".join(contexts), "gold": row["final_decision"]}
        )
    return questions


def render_prompts(lm, questions: list[dict[str, str]], context_tokens: int) -> list[str]:
    """Return chat-templated prompts whose contexts are cut to ``context_tokens`` tokens."""
    prompts = []
    for q in questions:
        context_ids = lm.tokenizer(q["context"], add_special_tokens=False)["input_ids"][:context_tokens]
        context = lm.tokenizer.decode(context_ids)
        user = (
            f"Context: {context}\n\nQuestion: {q['question']}\n\n"
            "Reply with yes, no or maybe on the first line, then explain in one sentence."
        )
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        prompts.append(lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompts


def parse_answer(text: str) -> str | None:
    match = _ANSWER.search(text)
    return match.group(1).lower() if match else None


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct", help="Model reference.")
    parser.add_argument("--count", type=int, default=16, help="Number of PubMedQA questions.")
    parser.add_argument("--context-tokens", type=int, default=192, help="Context tokens kept per question.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Maximum new tokens per completion.")
    parser.add_argument("--batch-size", type=int, default=16, help="Prompts per batch for batched generation.")
    parser.add_argument("--output", type=Path, help="Also write the JSON summary to this file.")
    args = parser.parse_args()

    data_dir = os.environ.get("BRIDGE_DATA_DIR")
    if not data_dir:
        parser.error("set BRIDGE_DATA_DIR to the folder that holds pubmedqa_pqal/")
    questions = load_questions(Path(data_dir), args.count)
    lm = load_model(ModelRef(path=args.model))
    prompts = render_prompts(lm, questions, args.context_tokens)
    prompt_tokens = [len(lm.encode(p)) for p in prompts]
    requests = [GenerationRequest(id=q["id"], prompt=p) for q, p in zip(questions, prompts, strict=True)]
    gold = [q["gold"] for q in questions]

    # Warm-up so that one-off costs (allocator, kernels, lazy imports) fall outside the timings.
    score_options(lm, prompts[:1], [OPTIONS], progress=False)
    generate(lm, requests[:1], max_new_tokens=4, progress=False)

    scoring_prompts = [p + "Answer:" for p in prompts]
    scores, scoring_s = timed(
        score_options, lm, scoring_prompts, [OPTIONS] * len(prompts), batch_size=1, progress=False
    )
    sequential, sequential_s = timed(
        generate, lm, requests, max_new_tokens=args.max_new_tokens, batch_size=1, progress=False
    )
    parsed = [parse_answer(g.text) for g in sequential]
    batched, batched_s = timed(
        generate, lm, requests, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False
    )

    scored_labels = [LABELS[s.predicted] for s in scores]
    sequential_tokens = sum(g.completion_tokens for g in sequential)
    batched_tokens = sum(g.completion_tokens for g in batched)
    summary = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(lm.device),
            "dtype": str(lm.dtype).removeprefix("torch."),
            # Other processes' load during the run; timings on a shared machine vary with it.
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "prompts": len(prompts),
        "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens),
        "prompt_tokens_max": max(prompt_tokens),
        "max_new_tokens": args.max_new_tokens,
        "scoring_one_at_a_time_s": round(scoring_s, 2),
        "generate_parse_one_at_a_time_s": round(sequential_s, 2),
        "generate_batched_s": round(batched_s, 2),
        "batch_size": args.batch_size,
        "ratio_generate_parse_over_scoring": round(sequential_s / scoring_s, 1),
        "ratio_one_at_a_time_over_batched": round(sequential_s / batched_s, 2),
        "completion_tokens_one_at_a_time": sequential_tokens,
        "completion_tokens_batched": batched_tokens,
        "tokens_per_s_one_at_a_time": round(sequential_tokens / sequential_s, 1),
        "tokens_per_s_batched": round(batched_tokens / batched_s, 1),
        "batched_equals_one_at_a_time": [g.text for g in batched] == [g.text for g in sequential],
        "scoring_accuracy": sum(p == g for p, g in zip(scored_labels, gold, strict=True)) / len(gold),
        "generate_parse_accuracy": sum(p == g for p, g in zip(parsed, gold, strict=True)) / len(gold),
        "generate_parse_unparsed": sum(p is None for p in parsed),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
