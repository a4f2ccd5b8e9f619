"""Accuracy with Wilson intervals, macro-F1, confusion matrices and gain over a floor."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

#: Two-sided 95 % normal quantile.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Return the Wilson score interval for a binomial proportion (0, 0 when total is 0)."""
    if total <= 0:
        return (0.0, 0.0)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def macro_f1(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> float:
    """Return the unweighted mean of per-label F1 over ``labels``.

    A prediction outside ``labels`` (such as ``unparsable``) counts as a miss for the gold label
    and as a false positive for no label.
    """
    if not labels:
        return 0.0
    scores = []
    for label in labels:
        tp = sum(1 for g, p in zip(golds, preds, strict=True) if g == label and p == label)
        fp = sum(1 for g, p in zip(golds, preds, strict=True) if g != label and p == label)
        fn = sum(1 for g, p in zip(golds, preds, strict=True) if g == label and p != label)
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return sum(scores) / len(scores)


def confusion_matrix(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, int]]:
    """Return counts ``matrix[gold][pred]``; predictions outside ``labels`` fall in ``other``."""
    columns = [*labels, "other"]
    matrix = {g: dict.fromkeys(columns, 0) for g in labels}
    for g, p in zip(golds, preds, strict=True):
        row = matrix.setdefault(g, dict.fromkeys(columns, 0))
        row[p if p in labels else "other"] += 1
    return matrix


@dataclass
class Scores:
    """Metrics of one model on one split."""

    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    unparsable: int
    unparsable_rate: float
    truncated: int = 0
    truncated_rate: float = 0.0
    macro_f1: float | None = None
    confusion: dict[str, dict[str, int]] | None = None
    per_class_accuracy: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def score_predictions(
    golds: Sequence[str],
    preds: Sequence[str],
    correct: Sequence[bool],
    *,
    labels: Sequence[str] = (),
    unparsable_value: str = "unparsable",
    truncated: Sequence[bool] | None = None,
) -> Scores:
    """Compute accuracy with a Wilson interval, parse failures, truncations and per-class results.

    ``correct`` comes from the shared answer comparison, so numeric tolerance and span
    normalisation are applied exactly as in every other stage.
    """
    n = len(golds)
    hits = sum(bool(c) for c in correct)
    low, high = wilson_interval(hits, n)
    unparsable = sum(1 for p in preds if p == unparsable_value)
    cut = sum(bool(t) for t in truncated) if truncated is not None else 0
    scores = Scores(
        n=n,
        correct=hits,
        accuracy=hits / n if n else 0.0,
        ci_low=low,
        ci_high=high,
        unparsable=unparsable,
        unparsable_rate=unparsable / n if n else 0.0,
        truncated=cut,
        truncated_rate=cut / n if n else 0.0,
    )
    if labels:
        scores.macro_f1 = macro_f1(golds, preds, labels)
        scores.confusion = confusion_matrix(golds, preds, labels)
        totals = Counter(golds)
        per_class = Counter(g for g, c in zip(golds, correct, strict=True) if c)
        scores.per_class_accuracy = {label: per_class[label] / totals[label] for label in labels if totals[label]}
    return scores


def majority_baseline(train_golds: Sequence[str], test_golds: Sequence[str]) -> tuple[str, Scores]:
    """Score always predicting the most frequent training label (ties broken by label order)."""
    counts = Counter(train_golds)
    label = sorted(counts, key=lambda k: (-counts[k], k))[0]
    preds = [label] * len(test_golds)
    correct = [g == label for g in test_golds]
    labels = sorted(set(train_golds) | set(test_golds))
    return label, score_predictions(test_golds, preds, correct, labels=labels)


def relative_gain(value: float, floor: float) -> float | None:
    """Return (value - floor) / floor, or None when the floor is 0."""
    return (value - floor) / floor if floor else None


def gap_closure(student: float, floor: float, teacher: float) -> float | None:
    """Return (student - floor) / (teacher - floor): the share of the floor-to-teacher gap closed."""
    return (student - floor) / (teacher - floor) if teacher != floor else None
