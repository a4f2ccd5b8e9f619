"""Time the TA's option scoring and generation through ``bridge serve`` replicas against the in-process path.

The model is a random 4-layer Llama (hidden size 256) with SmolLM2-135M-Instruct's tokenizer, so
prompts have SmolLM2's token counts. The prompts are chat-templated questions of 30 to 200 tokens.
Two workloads:

1. option scoring of " yes", " no", " maybe" for ``--score-prompts`` prompts;
2. greedy generation of up to ``--max-new-tokens`` tokens for ``--generate-prompts`` prompts.

Baselines, measured in the same run: :mod:`bridge.models.inference` in this process, in batches
of 8 and one prompt at a time, each the faster of two passes. Server path: :class:`bridge.engines.server.ServerEngine` over 1, 2
and 4 ``bridge serve`` processes on 127.0.0.1, with 2 requests in flight per replica. Each
replica gets ``cores / replicas`` torch threads (at least 1), so the replicas share the cores
that the in-process path uses alone. The server results are checked against the in-process
path at batch 1 (same scoring predictions, same generated texts).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_engines.py

Prints a Markdown table and a JSON summary; ``--output FILE`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bridge.config import ModelRef, ServerEngineConfig
from bridge.engines.server import ServerEngine
from bridge.models.inference import GenerationRequest, generate, score_options
from bridge.models.loading import load_model, resolve_model

OPTIONS = [" yes", " no", " maybe"]


def build_model(folder: Path) -> Path:
    """Write a random 4-layer Llama with the packaged SmolLM2-135M-Instruct tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("packaged:smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_prompts(tokenizer: Any, count: int) -> list[str]:
    topics = ["aspirin", "statins", "exercise", "vitamin D", "sleep", "fasting", "coffee", "metformin"]
    prompts = []
    for i in range(count):
        detail = " The trial enrolled adults with chronic disease and followed them for years." * (i % 9)
        messages = [{"role": "user", "content": f"Does {topics[i % len(topics)]} reduce mortality?{detail}"}]
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return prompts


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def replicas(model_dir: Path, count: int):
    """Start ``count`` bridge serve processes on loopback and yield their base URLs."""
    bridge = shutil.which("bridge", path=str(Path(sys.executable).parent)) or "bridge"
    threads = max(1, (os.cpu_count() or 1) // count)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    processes, urls = [], []
    try:
        for _ in range(count):
            port = free_port()
            processes.append(
                subprocess.Popen(
                    [bridge, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--model-name", "ta"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            urls.append(f"http://127.0.0.1:{port}/v1")
        deadline = time.monotonic() + 180
        for url in urls:
            while True:
                try:
                    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"bridge serve at {url} did not start within 180 s") from None
                    time.sleep(0.5)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def timed(function: Any, repeats: int = 1) -> tuple[Any, float]:
    """Return the function's result and its shortest wall time over ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--score-prompts", type=int, default=48, help="prompts in the option-scoring workload")
    parser.add_argument("--generate-prompts", type=int, default=24, help="prompts in the generation workload")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generated tokens per prompt at most")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4], help="replica counts to time")
    parser.add_argument("--output", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model")
        ref = ModelRef(path=str(model_dir), device="cpu", dtype="float32")
        lm = load_model(ref)
        score_texts = [p + "Answer:" for p in make_prompts(lm.tokenizer, args.score_prompts)]
        options = [OPTIONS] * len(score_texts)
        requests = [GenerationRequest(id=f"g{i}", prompt=p) for i, p in enumerate(make_prompts(lm.tokenizer, args.generate_prompts))]
        score_options(lm, score_texts[:2], options[:2], progress=False)  # warm-up

        reference_scores = None
        reference_texts = None
        for label, batch_size in (("in-process, batch 8", 8), ("in-process, batch 1", 1)):
            scores, score_seconds = timed(
                lambda b=batch_size: score_options(lm, score_texts, options, batch_size=b, progress=False), repeats=2
            )
            outputs, generate_seconds = timed(
                lambda b=batch_size: generate(lm, requests, max_new_tokens=args.max_new_tokens, batch_size=b, progress=False),
                repeats=2,
            )
            if batch_size == 1:
                reference_scores = [s.predicted for s in scores]
                reference_texts = [g.text for g in outputs]
            rows.append({"path": label, "score_seconds": score_seconds, "generate_seconds": generate_seconds,
                         "completion_tokens": sum(g.completion_tokens for g in outputs)})

        for count in args.replicas:
            with replicas(model_dir, count) as urls:
                engine = ServerEngine(ref, ServerEngineConfig(endpoints=urls, model="ta", concurrency=2), tokenizer=lm.tokenizer)
                engine.score_options(score_texts[:2], options[:2], progress=False)  # warm-up
                scores, score_seconds = timed(lambda e=engine: e.score_options(score_texts, options, progress=False))
                outputs, generate_seconds = timed(
                    lambda e=engine: e.generate(requests, max_new_tokens=args.max_new_tokens, progress=False)
                )
            rows.append(
                {
                    "path": f"server, {count} replica(s)",
                    "score_seconds": score_seconds,
                    "generate_seconds": generate_seconds,
                    "completion_tokens": sum(g.completion_tokens for g in outputs),
                    "same_predictions": [s.predicted for s in scores] == reference_scores,
                    "same_texts": [g.text for g in outputs] == reference_texts,
                }
            )

    baseline = rows[0]
    print("| path | scoring s | scoring vs batch 8 | generation s | generation vs batch 8 | same as batch 1 |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        row["score_ratio"] = baseline["score_seconds"] / row["score_seconds"]
        row["generate_ratio"] = baseline["generate_seconds"] / row["generate_seconds"]
        same = "-" if "same_predictions" not in row else f"{row['same_predictions']} / {row['same_texts']}"
        print(
            f"| {row['path']} | {row['score_seconds']:.1f} | {row['score_ratio']:.2f} | "
            f"{row['generate_seconds']:.1f} | {row['generate_ratio']:.2f} | {same} |"
        )
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}",
        "settings": vars(args) | {"output": str(args.output) if args.output else None},
        "rows": rows,
    }
    print(json.dumps(summary, indent=2))
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
