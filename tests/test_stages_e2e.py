"""The pipeline from selection to the student on real PubMedQA with tiny in-process models.

A 40-example training slice is read through the data loader. The reference teacher buys 25 % of
it. The tiny TA is first overfit on the slice so that it writes usable rationales: unguided it
always answers "yes" with one fixed rationale, and with the gold answer as a hint it restates the
hint for "maybe" and reasons towards it otherwise. So free and guided rows are kept, and the
answer, duplicate and restatement filters all drop rows. A second run is killed with SIGKILL in
the middle of tutoring and again in the middle of the student curriculum, and resumes to the
same result as the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bridge.config import BridgeConfig, DataConfig
from bridge.data import load_dataset
from bridge.prompts import render_messages, target_answer
from bridge.rundir import read_rows

REPO = Path(__file__).resolve().parents[1]
MAX_CONTEXT_TOKENS = 100
FREE_REPLY = "The abstract reports a clear finding.\nAnswer: yes"

CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
from bridge.config import BridgeConfig
from bridge.pipeline import run_pipeline
config = BridgeConfig.model_validate(json.loads(open(sys.argv[1]).read()))
run_pipeline(config, until_stage="train_student")
"""


def guided_reply(gold: str) -> str:
    if gold == "maybe":
        return f"Since the answer is maybe, it fits.\nAnswer: {gold}"
    return f"The evidence in this study points to {gold}.\nAnswer: {gold}"


