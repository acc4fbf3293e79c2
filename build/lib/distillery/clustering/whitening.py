"""Pre-processing of embeddings before k-means: PCA(-whitening) and L2 normalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distillery.clustering.arrays import as_matrix, check_finite, check_int


@dataclass
class PCAWhitening:
    """A fitted PCA projection with eigenvalue scaling, as returned by :func:`pca_whiten`.

    Attributes:
        mean: (d,) float64 mean of the fitted data.
        components: (dim, d) float64 principal directions, by decreasing variance.
        eigenvalues: (dim,) float64 variance along each direction.
        scale: (dim,) float64 factor applied to each projected coordinate
            (``eigenvalue ** eig_power``).
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    scale: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def apply(self, x: np.ndarray, chunk_size: int = 16384) -> np.ndarray:
        """Project and scale (n, d) data to (n, dim) float32, ``chunk_size`` rows at a time."""
        x = as_matrix(x, "x")
        if x.shape[1] != self.components.shape[1]:
            raise ValueError(f"x: expected {self.components.shape[1]} columns, got shape {x.shape}")
        w = (self.components * self.scale[:, None]).T.astype(np.float32)  # (d, dim)
        mean = self.mean.astype(np.float32)
        out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        for lo in range(0, x.shape[0], chunk_size):
            hi = min(lo + chunk_size, x.shape[0])
            # Centre before projecting: x @ w - mean @ w cancels digits for data far
            # from the origin.
            np.matmul(x[lo:hi] - mean, w, out=out[lo:hi])
        return out


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of (n, d) ``x`` scaled to unit L2 norm (rows of norm < ``eps`` are divided by ``eps``).

    Returns:
        (n, d) float32 array (a new one).
    """
    x = as_matrix(x, "x")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x / np.maximum(norms, np.float32(eps))[:, None]


def pca_whiten(
    x: np.ndarray, dim: int = 128, eig_power: float = -0.5, seed: int = 0
) -> tuple[np.ndarray, PCAWhitening]:
    """PCA to ``dim`` dimensions, each scaled by ``eigenvalue ** eig_power``.

    ``eig_power=-0.5`` whitens (unit variance along every kept direction), ``0`` is plain
    PCA (same convention as ``faiss.PCAMatrix``). The covariance is accumulated in
    float64 and diagonalised exactly, so ``seed`` does not change the result; it is
    accepted for a uniform call signature. Principal directions have a fixed sign (their
    largest-magnitude entry is positive), so equal inputs give equal outputs.

    Args:
        x: (n, d) data to fit, n >= 2.
        dim: output dimension, ``1 <= dim <= d``.
        eig_power: exponent applied to the eigenvalues.
        seed: unused (see above).

    Returns:
        ``(y, whitening)``: (n, dim) float32 transformed ``x`` and the fitted
        :class:`PCAWhitening` (its ``apply`` transforms new data the same way).
    """
    del seed
    x = as_matrix(x, "x")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"x: PCA needs at least 2 rows, got shape {x.shape}")
    dim = check_int(dim, "dim", 1, d)
    if not math.isfinite(eig_power):
        raise ValueError(f"eig_power must be finite, got {eig_power}")
    chunk = 65536
    check_finite(x, "x", chunk)
    mean = np.zeros(d, dtype=np.float64)
    for lo in range(0, n, chunk):
        mean += x[lo : lo + chunk].sum(axis=0, dtype=np.float64)
    mean /= n
    cov = np.zeros((d, d), dtype=np.float64)
    for lo in range(0, n, chunk):
        block = x[lo : lo + chunk].astype(np.float64) - mean
        cov += block.T @ block
    cov /= n - 1
    eigenvalues, vectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigenvalues)[::-1][:dim]
    eigenvalues = np.maximum(eigenvalues[order], 0.0)
    components = vectors[:, order].T  # (dim, d)
    flip = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
    components *= np.where(flip == 0, 1.0, flip)[:, None]
    # Floor tiny eigenvalues: a rank-deficient direction would otherwise be scaled by
    # ~1/sqrt(0) and turn round-off into unit-variance noise of any size.
    floor = max(float(eigenvalues[0]), 1e-30) * 1e-10
    scale = np.maximum(eigenvalues, floor) ** eig_power
    whitening = PCAWhitening(mean=mean, components=components, eigenvalues=eigenvalues, scale=scale)
    return whitening.apply(x, chunk_size=chunk), whitening
