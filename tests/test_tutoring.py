"""Tutoring: the restatement rule, duplicates, demonstrations, the generation loop and its resume."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bridge import tutoring
from bridge.config import PromptConfig, TutoringConfig
from bridge.data.types import Example, TaskSpec
from bridge.errors import BridgeError
from bridge.models.inference import Generation
from bridge.prompts import prompt_hash
from bridge.tutoring import (
    FAIL,
    FILTERS,
    NOT_APPLICABLE,
    PASS,
    find_duplicates,
    jaccard,
    nearest_demonstrations,
    rationale_words,
    restatement_reason,
    tutor_pool,
)

TASK = TaskSpec("pubmedqa_pqal", "yes_no_maybe", ("yes", "no", "maybe"), domain="biomedical research")

# --------------------------------------------------------------------------------------------
# The restatement rule

REJECTED = [
    ("Since the answer is B, option B is correct.", "B", "reasons from the answer"),
    ("As stated, the answer is yes.", "yes", "refers to the hint"),
    ("The hint says the answer is no, so the drug failed.", "no", "refers to the hint"),
    ("Hint: yes. The trial was positive overall in all arms.", "yes", "refers to the hint"),
    ("Given that the correct answer is maybe, the evidence must be mixed.", "maybe", "reasons from the answer"),
    ("We are told the answer is yes. The study supports it strongly.", "yes", "refers to the hint"),
    ("The verified answer is C because it matches the findings.", "C", "refers to the hint"),
    ("Because the answer is yes, the treatment works in these patients.", "yes", "reasons from the answer"),
    ("Knowing the answer is no, we see the drug failed in the trial.", "no", "reasons from the answer"),
    ("The answer is yes, so the trial succeeded in its primary aim.", "yes", "reasons from the answer"),
    ("We need to explain why the answer is yes. The drug helped.", "yes", "reasons from the answer"),
    ("The answer is yes.", "yes", "restates the answer"),
    ("Yes.", "yes", "restates the answer"),
    ("Therefore, the answer is no. Answer: no", "no", "restates the answer"),
    ("It is yes. The answer is yes.", "yes", "restates the answer"),
]

KEPT = [
    "The trial randomised 120 patients and mortality fell from 12% to 6%, a significant reduction.",
    "The study found no difference between the groups, so the treatment is not effective.",
    "As shown in the results, the odds ratio was 2.1 with a narrow confidence interval.",
    "The answer depends on the dose: at high doses the effect disappears entirely.",
    "Mortality fell sharply in the treated group. Therefore, the answer is yes.",
    "The data hint at a benefit, and the effect size is large in every subgroup.",
    "As stated in the abstract, recurrence was lower after surgery than after radiotherapy.",
    "Given the small sample, the authors could not confirm a benefit of the drug.",
]


@pytest.mark.parametrize(("rationale", "gold", "expected"), REJECTED)
def test_restatement_rule_rejects(rationale, gold, expected):
    reason = restatement_reason(rationale, gold, min_words=5)
    assert reason is not None, rationale
    assert reason.startswith(expected), reason


@pytest.mark.parametrize("rationale", KEPT)
def test_restatement_rule_keeps_reasoning(rationale):
    assert restatement_reason(rationale, "yes", min_words=5) is None


def test_restatement_word_floor_is_configurable():
    text = "Mortality fell. The answer is yes."
    assert restatement_reason(text, "yes", min_words=2) is None
    assert restatement_reason(text, "yes", min_words=3).startswith("restates the answer: 2 word(s)")


# --------------------------------------------------------------------------------------------
# Duplicates


def test_duplicates_exact_and_near():
    texts = [
        "The trial found lower mortality in treated patients.",  # 0 kept
        "the trial  found lower MORTALITY in treated patients.",  # 1 exact duplicate of 0
        "The trial found lower mortality in all treated patients.",  # 2 near duplicate of 0 (8/9 words)
        "A different study of kidney disease outcomes.",  # 3 kept
    ]
    dropped = find_duplicates(texts, 0.85)
    assert dropped == {1: ("exact", 0), 2: ("near", 0)}
    assert find_duplicates(texts, 0.9) == {1: ("exact", 0)}


def test_duplicates_forced_rows_stay():
    texts = ["same words here", "same words here", "same words here"]
    assert find_duplicates(texts, 0.95, keep=[0, 1]) == {2: ("exact", 0)}


def test_duplicates_match_brute_force():
    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(12)]
    texts = [" ".join(rng.sample(vocabulary, rng.randint(3, 8))) for _ in range(300)]
    for threshold in (0.5, 0.7, 0.9, 1.0):
        kept: list[int] = []
        expected = {}
        for i, text in enumerate(texts):
            words = rationale_words(text)
            exact = next((j for j in kept if tutoring.normalise_rationale(texts[j]) == tutoring.normalise_rationale(text)), None)
            if exact is not None:
                expected[i] = "exact"
                continue
            if any(jaccard(words, rationale_words(texts[j])) >= threshold for j in kept):
                expected[i] = "near"
                continue
            kept.append(i)
        found = {i: kind for i, (kind, _) in find_duplicates(texts, threshold).items()}
        assert set(found) == set(expected), threshold
        # A text dropped as near may also equal a kept one's normal form only when marked exact.
        assert {i for i, k in found.items() if k == "exact"} == {i for i, k in expected.items() if k == "exact"}


# --------------------------------------------------------------------------------------------
# Demonstrations


def test_nearest_demonstrations_excludes_self():
    ids = ["a", "b", "c", "d"]
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], dtype=np.float32)
    result = nearest_demonstrations(ids, vectors, ["a", "c"], 1)
    assert result == {"a": ["c"], "b": ["a"], "c": ["a"], "d": ["c"]}
    assert nearest_demonstrations(ids, vectors, ["a", "c"], 0) == {i: [] for i in ids}
    with pytest.raises(ValueError, match="without a vector"):
        nearest_demonstrations(ids, vectors, ["z"], 1)


# --------------------------------------------------------------------------------------------
# The generation loop with a scripted generator


def make_examples() -> list[Example]:
    golds = ["yes", "no", "maybe", "yes", "no", "yes", "no", "maybe"]
    return [
        Example(id=f"e{i}", question=f"Does treatment {i} reduce mortality in trial number {i}?", gold=gold,
                context=f"Patients in trial {i} were randomised to two groups.")
        for i, gold in enumerate(golds)
    ]


#: Scripted outputs per example: (free attempt 1, free attempt 2, guided).
SCRIPT = {
    "e0": ("Mortality fell by half in the treated group of trial zero.\nAnswer: yes",
           "Deaths fell in trial zero after treatment began.\nAnswer: yes",
           "Trial zero reported fewer deaths among treated patients.\nAnswer: yes"),
    "e1": ("The drug clearly helped everyone in this trial.\nAnswer: yes",
           "No difference appeared between the arms of trial one.\nAnswer: no",
           "Both arms of trial one had the same death rate.\nAnswer: no"),
    "e2": ("Effect sizes were large.\nAnswer: yes", "Clearly positive.\nAnswer: no",
           "Results were inconsistent across the centres of trial two.\nAnswer: maybe"),
    "e3": ("Answer: no", "Answer: no", "Since the answer is yes, the treatment works well here.\nAnswer: yes"),
    "e4": ("The study ran for many years and", "The study ran for many years and",
           "The trial showed no effect on mortality at all in trial four.\nAnswer: no"),
    "e5": ("Mortality fell by half in the treated group of trial zero.\nAnswer: yes",
           "Trial five saw fewer deaths with the drug.\nAnswer: yes",
           "Trial five reported fewer deaths among treated patients.\nAnswer: yes"),
    "e6": None,  # has a teacher row, so the TA never writes for it
    "e7": ("Answer: yes", "Answer: yes", "The answer is maybe.\nAnswer: maybe"),
}


class ScriptedGenerator:
    """Stands in for iter_generate: scripted texts, same skip and batch contract, optional crash."""

    def __init__(self, crash_after_batches: int | None = None) -> None:
        self.calls: list[dict] = []
        self.crash_after = crash_after_batches
        self.batches = 0

    def __call__(self, lm, requests, *, max_new_tokens, temperature, seed, batch_size, skip_ids, progress, **_):
        self.calls.append({"ids": [r.id for r in requests], "skip": set(skip_ids), "temperature": temperature})
        for start in range(0, len(requests), batch_size):
            batch = [r for r in requests[start : start + batch_size] if r.id not in skip_ids]
            if not batch:
                continue
            if self.crash_after is not None and self.batches >= self.crash_after:
                raise KeyboardInterrupt("simulated kill")
            self.batches += 1
            outputs = []
            for request in batch:
                guided = "Hint (the verified correct answer)" in request.prompt
                slot = 2 if guided else (0 if temperature == 0 else 1)
                text = SCRIPT[request.id][slot]
                truncated = not text.rstrip().splitlines()[-1].startswith("Answer:")
                outputs.append(
                    Generation(id=request.id, prompt_hash=prompt_hash(request.prompt), text=text,
                               completion_tokens=12, finish_reason="length" if truncated else "stop", mean_entropy=0.5)
                )
            yield outputs


def teacher_row(example_id: str) -> dict:
    return {
        "id": example_id, "rationale": "The teacher read trial six carefully and saw no effect.",
        "answer": "no", "target": "The teacher read trial six carefully and saw no effect.\nAnswer: no",
        "correct": True, "label_conditioned": False, "attempt": 1, "source": "reference", "model": "reference",
        "endpoint": "reference://pubmedqa_pqal", "ledger_key": "k6", "ledger_attempt_id": 3, "cost_usd": 0.01,
        "cached": False,
    }


def run_tutoring(tmp_path: Path, tokenizer, monkeypatch, generator: ScriptedGenerator, **config):
    monkeypatch.setattr("bridge.models.inference.iter_generate", generator)
    settings = {"batch_size": 2, "max_rationale_tokens": 60, "near_duplicate_threshold": 0.9} | config
    return tutor_pool(
        SimpleNamespace(tokenizer=tokenizer, name="tiny-ta"),
        make_examples(),
        TASK,
        TutoringConfig(**settings),
        PromptConfig(max_context_tokens=None),
        teacher_rows=[teacher_row("e6")],
        out_dir=tmp_path,
        seed=0,
        run_key="key-1",
        progress=False,
    )


def test_free_then_guided_rows_and_yield(tmp_path, tiny_tokenizer, monkeypatch):
    result = run_tutoring(tmp_path, tiny_tokenizer, monkeypatch, ScriptedGenerator())
    kept = {(r["id"], r["mode"], r["attempt"]) for r in result.rows}
    assert kept == {("e6", "teacher", 1), ("e0", "free", 1), ("e1", "free", 2), ("e2", "guided", 1), ("e4", "guided", 1)}
    rejected = {(r["id"], r["mode"], r["attempt"]): r["rejected_by"] for r in result.rejected}
    assert rejected == {
        ("e1", "free", 1): "answer",
        ("e2", "free", 1): "answer",
        ("e2", "free", 2): "answer",
        ("e3", "free", 1): "answer",
        ("e3", "free", 2): "answer",
        ("e3", "guided", 1): "restatement",
        ("e4", "free", 1): "truncation",
        ("e4", "free", 2): "truncation",
        ("e5", "free", 1): "duplicate",
        ("e7", "free", 1): "answer",
        ("e7", "free", 2): "answer",
        ("e7", "guided", 1): "restatement",
    }
    report = result.report
    assert report["modes"]["free"] == {"examples": 7, "generations": 12, "kept": 2, "yield": 2 / 7}
    assert report["modes"]["guided"] == {"examples": 4, "generations": 4, "kept": 2, "yield": 0.5}
    assert report["dropped_by"] == {"truncation": 2, "answer": 7, "empty": 0, "length": 0, "restatement": 2, "duplicate": 1}
    # e3's free attempts and e7's both fail the answer and empty filters.
    assert report["failed"]["empty"] == 4
    assert report["ta_unguided_agreement"] == {"correct": 2, "examples": 7, "rate": 2 / 7}
    assert report["examples_without_row"] == 3
    assert report["label_conditioned_rows"] == 2
    assert json.loads((tmp_path / "yield.json").read_text()) == report


def test_rows_carry_provenance(tmp_path, tiny_tokenizer, monkeypatch):
    result = run_tutoring(tmp_path, tiny_tokenizer, monkeypatch, ScriptedGenerator())
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    stored = [json.loads(line) for line in lines]
    assert stored == json.loads(json.dumps(result.rows))
    keys = set(stored[0])
    for row in stored + [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]:
        assert set(row) == keys, row["id"]
        assert set(row["filters"]) == set(FILTERS)
    by_id = {r["id"]: r for r in stored}

    teacher = by_id["e6"]
    assert teacher["writer"] == "teacher"
    assert teacher["ledger_key"] == "k6"
    assert teacher["cost_usd"] == 0.01
    assert set(teacher["filters"].values()) == {NOT_APPLICABLE}

    guided = by_id["e2"]
    assert guided["writer"] == "ta"
    assert guided["model"] == "tiny-ta"
    assert guided["label_conditioned"] is True
    assert guided["filters"] == {"truncation": PASS, "answer": PASS, "empty": PASS, "length": PASS,
                                 "restatement": PASS, "duplicate": PASS}
    free = by_id["e1"]
    assert free["filters"]["restatement"] == NOT_APPLICABLE
    assert free["temperature"] == 0.7
    assert free["messages"][-1] == {"role": "assistant", "content": "No difference appeared between the arms of trial one.\nAnswer: no"}
    for row in stored:
        user = row["messages"][-2]["content"]
        assert row["messages"][-2]["role"] == "user"
        assert "Hint" not in user, "a student prompt carries the hint"
    duplicate = next(r for r in result.rejected if r["id"] == "e5")
    assert duplicate["filters"]["duplicate"] == FAIL
    assert duplicate["reasons"]["duplicate"] == "exact duplicate of the rationale for e0"


def test_rows_load_with_datasets(tmp_path, tiny_tokenizer, monkeypatch):
    from datasets import load_dataset

    run_tutoring(tmp_path, tiny_tokenizer, monkeypatch, ScriptedGenerator())
    dataset = load_dataset("json", data_files=str(tmp_path / "rows.jsonl"), split="train", cache_dir=str(tmp_path / "cache"))
    assert dataset.num_rows == 5
    assert dataset[0]["messages"][-1]["role"] == "assistant"


def test_guided_mode_skips_free(tmp_path, tiny_tokenizer, monkeypatch):
    generator = ScriptedGenerator()
    result = run_tutoring(tmp_path, tiny_tokenizer, monkeypatch, generator, mode="guided")
    assert all(call["temperature"] == 0 for call in generator.calls)
    assert len(generator.calls) == 1
    assert {r["mode"] for r in result.rows} == {"teacher", "guided"}
    assert result.report["ta_unguided_agreement"] is None
    assert set(result.report["modes"]) == {"guided"}


def test_length_cap_drops_long_rationales(tmp_path, tiny_tokenizer, monkeypatch):
    result = run_tutoring(tmp_path, tiny_tokenizer, monkeypatch, ScriptedGenerator(), max_rationale_tokens=5, mode="free")
    assert {r["mode"] for r in result.rows} == {"teacher"}
    # e0 and e5 fail only the cap on both attempts, e1 on its second.
    assert result.report["dropped_by"]["length"] == 5
    assert all(r["reasons"]["length"].endswith("more than 5") for r in result.rejected if r["rejected_by"] == "length")


def test_resume_skips_stored_batches(tmp_path, tiny_tokenizer, monkeypatch):
    whole = run_tutoring(tmp_path / "whole", tiny_tokenizer, monkeypatch, ScriptedGenerator())

    crashing = ScriptedGenerator(crash_after_batches=3)
    with pytest.raises(KeyboardInterrupt):
        run_tutoring(tmp_path / "resumed", tiny_tokenizer, monkeypatch, crashing)
    stored = (tmp_path / "resumed" / "generations.jsonl").read_text().splitlines()
    assert len(stored) == 6  # three batches of two
    assert not (tmp_path / "resumed" / "rows.jsonl").exists()

    again = ScriptedGenerator()
    resumed = run_tutoring(tmp_path / "resumed", tiny_tokenizer, monkeypatch, again)
    first = again.calls[0]
    assert first["ids"] == crashing.calls[0]["ids"], "the resumed pass formed another request list"
    assert len(first["skip"]) == 6
    assert resumed.rows == whole.rows
    assert resumed.rejected == whole.rejected
    assert resumed.report == whole.report


def test_other_run_key_discards_generations(tmp_path, tiny_tokenizer, monkeypatch):
    run_tutoring(tmp_path, tiny_tokenizer, monkeypatch, ScriptedGenerator())
    monkeypatch.setattr("bridge.models.inference.iter_generate", generator := ScriptedGenerator())
    tutor_pool(
        SimpleNamespace(tokenizer=tiny_tokenizer, name="tiny-ta"), make_examples(), TASK, TutoringConfig(batch_size=2),
        PromptConfig(max_context_tokens=None), teacher_rows=[teacher_row("e6")], out_dir=tmp_path, seed=0, run_key="key-2",
        progress=False,
    )
    assert generator.calls[0]["skip"] == set()


def test_teacher_row_outside_pool_is_an_error(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr("bridge.models.inference.iter_generate", ScriptedGenerator())
    with pytest.raises(BridgeError, match="not in the training split"):
        tutor_pool(
            SimpleNamespace(tokenizer=tiny_tokenizer, name="tiny-ta"), make_examples(), TASK, TutoringConfig(),
            PromptConfig(), teacher_rows=[teacher_row("elsewhere")], out_dir=tmp_path, seed=0, run_key="k",
            progress=False,
        )
