"""Unit-norm embeddings and the k-means partitions that keep large pools off an N x N matrix."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
from numpy.typing import ArrayLike

log = logging.getLogger(__name__)

#: A k-means fit uses at most max(_MIN_FIT_POINTS, _FIT_POINTS_PER_CLUSTER * clusters) points.
#: Larger pools are fitted on a seeded sample and every point is then assigned to its nearest
#: centre, as faiss does with at most 256 points per centre.
_FIT_POINTS_PER_CLUSTER = 64
_MIN_FIT_POINTS = 1_024

#: Maximum clusters per k-means split when partitioning a large pool top-down; a part that needs
#: more is first split into sqrt(needed) clusters.
_MAX_BRANCHING = 32

#: Lloyd iterations per split: partitions only bound block sizes, so rough centres suffice.
_PARTITION_ITERATIONS = 10

#: Points per chunk when assigning points to centres.
_ASSIGN_CHUNK = 65_536


def unit_rows(embeddings: ArrayLike) -> np.ndarray:
    """Return the embeddings as float32 rows of unit L2 norm, so dot products are cosines.

    An already unit-norm float32 C-contiguous array is returned as is, without a copy. A
    zero row stays zero, so its cosine with every point is 0.
    """
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (examples x dimensions), got shape {array.shape}")
    if array.dtype == np.float32 and array.flags.c_contiguous:
        norms = _row_norms(array)
        _check_finite(norms)
        if np.all(np.abs(norms - 1.0) <= 1e-4):
            return array
    vectors = np.array(array, dtype=np.float32, order="C", copy=True)
    norms = _row_norms(vectors)
    _check_finite(norms)
    norms[norms == 0] = 1.0
    vectors /= norms[:, None]
    return vectors


def _row_norms(array: np.ndarray) -> np.ndarray:
    # einsum needs no N x d temporary, unlike np.linalg.norm(array, axis=1).
    return np.sqrt(np.einsum("ij,ij->i", array, array, dtype=np.float64))


def _check_finite(norms: np.ndarray) -> None:
    if not np.all(np.isfinite(norms)):
        bad = int(np.flatnonzero(~np.isfinite(norms))[0])
        raise ValueError(f"embedding row {bad} contains NaN or infinity; rescore that example")


def kmeans_labels(vectors: np.ndarray, n_clusters: int, seed: int, *, max_iter: int = 100) -> np.ndarray:
    """Cluster unit-norm rows with scikit-learn k-means and return labels 0..C-1 (C <= n_clusters).

    The fit runs on a seeded sample of at most max(1,024, 64 * n_clusters) points, in float64
    because scikit-learn 1.9's k-means++ computes float32 distances in many small upcast chunks
    that run up to ten times slower. Every point then goes to its nearest centre. Labels are
    renumbered by first appearance in row order, so empty or merged clusters leave no gaps.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    n = len(vectors)
    n_clusters = max(1, min(n_clusters, n))
    if n_clusters == 1:
        return np.zeros(n, dtype=np.int64)

    fit_size = max(_MIN_FIT_POINTS, _FIT_POINTS_PER_CLUSTER * n_clusters)
    if n > fit_size:
        sample = vectors[np.sort(np.random.default_rng(seed).choice(n, size=fit_size, replace=False))]
    else:
        sample = vectors
    model = KMeans(n_clusters=n_clusters, n_init=1, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # Duplicate points can leave fewer distinct clusters than requested; the renumbering
        # below handles that, so the warning is noise.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(np.asarray(sample, dtype=np.float64))
    return _renumber(nearest_centres(vectors, model.cluster_centers_.astype(np.float32)))


def nearest_centres(vectors: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Return the index of each row's nearest centre in Euclidean distance, in chunks."""
    half_norms = 0.5 * np.einsum("ij,ij->i", centres, centres)
    labels = np.empty(len(vectors), dtype=np.int64)
    for lo in range(0, len(vectors), _ASSIGN_CHUNK):
        scores = vectors[lo : lo + _ASSIGN_CHUNK] @ centres.T
        scores -= half_norms
        labels[lo : lo + _ASSIGN_CHUNK] = np.argmax(scores, axis=1)
    return labels


def _renumber(labels: np.ndarray) -> np.ndarray:
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def partition_pool(vectors: np.ndarray, partition_size: int, seed: int) -> np.ndarray:
    """Split a pool top-down into k-means partitions of about ``partition_size`` points.

    A part of n points with n > 2 * partition_size is split by k-means into
    c = ceil(n / partition_size) clusters, or into ceil(sqrt(c)) clusters when c exceeds 32, and
    each cluster is split again until it has at most 2 * partition_size points. A million
    points thus take about 33 k-means runs of at most 32 clusters each, and the cost grows as
    N log N. A part that k-means cannot separate (identical points) is cut into consecutive
    chunks. Returns labels 0..P-1 numbered by each partition's first row.
    """
    from threadpoolctl import threadpool_limits

    if partition_size < 1:
        raise ValueError(f"partition_size must be at least 1, got {partition_size}")
    n = len(vectors)
    limit = 2 * partition_size
    pending = [np.arange(n)] if n else []
    final: list[np.ndarray] = []
    while pending:
        members = pending.pop()
        if len(members) <= limit:
            final.append(members)
            continue
        clusters = math.ceil(len(members) / partition_size)
        if clusters > _MAX_BRANCHING:
            clusters = math.ceil(math.sqrt(clusters))
        points = vectors if len(members) == n else vectors[members]
        # Each fit uses at most 2,048 points, so thread start-up and barriers cost more than
        # the work. On a shared 2-core machine one thread cut partitioning the benchmark's
        # million blob points from 63 s to 15 s.
        with threadpool_limits(limits=1):
            sub = kmeans_labels(points, clusters, seed, max_iter=_PARTITION_ITERATIONS)
        if sub.max() == 0:
            final.extend(np.array_split(members, math.ceil(len(members) / partition_size)))
            continue
        pending.extend(members[sub == c] for c in range(int(sub.max()) + 1))

    labels = np.empty(n, dtype=np.int64)
    for part_id, members in enumerate(sorted(final, key=lambda m: int(m[0]))):
        labels[members] = part_id
    sizes = [len(m) for m in final]
    log.info(
        "partitioned %d points into %d k-means partitions (mean %.0f, largest %d points)",
        n, len(final), np.mean(sizes) if sizes else 0.0, max(sizes, default=0),
    )
    return labels
