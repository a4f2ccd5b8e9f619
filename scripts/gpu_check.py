"""Check bf16 LoRA fine-tuning and batched generation on a CUDA GPU against the same work on the CPU.

Builds a small random Llama (4 layers, hidden 256, the test tokenizer from tests/tiny_models.py)
and runs, through bridge's own code paths:

1. LoRA fine-tuning with :func:`bridge.models.training.train_sft`: ``--steps`` optimizer steps on
   the CPU in float32, on the GPU in float32 and on the GPU in bfloat16, from the same weights and
   rows. Reported: the loss curves, the relative difference of the adapters from the CPU's, and
   tokens/s.
2. Greedy batched generation with :func:`bridge.models.inference.generate`: 64 prompts in batches
   of 16 on the CPU (float32) and the GPU (float32 and bfloat16). Reported: the fraction of
   completions identical to the CPU's, and completion tokens/s.

Pass criteria (exit status 1 when one fails): GPU float32 matches the CPU (adapter relative
difference below 1e-3, every completion identical); GPU bfloat16 trains (finite losses, first
loss within 2 % of the CPU's). bf16 completions differing from float32 ones are reported, not
failed, because greedy decoding amplifies rounding differences.

Fine-tuning needs trl and peft. On a machine without them, pass ``--wheels DIR`` with wheels
made here (``pip download trl==1.16.0 peft==0.21.2 --no-deps -d DIR``) to install them first.

NOTE: this script has not yet run on a GPU. It is sized to finish well inside 8 minutes: on
this repository's 2-core CPU machine a simulated run with 2 steps and 6 prompts took about a
minute, and the GPU machine has 16 cores.

Usage (from the repository root)::

    python scripts/gpu_check.py --out gpu_check.json [--steps 20] [--wheels wheels/]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "src"), str(REPO_ROOT / "tests")]

ANSWERS = ["yes", "no", "maybe"]


def install_wheels(folder: Path) -> None:
    """Install the wheels in ``folder`` without dependencies and without an index."""
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"--wheels {folder}: no .whl files found")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *wheels], check=True)
    importlib.invalidate_caches()


def build_model(folder: Path) -> Path:
    """Write a random 4-layer Llama with the test tokenizer; initializer_range 0.2 makes outputs depend on prompts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def training_rows(count: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        question = f"Question: Is the treatment effective in trial {i}?" + " The cohort was small." * (i % 5)
        rows.append(
            {
                "id": f"r{i}",
                "messages": [
                    {"role": "user", "content": question + " Answer:"},
                    {"role": "assistant", "content": f"Answer: {ANSWERS[i % 3]}"},
                ],
            }
        )
    return rows


def relative_difference(found: dict[str, Any], expected: dict[str, Any]) -> float:
    """Return the largest per-tensor ||found - expected|| / ||expected||."""
    worst = 0.0
    for name, value in expected.items():
        reference = value.float()
        worst = max(worst, float((found[name].float() - reference).norm() / reference.norm().clamp_min(1e-12)))
    return worst


def run_training(model_dir: Path, work: Path, device: str, dtype: str, steps: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from bridge.config import LoraConfig, ModelRef, TrainingConfig
    from bridge.models.loading import load_model
    from bridge.models.training import train_sft

    config = TrainingConfig(
        batch_size=8,
        grad_accum=1,
        epochs=1.0,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        save_every=1000,
        lora=LoraConfig(rank=8, alpha=16, dropout=0.0),
    )
    lm = load_model(ModelRef(path=str(model_dir), device=device, dtype=dtype), padding_side="right")
    if device == "cuda":
        torch.cuda.synchronize()
    result = train_sft(training_rows(8 * steps), base=lm, config=config, out_dir=work / f"train-{device}-{dtype}", max_steps=steps)
    metrics = result.metrics
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    return {
        "losses": [entry["loss"] for entry in metrics["loss_curve"]],
        "tokens": metrics["tokens"],
        "seconds": metrics["train_seconds"],
        "tokens_per_second": metrics["tokens_per_second"],
        "adapter": {name: value.cpu() for name, value in adapter.items()},
    }


def run_generation(model_dir: Path, device: str, dtype: str, count: int, batch_size: int) -> dict[str, Any]:
    import torch

    from bridge.config import ModelRef
    from bridge.models.inference import GenerationRequest, generate
    from bridge.models.loading import load_model

    lm = load_model(ModelRef(path=str(model_dir), device=device, dtype=dtype))
    requests = []
    for i in range(count):
        messages = [{"role": "user", "content": f"Question: Does drug {i} lower blood pressure?" + " Details." * (i % 7)}]
        prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        requests.append(GenerationRequest(id=f"q{i}", prompt=prompt))
    generate(lm, requests[:batch_size], max_new_tokens=4, batch_size=batch_size, progress=False)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = generate(lm, requests, max_new_tokens=48, batch_size=batch_size, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(g.completion_tokens for g in outputs)
    return {"texts": [g.text for g in outputs], "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON file for the results")
    parser.add_argument("--steps", type=int, default=20, help="LoRA optimizer steps per run")
    parser.add_argument("--wheels", type=Path, help="folder of wheels (trl, peft) to install first")
    args = parser.parse_args()

    if args.wheels:
        install_wheels(args.wheels)
    import torch
    import transformers

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible to torch; this check needs one")
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model")

        generation = {
            name: run_generation(model_dir, device, dtype, count=64, batch_size=16)
            for name, device, dtype in (("cpu_fp32", "cpu", "float32"), ("gpu_fp32", "cuda", "float32"), ("gpu_bf16", "cuda", "bfloat16"))
        }
        cpu_texts = generation["cpu_fp32"]["texts"]
        for result in generation.values():
            result["identical_to_cpu"] = sum(a == b for a, b in zip(result.pop("texts"), cpu_texts, strict=True)) / len(cpu_texts)
            result["speedup_over_cpu"] = result["tokens_per_second"] / generation["cpu_fp32"]["tokens_per_second"]
        report["generation"] = generation
        if generation["gpu_fp32"]["identical_to_cpu"] < 1.0:
            failures.append("GPU float32 greedy completions differ from the CPU's")

        try:
            importlib.import_module("trl")
            importlib.import_module("peft")
        except ImportError as exc:
            report["training"] = f"skipped: {exc}; pass --wheels with trl and peft wheels"
            failures.append("fine-tuning was not checked (trl or peft missing)")
        else:
            training = {
                name: run_training(model_dir, work, device, dtype, args.steps)
                for name, device, dtype in (("cpu_fp32", "cpu", "float32"), ("gpu_fp32", "cuda", "float32"), ("gpu_bf16", "cuda", "bfloat16"))
            }
            reference = training["cpu_fp32"]
            reference_adapter = reference["adapter"]
            for result in training.values():
                result["adapter_relative_difference"] = relative_difference(result.pop("adapter"), reference_adapter)
                result["speedup_over_cpu"] = result["tokens_per_second"] / reference["tokens_per_second"]
            report["training"] = training
            if training["gpu_fp32"]["adapter_relative_difference"] > 1e-3:
                failures.append("GPU float32 LoRA weights differ from the CPU's by more than 1e-3")
            bf16 = training["gpu_bf16"]
            if not all(math.isfinite(loss) for loss in bf16["losses"]):
                failures.append("a bf16 training loss is not finite")
            elif abs(bf16["losses"][0] - reference["losses"][0]) > 0.02 * abs(reference["losses"][0]):
                failures.append("the first bf16 loss differs from the CPU's by more than 2 %")

    report["failures"] = failures
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
