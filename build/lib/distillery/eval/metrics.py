"""Metrics of a frozen encoder's embeddings: kNN, linear probe, k-means clustering.

Every function takes embeddings ``x`` of shape ``(n, d)`` and integer labels ``y`` of
shape ``(n,)`` as numpy arrays or torch tensors (any device; copied to CPU). Label ``-1``
means "unlabeled": such rows are ignored wherever labels are needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor

__all__ = [
    "UNLABELED",
    "cluster_and_score",
    "clustering_scores",
    "kmeans_labels",
    "knn_accuracy",
    "linear_probe_accuracy",
]

#: Label value of rows without a label.
UNLABELED = -1

#: Upper bound on the (test chunk x train) similarity block of the kNN classifier: 32 Mi
#: float32 values, i.e. 128 MiB, whatever the size of the train set.
_KNN_BLOCK_ELEMENTS = 1 << 25

#: Linear probe: target mini-batches per epoch, and the smallest mini-batch.
_PROBE_BATCHES_PER_EPOCH = 10
_PROBE_MIN_BATCH = 32
#: Linear probe steps with fewer multiply-adds than this run on one thread.
_PROBE_SINGLE_THREAD_MACS = 1 << 22

ArrayLike = np.ndarray | Tensor


def _to_numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _features(x: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(_to_numpy(x), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected (n, d) embeddings, got shape {x.shape}")
    return x


def _labels(y: ArrayLike, n: int, name: str) -> np.ndarray:
    y = np.asarray(_to_numpy(y)).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{name}: {y.shape[0]} labels for {n} embeddings")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def _labeled(x: ArrayLike, y: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``(x, y)`` whose label is not ``-1``; raises when none is left."""
    x = _features(x, name)
    y = _labels(y, x.shape[0], name)
    keep = y != UNLABELED
    if not keep.any():
        raise ValueError(f"{name}: no labeled rows (every label is {UNLABELED})")
    return x[keep], y[keep]


