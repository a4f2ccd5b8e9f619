"""Difficulty scores computed from the TA's own outputs, and their rank normalisation.

Every score is higher for an example the TA finds harder. Scores of different kinds live on
different scales, so the selectors only ever see them through :func:`rank_normalise`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike


def normalised_entropy(probs: ArrayLike) -> float:
    """Return the Shannon entropy of an option distribution divided by log(n) for n options.

    The result is 1 for the uniform distribution and 0 for a one-hot one. ``probs`` is
    renormalised to sum to 1, so scores that lost a little mass to other tokens are accepted.
    A distribution over a single option has no uncertainty and returns 0.
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("normalised_entropy needs at least one option probability, got none")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"option probabilities must be finite and non-negative, got {p.tolist()}")
    total = p.sum()
    if total <= 0:
        raise ValueError(f"option probabilities sum to {total}, expected a positive sum")
    if p.size == 1:
        return 0.0
    p = p / total
    nonzero = p[p > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum())
    return min(1.0, max(0.0, entropy / math.log(p.size)))


def answer_entropy(answers: Sequence[str | None], equal: Callable[[str, str], bool]) -> float:
    """Return the entropy of the distinct answers parsed from M sampled rationales, in [0, 1].

    Answers are grouped greedily in sample order: an answer joins the first group whose first
    member it ``equal``-s (for numbers, equality within the task's tolerance), else starts a
    new group. ``None`` marks a rationale whose answer could not be parsed. All unparsable
    samples form one group of their own, as if "no answer" were one more answer: a TA that
    never produces a parsable answer scores 0 (consistent), and a mix of answers and failures
    scores higher than the answers alone. The entropy is divided by log(M), its value when
    all M samples differ, so it is 1 then and 0 when all agree. Fewer than two samples
    return 0.
    """
    if len(answers) < 2:
        return 0.0

    representatives: list[str] = []
    counts: list[int] = []
    unparsable = 0
    for answer in answers:
        if answer is None:
            unparsable += 1
            continue
        for group, representative in enumerate(representatives):
            if equal(answer, representative):
                counts[group] += 1
                break
        else:
            representatives.append(answer)
            counts.append(1)
    if unparsable:
        counts.append(unparsable)

    p = np.asarray(counts, dtype=np.float64) / len(answers)
    entropy = float(-(p * np.log(p)).sum())
    return min(1.0, max(0.0, entropy / math.log(len(answers))))


def gold_difficulty(prob_gold: float) -> float:
    """Return 1 - p(gold answer): 0 when the TA is certain of the gold answer, 1 when it excludes it."""
    if not math.isfinite(prob_gold) or not 0.0 <= prob_gold <= 1.0 + 1e-6:
        raise ValueError(f"the gold answer's probability must be in [0, 1], got {prob_gold}")
    return max(0.0, 1.0 - prob_gold)


def mean_token_entropy(value: float) -> float:
    """Return the mean per-token entropy (nats) of a greedy rationale as its difficulty.

    The score is unbounded above, which is harmless because selectors rank-normalise it.
    """
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a mean token entropy must be finite and non-negative, got {value}")
    return float(value)


def rank_normalise(scores: ArrayLike) -> np.ndarray:
    """Map scores to [0, 1] by rank: the lowest gets 0, the highest 1, ties their average rank.

    A pool of one example, or one where every score ties, maps to 0.5 everywhere. NaN is
    rejected because its rank is undefined.
    """
    # scipy.stats takes seconds to import, so only this function loads it.
    from scipy.stats import rankdata

    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        return np.zeros(0, dtype=np.float64)
    if np.isnan(values).any():
        bad = int(np.flatnonzero(np.isnan(values))[0])
        raise ValueError(f"difficulty score at position {bad} is NaN; every example needs a score")
    if values.size == 1:
        return np.full(1, 0.5)
    ranks = rankdata(values, method="average")
    return (ranks - 1.0) / (values.size - 1.0)
