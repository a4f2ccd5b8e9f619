"""Data-parallel fine-tuning through ``accelerate launch``: two gloo CPU processes against one.

With dropout off, two processes with batch 2 each take the same optimizer steps as one process
with batch 4: the same rows in the same order, and gradients averaged over the same tokens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bridge.config import LoraConfig, ModelRef, TrainingConfig
from bridge.distributed import LaunchError, launch_command, launch_training
from bridge.models.loading import load_model
from bridge.models.training import SAMPLE_ORDER_FILE, train_sft
from bridge.rundir import read_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO_ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"
STEPS = 5
GLOBAL_BATCH = 4
TOLERANCE = 1e-5

# gloo's sockets bind to the loopback interface; OMP_NUM_THREADS keeps two processes off each other's cores.
LAUNCH_ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_rows(count: int) -> list[dict]:
    answers = ["yes", "no", "maybe"]
    rows = []
    for i in range(count):
        question = f"Question: Is the treatment effective in trial {i}?" + " Details follow." * (i % 4)
        rows.append(
            {
                "id": f"r{i}",
                "messages": [
                    {"role": "user", "content": question + " Answer:"},
                    {"role": "assistant", "content": f"Answer: {answers[i % 3]}"},
                ],
            }
        )
    return rows


def lora_config(batch_size: int) -> TrainingConfig:
    # Dropout draws different masks in each process, so it is off for an exact comparison.
    return TrainingConfig(
        batch_size=batch_size,
        grad_accum=1,
        epochs=1.0,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        save_every=100,
        lora=LoraConfig(rank=4, alpha=8, dropout=0.0),
    )


def loopback_namespace_prefix() -> list[str]:
    """Return a command prefix that runs in a fresh network namespace with only loopback up.

    torch's TCPStore (the rendezvous of torchrun, which accelerate launch uses) listens on all
    interfaces and has no bind-address option in torch 2.13, so inside a private namespace
    nothing outside the machine can reach it.
    """
    prefix = ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return []
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
    return prefix if probe.returncode == 0 else []


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_launch_command_uses_config(tmp_path):
    command = launch_command(CPU_CONFIG, ["--rows", "x.jsonl"], num_processes=2)

    assert command[1:4] == ["launch", "--config_file", str(CPU_CONFIG)]
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[-4:] == ["-m", "bridge.distributed", "--rows", "x.jsonl"]


def test_launch_training_reports_failure(tmp_path, tiny_model_dir):
    bad_config = tmp_path / "broken.yaml"
    bad_config.write_text("distributed_type: NOT_A_TYPE\n", encoding="utf-8")

    with pytest.raises(LaunchError) as caught:
        launch_training(
            make_rows(4),
            base=ModelRef(path=str(tiny_model_dir), device="cpu", dtype="float32"),
            config=lora_config(2),
            out_dir=tmp_path / "out",
            accelerate_config=bad_config,
            env=LAUNCH_ENV,
            timeout_s=120,
        )

    assert "exited with status" in str(caught.value)
    assert (tmp_path / "out" / "launch" / "launch.log").is_file()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_model_dir):
    prefix = loopback_namespace_prefix()
    if not prefix and os.environ.get("BRIDGE_CI") != "1":
        pytest.skip("no private network namespace (unshare --user --net) for torchrun's store; runs in CI")
    rows = make_rows(24)
    ref = ModelRef(path=str(tiny_model_dir), device="cpu", dtype="float32")

    single = train_sft(
        rows,
        base=load_model(ref, padding_side="right"),
        config=lora_config(GLOBAL_BATCH),
        out_dir=tmp_path / "single",
        max_steps=STEPS,
    )
    metrics = launch_training(
        rows,
        base=ref,
        config=lora_config(GLOBAL_BATCH // 2),
        out_dir=tmp_path / "ddp",
        accelerate_config=CPU_CONFIG,
        num_processes=2,
        max_steps=STEPS,
        env=LAUNCH_ENV,
        command_prefix=prefix,
        timeout_s=170,
    )

    assert metrics["global_step"] == STEPS
    assert single.metrics["global_step"] == STEPS
    assert metrics["rows_trained"] == STEPS * GLOBAL_BATCH
    ddp_losses = [entry["loss"] for entry in metrics["loss_curve"]]
    single_losses = [entry["loss"] for entry in single.metrics["loss_curve"]]
    assert ddp_losses == pytest.approx(single_losses, rel=TOLERANCE)
    single_order = list(read_rows(tmp_path / "single" / SAMPLE_ORDER_FILE))
    ddp_order = list(read_rows(tmp_path / "ddp" / SAMPLE_ORDER_FILE))
    assert ddp_order == single_order

    expected = load_file(str(single.output_dir / "adapter_model.safetensors"))
    found = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert sorted(found) == sorted(expected)
    initial_b = {name for name, value in expected.items() if "lora_B" in name and value.abs().max() == 0}
    assert not initial_b, "LoRA B matrices did not move, so the comparison would be vacuous"
    worst = max(relative_difference(found[name], expected[name]) for name in expected)
    assert worst < TOLERANCE