@contextmanager
def _at_most_threads(n: int) -> Iterator[None]:
    """Temporarily cap torch's intra-op threads (OpenMP and MKL) at ``n``."""
    before = torch.get_num_threads()
    if before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def knn_accuracy(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    k: int = 10,
    temperature: float = 0.07,
    *,
    chunk_size: int | None = None,
) -> float:
    """Accuracy of a weighted cosine-similarity kNN classifier (as in DINO / solo-learn).

    Each test row takes its ``k`` most cosine-similar train rows; neighbour ``j`` votes for
    its label with weight ``exp(sim_j / temperature)`` and the class with the largest total
    wins (ties: the smallest label). Rows labeled ``-1`` are dropped from both splits.

    Args:
        train_x: (n_train, d) train embeddings.
        train_y: (n_train,) train labels.
        test_x: (n_test, d) test embeddings.
        test_y: (n_test,) test labels.
        k: neighbours per test row (capped at the number of labeled train rows).
        temperature: softness of the vote weights.
        chunk_size: test rows per similarity block; by default as many as keep the
            (chunk, n_train) block under 128 MiB.

    Returns:
        The fraction of labeled test rows whose predicted label is right.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    xtr, ytr = _labeled(train_x, train_y, "train")
    xte, yte = _labeled(test_x, test_y, "test")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train and test dims differ: {xtr.shape[1]} vs {xte.shape[1]}")

    classes, ytr_idx = np.unique(ytr, return_inverse=True)
    n_train, n_classes = len(ytr), len(classes)
    k = min(k, n_train)
    rows = chunk_size or max(1, _KNN_BLOCK_ELEMENTS // n_train)

    bank = F.normalize(torch.from_numpy(xtr), dim=1)  # (n_train, d)
    bank_labels = torch.from_numpy(ytr_idx.reshape(-1))  # (n_train,) in [0, n_classes)
    queries = F.normalize(torch.from_numpy(xte), dim=1)  # (n_test, d)
    preds = torch.empty(len(yte), dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(yte), rows):
            sim = queries[start : start + rows] @ bank.T  # (chunk, n_train)
            top_sim, top_idx = sim.topk(k, dim=1)  # (chunk, k), sorted descending
            # Subtracting the row max scales each row's weights by one constant, which
            # leaves the vote unchanged and keeps exp() finite for small temperatures.
            weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
            votes = torch.zeros(len(top_sim), n_classes)
            votes.scatter_add_(1, bank_labels[top_idx], weights)
            preds[start : start + rows] = votes.argmax(dim=1)
    predicted = classes[preds.numpy()]
    return float((predicted == yte).mean())


def linear_probe_accuracy(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    batch_size: int = 4096,
) -> tuple[float, np.ndarray]:
    """Test accuracy of a linear softmax classifier trained on frozen embeddings.

    Features are standardised with the mean and std of all train rows (labeled or not),
    then a zero-initialised linear layer is trained with Adam (L2 ``weight_decay``) and a
    cosine learning-rate decay for ``epochs`` passes over the labeled train rows, in
    shuffled mini-batches of at most ``batch_size`` rows. Small sets get smaller batches
    (about 10 per epoch, at least 32 rows each) so the probe still takes enough steps to
    converge. Deterministic for a given ``seed`` (it only drives the shuffling).

    Args:
        train_x: (n_train, d) train embeddings.
        train_y: (n_train,) train labels; ``-1`` rows are not trained on.
        test_x: (n_test, d) test embeddings.
        test_y: (n_test,) test labels; ``-1`` rows are not scored.

    Returns:
        ``(accuracy, predictions)``: accuracy over the labeled test rows, and the (n_test,)
        int64 predicted labels of *every* test row, aligned with ``test_y`` (mask
        ``test_y != -1`` before building a confusion matrix).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    all_train = _features(train_x, "train")
    _labels(train_y, all_train.shape[0], "train")
    xtr, ytr = _labeled(train_x, train_y, "train")
    xte = _features(test_x, "test")
    yte = _labels(test_y, xte.shape[0], "test")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train and test dims differ: {xtr.shape[1]} vs {xte.shape[1]}")
    scored = yte != UNLABELED
    if not scored.any():
        raise ValueError(f"test: no labeled rows (every label is {UNLABELED})")

    # float64 statistics: float32 sums over many rows lose precision.
    mean = all_train.mean(axis=0, dtype=np.float64)
    std = all_train.std(axis=0, dtype=np.float64)
    std[std < 1e-8] = 1.0  # constant dims: leave them at 0 rather than dividing by ~0
    classes, ytr_idx = np.unique(ytr, return_inverse=True)
    n, d, n_classes = len(ytr), xtr.shape[1], len(classes)

    # Full-batch training would take only `epochs` steps on a small labeled set, far
    # from converged at lr 1e-2 (low-label probes came out several points too low).
    batch = min(batch_size, n, max(_PROBE_MIN_BATCH, -(-n // _PROBE_BATCHES_PER_EPOCH)))
    steps_per_epoch = -(-n // batch)
    # Tiny matmuls gain nothing from threads, and on a busy machine every threaded call
    # waits for descheduled workers: small probes ran 50x slower with 2 threads.
    threads = 1 if batch * d * n_classes < _PROBE_SINGLE_THREAD_MACS else torch.get_num_threads()

    # Fresh tensors with grad enabled, so this also works when called under
    # torch.inference_mode() / no_grad() (e.g. from a Lightning test loop).
    with _at_most_threads(threads), torch.inference_mode(False), torch.enable_grad():
        x = torch.from_numpy(((xtr - mean) / std).astype(np.float32))
        y = torch.from_numpy(ytr_idx.reshape(-1).astype(np.int64))
        weight = torch.zeros(n_classes, d, requires_grad=True)
        bias = torch.zeros(n_classes, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=epochs * steps_per_epoch
        )
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator) if batch < n else None
            for start in range(0, n, batch):
                idx = order[start : start + batch] if order is not None else slice(None)
                loss = F.cross_entropy(F.linear(x[idx], weight, bias), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()

        with torch.no_grad():
            xt = torch.from_numpy(((xte - mean) / std).astype(np.float32))
            pred_idx = F.linear(xt, weight, bias).argmax(dim=1).numpy()
    predictions = classes[pred_idx].astype(np.int64)
    return float((predictions[scored] == yte[scored]).mean()), predictions


def kmeans_labels(x: ArrayLike, k: int, *, seed: int = 0) -> np.ndarray:
    """k-means cluster index of each row of the L2-normalised embeddings.

    Args:
        x: (n, d) embeddings.
        k: number of clusters.

    Returns:
        (n,) int64 cluster indices in ``[0, k)``.
    """
    # Imported here: the clustering back-end (faiss) is only needed by this function.
    from distillery.clustering import kmeans

    x = _features(x, "x")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, n={x.shape[0]}], got {k}")
    unit = F.normalize(torch.from_numpy(x), dim=1).numpy()
    result = kmeans(np.ascontiguousarray(unit, dtype=np.float32), k, seed=seed)
    return np.asarray(result.labels).reshape(-1).astype(np.int64)


def cluster_and_score(
    x: ArrayLike, y: ArrayLike, k: int | None = None, seed: int = 0
) -> tuple[dict[str, float], np.ndarray]:
    """:func:`clustering_scores`, also returning the (n_labeled,) cluster indices."""
    x, y = _labeled(x, y, "x")
    k = len(np.unique(y)) if k is None else k
    assignments = kmeans_labels(x, k, seed=seed)
    scores = {
        "nmi": float(normalized_mutual_info_score(y, assignments)),
        "ari": float(adjusted_rand_score(y, assignments)),
        "k": float(k),
    }
    return scores, assignments


def clustering_scores(
    x: ArrayLike, y: ArrayLike, k: int | None = None, seed: int = 0
) -> dict[str, float]:
    """NMI and ARI between k-means clusters of the embeddings and the labels.

    Only the labeled rows (label != -1) are clustered and scored; the embeddings are
    L2-normalised first, so k-means groups by direction (as cosine kNN does).

    Args:
        x: (n, d) embeddings.
        y: (n,) labels.
        k: number of clusters; by default the number of distinct labels.

    Returns:
        ``{"nmi": ..., "ari": ..., "k": ...}`` (all floats).
    """
    return cluster_and_score(x, y, k, seed)[0]
