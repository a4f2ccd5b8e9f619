"""Fine-tuning and merging on tiny in-process models: labels, LoRA, full, packing, resume, merge."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from bridge.config import LoraConfig, ModelRef, TrainingConfig
from bridge.errors import BridgeError, ConfigError, DataError
from bridge.models.loading import load_model
from bridge.models.merge import MERGE_FILE, MergeError, merge_adapter
from bridge.models.training import (
    BASE_FILE,
    IGNORE_INDEX,
    SAMPLE_ORDER_FILE,
    TrainingError,
    _RowIndexCollator,
    _to_dataset,
    tokenize_rows,
    train_sft,
)

ANSWERS = ["yes", "no", "maybe"]


def make_rows(count: int, prefix: str = "r") -> list[dict]:
    rows = []
    for i in range(count):
        messages = [
            {"role": "user", "content": f"Question: Is the treatment effective in trial {i}? Answer:"},
            {"role": "assistant", "content": f"Answer: {ANSWERS[i % 3]}"},
        ]
        if i % 2:
            messages.insert(0, {"role": "system", "content": "You are a careful medical assistant."})
        rows.append({"id": f"{prefix}{i}", "messages": messages})
    return rows


def load_tiny(folder: Path):
    # Pinned to the CPU in float32, so that the exact comparisons hold on a GPU machine too.
    return load_model(ModelRef(path=str(folder), device="cpu", dtype="float32"), padding_side="right")


def quick_config(**overrides) -> TrainingConfig:
    settings = dict(
        batch_size=2, grad_accum=2, epochs=1.0, learning_rate=1e-2, warmup_ratio=0.0, save_every=100
    )
    settings.update(overrides)
    return TrainingConfig(**settings)


class Interrupt(Exception):
    """Raised by StopBefore to simulate a kill between optimizer steps."""


class StopBefore(TrainerCallback):
    """Raise Interrupt when the optimizer step after ``step`` begins."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt


