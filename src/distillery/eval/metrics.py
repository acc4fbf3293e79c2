"""Metrics of a frozen encoder's embeddings: kNN, linear probe, k-means clustering, and
mean average precision (mAP) for multi-label targets.

Every function takes embeddings ``x`` of shape ``(n, d)`` and integer labels ``y`` of
shape ``(n,)`` as numpy arrays or torch tensors (any device; copied to CPU). Label ``-1``
means "unlabeled": such rows are ignored wherever labels are needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "UNLABELED",
    "MeanAveragePrecision",
    "average_precision",
    "cluster_and_score",
    "clustering_scores",
    "kmeans_labels",
    "knn_accuracy",
    "linear_probe_accuracy",
    "linear_probe_map",
    "mean_average_precision",
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


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """Arrays standardised with the mean and std of ``train`` (every train row)."""
    # float64 statistics: float32 sums over many rows lose precision.
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std[std < 1e-8] = 1.0  # constant dims: leave them at 0 rather than dividing by ~0
    return [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in others]


def _fit_linear(
    x: Tensor,
    targets: Tensor,
    n_out: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` of a zero-initialised linear layer trained with Adam (L2
    ``weight_decay``) and a cosine learning-rate decay for ``epochs`` passes over
    ``(x, targets)`` in shuffled mini-batches of at most ``batch_size`` rows. Small sets
    get smaller batches (about 10 per epoch, at least 32 rows each) so the probe still
    takes enough steps to converge. Deterministic for a given ``seed`` (the shuffling)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    n, d = x.shape
    # Full-batch training would take only `epochs` steps on a small labeled set, far
    # from converged at lr 1e-2 (low-label probes came out several points too low).
    batch = min(batch_size, n, max(_PROBE_MIN_BATCH, -(-n // _PROBE_BATCHES_PER_EPOCH)))
    steps_per_epoch = -(-n // batch)
    # Tiny matmuls gain nothing from threads, and on a busy machine every threaded call
    # waits for descheduled workers: small probes ran 50x slower with 2 threads.
    threads = 1 if batch * d * n_out < _PROBE_SINGLE_THREAD_MACS else torch.get_num_threads()

    # Fresh tensors with grad enabled, so this also works when called under
    # torch.inference_mode() / no_grad() (e.g. from a Lightning test loop).
    with _at_most_threads(threads), torch.inference_mode(False), torch.enable_grad():
        x, targets = x.clone(), targets.clone()
        weight = torch.zeros(n_out, d, requires_grad=True)
        bias = torch.zeros(n_out, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=epochs * steps_per_epoch
        )
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator) if batch < n else None
            for start in range(0, n, batch):
                idx = order[start : start + batch] if order is not None else slice(None)
                loss = loss_fn(F.linear(x[idx], weight, bias), targets[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return weight.detach(), bias.detach()


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
    then a linear layer is trained with cross-entropy on the labeled train rows
    (:func:`_fit_linear`: Adam, cosine decay, ``epochs`` shuffled passes).

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

    classes, ytr_idx = np.unique(ytr, return_inverse=True)
    x, xt = _standardise(all_train, xtr, xte)
    y = torch.from_numpy(ytr_idx.reshape(-1).astype(np.int64))
    weight, bias = _fit_linear(
        x,
        y,
        len(classes),
        F.cross_entropy,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        batch_size=batch_size,
    )
    pred_idx = F.linear(xt, weight, bias).argmax(dim=1).numpy()
    predictions = classes[pred_idx].astype(np.int64)
    return float((predictions[scored] == yte[scored]).mean()), predictions


def _targets(t: ArrayLike, n: int, name: str) -> np.ndarray:
    t = np.asarray(_to_numpy(t))
    if t.ndim != 2 or t.shape[0] != n:
        raise ValueError(f"{name}: expected ({n}, classes) multi-hot targets, got shape {t.shape}")
    if not np.isin(t, (0, 1)).all():
        raise ValueError(f"{name}: multi-hot targets must be 0 or 1")
    return t.astype(np.float32)


def average_precision(targets: ArrayLike, scores: ArrayLike) -> float:
    """Average precision of one class: ``sum_i (R_i - R_{i-1}) P_i`` over the distinct
    score thresholds, highest first (tied scores form one threshold), as scikit-learn's
    ``average_precision_score``. ``targets``: (n,) 0/1; needs at least one positive."""
    y = np.asarray(_to_numpy(targets), dtype=np.float64).reshape(-1)
    s = np.asarray(_to_numpy(scores), dtype=np.float64).reshape(-1)
    if not y.any():
        raise ValueError("average precision needs at least one positive")
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    true_pos = np.cumsum(y)[last_of_threshold]
    precision = true_pos / (last_of_threshold + 1)
    recall = true_pos / true_pos[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(targets: ArrayLike, scores: ArrayLike) -> float:
    """mAP: the macro average of :func:`average_precision` over the classes (columns) with
    at least one positive row (a class absent from the scored split has no precision).

    Args:
        targets: (n, classes) multi-hot 0/1.
        scores: (n, classes) any monotone score per class (logits or probabilities).
    """
    scores = _features(scores, "scores")
    targets = _targets(targets, scores.shape[0], "targets")
    if targets.shape != scores.shape:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} differ in shape")
    present = np.flatnonzero(targets.any(axis=0))
    if not len(present):
        raise ValueError("mean average precision: no class has a positive row")
    return float(np.mean([average_precision(targets[:, c], scores[:, c]) for c in present]))


class MeanAveragePrecision(Metric):
    """:func:`mean_average_precision` as a torchmetrics metric: scores and targets are
    gathered from every process before it is computed, so DDP gives the global value."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, targets: Tensor) -> None:
        self.scores.append(scores.detach().float())
        self.targets.append(targets.detach().float())

    def compute(self) -> Tensor:
        scores, targets = dim_zero_cat(self.scores), dim_zero_cat(self.targets)
        return torch.tensor(mean_average_precision(targets.cpu(), scores.cpu()))


def linear_probe_map(
    train_x: ArrayLike,
    train_t: ArrayLike,
    test_x: ArrayLike,
    test_t: ArrayLike,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    batch_size: int = 4096,
) -> float:
    """Test mAP (:func:`mean_average_precision`) of a multi-label linear classifier (one
    sigmoid per class, binary cross-entropy) trained on frozen embeddings, as
    :func:`linear_probe_accuracy` trains its softmax one. Rows whose targets are all zero
    (unlabelled) are not trained on or scored.

    Args:
        train_x: (n_train, d) train embeddings; train_t: (n_train, classes) multi-hot.
        test_x: (n_test, d) test embeddings; test_t: (n_test, classes) multi-hot.
    """
    all_train = _features(train_x, "train")
    ttr = _targets(train_t, all_train.shape[0], "train")
    xte = _features(test_x, "test")
    tte = _targets(test_t, xte.shape[0], "test")
    if all_train.shape[1] != xte.shape[1]:
        raise ValueError(f"train and test dims differ: {all_train.shape[1]} vs {xte.shape[1]}")
    train_rows, test_rows = ttr.any(axis=1), tte.any(axis=1)
    if not train_rows.any() or not test_rows.any():
        raise ValueError("linear probe mAP: no labeled train or test rows")
    x, xt = _standardise(all_train, all_train[train_rows], xte[test_rows])
    weight, bias = _fit_linear(
        x,
        torch.from_numpy(ttr[train_rows]),
        ttr.shape[1],
        F.binary_cross_entropy_with_logits,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        batch_size=batch_size,
    )
    return mean_average_precision(tte[test_rows], F.linear(xt, weight, bias).numpy())


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
