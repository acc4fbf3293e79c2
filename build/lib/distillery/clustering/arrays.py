"""Argument checks shared by the clustering modules: shapes, finiteness, integer ranges."""

from __future__ import annotations

import numpy as np


def as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """C-contiguous float32 (n, d) view or copy of ``x``; checks shape only."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, d) array, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name}: expected a non-empty (n, d) array, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_finite(x: np.ndarray, name: str, chunk_size: int) -> None:
    # Chunked: np.isfinite on the whole array would allocate n * d bytes at once.
    for lo in range(0, x.shape[0], chunk_size):
        block = x[lo : lo + chunk_size]
        if not np.isfinite(block).all():
            row = lo + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ValueError(f"{name}: contains NaN or inf (first in row {row})")


def check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)
