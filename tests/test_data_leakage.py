"""The leakage guard on the prompt-input view of every adapter, and its failure cases."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bridge.config import DataConfig
from bridge.data import (
    PROMPT_FIELDS,
    DatasetSplits,
    Example,
    LeakageError,
    check_demonstrations,
    check_disjoint,
    check_leakage,
    load_dataset,
    prompt_view,
)

NAMES = ("pubmedqa_pqal", "medqa_usmle4_test", "mmlu_law_med_fin", "tatqa", "twitter_fin_sentiment")


@pytest.fixture(scope="module")
def loaded(data_dir: Path) -> dict[str, DatasetSplits]:
    return {name: load_dataset(DataConfig(dataset=name, data_dir=str(data_dir))) for name in NAMES}


def _render(view: dict, labels: tuple[str, ...] = ()) -> str:
    """A plain prompt with every input field and the label list, as a prompt builder might write it."""
    lines = []
    if view["context"]:
        lines.append(f"Context:\n{view['context']}")
    lines.append(f"Question: {view['question']}")
    for letter, text in (view["options"] or {}).items():
        lines.append(f"{letter}. {text}")
    if labels:
        lines.append(f"Answer with one of: {', '.join(labels)}")
    return "\n".join(lines)


@pytest.mark.parametrize("name", NAMES)
def test_view_has_only_input_fields(loaded, name):
    for example in loaded[name].test[:200]:
        view = prompt_view(example)
        assert tuple(view) == PROMPT_FIELDS
        assert view["question"] == example.question


@pytest.mark.parametrize("name", NAMES)
def test_every_view_passes_guard(loaded, name):
    splits = loaded[name]
    for examples in splits.by_split().values():
        for example in examples:
            check_leakage(prompt_view(example), example, task=splits.task)
            check_leakage(_render(prompt_view(example), splits.task.labels), example, task=splits.task)


@pytest.mark.parametrize("name", NAMES)
def test_splits_disjoint(loaded, name):
    check_disjoint(loaded[name].by_split(), grouped=name == "tatqa")


def test_pubmedqa_long_answer_caught(loaded):
    example = loaded["pubmedqa_pqal"].test[0]
    prompt = _render(prompt_view(example)) + "\nNote: " + example.explanation
    with pytest.raises(LeakageError, match="contains its explanation"):
        check_leakage(prompt, example)


def test_pubmedqa_one_sentence_caught(loaded):
    example = next(e for e in loaded["pubmedqa_pqal"].test if e.explanation.count(". ") >= 2)
    sentence = example.explanation.split(". ")[1]
    assert len(sentence) >= 40
    prompt = _render(prompt_view(example)) + "\n" + sentence.upper()
    with pytest.raises(LeakageError, match=example.id):
        check_leakage(prompt, example)


def test_pubmedqa_decision_fields_kept_out(loaded):
    example = loaded["pubmedqa_pqal"].train[0]
    assert set(example.gold_meta) == {"final_decision", "reasoning_required_pred", "reasoning_free_pred"}
    view = prompt_view(example)
    assert "LONG_ANSWER" not in view
    assert example.explanation not in str(view)


def test_tatqa_derivation_caught(loaded):
    example = next(e for e in loaded["tatqa"].test if e.answer_type == "arithmetic" and len(e.explanation) >= 12)
    prompt = _render(prompt_view(example)) + f"\nWork: {example.explanation}"
    with pytest.raises(LeakageError, match="explanation"):
        check_leakage(prompt, example)


def test_tatqa_extractive_span_not_flagged(loaded):
    spans = [e for e in loaded["tatqa"].test if e.answer_type == "span" and len(e.gold) >= 40 and e.gold in e.context]
    assert spans
    for example in spans:
        check_leakage(_render(prompt_view(example)), example)


def test_long_gold_outside_context_caught():
    example = Example(id="x", question="What did the board decide?", gold="the board approved the merger plan", context="No details.")
    with pytest.raises(LeakageError, match="contains its gold"):
        check_leakage("Question: What did the board decide?\nHint: the board approved the merger plan", example)


def test_allow_permits_hint():
    example = Example(id="x", question="Q?", gold="yes", explanation="The trial showed a clear benefit in mortality.")
    prompt = "Q?\nExplain why: The trial showed a clear benefit in mortality."
    check_leakage(prompt, example, allow={"explanation"})
    with pytest.raises(LeakageError):
        check_leakage(prompt, example)


def test_labels_listed_not_flagged(loaded):
    splits = loaded["twitter_fin_sentiment"]
    example = splits.test[0]
    check_leakage(_render(prompt_view(example), splits.task.labels), example, task=splits.task)


def test_gold_field_in_view_rejected(loaded):
    example = loaded["medqa_usmle4_test"].test[0]
    view = prompt_view(example) | {"gold": example.gold}
    with pytest.raises(LeakageError, match="carries field"):
        check_leakage(view, example)


def test_derivation_inside_number_not_flagged():
    example = Example(id="x", question="Change?", gold="-94", explanation="680-774")
    check_leakage("Demonstration: 1,680-7745 = ...", example, min_chars=6)
    with pytest.raises(LeakageError):
        check_leakage("Work: (680-774)", example, min_chars=6)


def test_copy_across_splits_detected(loaded):
    splits = loaded["pubmedqa_pqal"]
    copy = replace(splits.test[0], id="copy-of-test-0")
    with pytest.raises(LeakageError, match="normalised question"):
        check_disjoint({"train": [*splits.train, copy], "test": splits.test})


def test_shared_id_detected(loaded):
    splits = loaded["pubmedqa_pqal"]
    with pytest.raises(LeakageError, match="share their id"):
        check_disjoint({"dev": splits.dev, "test": [*splits.test, splits.dev[0]]})


def test_shared_group_detected(loaded):
    splits = loaded["tatqa"]
    moved = replace(splits.train[0], id="moved", question="A new question about the same table?")
    with pytest.raises(LeakageError, match="group"):
        check_disjoint({"train": splits.train, "test": [*splits.test, moved]}, grouped=True)


def test_demonstrations_from_training_only(loaded):
    splits = loaded["mmlu_law_med_fin"]
    target = splits.test[0]
    check_demonstrations(splits.fewshot[:3] + splits.train[:2], target, splits.by_split())
    with pytest.raises(LeakageError, match="not in the train split"):
        check_demonstrations([splits.test[1]], target, splits.by_split())
    with pytest.raises(LeakageError, match="itself or a copy"):
        check_demonstrations([replace(target, id=splits.train[0].id)], target, splits.by_split())
