"""One call from scores and embeddings to the ordered subset: filters, scale path and selector."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from bridge.config import SelectionConfig
from bridge.selection import selectors
from bridge.selection.difficulty import rank_normalise
from bridge.selection.filters import drop_hardest, duplicate_sources
from bridge.selection.partition import partition_pool, unit_rows
from bridge.selection.selectors import Pick

log = logging.getLogger(__name__)


@dataclass
class SelectionResult:
    """The ordered picks over the whole pool, and why the filtered rows were left out.

    ``picks[i].index`` is a row of the pool passed to :func:`select_subset`; every prefix of
    ``picks`` is the subset for that size. ``dropped`` maps a filtered row to the reason.
    ``difficulty`` is the rank-normalised score the selector saw (NaN for dropped rows).
    ``partitions`` contains each row's k-means partition when the pool took the scalable path.
    """

    picks: list[Pick]
    dropped: dict[int, str]
    difficulty: np.ndarray
    partitions: np.ndarray | None = None

    @property
    def indices(self) -> list[int]:
        """Pool rows of the picks, in pick order."""
        return [pick.index for pick in self.picks]


def select_subset(
    embeddings: ArrayLike,
    difficulty: ArrayLike,
    k: int,
    config: SelectionConfig,
    *,
    seed: int = 0,
) -> SelectionResult:
    """Filter the pool, then pick up to ``k`` examples with the configured selector.

    ``difficulty`` contains raw scores, higher for harder examples; they are rank-normalised over
    the rows that survive the filters. Pools larger than ``config.exact_max_pool`` are split
    into k-means partitions of at most ``config.partition_size`` rows once, and both the
    near-duplicate filter and the similarity-based selectors work within partitions. Fewer than
    ``k`` picks come back only when fewer rows survive the filters.
    """
    vectors = unit_rows(embeddings)
    raw = np.asarray(difficulty, dtype=np.float64).ravel()
    n = len(vectors)
    if len(raw) != n:
        raise ValueError(f"{n} embeddings but {len(raw)} difficulty scores; expected one score per example")
    if k < 0:
        raise ValueError(f"subset size k must be non-negative, got {k}")

    partitions = partition_pool(vectors, config.partition_size, seed) if n > config.exact_max_pool else None
    dropped: dict[int, str] = {}
    if config.drop_hardest_pct > 0:
        for row in drop_hardest(raw, config.drop_hardest_pct).tolist():
            dropped[row] = f"among the hardest {config.drop_hardest_pct:g} % of the pool"
    if config.drop_near_duplicates is not None:
        candidates = np.array([row for row in range(n) if row not in dropped], dtype=np.int64)
        labels = None if partitions is None else partitions[candidates]
        sources = duplicate_sources(vectors[candidates], config.drop_near_duplicates, labels)
        for local in np.flatnonzero(sources >= 0).tolist():
            dropped[int(candidates[local])] = (
                f"near-duplicate of row {int(candidates[sources[local]])} (cosine >= {config.drop_near_duplicates:g})"
            )

    keep = np.array([row for row in range(n) if row not in dropped], dtype=np.int64) if dropped else np.arange(n)
    kept_vectors = vectors if len(keep) == n else vectors[keep]
    kept_difficulty = rank_normalise(raw[keep])
    kept_labels = None if partitions is None else partitions[keep]
    if k > len(keep):
        log.warning("the subset size %d exceeds the %d examples left after filtering; selecting all of them", k, len(keep))

    picks = run_selector(config, kept_vectors, kept_difficulty, min(k, len(keep)), seed=seed, labels=kept_labels)
    picks = [dataclasses.replace(pick, index=int(keep[pick.index])) for pick in picks]

    normalised = np.full(n, np.nan)
    normalised[keep] = kept_difficulty
    log.info(
        "selected %d of %d examples with the %s selector (%d filtered out%s)",
        len(picks), n, config.selector, len(dropped),
        "" if partitions is None else f", {int(partitions.max()) + 1} partitions",
    )
    return SelectionResult(picks=picks, dropped=dropped, difficulty=normalised, partitions=partitions)


def run_selector(
    config: SelectionConfig,
    vectors: np.ndarray,
    difficulty: np.ndarray,
    k: int,
    *,
    seed: int,
    labels: np.ndarray | None = None,
) -> list[Pick]:
    """Run ``config.selector`` on unit-norm vectors and rank-normalised difficulty."""
    name = config.selector
    if name == "facility":
        return selectors.select_facility(vectors, difficulty, k, lam=config.lam, labels=labels)
    if name == "kcenter":
        return selectors.select_kcenter(vectors, difficulty, k, lam=config.lam, labels=labels)
    if name == "cluster":
        return selectors.select_clusters(vectors, difficulty, k, n_clusters=config.clusters, seed=seed)
    if name == "random":
        return selectors.select_random(len(vectors), k, seed=seed)
    if name == "difficulty":
        return selectors.select_difficulty(difficulty, k)
    if name == "coverage":
        return selectors.select_coverage(vectors, k, labels=labels)
    raise ValueError(f"unknown selector {name!r}; expected one of facility, kcenter, cluster, random, difficulty, coverage")