@pytest.fixture
def deterministic():
    """Deterministic kernels and one CPU thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Labels


def _pubmedqa_rows(data_dir: Path, count: int) -> list[dict]:
    items = json.loads((data_dir / "pubmedqa_pqal" / "ori_pqal.json").read_text(encoding="utf-8"))
    rows = []
    for index, (pmid, item) in enumerate(list(items.items())[:count]):
        messages = [
            {"role": "user", "content": f"Context: {' '.join(item['CONTEXTS'])}\nQuestion: {item['QUESTION']}"},
            {"role": "assistant", "content": f"{item['LONG_ANSWER']}\nAnswer: {item['final_decision']}"},
        ]
        if index % 2 == 0:
            messages.insert(0, {"role": "system", "content": "Answer with yes, no or maybe."})
        rows.append({"id": pmid, "messages": messages})
    return rows


def test_completion_mask_on_pubmedqa_rows(data_dir, tiny_tokenizer):
    rows = _pubmedqa_rows(data_dir, 4)
    end_of_turn_id = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = tokenize_rows(rows, tiny_tokenizer, end_of_turn="<|im_end|>", max_seq_len=100_000)

    assert [e.id for e in examples] == [r["id"] for r in rows]
    for row, example in zip(rows, examples, strict=True):
        trained = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
        start = trained[0]
        assert trained == list(range(start, len(example.input_ids))), "trained tokens are not one suffix"
        assert example.input_ids[-1] == end_of_turn_id
        assert example.labels[-1] == end_of_turn_id, "end-of-turn token lost its label"
        completion = tiny_tokenizer.decode(example.input_ids[start:])
        assert completion == row["messages"][-1]["content"] + "<|im_end|>"
        prompt = tiny_tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
        assert tiny_tokenizer.decode(example.input_ids[:start]) == prompt
        assert example.labels[start:] == example.input_ids[start:]


def test_padding_keeps_end_of_turn_label(tiny_model_dir):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    lm = load_tiny(tiny_model_dir)
    assert lm.tokenizer.pad_token_id != lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [make_rows(1)[0], make_rows(2)[1]]  # different lengths: one with a system message
    examples = tokenize_rows(rows, lm.tokenizer, end_of_turn="<|im_end|>", max_seq_len=512)
    dataset = _to_dataset(examples, pack_length=None)
    collator = _RowIndexCollator(DataCollatorForLanguageModeling(pad_token_id=lm.tokenizer.pad_token_id))
    batch = collator([dataset[0], dataset[1]])

    assert batch["row_index"].tolist() == [0, 1]
    for position, example in enumerate(examples):
        length = len(example.input_ids)
        assert batch["labels"][position, length - 1].item() == example.input_ids[-1]
        assert (batch["labels"][position, length:] == IGNORE_INDEX).all()


def test_row_without_trained_token_stops_run(tiny_model_dir, tmp_path):
    rows = make_rows(4)
    rows[2]["messages"] = rows[2]["messages"][:-1]  # ends with the user's question
    with pytest.raises(DataError, match="no trained token") as error:
        train_sft(rows, base=load_tiny(tiny_model_dir), config=quick_config(), out_dir=tmp_path / "run")
    assert "r2" in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_too_long_row_is_an_error(tiny_model_dir, tmp_path):
    rows = make_rows(3)
    rows[1]["messages"][-1]["content"] = "Answer: yes. " * 40
    with pytest.raises(DataError, match="longer than max_seq_len=64") as error:
        train_sft(rows, base=load_tiny(tiny_model_dir), config=quick_config(max_seq_len=64), out_dir=tmp_path)
    assert "r1 (" in str(error.value)


def test_unknown_lora_target_is_an_error(tiny_model_dir, tmp_path):
    config = quick_config(lora=LoraConfig(target_modules=["q_proj", "query_key_value"]))
    with pytest.raises(ConfigError, match="query_key_value"):
        train_sft(make_rows(4), base=load_tiny(tiny_model_dir), config=config, out_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Training


def test_lora_trains_adapter_only(tiny_model_dir, tmp_path, caplog):
    original = load_file(tiny_model_dir / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="bridge.models.training"):
        result = train_sft(make_rows(8), base=load_tiny(tiny_model_dir), config=quick_config(), out_dir=tmp_path)

    config_logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training configuration")]
    assert config_logs, "resolved configuration was not logged"
    assert '"target_modules": ["q_proj"' in config_logs[0]
    assert result.global_step == 2
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert (result.output_dir / BASE_FILE).is_file()

    state = result.model.get_base_model().state_dict()
    lora_b = {k: v for k, v in state.items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values()), "LoRA B matrices did not move from zero"
    for name, weight in original.items():
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert key in state, f"base weight {name} not found in the trained model"
        assert torch.equal(state[key], weight), f"base weight {name} changed"

    metrics = json.loads(result.metrics_path.read_text())
    assert len(metrics["loss_curve"]) == 2
    assert metrics["tokens"] > 0
    assert metrics["trained_tokens"] < metrics["tokens"]


def test_full_finetune_changes_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    original = load_file(tiny_model_dir / "model.safetensors")
    result = train_sft(
        make_rows(8), base=load_tiny(tiny_model_dir), config=quick_config(method="full", learning_rate=1e-3), out_dir=tmp_path
    )
    assert result.method == "full"
    saved = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.float32)
    saved_state = saved.state_dict()
    changed = [name for name, weight in original.items() if not torch.equal(saved_state[name], weight)]
    assert len(changed) == len(original), f"unchanged weights: {set(original) - set(changed)}"
    for name, weight in result.model.state_dict().items():
        assert torch.equal(saved_state[name], weight), f"saved {name} differs from the trained model"


def test_finished_run_is_returned_not_repeated(tiny_model_dir, tmp_path):
    rows = make_rows(8)
    first = train_sft(rows, base=load_tiny(tiny_model_dir), config=quick_config(), out_dir=tmp_path)
    order = (tmp_path / SAMPLE_ORDER_FILE).read_text()
    assert not (tmp_path / "checkpoints").exists()

    again = train_sft(rows, base=load_tiny(tiny_model_dir), config=quick_config(), out_dir=tmp_path)
    assert again.metrics == first.metrics
    assert (tmp_path / SAMPLE_ORDER_FILE).read_text() == order
    expected = {k: v for k, v in first.model.state_dict().items() if "lora_" in k}
    actual = {k: v for k, v in again.model.state_dict().items() if "lora_" in k}
    assert expected.keys() == actual.keys()
    for name, weight in expected.items():
        assert torch.equal(actual[name], weight), f"{name} was not loaded from the finished run"


@pytest.mark.parametrize("packing", [False, True])
def test_packing_on_and_off_train(tiny_model_dir, tmp_path, packing):
    rows = make_rows(12)
    result = train_sft(
        rows, base=load_tiny(tiny_model_dir), config=quick_config(packing=packing, max_seq_len=128), out_dir=tmp_path
    )
    losses = [entry["loss"] for entry in result.metrics["loss_curve"]]
    assert losses[-1] < losses[0]
    order = [json.loads(line) for line in (tmp_path / SAMPLE_ORDER_FILE).read_text().splitlines()]
    assert sorted(row for entry in order for row in entry["rows"]) == sorted(r["id"] for r in rows)
    if packing:
        assert result.global_step < 3, "packing did not put several rows into one sequence"
    else:
        assert result.global_step == 3


def test_packed_rows_do_not_attend_to_each_other(tiny_model_dir):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    lm = load_tiny(tiny_model_dir)
    examples = tokenize_rows(make_rows(3), lm.tokenizer, end_of_turn="<|im_end|>", max_seq_len=256)
    packed = _to_dataset(examples, pack_length=256)
    assert len(packed) == 1
    collator = _RowIndexCollator(DataCollatorForLanguageModeling(pad_token_id=lm.tokenizer.pad_token_id, padding_free=True))
    batch = collator([packed[0]])
    with torch.no_grad():
        # SFTTrainer.compute_loss passes use_cache=False; with a cache, transformers 5.25 ignores
        # the row boundaries in position_ids.
        logits = lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        offset = 0
        for position in batch["row_index"].tolist():
            ids = examples[position].input_ids
            alone = lm.model(input_ids=torch.tensor([ids])).logits[0]
            assert torch.allclose(logits[offset : offset + len(ids)], alone, atol=1e-5), f"row {position} saw another row"
            offset += len(ids)


def test_non_finite_loss_stops_run(tiny_model_dir, tmp_path):
    lm = load_tiny(tiny_model_dir)
    with torch.no_grad():
        lm.model.model.norm.weight[0] = float("nan")
    with pytest.raises(TrainingError, match="loss is nan at optimizer step 1"):
        train_sft(make_rows(8), base=lm, config=quick_config(), out_dir=tmp_path)


def test_dev_metric_picks_best_and_stops_early(tiny_model_dir, tmp_path):
    scores = iter([0.2, 0.9, 0.5, 0.4, 0.3])
    snapshots: list[dict[str, torch.Tensor]] = []
    padding_sides: list[str] = []

    def dev_metric(model, tokenizer) -> float:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items() if "lora_" in k})
        padding_sides.append(tokenizer.padding_side)
        return next(scores)

    # Left padding, as for generation: a dev metric that generates must find it unchanged.
    base = load_model(ModelRef(path=str(tiny_model_dir), device="cpu", dtype="float32"), padding_side="left")
    config = quick_config(eval_every=1, early_stopping_patience=2, epochs=3.0)
    result = train_sft(
        make_rows(8), base=base, config=config, out_dir=tmp_path,
        dev_rows=make_rows(2, prefix="d"), dev_metric=dev_metric,
    )
    assert padding_sides == ["left"] * 4
    assert result.global_step == 4
    assert result.metrics["stopped_early"] is True
    assert result.metrics["best_step"] == 2
    assert [e["dev_metric"] for e in result.metrics["dev_evaluations"]] == [0.2, 0.9, 0.5, 0.4]
    final = {k: v for k, v in result.model.state_dict().items() if "lora_" in k}
    for name, weight in snapshots[1].items():
        assert torch.equal(final[name], weight), f"{name} is not from the best evaluation"
    assert not (tmp_path / "best").exists()


def test_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path, deterministic):
    rows = make_rows(14)  # 7 micro-batches of 2: four optimizer steps per epoch, the last one short
    dev = make_rows(3, prefix="d")
    config = quick_config(epochs=2.0, save_every=3, eval_every=2, lora=LoraConfig(rank=4, dropout=0.1))

    whole = train_sft(rows, base=load_tiny(tiny_model_dir), config=config, out_dir=tmp_path / "whole", dev_rows=dev)

    resumed_dir = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        train_sft(rows, base=load_tiny(tiny_model_dir), config=config, out_dir=resumed_dir, dev_rows=dev,
                  callbacks=[StopBefore(5)])
    assert (resumed_dir / "checkpoints" / "checkpoint-3").is_dir()
    changed = config.model_copy(update={"learning_rate": 2e-2})
    with pytest.raises(TrainingError, match="learning_rate"):
        train_sft(rows, base=load_tiny(tiny_model_dir), config=changed, out_dir=resumed_dir, dev_rows=dev)
    resumed = train_sft(rows, base=load_tiny(tiny_model_dir), config=config, out_dir=resumed_dir, dev_rows=dev)

    assert resumed.metrics["resumed_from_step"] == 3
    assert resumed.global_step == whole.global_step == 8
    whole_order = (tmp_path / "whole" / SAMPLE_ORDER_FILE).read_text()
    assert (resumed_dir / SAMPLE_ORDER_FILE).read_text() == whole_order
    assert resumed.metrics["best_step"] == whole.metrics["best_step"]
    expected = load_file(whole.output_dir / "adapter_model.safetensors")
    actual = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert (expected[name] - actual[name]).abs().max() <= 1e-6, name


# --------------------------------------------------------------------------------------------
# Merge


def make_adapter(model_dir: Path, folder: Path, *, trained: bool = True) -> Path:
    """Save a LoRA adapter for the tiny model; with ``trained``, its B matrices are random, not zero."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lm = load_tiny(model_dir)
    torch.manual_seed(1)
    model = get_peft_model(lm.model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    if trained:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    (folder / BASE_FILE).write_text(json.dumps({"path": str(model_dir), "num_hidden_layers": 2}))
    return folder


def test_merge_matches_adapter_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = merge_adapter(adapter, tmp_path / "merged")

    report = json.loads((out / MERGE_FILE).read_text())
    assert report["changed_tensors"] == 6
    assert report["max_logit_diff"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(load_tiny(tiny_model_dir).model, adapter)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        difference = (merged(input_ids=ids).logits - with_adapter(input_ids=ids).logits).abs().max()
    assert difference <= 1e-4


def test_merge_rejects_untrained_adapter(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", trained=False)
    with pytest.raises(MergeError, match="unchanged"):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_rejects_logit_mismatch(tiny_model_dir, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    original = BaseTuner.merge_and_unload

    def broken_merge(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.add_(0.05)
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", broken_merge)
    with pytest.raises(MergeError, match="logits differ"):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_command(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from bridge.cli import app

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    result = CliRunner().invoke(app, ["merge", str(adapter), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "merged" in result.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()

    not_adapter = CliRunner().invoke(app, ["merge", str(tmp_path / "merged"), str(tmp_path / "again")])
    assert isinstance(not_adapter.exception, BridgeError)
    assert "adapter_config.json" in str(not_adapter.exception)
