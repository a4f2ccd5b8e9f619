"""Compare the cost model's predictions with a real run of the selection and teacher stages.

For each pool size N and budget fraction b (PubMedQA PQA-L, the embedded default configuration
otherwise):

* predicted teacher calls and tokens: :func:`bridge.api.estimate`, offline, as ``bridge estimate``
  prints them, once without ``teacher.tokenizer`` (UTF-8 bytes / 4) and once with the TA's
  tokenizer as ``teacher.tokenizer``;
* predicted TA tokens of the selection pass: the tokens option scoring feeds the TA (each prompt
  once, plus every option token after the first), measured on the first 20 examples of the pool
  and scaled to N, the same extrapolation the teacher estimate uses;
* real: ``bridge run --until teach`` with the reference teacher and a random 2-layer TA that has
  SmolLM2-135M-Instruct's tokenizer (so token counts are SmolLM2's, and the forward passes take
  seconds). Teacher calls and tokens come from the run's ledger, and TA tokens from a counter
  around the TA's forward pass (non-padding input tokens of every call).

Usage::

    BRIDGE_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_cost_model.py

Prints a Markdown table and a JSON summary; ``--output FILE`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

SAMPLE = 20


def build_ta(folder: Path) -> Path:
    """Write a random 2-layer Llama with the packaged SmolLM2-135M-Instruct tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bridge.models.loading import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("packaged:smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class ForwardTokenCounter:
    """Count the non-padding input tokens of every forward pass of a causal-LM class."""

    def __init__(self, model_class: type) -> None:
        self.model_class = model_class
        self.original = model_class.forward
        self.tokens = 0

    def __enter__(self) -> ForwardTokenCounter:
        counter = self

        def forward(module: Any, *args: Any, **kwargs: Any) -> Any:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if input_ids is not None:
                width = input_ids.shape[1]
                # With a key-value cache the mask also covers earlier tokens; the last columns are this call's.
                counter.tokens += int(mask[:, -width:].sum()) if mask is not None else int(input_ids.numel())
            return counter.original(module, *args, **kwargs)

        self.model_class.forward = forward
        return self

    def __exit__(self, *exc: object) -> None:
        self.model_class.forward = self.original


def predict_ta_tokens(config: Any, splits: Any, tokenizer: Any) -> float:
    """Predict the selection pass's TA tokens from the first examples of the pool, scaled to the pool."""
    from bridge.models.inference import option_token_ids
    from bridge.prompts import option_continuations, render_all, scoring_prompt

    class Encoder:
        def encode(self, text: str) -> list[int]:
            bos = tokenizer.bos_token
            return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])

    pool = splits.train
    sample = pool[:SAMPLE]
    rendered, _ = render_all(
        sample,
        splits.task,
        style="answer_only",
        system=config.prompts.system,
        tokenizer=tokenizer,
        max_context_tokens=config.prompts.max_context_tokens,
    )
    by_id = {e.id: e for e in sample}
    counts = []
    for prompt in rendered:
        text = scoring_prompt(prompt, tokenizer)
        prompt_ids, option_ids = option_token_ids(Encoder(), text, option_continuations(splits.task, by_id[prompt.example_id]))
        counts.append(len(prompt_ids) + sum(len(ids) - 1 for ids in option_ids))
    return sum(counts) / len(counts) * len(pool)


def measure(pool_size: int, fraction: float, ta_dir: Path, runs_dir: Path, *, teacher_tokenizer: bool) -> dict[str, Any]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from bridge import api
    from bridge.config import load_config
    from bridge.data import load_dataset
    from bridge.pipeline import run_dir_for, run_pipeline
    from bridge.teacher.ledger import summarize_ledger

    overrides = [
        f"name=cost-{pool_size}-{fraction}-{'tokenizer' if teacher_tokenizer else 'bytes'}",
        f"data.train_size={pool_size}",
        f"budget.fraction={fraction}",
        f"models.ta.path={ta_dir}",
        "models.ta.device=cpu",
        f"output.runs_dir={runs_dir}",
    ]
    if teacher_tokenizer:
        overrides.append(f"teacher.tokenizer={ta_dir}")
    config = load_config(None, overrides)
    estimate = api.estimate(config)
    splits = load_dataset(config.data)
    predicted_ta = predict_ta_tokens(config, splits, AutoTokenizer.from_pretrained(ta_dir))

    started = time.perf_counter()
    with ForwardTokenCounter(LlamaForCausalLM) as counter:
        run_pipeline(config, until_stage="teach", yes=True)
    seconds = time.perf_counter() - started
    ledger = summarize_ledger(run_dir_for(config).root)
    return {
        "pool": len(splits.train),
        "fraction": fraction,
        "teacher_tokenizer": "SmolLM2" if teacher_tokenizer else "bytes",
        "teacher_calls": {"predicted": estimate.planned_calls, "real": ledger.calls},
        "teacher_tokens": {"predicted": estimate.tokens_estimate, "predicted_worst": estimate.tokens_worst, "real": ledger.tokens},
        "ta_tokens": {"predicted": round(predicted_ta), "real": counter.tokens},
        "seconds": round(seconds, 1),
    }


def ratio(entry: dict[str, Any]) -> str:
    return f"{entry['real'] / entry['predicted']:.3f}" if entry["predicted"] else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, nargs="+", default=[40, 120], help="training pool sizes N")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1], help="budget fractions b")
    parser.add_argument("--output", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ta_dir = build_ta(work / "ta")
        for teacher_tokenizer in (False, True):
            for pool_size in args.pools:
                for fraction in args.fractions:
                    results.append(measure(pool_size, fraction, ta_dir, work / "runs", teacher_tokenizer=teacher_tokenizer))

    print("| N | b | teacher tokens counted by | teacher calls (pred / real) | teacher tokens (pred / real) | TA tokens (pred / real) |")
    print("| ---: | ---: | --- | --- | --- | --- |")
    for r in results:
        cells = [
            f"{r[key]['predicted']} / {r[key]['real']} ({ratio(r[key])})" for key in ("teacher_calls", "teacher_tokens", "ta_tokens")
        ]
        print(f"| {r['pool']} | {r['fraction']} | {r['teacher_tokenizer']} | " + " | ".join(cells) + " |")
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(summary, indent=2))
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
