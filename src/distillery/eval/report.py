"""The standard evaluation of an encoder: kNN, linear probe, clustering, size, plots."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distillery.eval.embed import embed
from distillery.eval.metrics import (
    UNLABELED,
    cluster_and_score,
    knn_accuracy,
    linear_probe_accuracy,
    linear_probe_map,
)

__all__ = ["evaluate_encoder"]

log = logging.getLogger("distillery.eval")


def _plot(name: str, plot: Callable[..., Path], *args: Any, **kwargs: Any) -> str | None:
    """Draw one figure; a failing plot is logged and skipped so the metrics survive."""
    try:
        return str(plot(*args, **kwargs))
    except Exception:
        log.exception("could not draw the %s plot", name)
        return None


def evaluate_encoder(
    encoder: nn.Module,
    train_loader: Iterable[dict[str, Any]],
    test_loader: Iterable[dict[str, Any]],
    featurize: Callable[[Tensor], Tensor],
    *,
    class_names: Sequence[str],
    out_dir: Path,
    knn_k: Sequence[int] = (10, 20),
    probe_epochs: int = 100,
    plots: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
    name: str = "encoder",
    multi_hot: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Embed both splits with the frozen encoder and compute the standard metrics.

    - ``knn{k}_acc`` for each ``k`` in ``knn_k`` and ``linear_acc``: need labeled rows in
      both splits, otherwise they are left out (e.g. a fully unlabeled train split);
    - ``nmi`` / ``ari``: k-means (k = number of classes) on the labeled test rows;
      left out when the test split has no labels;
    - ``params``: parameter count of the encoder; ``embed_dim``: embedding size;
    - ``throughput_clips_s``: test clips the frozen encoder embeds per second on ``device``
      (featurize + forward in the test loader's batches, data loading excluded).

    Multi-label data (``multi_hot`` given: item indices -> (n, classes) multi-hot
    targets) is scored by ``linear_map`` alone, the test mAP of a linear probe with one
    sigmoid per class; the single-label metrics and plots above are left out.

    Plots (when ``plots``) go under ``out_dir``: ``embedding_map`` (t-SNE of the test
    split), ``confusion`` (linear probe on the test split) and ``cluster_sizes`` (k-means
    on the test split), each present only when its inputs exist.

    Args:
        encoder: (B, ...) encoder input -> (B, d) embeddings; already on ``device``.
        train_loader: batches of ``index``, ``audio``, ``label`` (see :func:`embed`).
        test_loader: same, for the split that is scored.
        featurize: audio on ``device`` -> encoder input.
        class_names: name of each label index (plots only).
        out_dir: folder of the plots (created when needed).
        name: what is evaluated (e.g. the stage), first in every plot title.

    Returns:
        ``(metrics, plot_paths)``: floats by metric name, and PNG paths by plot name.
    """
    out_dir = Path(out_dir)
    train_i, train_x, train_y = embed(encoder, train_loader, featurize, device)
    timing: dict[str, float] = {}
    test_i, test_x, test_y = embed(encoder, test_loader, featurize, device, timing=timing)
    if len(test_x) == 0:
        raise ValueError("the test loader yielded no items")

    metrics: dict[str, float] = {
        "params": float(sum(p.numel() for p in encoder.parameters())),
        "embed_dim": float(test_x.shape[1]),
        "throughput_clips_s": len(test_x) / max(timing["seconds"], 1e-9),
    }
    if multi_hot is not None:
        metrics["linear_map"] = linear_probe_map(
            train_x, multi_hot(train_i), test_x, multi_hot(test_i), epochs=probe_epochs, seed=seed
        )
        log.info("encoder eval: linear_map=%.4f", metrics["linear_map"])
        return metrics, {}
    paths: dict[str, str | None] = {}
    train_labeled = bool((train_y != UNLABELED).any())
    test_labeled = bool((test_y != UNLABELED).any())

    if train_labeled and test_labeled:
        for k in knn_k:
            metrics[f"knn{k}_acc"] = knn_accuracy(train_x, train_y, test_x, test_y, k=k)
        metrics["linear_acc"], predictions = linear_probe_accuracy(
            train_x, train_y, test_x, test_y, epochs=probe_epochs, seed=seed
        )
    else:
        predictions = None
        log.warning(
            "no labels in the %s split: kNN and linear-probe metrics skipped",
            "train" if not train_labeled else "test",
        )

    assignments, k_clusters = None, 0
    if test_labeled:
        scores, assignments = cluster_and_score(test_x, test_y, seed=seed)
        metrics["nmi"], metrics["ari"] = scores["nmi"], scores["ari"]
        k_clusters = int(scores["k"])

    if plots:
        # Imported here: matplotlib / sklearn.manifold are only needed for figures.
        from distillery.eval.plots import (
            plot_cluster_sizes,
            plot_confusion_matrix,
            plot_embedding_map,
        )

        paths["embedding_map"] = _plot(
            "embedding map",
            plot_embedding_map,
            test_x,
            test_y,
            class_names,
            out_dir / "embedding_map.png",
            seed=seed,
            title=f"{name}, test split",
        )
        if predictions is not None:
            paths["confusion"] = _plot(
                "confusion matrix",
                plot_confusion_matrix,
                test_y,
                predictions,
                class_names,
                out_dir / "confusion.png",
                title=f"{name}, test split: linear probe, accuracy {metrics['linear_acc']:.3f}",
            )
        if assignments is not None:
            paths["cluster_sizes"] = _plot(
                "cluster sizes",
                plot_cluster_sizes,
                assignments,
                k_clusters,
                out_dir / "cluster_sizes.png",
                title=f"{name}, test split: k-means on the embeddings",
            )

    names = [*(f"knn{k}_acc" for k in knn_k), "linear_acc", "nmi", "ari"]
    shown = [f"{name}={metrics[name]:.4f}" for name in names if name in metrics]
    log.info(
        "encoder eval: %s params=%s dim=%d %.0f clips/s (train n=%d, test n=%d)",
        " ".join(shown) or "(no labels)",
        f"{metrics['params'] / 1e6:.2f}M"
        if metrics["params"] >= 1e5
        else f"{metrics['params']:.0f}",
        int(metrics["embed_dim"]),
        metrics["throughput_clips_s"],
        len(train_x),
        len(test_x),
    )
    return metrics, {name: path for name, path in paths.items() if path is not None}
