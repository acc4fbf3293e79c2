"""Clustering embeddings held in shards across ranks, with memory bounded in the data size.

k-means and PCA are fitted on a random subset of at most ``fit_sample`` training clips (the
only features gathered to rank 0), every rank assigns its own shard in chunks, and the
embeddings can be streamed to a ``.npy`` file per rank that clustering then reads through a
memory map. :class:`~distillery.callbacks.pseudo_labeler.PseudoLabeler` runs this between
stages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from distillery.clustering.kmeans import KMeansResult, assign, kmeans
from distillery.clustering.whitening import PCAWhitening, l2_normalize, pca_whiten
from distillery.eval.embed import NpyFeatureWriter, embed, release_pages

#: Default cap on the training clips k-means and PCA are fitted on. 100k points estimate
#: k <= ~400 centroids (kmeans itself iterates on <= 256 points per centroid) and a PCA
#: covariance well; the features to gather stay ~100 MB at d = 256 in float32.
DEFAULT_FIT_SAMPLE = 100_000
#: Rows per block when features are transformed, assigned or copied; bounds temporaries.
DEFAULT_CHUNK_SIZE = 65536


class Collective(Protocol):
    """What clustering needs from a distributed backend; Lightning strategies and Fabric fit."""

    world_size: int
    global_rank: int

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def broadcast(self, obj: Any, src: int = 0) -> Any: ...
    def barrier(self, name: str | None = None) -> None: ...


class LocalComm:
    """The :class:`Collective` of a single process."""

    world_size = 1
    global_rank = 0

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self, name: str | None = None) -> None:
        return None


def gather_by_index(
    comm: Collective, indices: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' (index, value-row) pairs on every rank, sorted by dataset index.

    Ranks pad their pairs to the largest local count with index -1; padding and duplicates
    (a distributed sampler repeats samples) are dropped, so the result never depends on
    gather order. ``values`` is (n_local, ...) of any dtype torch can carry.
    """
    if comm.world_size == 1:
        if len(indices) < 2 or bool(np.all(indices[1:] > indices[:-1])):
            return indices, values  # already sorted: no copy of a possibly large array
        order = np.argsort(indices, kind="stable")
        return indices[order], values[order]
    device = getattr(comm, "root_device", None) or getattr(comm, "device", "cpu")
    size = int(comm.all_gather(torch.tensor([len(indices)], device=device)).max())
    idx_t = torch.full((size,), -1, dtype=torch.long)
    idx_t[: len(indices)] = torch.from_numpy(indices)
    val_t = torch.zeros((size, *values.shape[1:]), dtype=torch.from_numpy(values[:0]).dtype)
    val_t[: len(values)] = torch.from_numpy(values)
    all_idx = comm.all_gather(idx_t.to(device)).reshape(-1).cpu().numpy()
    all_val = comm.all_gather(val_t.to(device)).reshape(-1, *values.shape[1:]).cpu().numpy()
    keep = all_idx >= 0
    unique_idx, first = np.unique(all_idx[keep], return_index=True)
    return unique_idx, all_val[keep][first]


