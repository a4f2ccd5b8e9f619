"""Subset selectors: each returns an ordered list of picks, and every prefix is a valid subset.

All selectors take embeddings (normalised to unit rows here, without a copy when they already
are) and difficulty already rank-normalised to [0, 1]. None of them looks at the requested size
``k`` except to stop, so the run for ``k`` is the first ``k`` picks of the run for any larger
size: raising the budget extends an earlier subset instead of replacing it.

``labels`` (k-means partitions from :func:`~bridge.selection.partition.partition_pool`) switch
the similarity-based selectors to their scalable form: a point is covered only by picks in its
own partition, so no similarity between partitions is ever computed and memory stays at one
partition's block.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from bridge.selection.partition import kmeans_labels, unit_rows

log = logging.getLogger(__name__)

#: Similarity blocks are computed in row chunks of at most this many float32 values (256 MiB).
_CHUNK_VALUES = 1 << 26


@dataclass(frozen=True)
class Pick:
    """One chosen example: its row in the pool the selector saw, and why it was chosen.

    ``parts`` contains the named terms of the score that won the pick. For the facility
    selector, ``difficulty`` and ``coverage`` add up to ``gain``. ``cluster`` is the k-means
    cluster of the cluster selector or the partition of a large pool, and None otherwise.
    """

    index: int
    gain: float
    reason: str
    cluster: int | None = None
    parts: dict[str, float] = field(default_factory=dict)


def _check_inputs(vectors: np.ndarray, difficulty: np.ndarray | None, k: int) -> None:
    if k < 0:
        raise ValueError(f"subset size k must be non-negative, got {k}")
    if difficulty is None:
        return
    if len(difficulty) != len(vectors):
        raise ValueError(f"{len(vectors)} embeddings but {len(difficulty)} difficulty scores; expected one per example")
    if len(difficulty) and (np.min(difficulty) < 0 or np.max(difficulty) > 1):
        raise ValueError(
            f"difficulty must be rank-normalised to [0, 1], got range [{np.min(difficulty)}, {np.max(difficulty)}]; "
            "pass it through bridge.selection.rank_normalise"
        )


def _group_rows(labels: np.ndarray | None, n: int) -> list[np.ndarray]:
    """Return each partition's rows in ascending order; one group of all rows without labels."""
    if labels is None:
        return [np.arange(n)]
    labels = np.asarray(labels)
    if len(labels) != n:
        raise ValueError(f"{n} embeddings but {len(labels)} partition labels")
    order = np.argsort(labels, kind="stable")
    return [g for g in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1) if len(g)]


