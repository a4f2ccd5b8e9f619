"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from bridge.metrics import (
    confusion_matrix,
    gap_closure,
    macro_f1,
    majority_baseline,
    relative_gain,
    score_predictions,
    wilson_interval,
)


def test_wilson_matches_reference_values():
    # 81 of 263 (a textbook example) gives about (0.2553, 0.3662).
    low, high = wilson_interval(81, 263)
    assert low == pytest.approx(0.2553, abs=1e-4)
    assert high == pytest.approx(0.3662, abs=1e-4)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 0.0)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0)
    assert 0.69 < low < 0.73
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert 0.27 < high < 0.31


def test_macro_f1_hand_computed():
    golds = ["yes", "yes", "no", "maybe"]
    preds = ["yes", "no", "no", "unparsable"]
    # yes: tp1 fp0 fn1 -> 2/3; no: tp1 fp1 fn0 -> 2/3; maybe: 0
    assert macro_f1(golds, preds, ["yes", "no", "maybe"]) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_confusion_counts_other():
    matrix = confusion_matrix(["a", "b", "b"], ["a", "unparsable", "a"], ["a", "b"])
    assert matrix["a"]["a"] == 1
    assert matrix["b"]["other"] == 1
    assert matrix["b"]["a"] == 1


def test_score_predictions_counts_parse_failures_apart():
    golds = ["A", "B", "C", "D"]
    preds = ["A", "unparsable", "B", "D"]
    correct = [g == p for g, p in zip(golds, preds, strict=True)]
    scores = score_predictions(golds, preds, correct, labels=["A", "B", "C", "D"], truncated=[False, True, False, False])
    assert scores.accuracy == 0.5
    assert scores.unparsable == 1
    assert scores.truncated == 1
    assert scores.per_class_accuracy == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 1.0}


def test_majority_baseline():
    label, scores = majority_baseline(["yes", "yes", "no"], ["yes", "no", "no", "yes"])
    assert label == "yes"
    assert scores.accuracy == 0.5


def test_gain_and_gap_closure():
    assert relative_gain(0.6, 0.5) == pytest.approx(0.2)
    assert relative_gain(0.6, 0.0) is None
    assert gap_closure(0.6, 0.5, 1.0) == pytest.approx(0.2)
    assert gap_closure(0.6, 0.5, 0.5) is None
    assert math.isclose(gap_closure(1.0, 0.5, 1.0), 1.0)