def fit_subset(fit_indices: np.ndarray, fit_sample: int | None, seed: int = 0) -> np.ndarray:
    """The sorted dataset indices k-means is fitted on: ``fit_sample`` of ``fit_indices``.

    Drawn with ``numpy.random.default_rng(seed)`` from the (sorted, de-duplicated) index
    array itself, so every rank, and every world size, picks the same clips. All of
    ``fit_indices`` when ``fit_sample`` is None or not smaller.

    Args:
        fit_indices: (n_fit,) int dataset indices.
        fit_sample: most indices to keep, >= 1, or None.
        seed: seeds the draw.

    Returns:
        (min(n_fit, fit_sample),) int64, ascending.
    """
    fit_indices = np.unique(np.asarray(fit_indices, dtype=np.int64))
    if fit_sample is None or fit_sample >= len(fit_indices):
        return fit_indices
    if fit_sample < 1:
        raise ValueError(f"fit_sample must be >= 1 or None, got {fit_sample}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(fit_indices, size=int(fit_sample), replace=False))


def iter_chunks(
    x: np.ndarray, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(lo, hi, x[lo:hi])`` blocks of the rows of (n, d) ``x``, as float32.

    A float32 block of an in-memory array is a view; other dtypes (float16 files) are
    converted one block at a time. Blocks of a memmap are unmapped once the caller is done
    with them (:func:`~distillery.eval.embed.release_pages`), so that resident memory
    stays at about one block.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for lo in range(0, len(x), chunk_size):
        hi = min(lo + chunk_size, len(x))
        yield lo, hi, np.asarray(x[lo:hi], dtype=np.float32)
        release_pages(x, lo, hi)


def take_rows(x: np.ndarray, mask: np.ndarray, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """``x[mask]`` read in blocks of rows: (mask.sum(), d) in the dtype of (n, d) ``x``.

    An in-memory ``x`` whose rows are all taken is returned as is (no copy; callers only
    read it).
    """
    if mask.all() and x.flags.writeable and not isinstance(x, np.memmap):
        return x
    out = np.empty((int(mask.sum()), *x.shape[1:]), dtype=x.dtype)
    pos = 0
    for lo in range(0, len(x), chunk_size):
        hi = min(lo + chunk_size, len(x))
        rows = x[lo:hi][mask[lo:hi]]
        out[pos : pos + len(rows)] = rows
        pos += len(rows)
        release_pages(x, lo, hi)
    return out


@dataclass
class ClusterModel:
    """What rank 0 fits and every rank applies: optional PCA-whitening, then centroids."""

    centroids: np.ndarray  # (k, dim) float32
    whitening: PCAWhitening | None
    normalize: bool

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(n, d) features -> (n, dim) float32 in the space of the centroids (all at once)."""
        x = x.astype(np.float32)
        if self.whitening is not None:
            x = self.whitening.apply(x)
        return l2_normalize(x) if self.normalize else x

    def predict(self, x: np.ndarray, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
        """(n,) int64 nearest centroid of each row of (n, d) ``x`` (any float dtype, a
        memmap included), transformed and assigned ``chunk_size`` rows at a time, so the
        temporaries are a few (chunk_size, d) float32 blocks whatever n is."""
        labels = np.empty(len(x), dtype=np.int64)
        for lo, hi, block in iter_chunks(x, chunk_size):
            labels[lo:hi], _ = assign(self.transform(block), self.centroids, chunk_size)
        return labels


def pseudo_label(
    comm: Collective,
    local_indices: np.ndarray,
    local_features: np.ndarray,
    fit_indices: np.ndarray,
    num_records: int,
    *,
    k: int,
    pca_dim: int | None = 128,
    eig_power: float = -0.5,
    normalize: bool = True,
    niter: int = 20,
    seed: int = 0,
    fit_sample: int | None = DEFAULT_FIT_SAMPLE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, ClusterModel, KMeansResult | None]:
    """Cluster embeddings held in shards across ranks; every rank returns the same labels.

    ``local_indices``/``local_features``: this rank's (n_local,) dataset indices and (n_local,
    d) embeddings (float32 or float16, in memory or a read-only memmap). ``fit_indices``:
    the records k-means may be fitted on (the same array on every rank); it is fitted on
    ``fit_subset(fit_indices, fit_sample, seed)`` (all of them when ``fit_sample`` is None).
    Ranks send only those features to rank 0, which fits whitening + k-means and
    broadcasts the model; each rank assigns its own shard ``chunk_size`` rows at a time;
    the (index, label) pairs are gathered so all ranks hold the full (num_records,) int64
    labels, -1 for records not given. The k-means result (labels and inertia of the fitted
    subset) is returned on rank 0 only (None elsewhere). Nothing depends on the world size
    but floating-point summation order in the encoder.

    Memory: the gathered subset, (fit_sample, d) in the features' dtype on every rank
    plus float32 copies of it on rank 0, and O(chunk_size * d) temporaries; besides that,
    O(n_local) labels and the caller's features, which a memmap keeps out of memory.
    """
    fit_idx = fit_subset(fit_indices, fit_sample, seed)
    if k > len(fit_idx):  # checked on every rank: a raise on rank 0 alone would hang the others
        raise ValueError(
            f"k={k} is larger than the {len(fit_idx)} clips to fit on (fit_sample={fit_sample})"
        )
    is_fit = np.isin(local_indices, fit_idx)
    fit_rows = take_rows(local_features, is_fit, chunk_size)
    _, fit_x = gather_by_index(comm, local_indices[is_fit], fit_rows)
    del fit_rows
    result, model = None, None
    if comm.global_rank != 0:
        del fit_x  # only rank 0 fits
    else:
        fit_x = np.asarray(fit_x, dtype=np.float32)  # copies float16 only
        whitening = None
        if pca_dim and pca_dim < fit_x.shape[1]:
            fit_x, whitening = pca_whiten(fit_x, dim=pca_dim, eig_power=eig_power, seed=seed)
        if normalize:
            fit_x = l2_normalize(fit_x)
        result = kmeans(fit_x, k, seed=seed, niter=niter)
        model = ClusterModel(result.centroids, whitening, normalize)
    if comm.world_size > 1:
        model = comm.broadcast(model, src=0)
    local_labels = model.predict(local_features, chunk_size)
    idx, lab = gather_by_index(comm, local_indices, local_labels)
    labels = np.full(num_records, -1, dtype=np.int64)
    labels[idx] = lab
    return labels, model, result


def label_dataset(
    comm: Collective,
    encoder: torch.nn.Module,
    datamodule: Any,
    *,
    k: int,
    assign_splits: tuple[str, ...] = ("val",),
    device: torch.device | str = "cpu",
    feature_dir: str | os.PathLike | None = None,
    feature_dtype: str = "float32",
    **options: Any,
) -> tuple[np.ndarray, np.ndarray, ClusterModel, KMeansResult | None]:
    """Embed the train split (+ ``assign_splits``) in strided shards, one per rank, and
    cluster with :func:`pseudo_label`. Returns (labels, fit indices, model, result).

    With ``feature_dir``, each rank streams its (n_local, d) embeddings into
    ``<feature_dir>/rank<r>.npy`` (``feature_dtype``) and clusters from a read-only memory
    map of it. The file is written under a temporary name and renamed when complete; it is
    rewritten on every call (never reused), and stays afterwards as a complete ``.npy``
    file, in the rank's shard order.
    """
    table = datamodule.table
    fit_idx = table.indices("train")
    if k > len(fit_idx):
        raise ValueError(
            f"PseudoLabeler.k={k} is larger than the {len(fit_idx)} training clips to cluster"
        )
    indices = np.sort(np.concatenate([fit_idx, *(table.indices(s) for s in assign_splits)]))
    shard = indices[comm.global_rank :: comm.world_size]
    loader = datamodule.dataloader("train", indices=shard)
    out = None
    if feature_dir is not None:
        path = Path(feature_dir) / f"rank{comm.global_rank}.npy"
        out = NpyFeatureWriter(path, len(shard), feature_dtype)
    local_idx, local_x, _ = embed(encoder, loader, datamodule.featurize, device=device, out=out)
    labels, model, result = pseudo_label(
        comm, local_idx, local_x, fit_idx, len(table.source.records), k=k, **options
    )
    return labels, fit_idx, model, result