def make_tokenizer(texts: list[str]):
    """Train a byte-level BPE tokenizer on the slice, so that prompts stay short."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny_models import CHAT_TEMPLATE, SPECIAL_TOKENS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=3000,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def overfit_ta(folder: Path, data_dir: Path) -> Path:
    """Save a tiny TA trained to reply FREE_REPLY unguided and guided_reply(gold) with a hint."""
    from bridge.config import ModelRef
    from bridge.models.loading import load_model
    from bridge.models.training import IGNORE_INDEX, tokenize_rows
    from tiny_models import make_model

    data = load_dataset(DataConfig(dataset="pubmedqa_pqal", data_dir=str(data_dir), train_size=40, dev_size=8, test_size=8))
    task = data.task
    probe = render_messages(data.train[0], task, style="rationale", hint="yes")
    texts = [t for e in data.train + data.dev for t in (e.question, e.context or "", e.explanation or "")]
    texts += [m["content"] for m in probe.messages] * 20 + [FREE_REPLY, guided_reply("no"), guided_reply("maybe")] * 20
    tokenizer = make_tokenizer(texts)
    make_model(tokenizer, hidden=64, layers=2, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lm = load_model(ModelRef(path=str(folder), device="cpu", dtype="float32"), padding_side="right")

    rows = []
    for example in sorted(data.train, key=lambda e: e.id)[:20]:
        gold = target_answer(example, task)
        for hint, reply in ((None, FREE_REPLY), (gold, guided_reply(gold))):
            rendered = render_messages(
                example, task, style="rationale", hint=hint, tokenizer=lm.tokenizer, max_context_tokens=MAX_CONTEXT_TOKENS
            )
            rows.append({"id": f"{example.id}/{hint}", "messages": [*rendered.messages, {"role": "assistant", "content": reply}]})
    encoded = tokenize_rows(rows, lm.tokenizer, end_of_turn=lm.end_of_turn_token, max_seq_len=4096)
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), lm.tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), IGNORE_INDEX)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, example in enumerate(encoded):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
        mask[row, : len(example.input_ids)] = 1

    # Full-batch steps; the LM head runs only where a label is trained, which is most of the cost saved.
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=5e-3)
    lm.model.train()
    for _ in range(70):
        hidden = lm.model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(lm.model.lm_head(hidden[trained]), targets[trained])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lm.model.save_pretrained(folder)
    return folder


def make_config(ta: Path, runs_dir: Path, data_dir: Path, mix_file: Path) -> BridgeConfig:
    model = {"path": str(ta), "device": "cpu", "dtype": "float32"}
    return BridgeConfig.model_validate(
        {
            "name": "e2e",
            "seed": 0,
            "output": {"runs_dir": str(runs_dir)},
            "data": {"dataset": "pubmedqa_pqal", "data_dir": str(data_dir), "train_size": 40, "dev_size": 8, "test_size": 8},
            "models": {"ta": model, "student": {**model, "keep_layers": [0]}},
            "prompts": {"max_context_tokens": MAX_CONTEXT_TOKENS},
            "teacher": {"backend": "reference", "model": "reference", "price_per_call": 0.01},
            "budget": {"fraction": 0.25},
            "selection": {"batch_size": 8},
            "ta_training": {"epochs": 1.0, "batch_size": 4, "learning_rate": 1e-5, "save_every": 100, "max_seq_len": 1024},
            "tutoring": {"batch_size": 4, "max_new_tokens": 24, "free_samples": 2},
            "student": {
                "training": {"method": "full", "batch_size": 4, "save_every": 2, "max_seq_len": 1024, "warmup_ratio": 0.0},
                "stages": [
                    {"name": "stage-a", "data": "labels", "epochs": 1.0, "learning_rate": 1e-3,
                     "mix_file": str(mix_file)},
                    {"name": "stage-b", "data": "rationales", "epochs": 2.0, "learning_rate": 1e-3,
                     "order": "easy_to_hard"},
                ],
            },
            "evaluation": {"max_new_tokens": 16, "batch_size": 8},
        }
    )


@pytest.fixture(scope="module")
def deterministic_cpu():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, deterministic_cpu):
    """An uninterrupted run, with a copy of its run directory taken after the train-ta stage."""
    from bridge.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("e2e")
    ta = overfit_ta(root / "ta", data_dir)
    mix_file = root / "general.jsonl"
    mix_file.write_text(
        "".join(json.dumps({"instruction": f"Repeat the word {w}.", "output": w}) + "\n" for w in ("alpha", "beta", "gamma"))
    )
    config = make_config(ta, root / "runs", data_dir, mix_file)
    run_pipeline(config, until_stage="train_ta")
    shutil.copytree(root / "runs" / "e2e", root / "after_train_ta")
    summaries = run_pipeline(config, until_stage="train_student")
    return {"root": root, "config": config, "ta": ta, "mix_file": mix_file, "run": root / "runs" / "e2e",
            "summaries": summaries}


@pytest.mark.slow
def test_every_stage_writes_artefacts(reference):
    run = reference["run"]
    for stage in ("select", "teach", "train_ta", "tutor", "train_student"):
        assert json.loads((run / stage / "fingerprint.json").read_text())["complete"] is True, stage
    for name in ("rows.jsonl", "rejected.jsonl", "yield.json", "generations.jsonl"):
        assert (run / "tutor" / name).is_file(), name
    for stage in ("stage-a", "stage-b"):
        folder = run / "train_student" / stage
        assert (folder / "model" / "config.json").is_file(), stage
        assert (folder / "metrics.json").is_file(), stage
        assert len(list(read_rows(folder / "dev_predictions.jsonl"))) == 8, stage
        assert 0.0 <= json.loads((folder / "dev.json").read_text())["accuracy"] <= 1.0
    assert (run / "train_student" / "model" / "config.json").is_file()


@pytest.mark.slow
def test_tutoring_provenance_and_filters(reference):
    run = reference["run"]
    rows = list(read_rows(run / "tutor" / "rows.jsonl"))
    rejected = list(read_rows(run / "tutor" / "rejected.jsonl"))
    report = json.loads((run / "tutor" / "yield.json").read_text())
    teacher = list(read_rows(run / "teach" / "rows.jsonl"))

    assert len(teacher) == 10
    teacher_rows = [r for r in rows if r["writer"] == "teacher"]
    assert sorted(r["id"] for r in teacher_rows) == sorted(r["id"] for r in teacher)
    for row in teacher_rows:
        assert row["ledger_key"], row["id"]
        assert row["cost_usd"] == pytest.approx(0.01)
    ta_rows = [r for r in rows if r["writer"] == "ta"]
    assert {r["model"] for r in ta_rows} == {str(reference["ta"])}
    for row in ta_rows + rejected:
        assert set(row["filters"]) == {"truncation", "answer", "empty", "length", "restatement", "duplicate"}
        assert row["mode"] in ("free", "guided")
        assert row["attempt"] >= 1
        assert row["label_conditioned"] == (row["mode"] == "guided")
    for row in rows:
        assert row["messages"][-1]["role"] == "assistant"
        assert "Hint" not in row["messages"][-2]["content"]

    free = [r for r in ta_rows if r["mode"] == "free"]
    guided = [r for r in ta_rows if r["mode"] == "guided"]
    assert free, "no free-mode rationale was kept"
    assert guided, "no guided rationale was kept"
    assert all(r["messages"][-1]["content"] == FREE_REPLY for r in free)

    assert report["modes"]["free"]["kept"] == len(free)
    assert report["modes"]["guided"]["kept"] == len(guided)
    assert report["teacher_rows"] == 10
    assert report["ta_examples"] == 30
    for name in ("answer", "duplicate", "restatement"):
        dropped = sum(1 for r in rejected if r["rejected_by"] == name)
        assert dropped > 0, f"the {name} filter dropped nothing"
        assert report["dropped_by"][name] == dropped
    agreement = report["ta_unguided_agreement"]
    assert agreement["examples"] == 30
    golds = {e.id: e.gold for e in load_dataset(reference["config"].data).train}
    assert agreement["correct"] == sum(1 for r in rows + rejected if r["mode"] == "free" and r["attempt"] == 1
                                       and golds[r["id"]] == "yes")


@pytest.mark.slow
def test_curriculum_order_is_honoured(reference):
    run = reference["run"]
    summary = json.loads((run / "train_student" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["stage-a", "stage-b"]
    assert summary["stages"][0]["rows"] == {"rows": 43, "pool_rows": 40, "mixed_rows": 3}

    # Stage B reads its rows from easy to hard by Phase 1 difficulty, in both epochs.
    difficulty = {r["id"]: r["difficulty"] for r in read_rows(run / "select" / "scores.jsonl")}
    steps = [r["rows"] for r in read_rows(run / "train_student" / "stage-b" / "sample_order.jsonl")]
    seen = [row for step in steps for row in step]
    tutored = [r["id"] for r in read_rows(run / "tutor" / "rows.jsonl")]
    epoch = sorted(tutored, key=lambda i: (difficulty[i], i))
    assert seen == epoch * 2

    # The final model is the last stage's weights.
    final = load_file(run / "train_student" / "model" / "model.safetensors")
    last = load_file(run / "train_student" / "stage-b" / "model" / "model.safetensors")
    assert final.keys() == last.keys()
    for name in final:
        assert torch.equal(final[name], last[name]), name


def _run_child(config_path: Path, log_path: Path, ready) -> None:
    """Start the pipeline in a subprocess and SIGKILL it as soon as ``ready()`` holds."""
    with open(log_path, "wb") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(config_path)],
            stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ), cwd=REPO,
        )
        deadline = time.monotonic() + 180
        while not ready() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
        assert child.poll() is None, log_path.read_text()[-3000:]
        assert ready(), "the child did not reach the kill point in time"
        child.send_signal(signal.SIGKILL)
        child.wait(30)


@pytest.mark.slow
def test_killed_run_resumes_to_same_result(reference, tmp_path):
    from bridge.pipeline import run_pipeline

    runs = tmp_path / "runs"
    run = runs / "e2e"
    shutil.copytree(reference["root"] / "after_train_ta", run)
    config = reference["config"].model_copy(update={"output": reference["config"].output.model_copy(update={"runs_dir": str(runs)})})
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.model_dump(mode="json")))

    def tutoring_started() -> bool:
        path = run / "tutor" / "generations.jsonl"
        return path.exists() and path.read_text().count("\n") >= 4

    _run_child(config_path, tmp_path / "first.log", tutoring_started)
    assert not (run / "tutor" / "fingerprint.json").exists(), "tutoring finished before the kill"

    def student_checkpointed() -> bool:
        return any((run / "train_student" / "stage-a" / "checkpoints").glob("checkpoint-*/bridge_checkpoint.json"))

    _run_child(config_path, tmp_path / "second.log", student_checkpointed)
    assert (run / "tutor" / "fingerprint.json").exists()
    assert not (run / "train_student" / "fingerprint.json").exists()
    assert not (run / "train_student" / "stage-a" / "metrics.json").exists(), "stage A finished before the kill"

    run_pipeline(config, until_stage="train_student")

    original = reference["run"]
    for name in ("rows.jsonl", "rejected.jsonl", "yield.json"):
        assert (run / "tutor" / name).read_text() == (original / "tutor" / name).read_text(), name
    assert json.loads((run / "train_student" / "stage-a" / "metrics.json").read_text())["resumed_from_step"] is not None
    for stage in ("stage-a", "stage-b"):
        ours = (run / "train_student" / stage / "sample_order.jsonl").read_text()
        assert ours == (original / "train_student" / stage / "sample_order.jsonl").read_text(), stage
    expected = load_file(original / "train_student" / "model" / "model.safetensors")
    actual = load_file(run / "train_student" / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert (expected[name] - actual[name]).abs().max() <= 1e-5, name
    for stage in ("stage-a", "stage-b"):
        ours = [r["pred"] for r in read_rows(run / "train_student" / stage / "dev_predictions.jsonl")]
        theirs = [r["pred"] for r in read_rows(original / "train_student" / stage / "dev_predictions.jsonl")]
        assert sorted(ours) == sorted(theirs), stage


@pytest.mark.slow
def test_teacher_demonstrations_are_nearest(reference, tmp_path):
    import numpy as np

    from bridge.pipeline import run_pipeline
    from bridge.stages.select import load_embeddings

    runs = tmp_path / "runs"
    run = runs / "e2e"
    shutil.copytree(reference["run"], run)
    base = reference["config"]
    config = base.model_copy(
        update={
            "output": base.output.model_copy(update={"runs_dir": str(runs)}),
            "tutoring": base.tutoring.model_copy(update={"demonstrations": 2}),
        }
    )
    run_pipeline(config, only="tutor")

    teacher_ids = {r["id"] for r in read_rows(run / "teach" / "rows.jsonl")}
    scored = list(read_rows(run / "select" / "scores.jsonl"))
    vectors = load_embeddings(run / "select", scored)
    position = {row["id"]: index for index, row in enumerate(scored)}
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    candidates = list(read_rows(run / "tutor" / "rows.jsonl")) + list(read_rows(run / "tutor" / "rejected.jsonl"))
    ta_rows = [r for r in candidates if r["writer"] == "ta"]
    assert ta_rows
    for row in ta_rows:
        similarity = {t: float(unit[position[row["id"]]] @ unit[position[t]]) for t in teacher_ids}
        expected = sorted(teacher_ids, key=lambda t: (-similarity[t], t))[:2]
        assert row["demonstrations"] == expected, row["id"]
