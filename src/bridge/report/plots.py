"""Report plots, written as PNG with matplotlib's Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge.rundir import ensure_dir


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_bars(models: dict[str, dict[str, Any]], mode: str, path: Path, title: str) -> Path:
    """Bar chart of accuracy with 95 % Wilson intervals, one bar per model."""
    plt = _pyplot()
    names = [n for n, r in models.items() if mode in r]
    acc = [models[n][mode]["accuracy"] for n in names]
    low = [a - models[n][mode]["ci_low"] for n, a in zip(names, acc, strict=True)]
    high = [models[n][mode]["ci_high"] - a for n, a in zip(names, acc, strict=True)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    ax.bar(range(len(names)), acc, yerr=[low, high], capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"test accuracy ({mode})")
    ax.set_title(title)
    for i, a in enumerate(acc):
        ax.text(i, a + 0.02, f"{a:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    ensure_dir(path.parent)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_class(models: dict[str, dict[str, Any]], mode: str, labels: Sequence[str], path: Path) -> Path | None:
    """Grouped bars of per-class accuracy for each model that has them."""
    plt = _pyplot()
    names = [n for n, r in models.items() if r.get(mode, {}).get("per_class_accuracy")]
    if not names or not labels:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(names)) / 3), 4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        values = [models[name][mode]["per_class_accuracy"].get(label, 0.0) for label in labels]
        ax.bar([i + j * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy within class")
    ax.set_title("Per-class test accuracy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    ensure_dir(path.parent)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(curves: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Training loss per optimizer step for each training run, with dev points where logged."""
    plt = _pyplot()
    curves = {k: v for k, v in curves.items() if v.get("loss_curve")}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (name, metrics) in zip(axes[0], curves.items(), strict=True):
        steps = [p["step"] for p in metrics["loss_curve"]]
        ax.plot(steps, [p["loss"] for p in metrics["loss_curve"]], marker=".", label="train loss")
        dev = [e for e in metrics.get("dev_evaluations", []) if e.get("dev_loss") is not None]
        if dev:
            ax.plot([e["step"] for e in dev], [e["dev_loss"] for e in dev], marker="o", label="dev loss")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    ensure_dir(path.parent)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frontier(points: Sequence[dict[str, Any]], x_key: str, x_label: str, path: Path, title: str) -> Path | None:
    """Scatter of accuracy against cost, one labelled point per method and budget.

    Each point is a dict with ``label``, ``accuracy``, optional ``ci_low``/``ci_high`` and the
    cost under ``x_key``. The upper-left envelope (no other point cheaper and better) is drawn.
    """
    plt = _pyplot()
    points = [p for p in points if p.get(x_key) is not None and p.get("accuracy") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [p[x_key] for p in points]
    middle = (min(xs) + max(xs)) / 2
    for p in points:
        yerr = None
        if p.get("ci_low") is not None:
            yerr = [[p["accuracy"] - p["ci_low"]], [p["ci_high"] - p["accuracy"]]]
        ax.errorbar([p[x_key]], [p["accuracy"]], yerr=yerr, fmt="o", capsize=3)
        # Labels of points in the right half run leftwards, so they stay inside the axes.
        right = max(xs) > min(xs) and p[x_key] > middle
        ax.annotate(
            p["label"], (p[x_key], p["accuracy"]), textcoords="offset points",
            xytext=(-5, 4) if right else (5, 4), ha="right" if right else "left", fontsize=8,
        )
    ax.margins(x=0.08)
    ordered = sorted(points, key=lambda p: (p[x_key], -p["accuracy"]))
    envelope, best = [], -1.0
    for p in ordered:
        if p["accuracy"] > best:
            envelope.append(p)
            best = p["accuracy"]
    ax.step([p[x_key] for p in envelope], [p["accuracy"] for p in envelope], where="post", color="grey", alpha=0.6)
    ax.set_xlabel(x_label)
    ax.set_ylabel("student test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    ensure_dir(path.parent)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
