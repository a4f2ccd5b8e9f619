"""The transformers engine on a CUDA GPU against the CPU; skipped without a GPU.

scripts/gpu_check.py runs the same comparisons on a larger model and records throughput.
"""

from __future__ import annotations

import math

import pytest
import torch

from bridge.config import LoraConfig, ModelRef, TrainingConfig
from bridge.models.inference import GenerationRequest, generate, score_options
from bridge.models.loading import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def prompts(lm, count: int) -> list[str]:
    texts = []
    for i in range(count):
        messages = [{"role": "user", "content": f"Question: Does drug {i} help?" + " More detail." * (i % 4)}]
        texts.append(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_engines import save_varied_model

    return save_varied_model(tmp_path_factory.mktemp("gpu") / "model")


def test_gpu_generation_matches_cpu(model_dir):
    cpu = load_model(ModelRef(path=str(model_dir), device="cpu", dtype="float32"))
    gpu = load_model(ModelRef(path=str(model_dir), device="cuda", dtype="float32"))
    requests = [GenerationRequest(id=f"q{i}", prompt=p) for i, p in enumerate(prompts(cpu, 12))]

    expected = generate(cpu, requests, max_new_tokens=16, batch_size=4, progress=False)
    found = generate(gpu, requests, max_new_tokens=16, batch_size=4, progress=False)

    assert [g.text for g in found] == [g.text for g in expected]
    assert [g.completion_tokens for g in found] == [g.completion_tokens for g in expected]


def test_gpu_option_scores_match_cpu(model_dir):
    cpu = load_model(ModelRef(path=str(model_dir), device="cpu", dtype="float32"))
    gpu = load_model(ModelRef(path=str(model_dir), device="cuda", dtype="float32"))
    texts = [p + "Answer:" for p in prompts(cpu, 8)]
    options = [[" yes", " no", " maybe"]] * len(texts)

    expected = score_options(cpu, texts, options, batch_size=4, progress=False)
    found = score_options(gpu, texts, options, batch_size=4, progress=False)

    assert [s.predicted for s in found] == [s.predicted for s in expected]
    for got, want in zip(found, expected, strict=True):
        assert got.probs == pytest.approx(want.probs, abs=1e-4)


def test_gpu_bf16_lora_steps(model_dir, tmp_path):
    pytest.importorskip("trl")
    from bridge.models.training import train_sft

    rows = [
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": f"Question: Is the treatment effective in trial {i}? Answer:"},
                {"role": "assistant", "content": f"Answer: {('yes', 'no', 'maybe')[i % 3]}"},
            ],
        }
        for i in range(16)
    ]
    config = TrainingConfig(
        batch_size=4, epochs=1.0, learning_rate=1e-3, warmup_ratio=0.0, save_every=100, lora=LoraConfig(rank=4, alpha=8, dropout=0.0)
    )
    runs = {}
    for name, device, dtype in (("cpu", "cpu", "float32"), ("gpu", "cuda", "bfloat16")):
        base = load_model(ModelRef(path=str(model_dir), device=device, dtype=dtype), padding_side="right")
        runs[name] = train_sft(rows, base=base, config=config, out_dir=tmp_path / name, max_steps=3)

    cpu_losses = [entry["loss"] for entry in runs["cpu"].metrics["loss_curve"]]
    gpu_losses = [entry["loss"] for entry in runs["gpu"].metrics["loss_curve"]]
    assert runs["gpu"].global_step == 3
    assert all(math.isfinite(loss) for loss in gpu_losses)
    assert gpu_losses[0] == pytest.approx(cpu_losses[0], rel=0.02)
    assert next(runs["gpu"].model.parameters()).dtype == torch.bfloat16
