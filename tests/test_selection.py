"""Phase 1 selection library: difficulty scores, selectors, filters, sizing, scale path and plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from bridge.config import BudgetConfig, SelectionConfig
from bridge.errors import BudgetError
from bridge.selection import difficulty as scores
from bridge.selection.filters import drop_hardest, duplicate_sources, near_duplicates
from bridge.selection.partition import partition_pool, unit_rows
from bridge.selection.selectors import (
    dhondt_seats,
    facility_objective,
    select_clusters,
    select_coverage,
    select_difficulty,
    select_facility,
    select_kcenter,
    select_random,
    weight_step,
)
from bridge.selection.sizing import subset_size
from bridge.selection.subset import select_subset

CLUSTERS = 5
PER_CLUSTER = 40


def separated_clusters(seed: int = 0, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Return 5 clusters of 40 points around orthogonal centres, and each point's cluster."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLUSTERS), PER_CLUSTER)
    centres = np.eye(dim, dtype=np.float32)[:CLUSTERS] * 5.0
    points = centres[labels] + 0.3 * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return unit_rows(points), labels


def blob_pool(n: int, centers: int, spread: float, seed: int, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Return unit-norm Gaussian blobs and rank-normalised uniform difficulty."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((centers, dim)).astype(np.float32)
    points = centres[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return unit_rows(points), scores.rank_normalise(rng.random(n))


def naive_facility(
    vectors: np.ndarray, difficulty: np.ndarray, k: int, lam: float, *, fixed_weight: bool = False
) -> list[int]:
    """Plain greedy on the facility objective: every candidate's exact gain at every step.

    ``fixed_weight`` weights difficulty by lam / k at every step, the greedy for the size-k
    objective alone, whose subsets are not nested across k.
    """
    similarity = np.maximum(vectors @ vectors.T, 0.0).astype(np.float64)
    n = len(vectors)
    covered = np.zeros(n)
    chosen: list[int] = []
    for step in range(1, k + 1):
        coverage_gain = np.maximum(similarity - covered[:, None], 0.0).sum(axis=0)
        weight = lam / (k if fixed_weight else weight_step(step))
        values = weight * difficulty + (1 - lam) / n * coverage_gain
        values[chosen] = -np.inf
        best = int(np.argmax(values))
        chosen.append(best)
        covered = np.maximum(covered, similarity[best])
    return chosen


# --------------------------------------------------------------------------------------------
# Difficulty


@pytest.mark.parametrize("options", [2, 3, 4, 10])
def test_option_entropy_uniform_is_one(options: int) -> None:
    assert scores.normalised_entropy(np.full(options, 1.0 / options)) == pytest.approx(1.0)


@pytest.mark.parametrize("options", [2, 3, 4])
def test_option_entropy_one_hot_is_zero(options: int) -> None:
    one_hot = np.zeros(options)
    one_hot[options - 1] = 1.0
    assert scores.normalised_entropy(one_hot) == 0.0


def test_option_entropy_hand_computed() -> None:
    # H(0.5, 0.25, 0.25) = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2 nats; divided by ln 3.
    expected = 1.5 * math.log(2) / math.log(3)
    assert expected == pytest.approx(0.946395, abs=1e-6)
    assert scores.normalised_entropy([0.5, 0.25, 0.25]) == pytest.approx(expected, abs=1e-12)
    assert scores.normalised_entropy([2.0, 1.0, 1.0]) == pytest.approx(expected, abs=1e-12)


def test_option_entropy_rejects_invalid() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        scores.normalised_entropy([0.5, -0.1, 0.6])
    with pytest.raises(ValueError, match="positive sum"):
        scores.normalised_entropy([0.0, 0.0])
    with pytest.raises(ValueError, match="at least one"):
        scores.normalised_entropy([])


def numbers_equal(a: str, b: str) -> bool:
    return abs(float(a) - float(b)) <= 1e-3 * abs(float(b))


def test_answer_entropy_agreement_and_spread() -> None:
    assert scores.answer_entropy(["4", "4", "4", "4"], numbers_equal) == 0.0
    assert scores.answer_entropy(["1", "2", "3", "4"], numbers_equal) == pytest.approx(1.0)
    # Two groups of two among four samples: ln 2 / ln 4.
    assert scores.answer_entropy(["1", "2", "1", "2"], numbers_equal) == pytest.approx(0.5)


def test_answer_entropy_tolerance_merges() -> None:
    assert scores.answer_entropy(["100", "100.05", "99.99", "100"], numbers_equal) == 0.0


def test_answer_entropy_unparsable_is_one_answer() -> None:
    assert scores.answer_entropy([None, None, None], numbers_equal) == 0.0
    assert scores.answer_entropy(["1", None, None, "1"], numbers_equal) == pytest.approx(0.5)
    assert scores.answer_entropy(["1", None, "2", "3"], numbers_equal) == pytest.approx(1.0)


def test_gold_difficulty_and_token_entropy() -> None:
    assert scores.gold_difficulty(0.8) == pytest.approx(0.2)
    assert scores.gold_difficulty(1.0) == 0.0
    assert scores.gold_difficulty(0.0) == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scores.gold_difficulty(1.5)
    assert scores.mean_token_entropy(2.5) == 2.5
    with pytest.raises(ValueError, match="non-negative"):
        scores.mean_token_entropy(float("nan"))


def test_rank_normalise_ties_and_range() -> None:
    np.testing.assert_allclose(scores.rank_normalise([3.0, 1.0, 2.0]), [1.0, 0.0, 0.5])
    # Ranks 1.5, 1.5, 3, 4 over (N - 1) = 3 after subtracting 1.
    np.testing.assert_allclose(scores.rank_normalise([1.0, 1.0, 2.0, 3.0]), [1 / 6, 1 / 6, 2 / 3, 1.0])
    np.testing.assert_allclose(scores.rank_normalise([7.0, 7.0, 7.0]), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(scores.rank_normalise([4.0]), [0.5])
    with pytest.raises(ValueError, match="position 1 is NaN"):
        scores.rank_normalise([1.0, float("nan")])


# --------------------------------------------------------------------------------------------
# Selectors


def test_coverage_picks_one_per_cluster() -> None:
    vectors, labels = separated_clusters()
    picks = select_coverage(vectors, CLUSTERS)
    assert sorted(labels[[p.index for p in picks]].tolist()) == list(range(CLUSTERS))


def test_kcenter_without_difficulty_picks_one_per_cluster() -> None:
    vectors, labels = separated_clusters()
    difficulty = scores.rank_normalise(np.random.default_rng(1).random(len(vectors)))
    picks = select_kcenter(vectors, difficulty, CLUSTERS, lam=0.0)
    assert sorted(labels[[p.index for p in picks]].tolist()) == list(range(CLUSTERS))


def test_difficulty_picks_top_scores() -> None:
    raw = np.random.default_rng(2).random(200)
    d = scores.rank_normalise(raw)
    top = np.argsort(-raw)[:15].tolist()
    assert [p.index for p in select_difficulty(d, 15)] == top
    vectors, _ = separated_clusters()
    assert sorted(p.index for p in select_facility(vectors, d, 15, lam=1.0)) == sorted(top)


def test_lam_moves_subset_from_coverage_to_difficulty() -> None:
    vectors, labels = separated_clusters()
    rng = np.random.default_rng(3)
    # Every hard example is in cluster 0.
    raw = rng.random(len(vectors)) + 2.0 * (labels == 0)
    d = scores.rank_normalise(raw)
    k = 10
    mean_difficulty, coverage, clusters_hit = [], [], []
    for lam in (0.0, 0.25, 0.5, 0.75, 1.0):
        chosen = [p.index for p in select_facility(vectors, d, k, lam=lam)]
        mean_difficulty.append(float(d[chosen].mean()))
        coverage.append(facility_objective(vectors, d, chosen, 0.0))
        clusters_hit.append(len(set(labels[chosen].tolist())))
    assert clusters_hit[0] == CLUSTERS
    assert clusters_hit[-1] == 1
    assert mean_difficulty == sorted(mean_difficulty)
    assert mean_difficulty[0] < mean_difficulty[2] < mean_difficulty[4]
    # Greedy coverage need not fall at every step of lambda, but the ends bound the middle.
    assert coverage[0] == max(coverage)
    assert coverage[-1] == min(coverage)
    assert coverage[0] > coverage[2] > coverage[-1]


def test_lazy_greedy_equals_plain_greedy() -> None:
    vectors, d = blob_pool(300, centers=6, spread=1.5, seed=4)
    for lam in (0.0, 0.3, 0.7):
        picks = select_facility(vectors, d, 40, lam=lam)
        assert [p.index for p in picks] == naive_facility(vectors, d, 40, lam)


@pytest.mark.parametrize(("centers", "spread"), [(6, 1.0), (3, 3.0), (1, 1.0)])
def test_step_weight_close_to_fixed_weight(centers: int, spread: float) -> None:
    # The nested step-weighted greedy loses little against the greedy for one size k.
    vectors, d = blob_pool(300, centers=centers, spread=spread, seed=17)
    for lam in (0.2, 0.5, 0.8):
        for k in (10, 40):
            nested = facility_objective(vectors, d, [p.index for p in select_facility(vectors, d, k, lam=lam)], lam)
            fixed = facility_objective(vectors, d, naive_facility(vectors, d, k, lam, fixed_weight=True), lam)
            assert nested >= 0.99 * fixed


def test_facility_reason_parts_add_up() -> None:
    vectors, d = blob_pool(120, centers=4, spread=1.0, seed=5)
    for pick in select_facility(vectors, d, 10, lam=0.4):
        assert pick.parts["difficulty"] + pick.parts["coverage"] == pytest.approx(pick.gain)
        assert pick.reason.startswith("facility step")
        assert pick.cluster is None


def test_weight_step_grid() -> None:
    assert [weight_step(t) for t in range(1, 22)] == list(range(1, 22))
    assert weight_step(41) == 40
    assert weight_step(43) == 42
    assert all(0.95 <= weight_step(t) / t <= 1.0 for t in range(1, 5000))


def test_dhondt_hand_computed_and_house_monotone() -> None:
    # Quotients: A 5, 2.5, 1.67, 1.25; B 3, 1.5; C 2, 1.
    assert dhondt_seats([5, 3, 2], 6) == [0, 1, 0, 2, 0, 1]
    long = dhondt_seats([50, 30, 20], 40)
    for seats in range(40):
        assert dhondt_seats([50, 30, 20], seats) == long[:seats]
    assert [long.count(c) for c in range(3)] == [20, 12, 8]


def test_dhondt_respects_cluster_sizes() -> None:
    # A cluster of 1 gets no seat while a cluster of 10 still has quotients above 1.
    assert dhondt_seats([1, 10], 4) == [1, 1, 1, 1]
    # Seating the whole pool gives every cluster exactly its size; ties go to the lower cluster.
    assert dhondt_seats([2, 3], 5) == [1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="cannot allocate"):
        dhondt_seats([1, 2], 4)


def test_cluster_selector_takes_hardest_per_cluster() -> None:
    vectors, labels = separated_clusters()
    d = scores.rank_normalise(np.random.default_rng(6).random(len(vectors)))
    picks = select_clusters(vectors, d, CLUSTERS, n_clusters=CLUSTERS, seed=0)
    chosen = [p.index for p in picks]
    assert sorted(labels[chosen].tolist()) == list(range(CLUSTERS))
    for index in chosen:
        same = labels == labels[index]
        assert d[index] == d[same].max()


def all_selectors(vectors: np.ndarray, d: np.ndarray, seed: int) -> dict[str, object]:
    labels = partition_pool(vectors, 60, seed)
    return {
        "facility": lambda k: select_facility(vectors, d, k, lam=0.5),
        "facility_partitioned": lambda k: select_facility(vectors, d, k, lam=0.5, labels=labels),
        "coverage": lambda k: select_coverage(vectors, k),
        "kcenter": lambda k: select_kcenter(vectors, d, k, lam=0.5),
        "kcenter_partitioned": lambda k: select_kcenter(vectors, d, k, lam=0.5, labels=labels),
        "cluster": lambda k: select_clusters(vectors, d, k, n_clusters=7, seed=seed),
        "random": lambda k: select_random(len(vectors), k, seed=seed),
        "difficulty": lambda k: select_difficulty(d, k),
    }


@pytest.mark.parametrize(
    "name",
    ["facility", "facility_partitioned", "coverage", "kcenter", "kcenter_partitioned", "cluster", "random", "difficulty"],
)
def test_subsets_nested_and_seeded(name: str) -> None:
    vectors, d = blob_pool(240, centers=5, spread=1.2, seed=7)
    run = all_selectors(vectors, d, seed=3)[name]
    full = run(60)
    assert len(full) == 60
    assert len({p.index for p in full}) == 60
    for k in (1, 12, 37):
        prefix = run(k)
        assert [p.index for p in prefix] == [p.index for p in full[:k]]
        assert [p.reason for p in prefix] == [p.reason for p in full[:k]]
    rerun = all_selectors(vectors, d, seed=3)[name](60)
    assert [p.index for p in rerun] == [p.index for p in full]


def test_random_depends_on_seed() -> None:
    assert [p.index for p in select_random(100, 10, seed=1)] != [p.index for p in select_random(100, 10, seed=2)]


def test_selectors_cap_k_at_pool_size() -> None:
    vectors, d = blob_pool(20, centers=2, spread=1.0, seed=8)
    assert len(select_facility(vectors, d, 50)) == 20
    assert len(select_kcenter(vectors, d, 50)) == 20
    assert select_facility(vectors, d, 0) == []


def test_facility_rejects_unnormalised_difficulty() -> None:
    vectors, _ = blob_pool(20, centers=2, spread=1.0, seed=8)
    with pytest.raises(ValueError, match="rank-normalised"):
        select_facility(vectors, np.linspace(0, 5, 20), 3)


# --------------------------------------------------------------------------------------------
# Scale path


@pytest.mark.parametrize(("centers", "spread"), [(20, 1.0), (4, 3.0), (1, 1.0)])
def test_partitioned_objective_close_to_exact(centers: int, spread: float) -> None:
    vectors, d = blob_pool(3000, centers=centers, spread=spread, seed=9, dim=64)
    k = 60
    labels = partition_pool(vectors, 300, seed=0)
    assert labels.max() + 1 >= 8
    assert np.bincount(labels).max() <= 600
    exact = facility_objective(vectors, d, [p.index for p in select_facility(vectors, d, k)], 0.5)
    partitioned = facility_objective(vectors, d, [p.index for p in select_facility(vectors, d, k, labels=labels)], 0.5)
    random = facility_objective(vectors, d, [p.index for p in select_random(len(vectors), k)], 0.5)
    assert partitioned >= 0.97 * exact
    assert partitioned > random


def test_partition_pool_bounds_sizes_and_splits_duplicates() -> None:
    vectors, _ = blob_pool(1000, centers=3, spread=0.5, seed=10)
    labels = partition_pool(vectors, 100, seed=0)
    assert np.bincount(labels).max() <= 200
    assert labels.min() == 0
    assert set(np.unique(labels).tolist()) == set(range(labels.max() + 1))
    identical = np.ones((500, 8), dtype=np.float32)
    assert np.bincount(partition_pool(identical, 100, seed=0)).max() <= 200


def test_facility_objective_matches_definition() -> None:
    vectors, d = blob_pool(50, centers=3, spread=1.0, seed=11)
    chosen = [3, 17, 29]
    similarity = np.maximum(vectors @ vectors[chosen].T, 0.0)
    expected = 0.3 * d[chosen].mean() + 0.7 * similarity.max(axis=1).mean()
    assert facility_objective(vectors, d, chosen, 0.3) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Filters


def test_drop_hardest_percent() -> None:
    raw = np.array([0.1, 0.9, 0.5, 0.95, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8])
    assert drop_hardest(raw, 20).tolist() == [1, 3]
    assert drop_hardest(raw, 5).tolist() == []
    # Ties: of the three equal scores, the lowest rows are dropped first.
    assert drop_hardest([1.0, 1.0, 0.0, 1.0], 50).tolist() == [0, 1]


def test_near_duplicates_keep_first_of_group() -> None:
    rng = np.random.default_rng(12)
    base = rng.standard_normal((6, 16)).astype(np.float32)
    vectors = np.vstack([base, base[0], base[2] + 1e-3, base[4] * 3.0])
    assert near_duplicates(vectors, 0.99).tolist() == [6, 7, 8]
    sources = duplicate_sources(vectors, 0.99)
    assert sources[6] == 0
    assert sources[7] == 2
    assert sources[8] == 4


def test_near_duplicates_compare_with_kept_rows_only() -> None:
    # b is within the threshold of a and c, but c is not within it of a: b goes, c stays.
    a = np.array([1.0, 0.0])
    angle = math.acos(0.95) * 0.75
    b = np.array([math.cos(angle), math.sin(angle)])
    c = np.array([math.cos(2 * angle), math.sin(2 * angle)])
    assert near_duplicates(np.vstack([a, b, c]), 0.95).tolist() == [1]


def test_near_duplicates_within_partitions_only() -> None:
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    assert near_duplicates(vectors, 0.99, labels=np.array([0, 1, 1, 1])).tolist() == [3]


# --------------------------------------------------------------------------------------------
# Whole selection, sizing and plots


def test_select_subset_filters_and_maps_rows() -> None:
    vectors, d = blob_pool(300, centers=5, spread=1.0, seed=13)
    vectors = np.vstack([vectors, vectors[:5]])
    raw = np.concatenate([d, d[:5]])
    config = SelectionConfig(drop_hardest_pct=5.0, drop_near_duplicates=0.999)
    result = select_subset(vectors, raw, 30, config, seed=0)
    hardest = set(drop_hardest(raw, 5.0).tolist())
    assert hardest <= set(result.dropped)
    duplicates = {row for row, reason in result.dropped.items() if reason.startswith("near-duplicate")}
    assert duplicates == {300 + i for i in range(5) if i not in hardest}
    assert len(result.picks) == 30
    assert not set(result.indices) & set(result.dropped)
    assert all(np.isnan(result.difficulty[row]) for row in result.dropped)
    assert np.nanmax(result.difficulty) == 1.0
    assert result.partitions is None


def test_select_subset_partitions_large_pool() -> None:
    vectors, d = blob_pool(900, centers=6, spread=1.0, seed=14)
    config = SelectionConfig(exact_max_pool=500, partition_size=100)
    result = select_subset(vectors, d, 25, config, seed=0)
    assert result.partitions is not None
    assert len(result.picks) == 25
    for pick in result.picks:
        assert pick.cluster == result.partitions[pick.index]
    exact = select_subset(vectors, d, 25, SelectionConfig(), seed=0)
    ratio = facility_objective(vectors, d, result.indices, 0.5) / facility_objective(vectors, d, exact.indices, 0.5)
    assert ratio >= 0.97


@pytest.mark.parametrize("selector", ["facility", "kcenter", "cluster", "random", "difficulty", "coverage"])
def test_select_subset_runs_every_selector(selector: str) -> None:
    vectors, d = blob_pool(200, centers=4, spread=1.0, seed=15)
    result = select_subset(vectors, d * 7.0, 12, SelectionConfig(selector=selector), seed=1)
    assert len(set(result.indices)) == 12


def test_subset_size_rules() -> None:
    size = subset_size(BudgetConfig(fraction=0.05), 101)
    assert (size.examples, size.call_cap, size.rule) == (6, 6, "fraction")
    assert subset_size(BudgetConfig(fraction=None, count=40), 30).examples == 30
    assert subset_size(BudgetConfig(fraction=None, count=40), 30).call_cap == 40
    money = subset_size(BudgetConfig(fraction=None, max_cost_usd=1.0), 10_000, cost_per_call=0.01)
    assert (money.examples, money.rule) == (100, "money")
    capped = subset_size(BudgetConfig(fraction=0.5, max_calls=7), 100)
    assert capped.call_cap == 7
    assert "max_calls" in capped.explanation


def test_subset_size_errors() -> None:
    with pytest.raises(BudgetError, match="cost per call"):
        subset_size(BudgetConfig(fraction=None, max_cost_usd=1.0), 100)
    with pytest.raises(ValidationError, match="subset size is undefined"):
        BudgetConfig(fraction=None)


def test_plot_selection_writes_pngs(tmp_path) -> None:
    from bridge.selection.plots import plot_selection

    vectors, d = blob_pool(400, centers=4, spread=1.0, seed=16)
    chosen = [p.index for p in select_facility(vectors, d, 20)]
    paths = plot_selection(vectors, d, chosen, tmp_path / "plots")
    assert [p.name for p in paths] == ["selection_projection.png", "selection_difficulty.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000
