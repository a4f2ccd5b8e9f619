"""Plots of a selection: a 2-D projection of the embeddings and difficulty histograms."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from bridge.rundir import atomic_write_bytes, ensure_dir

log = logging.getLogger(__name__)

#: Most unchosen points drawn in the projection; a seeded sample stands for larger pools.
MAX_PLOTTED_POINTS = 20_000


def plot_selection(
    embeddings: ArrayLike,
    difficulty: ArrayLike,
    chosen_idx: Sequence[int],
    out_dir: Path,
    *,
    seed: int = 0,
) -> list[Path]:
    """Draw the pool with the chosen examples marked, and difficulty histograms; return the PNG paths.

    The projection is UMAP when the umap-learn package is installed and PCA otherwise, fitted
    on the drawn points: every chosen one plus a seeded sample of at most 20,000 others. The
    histograms compare the difficulty of the chosen examples with the whole pool, each
    normalised to unit area so that their shapes compare at any subset size. Rows with a
    NaN difficulty are left out of the histograms.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    vectors = np.asarray(embeddings, dtype=np.float32)
    scores = np.asarray(difficulty, dtype=np.float64).ravel()
    if vectors.ndim != 2 or len(vectors) != len(scores):
        raise ValueError(f"expected one embedding row per difficulty score, got {vectors.shape} and {scores.shape}")
    chosen = np.unique(np.asarray(chosen_idx, dtype=np.int64))
    out_dir = ensure_dir(Path(out_dir))

    is_chosen = np.zeros(len(vectors), dtype=bool)
    is_chosen[chosen] = True
    others = np.flatnonzero(~is_chosen)
    if len(others) > MAX_PLOTTED_POINTS:
        others = np.sort(np.random.default_rng(seed).choice(others, MAX_PLOTTED_POINTS, replace=False))
    drawn = np.concatenate([others, chosen])
    coordinates, method = _project(vectors[drawn], seed)
    background, marked = coordinates[: len(others)], coordinates[len(others) :]

    figure = Figure(figsize=(7, 6), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(background[:, 0], background[:, 1], s=6, c="#9e9e9e", alpha=0.5, linewidths=0, label=f"pool ({len(vectors)})")
    axes.scatter(
        marked[:, 0], marked[:, 1], s=28, c="#d62728", marker="o", edgecolors="black", linewidths=0.5,
        label=f"chosen ({len(chosen)})",
    )
    axes.set_title(f"Embeddings ({method}), chosen examples marked")
    axes.set_xlabel(f"{method} 1")
    axes.set_ylabel(f"{method} 2")
    axes.legend(loc="best", frameon=True)
    projection_path = out_dir / "selection_projection.png"
    _save(figure, projection_path)

    finite = np.isfinite(scores)
    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    pool_scores = scores[finite]
    chosen_scores = scores[chosen][finite[chosen]]
    bins = np.histogram_bin_edges(pool_scores, bins=30) if len(pool_scores) else 30
    axes.hist(pool_scores, bins=bins, density=True, alpha=0.45, color="#1f77b4", label=f"pool ({len(pool_scores)})")
    axes.hist(chosen_scores, bins=bins, density=True, histtype="step", linewidth=2.0, color="#d62728", label=f"chosen ({len(chosen_scores)})")
    axes.set_title("Difficulty of the chosen examples against the pool")
    axes.set_xlabel("difficulty (higher is harder)")
    axes.set_ylabel("density")
    axes.legend(loc="best")
    histogram_path = out_dir / "selection_difficulty.png"
    _save(figure, histogram_path)
    return [projection_path, histogram_path]


def _project(vectors: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """Return 2-D coordinates of the rows and the method's name (UMAP when installed, else PCA)."""
    if len(vectors) < 3 or vectors.shape[1] < 2:
        padded = np.zeros((len(vectors), 2), dtype=np.float64)
        padded[:, : min(2, vectors.shape[1])] = vectors[:, :2]
        return padded, "raw"
    try:
        import umap
    except ImportError:
        umap = None
    if umap is not None:
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(vectors), "UMAP"

    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(vectors), "PCA"


def _save(figure: object, path: Path) -> None:
    buffer = io.BytesIO()
    figure.tight_layout()  # type: ignore[attr-defined]
    figure.savefig(buffer, format="png")  # type: ignore[attr-defined]
    atomic_write_bytes(path, buffer.getvalue())
    log.info("wrote %s", path)
