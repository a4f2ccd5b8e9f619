"""Filters applied to the pool before selection: the hardest percentile and near-duplicates."""

from __future__ import annotations

import logging
import math

import numpy as np
from numpy.typing import ArrayLike

log = logging.getLogger(__name__)


def drop_hardest(difficulty: ArrayLike, percent: float) -> np.ndarray:
    """Return the ascending indices of the floor(percent / 100 * N) hardest examples.

    Very high difficulty often means a wrong gold label rather than a useful example. The count
    is fixed by ``percent`` whatever the ties, and among equal scores the lower index is
    dropped first, so the result is deterministic.
    """
    if not 0 <= percent < 100:
        raise ValueError(f"the percentage of hardest examples to drop must be in [0, 100), got {percent}")
    d = np.asarray(difficulty, dtype=np.float64)
    count = math.floor(percent / 100.0 * len(d))
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    hardest_first = np.lexsort((np.arange(len(d)), -d))
    return np.sort(hardest_first[:count])


def near_duplicates(vectors: ArrayLike, threshold: float, labels: np.ndarray | None = None) -> np.ndarray:
    """Return the ascending indices of examples that duplicate an earlier kept example.

    See :func:`duplicate_sources` for the rule.
    """
    return np.flatnonzero(duplicate_sources(vectors, threshold, labels) >= 0)


def duplicate_sources(vectors: ArrayLike, threshold: float, labels: np.ndarray | None = None) -> np.ndarray:
    """Return, per row, the earlier kept row it near-duplicates, or -1 for rows that stay.

    Rows are visited in order: a row is dropped when its cosine similarity to an earlier row
    that was kept reaches ``threshold``, so of a group of near-duplicates the first stays.
    Neighbours come from scikit-learn's brute-force radius search on cosine distance
    (radius 1 - threshold). With ``labels`` (k-means partitions) only rows in the same partition
    are compared, which keeps the search linear in N; near-duplicates almost always share a
    partition, but a pair split across two is missed.
    """
    from sklearn.neighbors import NearestNeighbors

    from bridge.selection.partition import unit_rows

    if not 0 < threshold <= 1:
        raise ValueError(f"the near-duplicate cosine threshold must be in (0, 1], got {threshold}")
    units = unit_rows(vectors)
    n = len(units)
    if labels is None:
        groups = [np.arange(n)]
    else:
        order = np.argsort(labels, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(np.asarray(labels)[order])) + 1)
    # Cosine distances of identical unit rows round to about 1e-7, so a threshold of exactly 1
    # still finds them.
    radius = max(1.0 - threshold, 1e-6)
    source = np.full(n, -1, dtype=np.int64)
    for members in groups:
        if len(members) < 2:
            continue
        points = units[members]
        index = NearestNeighbors(radius=radius, metric="cosine", algorithm="brute").fit(points)
        for local, neighbours in enumerate(index.radius_neighbors(points, return_distance=False)):
            row = members[local]
            if source[row] >= 0:
                continue
            later = members[neighbours[neighbours > local]]
            later = later[source[later] < 0]
            source[later] = row
    dropped = int((source >= 0).sum())
    if dropped:
        log.info("found %d of %d examples to be near-duplicates (cosine >= %g)", dropped, n, threshold)
    return source
