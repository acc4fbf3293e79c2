"""Evaluation figures: embedding map (t-SNE), confusion matrix, k-means cluster sizes.

Figures are built with the object-oriented matplotlib API on an Agg canvas, so nothing
touches pyplot's global state or needs a display, and no figure outlives its function.
Every function writes its PNG atomically (temp file in the same folder, then
``os.replace``) and returns the path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distillery import artifacts

__all__ = [
    "confusion_counts",
    "plot_cluster_sizes",
    "plot_confusion_counts",
    "plot_confusion_matrix",
    "plot_embedding_map",
]

#: Above this many classes the confusion-matrix cells are not annotated (unreadable).
MAX_ANNOTATED_CLASSES = 30
#: t-SNE of fewer points than this runs on one thread.
_TSNE_THREADED_MIN_POINTS = 1000


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically, then release it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    try:
        with artifacts.atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        fig.clear()
    return path


def _class_name(label: int, class_names: Sequence[str]) -> str:
    if label < 0:
        return "unlabeled"
    return str(class_names[label]) if label < len(class_names) else str(label)


def _class_colors(n: int) -> np.ndarray:
    """(n, 4) RGBA colours: qualitative palettes for few classes, a spread-out ramp beyond."""
    if n <= 10:
        return colormaps["tab10"](np.arange(n))
    if n <= 20:
        return colormaps["tab20"](np.arange(n))
    return colormaps["turbo"](np.linspace(0.0, 1.0, n))


def _tsne_2d(x: np.ndarray, seed: int) -> np.ndarray:
    """(n, d) -> (n, 2) t-SNE coordinates (tiny inputs: the first two dims, zero-padded)."""
    n = x.shape[0]
    if n < 4:
        out = np.zeros((n, 2), dtype=np.float32)
        out[:, : min(2, x.shape[1])] = x[:, :2]
        return out
    from sklearn.manifold import TSNE  # imported here: slow import, only needed here
    from threadpoolctl import threadpool_limits

    # Perplexity must stay below n; ~n/3 keeps small sets from collapsing to a ball.
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # Small maps gain nothing from OpenMP threads, which on a busy machine mostly wait.
    with threadpool_limits(limits=1 if n < _TSNE_THREADED_MIN_POINTS else None):
        return tsne.fit_transform(x.astype(np.float32))


def plot_embedding_map(
    x: np.ndarray,
    y: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    max_points: int = 2000,
    title: str | None = None,
) -> Path:
    """2-D t-SNE map of the L2-normalised embeddings, coloured by label.

    Args:
        x: (n, d) embeddings.
        y: (n,) labels; ``-1`` rows are drawn in grey as "unlabeled".
        class_names: name of each label index (missing names fall back to the index).
        path: PNG to write.
        seed: drives the subsample and t-SNE.
        max_points: at most this many rows (a seeded random subset) are mapped, since
            t-SNE is quadratic in n.
        title: prefix of the figure title (e.g. the stage name).
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"expected (n, d) embeddings and (n,) labels, got {x.shape}, {y.shape}")
    if len(x) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
        x, y = x[keep], y[keep]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    xy = _tsne_2d(x, seed)

    labels = np.unique(y)
    known = labels[labels >= 0]
    colors = _class_colors(len(known))
    fig = Figure(figsize=(8.0, 6.5))
    ax = fig.add_subplot()
    if (labels < 0).any():
        grey = y < 0
        ax.scatter(*xy[grey].T, s=6, c="lightgrey", label="unlabeled", linewidths=0)
    for color, label in zip(colors, known, strict=True):
        sel = y == label
        name = _class_name(int(label), class_names)
        ax.scatter(*xy[sel].T, s=8, color=color, label=name, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}t-SNE of L2-normalised embeddings (n = {len(x)})")
    if len(labels):
        ncol = 1 + len(labels) // 25  # long legends wrap into columns beside the plot
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
            markerscale=2.0,
            ncol=ncol,
            frameon=False,
        )
    return _save(fig, path)


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows: true class, columns: predicted; rows with ``y_true == -1`` are
    ignored; ``C = max(num_classes, largest label + 1)``."""
    y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
    y_pred = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} true labels vs {len(y_pred)} predictions")
    keep = y_true >= 0
    y_true, y_pred = y_true[keep], y_pred[keep]
    if (y_pred < 0).any():
        raise ValueError("predictions must be non-negative class indices")
    n = max(num_classes, int(y_true.max(initial=-1)) + 1, int(y_pred.max(initial=-1)) + 1)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def plot_confusion_matrix(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str,
) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted class).

    Each row sums to 1 (rows of classes absent from ``y_true`` stay 0); cells are annotated
    with their value when there are at most 30 classes. Rows with ``y_true == -1`` are
    ignored.

    Args:
        y_true: (n,) true labels.
        y_pred: (n,) predicted labels.
        class_names: name of each label index; the matrix has
            ``max(len(class_names), max label + 1)`` rows and columns.
    """
    counts = confusion_counts(y_true, y_pred, len(class_names))
    return plot_confusion_counts(counts, class_names, path, title=title)


def plot_confusion_counts(
    counts: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str,
) -> Path:
    """:func:`plot_confusion_matrix` from (C, C) counts (rows: true class)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = len(counts)
    totals = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    names = [_class_name(i, class_names) for i in range(n)]

    side = float(np.clip(0.45 * n + 2.5, 4.0, 24.0))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=names, rotation=90, fontsize="small")
    ax.set_yticks(ticks, labels=names, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (n = {int(counts.sum())})")
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                value = norm[i, j]
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize="x-small" if n > 10 else "small",
                    color="white" if value > 0.5 else "black",  # legible on dark cells
                )
    return _save(fig, path)


def plot_cluster_sizes(
    labels: np.ndarray,
    k: int,
    path: str | os.PathLike[str],
    *,
    title: str,
) -> Path:
    """Bar chart of cluster sizes sorted descending, with the mean size as a line.

    Empty clusters are kept (zero-height bars at the right end) and marked with red ticks
    on the axis, and counted in the legend.

    Args:
        labels: (n,) cluster index of each item, in ``[0, k)``.
        k: number of clusters.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(
            f"cluster labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]"
        )
    sizes = np.sort(np.bincount(labels, minlength=k))[::-1]
    empty = int((sizes == 0).sum())
    mean = len(labels) / k

    fig = Figure(figsize=(float(np.clip(0.08 * k + 4.0, 6.0, 16.0)), 4.0))
    ax = fig.add_subplot()
    ranks = np.arange(k)
    ax.bar(ranks, sizes, width=1.0 if k > 50 else 0.8, color="tab:blue", label="cluster size")
    ax.axhline(mean, color="tab:orange", linestyle="--", label=f"mean = {mean:.1f}")
    if empty:
        ax.plot(
            ranks[sizes == 0],
            np.zeros(empty),
            linestyle="none",
            marker="|",
            markersize=12,
            markeredgewidth=2,
            color="tab:red",
            clip_on=False,
            label=f"empty: {empty}",
        )
    ax.set_xlim(-0.5, k - 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("cluster (sorted by size)")
    ax.set_ylabel("items")
    ax.set_title(f"{title} (k = {k}, n = {len(labels)}, max = {sizes[0]}, min = {sizes[-1]})")
    ax.legend(fontsize="small")
    return _save(fig, path)
