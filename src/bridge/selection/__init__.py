"""Phase 1 selection: difficulty scores, selectors, filters, subset sizing and plots.

Nothing here runs a model. :func:`select_subset` takes the TA's difficulty scores and
embeddings and returns the ordered picks; the plots live in :mod:`bridge.selection.plots`,
which imports matplotlib only when called.
"""

from bridge.selection.difficulty import (
    answer_entropy,
    gold_difficulty,
    mean_token_entropy,
    normalised_entropy,
    rank_normalise,
)
from bridge.selection.filters import drop_hardest, duplicate_sources, near_duplicates
from bridge.selection.partition import partition_pool, unit_rows
from bridge.selection.selectors import (
    Pick,
    facility_objective,
    select_clusters,
    select_coverage,
    select_difficulty,
    select_facility,
    select_kcenter,
    select_random,
)
from bridge.selection.sizing import SubsetSize, subset_size
from bridge.selection.subset import SelectionResult, run_selector, select_subset

__all__ = [
    "Pick",
    "SelectionResult",
    "SubsetSize",
    "answer_entropy",
    "drop_hardest",
    "duplicate_sources",
    "facility_objective",
    "gold_difficulty",
    "mean_token_entropy",
    "near_duplicates",
    "normalised_entropy",
    "partition_pool",
    "rank_normalise",
    "run_selector",
    "select_clusters",
    "select_coverage",
    "select_difficulty",
    "select_facility",
    "select_kcenter",
    "select_random",
    "select_subset",
    "subset_size",
    "unit_rows",
]
