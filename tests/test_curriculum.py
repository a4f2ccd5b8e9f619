"""Student curriculum: stage rows, mixing, ordering, the step-by-step loss, GKD and the configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from bridge.config import (
    BridgeConfig,
    CurriculumStage,
    ModelRef,
    PromptConfig,
    StudentConfig,
    TrainingConfig,
)
from bridge.curriculum import (
    active_stages,
    build_stage_data,
    label_rows,
    order_easy_to_hard,
    rationale_rows,
    read_mix_file,
    shares_tokenizer,
    step_by_step_rows,
    train_gkd,
    train_stage,
)
from bridge.data.types import Example, TaskSpec
from bridge.errors import ConfigError, DataError
from bridge.models.loading import load_model
from bridge.models.training import IGNORE_INDEX, SAMPLE_ORDER_FILE, tokenize_rows

TASK = TaskSpec("pubmedqa_pqal", "yes_no_maybe", ("yes", "no", "maybe"), domain="biomedical research")
PROMPTS = PromptConfig(max_context_tokens=None)
GOLDS = ["yes", "no", "maybe", "yes", "no", "yes"]


def make_examples() -> list[Example]:
    return [
        Example(id=f"q{i}", question=f"Does drug {i} help?", gold=gold, context=f"Trial {i} enrolled patients.")
        for i, gold in enumerate(GOLDS)
    ]


def tutor_rows(ids=("q0", "q2", "q4")) -> list[dict]:
    golds = dict(zip([f"q{i}" for i in range(len(GOLDS))], GOLDS, strict=True))
    return [{"id": i, "target": f"Trial {i[1:]} showed an effect.\nAnswer: {golds[i]}"} for i in ids]


def load_tiny(folder: Path, keep_layers=None):
    return load_model(ModelRef(path=str(folder), device="cpu", dtype="float32", keep_layers=keep_layers))


# --------------------------------------------------------------------------------------------
# Rows


def test_label_rows_are_answer_only(tiny_tokenizer):
    rows = label_rows(make_examples(), TASK, PROMPTS, tiny_tokenizer)
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(6)]
    first = rows[0]["messages"]
    assert first[-1] == {"role": "assistant", "content": "Answer: yes"}
    assert "Reply with the final answer only" in first[-2]["content"]
    assert "Hint" not in first[-2]["content"]


def test_rationale_rows_use_deployed_prompt(tiny_tokenizer):
    rows = rationale_rows(tutor_rows(), make_examples(), TASK, PROMPTS, tiny_tokenizer)
    assert [r["id"] for r in rows] == ["q0", "q2", "q4"]
    assert rows[1]["messages"][-1]["content"] == "Trial 2 showed an effect.\nAnswer: maybe"
    assert "Think step by step" in rows[1]["messages"][-2]["content"]
    with pytest.raises(DataError, match="outside the training split"):
        rationale_rows([{"id": "zz", "target": "x\nAnswer: yes"}], make_examples(), TASK, PROMPTS, tiny_tokenizer)


@pytest.mark.parametrize(("alpha", "tasks"), [(0.5, ["label", "rationale"]), (1.0, ["label"]), (0.0, ["rationale"])])
def test_step_by_step_pairs_tasks(tiny_tokenizer, alpha, tasks):
    rows, weights = step_by_step_rows(tutor_rows(), make_examples(), TASK, PROMPTS, tiny_tokenizer, alpha=alpha)
    assert [r["id"] for r in rows] == [f"{i}#{task}" for i in ("q0", "q2", "q4") for task in tasks]
    expected = {"label": alpha, "rationale": 1 - alpha}
    assert weights == [expected[r["task"]] for r in rows]
    for row in rows:
        reply = row["messages"][-1]["content"]
        if row["task"] == "label":
            assert reply.startswith("Answer: ")
            assert "Reply with the final answer only" in row["messages"][-2]["content"]
        else:
            assert "showed an effect" in reply


def test_mix_file_formats_and_errors(tmp_path):
    path = tmp_path / "mix.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
        {"prompt": "Name a colour", "response": "blue"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    rows = read_mix_file(path, limit=None, seed=0)
    assert [r["id"] for r in rows] == ["mix/1", "mix/2", "mix/3"]
    assert rows[1]["messages"] == [
        {"role": "user", "content": "Add the numbers\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    sample = read_mix_file(path, limit=2, seed=4)
    assert len(sample) == 2
    assert sample == read_mix_file(path, limit=2, seed=4)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: unrecognised row with keys \['question'\]"):
        read_mix_file(bad, limit=None, seed=0)
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: invalid JSON"):
        read_mix_file(bad, limit=None, seed=0)
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}) + "\n")
    with pytest.raises(DataError, match="ending with the assistant"):
        read_mix_file(bad, limit=None, seed=0)
    with pytest.raises(ConfigError, match="not found"):
        read_mix_file(tmp_path / "missing.jsonl", limit=None, seed=0)


def test_easy_to_hard_order(tiny_tokenizer, tmp_path):
    difficulty = {"q0": 0.9, "q1": 0.1, "q2": 0.5, "q3": 0.1, "q4": 0.3, "q5": 0.7}
    rows = label_rows(make_examples(), TASK, PROMPTS, tiny_tokenizer)
    ordered, weights = order_easy_to_hard(rows, None, difficulty)
    assert [r["id"] for r in ordered] == ["q1", "q3", "q4", "q2", "q5", "q0"]
    assert weights is None

    mix = [{"id": f"mix/{i}", "example_id": None, "messages": []} for i in (1, 2)]
    ordered, weights = order_easy_to_hard(rows + mix, [1.0] * 6 + [0.5, 0.5], difficulty)
    assert [r["id"] for r in ordered] == ["q1", "q3", "mix/1", "q4", "q2", "mix/2", "q5", "q0"]
    assert weights == [1.0, 1.0, 0.5, 1.0, 1.0, 0.5, 1.0, 1.0]
    with pytest.raises(DataError, match="no Phase 1 difficulty"):
        order_easy_to_hard(rows, None, {"q0": 0.1})


def test_build_stage_data_mixes_and_counts(tiny_tokenizer, tmp_path):
    mix = tmp_path / "general.jsonl"
    mix.write_text("\n".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) for i in range(5)) + "\n")
    stage = CurriculumStage(name="a", data="labels", mix_file=str(mix), mix_rows=2)
    data = build_stage_data(stage, examples=make_examples(), task=TASK, prompts=PROMPTS, tokenizer=tiny_tokenizer)
    assert data.counts == {"rows": 8, "pool_rows": 6, "mixed_rows": 2}
    assert data.weights is None

    stage = CurriculumStage(name="b", data="rationales", loss="step_by_step", alpha=0.3)
    data = build_stage_data(stage, examples=make_examples(), task=TASK, prompts=PROMPTS, tokenizer=tiny_tokenizer,
                            tutor_rows=tutor_rows())
    assert data.counts["label_rows"] == data.counts["rationale_rows"] == 3
    assert data.weights == [0.3, 0.7] * 3
    bought = [{"id": "q1", "target": "The teacher saw no effect.\nAnswer: no"}]
    data = build_stage_data(CurriculumStage(name="t", data="teacher_rationales"), examples=make_examples(), task=TASK,
                            prompts=PROMPTS, tokenizer=tiny_tokenizer, tutor_rows=tutor_rows(), teacher_rows=bought)
    assert [r["id"] for r in data.rows] == ["q1"]
    assert data.rows[0]["messages"][-1]["content"] == "The teacher saw no effect.\nAnswer: no"
    with pytest.raises(DataError, match="no teacher rationales rows"):
        build_stage_data(CurriculumStage(name="c", data="teacher_rationales"), examples=make_examples(), task=TASK,
                         prompts=PROMPTS, tokenizer=tiny_tokenizer, teacher_rows=[])


# --------------------------------------------------------------------------------------------
# Configuration


def test_stage_config_rules():
    with pytest.raises(ValidationError, match="data distill goes with loss gkd"):
        CurriculumStage(name="x", data="rationales", loss="gkd")
    with pytest.raises(ValidationError, match="data distill goes with loss gkd"):
        CurriculumStage(name="x", data="distill")
    with pytest.raises(ValidationError, match="step_by_step needs data rationales"):
        CurriculumStage(name="x", data="labels", loss="step_by_step")
    with pytest.raises(ValidationError, match="must be a folder name"):
        CurriculumStage(name="../up", data="labels")
    with pytest.raises(ValidationError, match="mix_file is only read by sft stages"):
        CurriculumStage(name="x", data="rationales", loss="step_by_step", mix_file="m.jsonl")
    with pytest.raises(ValidationError, match="repeats the stage name"):
        StudentConfig(stages=[CurriculumStage(name="a", data="labels"), CurriculumStage(name="a", data="rationales")])
    with pytest.raises(ValidationError, match="no stage has data rationales"):
        StudentConfig(stages=[CurriculumStage(name="a", data="labels")], curriculum=False)


def test_no_curriculum_runs_stage_b_alone():
    config = BridgeConfig().student
    assert [s.name for s in active_stages(config)] == ["stage-a", "stage-b"]
    assert [s.name for s in active_stages(config.model_copy(update={"curriculum": False}))] == ["stage-b"]
    assert config.training.method == "full"
    assert all(stage.loss != "gkd" for stage in config.stages), "Stage C must be off by default"


# --------------------------------------------------------------------------------------------
# Training


def quick_training(**overrides) -> TrainingConfig:
    settings = dict(method="full", batch_size=6, grad_accum=1, epochs=1.0, learning_rate=1e-3, warmup_ratio=0.0,
                    save_every=100, max_seq_len=512)
    settings.update(overrides)
    return TrainingConfig(**settings)


def test_step_by_step_loss_is_weighted(tiny_model_dir, tmp_path, tiny_tokenizer):
    stage = CurriculumStage(name="b", data="rationales", loss="step_by_step", alpha=0.2, epochs=1.0)
    lm = load_tiny(tiny_model_dir)
    # Larger (tied) embeddings make the initial distributions peaked, so rows differ in loss.
    with torch.no_grad():
        lm.model.get_input_embeddings().weight.mul_(40)
    data = build_stage_data(stage, examples=make_examples(), task=TASK, prompts=PROMPTS, tokenizer=lm.tokenizer,
                            tutor_rows=tutor_rows())
    examples = tokenize_rows(
        [{"id": r["id"], "messages": r["messages"]} for r in data.rows], lm.tokenizer, end_of_turn=lm.end_of_turn_token,
        max_seq_len=512,
    )
    # The first step's loss is computed on the initial weights over all six rows (one batch).
    expected = 0.0
    with torch.no_grad():
        for example, weight in zip(examples, data.weights, strict=True):
            logits = lm.model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            labels = torch.tensor(example.labels[1:])
            mask = labels != IGNORE_INDEX
            row_loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
            expected += 2 * weight * float(row_loss) / len(examples)
    plain = 0.0
    with torch.no_grad():
        total, count = 0.0, 0
        for example in examples:
            logits = lm.model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            labels = torch.tensor(example.labels[1:])
            mask = labels != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            count += int(mask.sum())
        plain = total / count

    result = train_stage(stage, data, base=lm, training=quick_training(), out_dir=tmp_path / "b")
    logged = result.metrics["loss_curve"][0]["loss"]
    assert logged == pytest.approx(expected, rel=2e-3)
    assert abs(expected - plain) > 0.05, "the weighted and plain losses coincide, so the test proves nothing"

    from bridge.models import training

    assert training._make_trainer_class.__name__ == "_make_trainer_class", "the trainer factory was not restored"


def test_easy_to_hard_trains_in_order(tiny_model_dir, tmp_path, tiny_tokenizer):
    stage = CurriculumStage(name="a", data="labels", order="easy_to_hard", epochs=2.0)
    difficulty = {"q0": 0.9, "q1": 0.1, "q2": 0.5, "q3": 0.2, "q4": 0.3, "q5": 0.7}
    lm = load_tiny(tiny_model_dir)
    data = build_stage_data(stage, examples=make_examples(), task=TASK, prompts=PROMPTS, tokenizer=lm.tokenizer,
                            difficulty=difficulty)
    train_stage(stage, data, base=lm, training=quick_training(batch_size=2), out_dir=tmp_path / "a")
    steps = [json.loads(line) for line in (tmp_path / "a" / SAMPLE_ORDER_FILE).read_text().splitlines()]
    order = ["q1", "q3", "q4", "q2", "q5", "q0"]
    assert [s["rows"] for s in steps] == [order[0:2], order[2:4], order[4:6]] * 2


def test_gkd_stage_trains_and_resumes(tiny_model_dir, tmp_path, tiny_tokenizer):
    stage = CurriculumStage(name="c", data="distill", loss="gkd", epochs=1.0, gkd_lambda=0.5)
    teacher = load_tiny(tiny_model_dir)
    student = load_tiny(tiny_model_dir, keep_layers=[0])
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    data = build_stage_data(stage, examples=make_examples(), task=TASK, prompts=PROMPTS, tokenizer=student.tokenizer,
                            tutor_rows=tutor_rows(("q0", "q1", "q2", "q3")))
    config = quick_training(batch_size=2)
    result = train_stage(stage, data, base=student, training=config, out_dir=tmp_path / "c", teacher=teacher,
                         max_new_tokens=8)
    assert result.global_step == 2
    assert (tmp_path / "c" / "model" / "config.json").is_file()
    assert not (tmp_path / "c" / "checkpoints").exists()
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "GKD changed no student weight"

    again = load_tiny(tiny_model_dir, keep_layers=[0])
    repeat = train_gkd(data.rows, student=again, teacher=teacher, config=stage_config(config, stage), stage=stage,
                       out_dir=tmp_path / "c", max_new_tokens=8)
    assert repeat.metrics == result.metrics
    for name, value in repeat.model.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[name]), name


def stage_config(config: TrainingConfig, stage: CurriculumStage) -> TrainingConfig:
    from bridge.curriculum import stage_training

    return stage_training(config, stage)


def test_gkd_needs_shared_tokenizer_and_full(tiny_model_dir, tmp_path):
    from tiny_models import make_tokenizer

    stage = CurriculumStage(name="c", data="distill", loss="gkd")
    teacher = load_tiny(tiny_model_dir)
    student = load_tiny(tiny_model_dir, keep_layers=[0])
    assert shares_tokenizer(teacher.tokenizer, student.tokenizer)
    other = make_tokenizer(vocab_size=300)
    assert not shares_tokenizer(teacher.tokenizer, other)
    with pytest.raises(ConfigError, match="tokenizers differ"):
        train_gkd([], student=student, teacher=type(teacher)(**{**teacher.__dict__, "tokenizer": other}),
                  config=quick_training(), stage=stage, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="method is lora"):
        train_gkd([], student=student, teacher=teacher, config=quick_training(method="lora"), stage=stage, out_dir=tmp_path)