class _Blocks:
    """Cached clipped similarity blocks ``max(0, cos)``, one per partition.

    Positions number the rows partition by partition (``order[position]`` is the row), so
    partition p owns positions ``starts[p]:starts[p + 1]``. The exact path (one partition)
    stores its N x N block in float32. Partitions store theirs in float16, whose rounding error
    (at most 2^-11 for values in [0, 1]) is far below the gaps the greedy choices turn on, and
    which halves the memory: about N * 2 * partition_size bytes in all.
    """

    def __init__(self, vectors: np.ndarray, groups: list[np.ndarray], dtype: type) -> None:
        self.order = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
        sizes = [len(g) for g in groups]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.partitions = len(groups)
        self.dense: list[np.ndarray] = []
        for rows in groups:
            points = vectors if len(rows) == len(vectors) else vectors[rows]
            block = np.empty((len(rows), len(rows)), dtype=dtype)
            step = max(1, _CHUNK_VALUES // max(1, len(rows)))
            for lo in range(0, len(rows), step):
                chunk = points[lo : lo + step] @ points.T
                np.maximum(chunk, 0.0, out=chunk)
                block[lo : lo + step] = chunk
            self.dense.append(block)

    def clipped_rows(self, p: int, local: np.ndarray | int) -> np.ndarray:
        """Return float32 rows of partition p's clipped block, as a new array."""
        return np.array(self.dense[p][local], dtype=np.float32)

    def chunk_rows(self, p: int) -> int:
        """Return how many rows of partition p's block fit in one chunk."""
        return max(1, _CHUNK_VALUES // max(1, int(self.starts[p + 1] - self.starts[p])))


def select_facility(
    vectors: np.ndarray,
    difficulty: np.ndarray,
    k: int,
    *,
    lam: float = 0.5,
    labels: np.ndarray | None = None,
) -> list[Pick]:
    """Pick examples greedily on difficulty plus facility-location coverage.

    The objective of a subset S of a pool of N is
    ``F(S) = lam * mean_{j in S} d_j + (1 - lam) * (1/N) * sum_i max_{j in S} max(0, cos(e_i, e_j))``.
    Step t (t = |S| + 1) adds the j that maximises ``lam / t * d_j + (1 - lam) / N * coverage_gain_j``,
    which is the step that increases F most at size t, because the mean's other change,
    -mean(S) * lam / t, is the same for every candidate. The weight depends on the step and
    never on the requested size, so subsets are nested. It shrinks like the coverage gains do
    (both are about 1/t), which keeps lam's balance roughly steady along the run. Ties go to
    the lower row. For speed, t in the weight is rounded down to a grid (:func:`weight_step`):
    exact up to t = 20, then at most 5 % low, so difficulty is over-weighted by at most 5 %.

    Every candidate's coverage gain is kept exact: a pick lowers the gains only through the
    points whose coverage it raises, so only those rows of the similarity block are read. A
    lazy heap keeps one upper bound per partition, which stays valid because gains and the
    weight only fall. Between grid points the weight is constant, so only the partition that
    received the last pick needs a new bound. ``difficulty`` must lie in [0, 1] (see
    :func:`~bridge.selection.difficulty.rank_normalise`).

    Without ``labels`` the pool is one partition and its whole N x N block is held in float32:
    the exact path. With ``labels`` a point is covered only by picks in its own partition, and
    each partition's block is held in float16.
    """
    _check_inputs(vectors, difficulty, k)
    vectors = unit_rows(vectors)
    n = len(vectors)
    k = min(k, n)
    if k == 0:
        return []

    blocks = _Blocks(vectors, _group_rows(labels, n), np.float16 if labels is not None else np.float32)
    order, starts = blocks.order, blocks.starts
    d = np.asarray(difficulty, dtype=np.float64)[order]
    coverage_weight = (1.0 - lam) / n

    gains = np.empty(n, dtype=np.float64)
    for p in range(blocks.partitions):
        gains[starts[p] : starts[p + 1]] = blocks.dense[p].sum(axis=1, dtype=np.float64)
    covered = np.zeros(n, dtype=np.float32)
    chosen = np.zeros(n, dtype=bool)
    version = [0] * blocks.partitions

    def best_of(p: int, grid_step: int) -> tuple[float, int, int, int, int]:
        lo, hi = int(starts[p]), int(starts[p + 1])
        values = lam / grid_step * d[lo:hi] + coverage_weight * gains[lo:hi]
        values[chosen[lo:hi]] = -np.inf
        local = int(np.argmax(values))
        return -float(values[local]), lo + local, p, grid_step, version[p]

    # One entry per partition: (-upper bound, position, partition, grid step and version evaluated at).
    heap = [best_of(p, 1) for p in range(blocks.partitions)]
    heapq.heapify(heap)
    picks: list[Pick] = []
    grid_step, next_grid_step = 1, 2
    with tqdm(total=k, desc="facility greedy", unit="pick", disable=None, leave=False) as progress:
        while len(picks) < k:
            step = len(picks) + 1
            if step == next_grid_step:
                grid_step, next_grid_step = step, step + max(1, step // 20)
            entry = heapq.heappop(heap)
            p = entry[2]
            if entry[3] != grid_step or entry[4] != version[p]:
                entry = best_of(p, grid_step)
                if heap and entry > heap[0]:
                    heapq.heappush(heap, entry)
                    continue
            pos = entry[1]

            difficulty_part = lam / grid_step * d[pos]
            coverage_part = coverage_weight * gains[pos]
            picks.append(
                Pick(
                    index=int(order[pos]),
                    gain=difficulty_part + coverage_part,
                    reason=(
                        f"facility step {step}: gain {difficulty_part + coverage_part:.4g} = "
                        f"difficulty {difficulty_part:.4g} + coverage {coverage_part:.4g}"
                    ),
                    cluster=None if labels is None else int(labels[order[pos]]),
                    parts={"difficulty": difficulty_part, "coverage": coverage_part, "difficulty_score": float(d[pos])},
                )
            )
            chosen[pos] = True
            _cover(blocks, p, pos, covered, gains)
            version[p] += 1
            if not chosen[starts[p] : starts[p + 1]].all():
                heapq.heappush(heap, best_of(p, grid_step if step + 1 < next_grid_step else step + 1))
            progress.update()
    return picks


def weight_step(step: int) -> int:
    """Return ``step`` rounded down to the grid g(1) = 1, g(m + 1) = g(m) + max(1, g(m) // 20).

    The grid contains every integer up to 20 and then grows by 5 % (rounded down) per point, so
    the rounded value is never more than 5 % below ``step``.
    """
    if step < 1:
        raise ValueError(f"greedy steps count from 1, got {step}")
    grid = 1
    while True:
        following = grid + max(1, grid // 20)
        if following > step:
            return grid
        grid = following


def _cover(blocks: _Blocks, p: int, pos: int, covered: np.ndarray, gains: np.ndarray) -> None:
    """Add ``pos`` to the subset: raise the coverage of partition p and lower its gains to match.

    A point i whose coverage rises from ``old`` to ``new`` changes candidate j's gain by
    ``max(0, s_ij - new) - max(0, s_ij - old) = old - clip(s_ij, old, new)``, so only the rows
    of the improved points are read.
    """
    lo, hi = int(blocks.starts[p]), int(blocks.starts[p + 1])
    current = covered[lo:hi]
    new = blocks.clipped_rows(p, pos - lo)
    improved = np.flatnonzero(new > current)
    step = blocks.chunk_rows(p)
    for first in range(0, len(improved), step):
        local = improved[first : first + step]
        old_values = current[local]
        new_values = new[local]
        block = blocks.clipped_rows(p, local)
        np.clip(block, old_values[:, None], new_values[:, None], out=block)
        gains[lo:hi] -= block.sum(axis=0, dtype=np.float64) - old_values.sum(dtype=np.float64)
    current[improved] = new[improved]


def select_coverage(vectors: np.ndarray, k: int, *, labels: np.ndarray | None = None) -> list[Pick]:
    """Pick examples by facility-location coverage alone (the facility selector with lam = 0)."""
    return select_facility(vectors, np.zeros(len(vectors)), k, lam=0.0, labels=labels)


def select_kcenter(
    vectors: np.ndarray,
    difficulty: np.ndarray,
    k: int,
    *,
    lam: float = 0.5,
    labels: np.ndarray | None = None,
) -> list[Pick]:
    """Pick examples by difficulty-weighted k-center greedy.

    Each step picks the j maximising ``distance_j * ((1 - lam) + lam * d_j)``, where
    ``distance_j = 1 - max_{s in S} max(0, cos(e_j, e_s))`` is 1 while nothing near j is
    chosen. With lam = 0 this is the classic farthest-point k-center greedy. With ``labels``
    distances are measured to picks in the same partition only. Ties go to the lower row.
    """
    _check_inputs(vectors, difficulty, k)
    vectors = unit_rows(vectors)
    n = len(vectors)
    k = min(k, n)
    if k == 0:
        return []

    groups = _group_rows(labels, n)
    weight = (1.0 - lam) + lam * np.asarray(difficulty, dtype=np.float64)
    distance = np.ones(n, dtype=np.float64)
    chosen = np.zeros(n, dtype=bool)

    def best_of(p: int) -> tuple[float, int, int]:
        rows = groups[p]
        scores = np.where(chosen[rows], -np.inf, distance[rows] * weight[rows])
        local = int(np.argmax(scores))
        return -float(scores[local]), int(rows[local]), p

    # One entry per partition with its current best; a pick refreshes only its partition.
    heap = [best_of(p) for p in range(len(groups))]
    heapq.heapify(heap)
    picks: list[Pick] = []
    with tqdm(total=k, desc="k-center greedy", unit="pick", disable=None, leave=False) as progress:
        while len(picks) < k:
            negative_score, row, p = heapq.heappop(heap)
            rows = groups[p]
            picks.append(
                Pick(
                    index=row,
                    gain=-negative_score,
                    reason=(
                        f"k-center step {len(picks) + 1}: distance {distance[row]:.4g} x weight "
                        f"{weight[row]:.4g} = {-negative_score:.4g}"
                    ),
                    cluster=None if labels is None else int(labels[row]),
                    parts={"distance": float(distance[row]), "weight": float(weight[row])},
                )
            )
            chosen[row] = True
            points = vectors if len(rows) == n else vectors[rows]
            similarity = np.maximum(points @ vectors[row], 0.0)
            distance[rows] = np.minimum(distance[rows], 1.0 - similarity)
            if not chosen[rows].all():
                heapq.heappush(heap, best_of(p))
            progress.update()
    return picks


def dhondt_seats(sizes: list[int] | np.ndarray, seats: int) -> list[int]:
    """Return the cluster of each seat in order under D'Hondt allocation by cluster size.

    Seat t goes to the cluster with the largest quotient size / (seats so far + 1), ties to the
    lower cluster, and a cluster never gets more seats than it has members. The sequence does
    not depend on ``seats``, so allocations are house-monotone: one more seat never takes a
    seat away from any cluster.
    """
    sizes = [int(s) for s in sizes]
    if seats > sum(sizes):
        raise ValueError(f"cannot allocate {seats} seats over clusters with {sum(sizes)} members")
    heap = [(-float(size), c) for c, size in enumerate(sizes) if size > 0]
    heapq.heapify(heap)
    seats_given = [0] * len(sizes)
    sequence: list[int] = []
    while len(sequence) < seats:
        _, c = heapq.heappop(heap)
        sequence.append(c)
        seats_given[c] += 1
        if seats_given[c] < sizes[c]:
            heapq.heappush(heap, (-sizes[c] / (seats_given[c] + 1), c))
    return sequence


def default_cluster_count(n: int) -> int:
    """Return round(sqrt(n)), at least 1: the cluster count when none is configured."""
    return max(1, round(math.sqrt(n)))


def select_clusters(
    vectors: np.ndarray,
    difficulty: np.ndarray,
    k: int,
    *,
    n_clusters: int | None = None,
    seed: int = 0,
    labels: np.ndarray | None = None,
) -> list[Pick]:
    """Pick the hardest examples of each k-means cluster, with seats allocated by D'Hondt.

    The cluster count is ``n_clusters`` (sqrt(N) when None) and never depends on k, and the
    allocation is house-monotone, so subsets are nested. Within a cluster examples go hardest
    first, ties to the lower row. Precomputed ``labels`` replace the k-means run.
    """
    _check_inputs(vectors, difficulty, k)
    vectors = unit_rows(vectors)
    n = len(vectors)
    k = min(k, n)
    if k == 0:
        return []
    if labels is None:
        labels = kmeans_labels(vectors, n_clusters or default_cluster_count(n), seed)
    d = np.asarray(difficulty, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(labels))[:-1])
    # Hardest first within each cluster; lexsort's last key is primary, the row breaks ties.
    members = [m[np.lexsort((m, -d[m]))] for m in members]
    sizes = [len(m) for m in members]
    picked = [0] * len(members)
    picks: list[Pick] = []
    for c in dhondt_seats(sizes, k):
        index = int(members[c][picked[c]])
        quotient = sizes[c] / (picked[c] + 1)
        picked[c] += 1
        picks.append(
            Pick(
                index=index,
                gain=float(d[index]),
                reason=(
                    f"cluster {c} (size {sizes[c]}): seat {picked[c]} by D'Hondt quotient {quotient:.4g}, "
                    f"difficulty rank {picked[c]} in cluster"
                ),
                cluster=c,
                parts={"quotient": quotient, "difficulty_score": float(d[index])},
            )
        )
    return picks


def select_random(n: int, k: int, *, seed: int = 0) -> list[Pick]:
    """Pick a seeded uniform random subset: the first k of one permutation of the pool."""
    k = min(max(k, 0), n)
    permutation = np.random.default_rng(seed).permutation(n)
    return [
        Pick(index=int(i), gain=0.0, reason=f"random (seed {seed}) position {t + 1}")
        for t, i in enumerate(permutation[:k])
    ]


def select_difficulty(difficulty: np.ndarray, k: int) -> list[Pick]:
    """Pick the k hardest examples, hardest first, ties to the lower row."""
    d = np.asarray(difficulty, dtype=np.float64)
    k = min(max(k, 0), len(d))
    ranking = np.lexsort((np.arange(len(d)), -d))[:k]
    return [
        Pick(
            index=int(i),
            gain=float(d[i]),
            reason=f"difficulty rank {t + 1}: score {d[i]:.4g}",
            parts={"difficulty_score": float(d[i])},
        )
        for t, i in enumerate(ranking)
    ]


def facility_objective(
    vectors: np.ndarray, difficulty: np.ndarray, chosen: list[int] | np.ndarray, lam: float
) -> float:
    """Return the exact facility objective F(S) of a chosen subset over the whole pool.

    ``F(S) = lam * mean_{j in S} d_j + (1 - lam) * (1/N) * sum_i max_{j in S} max(0, cos(e_i, e_j))``,
    computed in row chunks with O(N * |S|) time and O(chunk * |S|) memory, across partitions.
    """
    chosen = np.asarray(chosen, dtype=np.int64)
    n = len(vectors)
    if len(chosen) == 0 or n == 0:
        return 0.0
    targets = vectors[chosen]
    covered = 0.0
    step = max(1, _CHUNK_VALUES // len(chosen))
    for lo in range(0, n, step):
        block = vectors[lo : lo + step] @ targets.T
        covered += float(np.maximum(block.max(axis=1), 0.0).sum(dtype=np.float64))
    mean_difficulty = float(np.asarray(difficulty, dtype=np.float64)[chosen].mean())
    return lam * mean_difficulty + (1.0 - lam) * covered / n
