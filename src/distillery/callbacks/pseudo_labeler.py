"""``PseudoLabeler``: k-means on a teacher's embeddings -> pseudo-labels for the next stage.

Memory stays bounded however many clips there are: k-means and PCA are fitted on a
random subset of at most ``fit_sample`` training clips (the only features gathered to
rank 0), every rank assigns its own shard in chunks, and the embeddings can be streamed
to a ``.npy`` file per rank (``feature_dir``, float16 or float32) that clustering then
reads through a memory map.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import lightning.pytorch as pl
import numpy as np
import torch

from distillery import artifacts
from distillery.clustering import (
    KMeansResult,
    PCAWhitening,
    assign,
    cluster_stats,
    kmeans,
    l2_normalize,
    pca_whiten,
)
from distillery.eval.embed import FEATURE_DTYPES, NpyFeatureWriter, embed, release_pages
from distillery.eval.plots import plot_cluster_sizes
from distillery.pipeline.collectives import RankZeroWait
from distillery.pipeline.tracking import log_to_loggers

log = logging.getLogger(__name__)

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


class PseudoLabeler(pl.Callback):
    """Cluster the teacher's embeddings of the data set into ``k`` pseudo-classes.

    Runs when training ends (and every ``every_n_epochs`` epochs when > 0, DeepCluster
    style). Embeds the data module's train split without augmentation, PCA-whitens to
    ``pca_dim`` (eigenvalue power ``eig_power``), L2-normalises, fits k-means on a random
    subset of at most ``fit_sample`` train clips (None: all of them) and assigns the rest
    of the train split and the ``assign_splits`` to the same centroids.

    ``feature_dir`` (None: embeddings stay in memory) streams each rank's embeddings to
    ``<feature_dir>/rank<r>.npy`` as ``feature_dtype`` ("float32" or "float16", which
    halves disk and page-cache use; clustering computes in float32 either way) and clusters
    from a memory map, so no rank holds its shard's embeddings in memory. A relative
    ``feature_dir`` lies under ``out_dir``. The files are re-embedded at every labeling,
    written under a temporary name and renamed when complete, and kept afterwards (the
    teacher's embeddings, in each rank's shard order). Writes to
    ``out_dir/pseudo_labels/``: ``labels.npy`` (int64 per data-set record, -1 where not
    labeled), ``centroids.npy``, ``meta.json`` (k, seed, inertia, empty/tiny clusters,
    imbalance, NMI/ARI against true labels where known) and ``cluster_sizes.png``.
    """

    produces: ClassVar[tuple[str, ...]] = ("pseudo_labels",)

    def __init__(
        self,
        k: int = 32,
        out_dir: str = ".",
        pca_dim: int | None = 128,
        eig_power: float = -0.5,
        normalize: bool = True,
        niter: int = 20,
        seed: int = 0,
        every_n_epochs: int = 0,
        assign_splits: tuple[str, ...] = ("val",),
        fit_sample: int | None = DEFAULT_FIT_SAMPLE,
        feature_dir: str | None = None,
        feature_dtype: str = "float32",
        wait_timeout_min: float = 120,
    ) -> None:
        if k < 2:
            raise ValueError(f"PseudoLabeler.k must be >= 2, got {k}")
        if fit_sample is not None and fit_sample < k:
            raise ValueError(f"PseudoLabeler.fit_sample={fit_sample} must be >= k={k} (or null)")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(
                f"PseudoLabeler.feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}"
            )
        self.k = k
        self.wait_timeout_min = wait_timeout_min
        self.out_dir = Path(out_dir) / "pseudo_labels"
        self.pca_dim = pca_dim
        self.eig_power = eig_power
        self.normalize = normalize
        self.niter = niter
        self.seed = seed
        self.every_n_epochs = every_n_epochs
        self.assign_splits = tuple(assign_splits)
        self.fit_sample = fit_sample
        # Path() / an absolute path is that path: only a relative one moves under out_dir.
        self.feature_dir = None if feature_dir is None else Path(out_dir) / feature_dir
        self.feature_dtype = feature_dtype
        self.artifacts: dict[str, str] = {}
        self.metrics: dict[str, float] = {}  # of the latest clustering, on rank 0
        self._previous: np.ndarray | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        clips = len(trainer.datamodule.table.indices("train"))
        if self.k > clips:  # fail before training, not after it
            raise ValueError(
                f"PseudoLabeler.k={self.k} is larger than the {clips} training clips it would cluster; "
                "lower k or use more data"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and epoch < trainer.max_epochs:
            self.label(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.label(trainer, pl_module)

    def label(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        table = trainer.datamodule.table
        labels, fit_idx, _, result = label_dataset(
            RankZeroWait(trainer.strategy, self.wait_timeout_min),  # while rank 0 clusters
            pl_module.encoder_for_eval(),
            trainer.datamodule,
            k=self.k,
            assign_splits=self.assign_splits,
            device=trainer.strategy.root_device,
            pca_dim=self.pca_dim,
            eig_power=self.eig_power,
            normalize=self.normalize,
            niter=self.niter,
            seed=self.seed,
            fit_sample=self.fit_sample,
            feature_dir=self.feature_dir,
            feature_dtype=self.feature_dtype,
        )
        meta: dict[str, Any] = {}
        if trainer.is_global_zero:
            n_assigned = int((labels >= 0).sum()) - len(fit_idx)
            meta = self._write(
                labels, result, fit_idx, n_assigned, table.true_labels, trainer.current_epoch
            )
            self.metrics = {
                f"{pl_module.stage_name}/pseudo/{k}": float(v)
                for k, v in meta.items()
                if isinstance(v, float | int) and not isinstance(v, bool)
            }
            log_to_loggers(trainer.loggers, self.metrics, step=trainer.global_step)
        self._previous = labels
        trainer.strategy.barrier("pseudo-labels-written")
        self.artifacts = {"pseudo_labels": str(self.out_dir / "labels.npy")}
        return meta

    def _write(
        self,
        labels: np.ndarray,
        result: KMeansResult,
        fit_idx: np.ndarray,
        n_assigned: int,
        true_labels: np.ndarray,
        epoch: int,
    ) -> dict[str, Any]:
        stats = cluster_stats(
            labels[fit_idx],
            self.k,
            true_labels=true_labels[fit_idx],
            previous_labels=None if self._previous is None else self._previous[fit_idx],
        )
        meta = {
            "k": self.k,
            "seed": self.seed,
            "niter": self.niter,
            "epoch": epoch,
            "n_clustered": len(fit_idx),
            "n_assigned": n_assigned,
            "fit_sample": self.fit_sample,
            "n_fit": len(result.labels),  # clips k-means was fitted on; inertia is over them
            "inertia": float(result.inertia),
            "n_reseeded": int(result.n_reseeded),
            "pca_dim": self.pca_dim,
            "eig_power": self.eig_power,
            "normalize": self.normalize,
            **stats,
        }
        artifacts.write_numpy(self.out_dir / "labels.npy", labels)
        artifacts.write_numpy(self.out_dir / "centroids.npy", result.centroids)
        artifacts.write_json(self.out_dir / "meta.json", meta)
        plot_cluster_sizes(
            labels[fit_idx],
            self.k,
            self.out_dir / "cluster_sizes.png",
            title=f"k-means, k={self.k}, epoch {epoch}",
        )
        log.info(
            "pseudo-labels: k=%d fitted on %d of %d clips, NMI vs labels %s, "
            "%d empty clusters re-seeded -> %s",
            self.k,
            len(result.labels),
            len(fit_idx),
            meta.get("nmi"),
            result.n_reseeded,
            self.out_dir,
        )
        return meta
