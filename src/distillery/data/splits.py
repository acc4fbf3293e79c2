"""Deterministic, label-stratified train/val/test splits and labelled subsets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["assign_splits", "label_subset", "per_class_subset"]


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (-1 = unknown), got dtype {labels.dtype}")
    return labels


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; 2.5 items should give 3, not 2.
    return int(np.floor(x + 0.5))


def assign_splits(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Assign each item to "train", "val" or "test", stratified by label.

    Args:
        labels: int array of shape ``(n,)``; -1 (unknown) items form their own stratum.
        val_fraction, test_fraction: shares of each stratum, each in [0, 1), sum < 1.
        seed: the assignment is a pure function of ``labels`` and ``seed``.

    Returns:
        array of shape ``(n,)`` with the split name of each item. Every stratum keeps
        at least one train item; tiny strata may get no val/test item.
    """
    labels = _as_labels(labels)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave train items, "
            f"got {val_fraction} + {test_fraction}"
        )

    splits = np.full(labels.shape, "train", dtype="<U5")
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):  # sorted, so the rng is consumed in a fixed order
        members = rng.permutation(np.flatnonzero(labels == label))
        n = members.shape[0]
        n_val = _round_half_up(n * val_fraction)
        n_test = _round_half_up(n * test_fraction)
        # Rounding both up can leave no train item; take it back from the larger share.
        while n_val + n_test > n - 1 and n_val + n_test > 0:
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        splits[members[:n_val]] = "val"
        splits[members[n_val : n_val + n_test]] = "test"
    return splits


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the items that keep their label when only ``fraction`` is labelled.

    Stratified: each known class keeps ``round(fraction * count)`` items, at least one.
    Unknown labels (-1) are never selected.

    Args:
        labels: int array of shape ``(n,)``.
        fraction: share of labelled items to keep, in (0, 1].
        seed: the subset is a pure function of ``labels``, ``fraction`` and ``seed``.

    Returns:
        sorted int64 array of indices into ``labels``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    return _stratified(labels, lambda n: max(1, _round_half_up(n * fraction)), seed)


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of at most ``per_class`` items of each known class (-1 never), seeded like
    :func:`label_subset`; sorted int64 indices into ``labels``."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    return _stratified(labels, lambda n: min(n, per_class), seed)


def _stratified(labels: np.ndarray, count: Callable[[int], int], seed: int) -> np.ndarray:
    """``count(n)`` items of each known class of ``n`` members, drawn with ``seed``."""
    labels = _as_labels(labels)
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for label in np.unique(labels):
        if label < 0:
            continue
        members = rng.permutation(np.flatnonzero(labels == label))
        keep.append(members[: count(members.shape[0])])
    if not keep:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(keep)).astype(np.int64)
