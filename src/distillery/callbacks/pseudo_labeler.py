"""``PseudoLabeler``: k-means on a teacher's embeddings -> pseudo-labels for the next stage."""

from __future__ import annotations

import logging
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
from distillery.eval.embed import embed
from distillery.eval.plots import plot_cluster_sizes
from distillery.pipeline.tracking import log_to_loggers

log = logging.getLogger(__name__)


class Collective(Protocol):
    """What clustering needs from a distributed backend; Lightning strategies and Fabric fit."""

    world_size: int
    global_rank: int

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def broadcast(self, obj: Any, src: int = 0) -> Any: ...
    def barrier(self, name: str | None = None) -> None: ...


def gather_by_index(
    comm: Collective, indices: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' (index, value-row) pairs on every rank, sorted by dataset index.

    Ranks pad their pairs to the largest local count with index -1; padding and duplicates
    (a distributed sampler repeats samples) are dropped, so the result never depends on
    gather order. ``values`` is (n_local, ...) of any dtype torch can carry.
    """
    if comm.world_size == 1:
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


@dataclass
class ClusterModel:
    """What rank 0 fits and every rank applies: optional PCA-whitening, then centroids."""

    centroids: np.ndarray  # (k, dim) float32
    whitening: PCAWhitening | None
    normalize: bool

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        if self.whitening is not None:
            x = self.whitening.apply(x)
        return l2_normalize(x) if self.normalize else x


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
) -> tuple[np.ndarray, ClusterModel, KMeansResult | None]:
    """Cluster embeddings held in shards across ranks; every rank returns the same labels.

    ``local_indices``/``local_features``: this rank's (n_local,) dataset indices and (n_local,
    d) embeddings. ``fit_indices``: the records k-means is fitted on (the same array on
    every rank). Rank 0 gathers the fit features, fits whitening + k-means and broadcasts
    the model; each rank assigns its own shard in chunks; the (index, label) pairs are
    gathered so all ranks hold the full (num_records,) int64 labels, -1 for records not
    given. The k-means result is returned on rank 0 only (None elsewhere). Nothing depends
    on the world size but floating-point summation order in the encoder.
    """
    is_fit = np.isin(local_indices, fit_indices)
    fit_idx, fit_x = gather_by_index(comm, local_indices[is_fit], local_features[is_fit])
    result, model = None, None
    if comm.global_rank == 0:
        fit_x = fit_x.astype(np.float32)
        whitening = None
        if pca_dim and pca_dim < fit_x.shape[1]:
            fit_x, whitening = pca_whiten(fit_x, dim=pca_dim, eig_power=eig_power, seed=seed)
        if normalize:
            fit_x = l2_normalize(fit_x)
        result = kmeans(fit_x, k, seed=seed, niter=niter)
        model = ClusterModel(result.centroids, whitening, normalize)
    if comm.world_size > 1:
        model = comm.broadcast(model, src=0)
    local_labels, _ = assign(model.transform(local_features), model.centroids)
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
    **options: Any,
) -> tuple[np.ndarray, np.ndarray, ClusterModel, KMeansResult | None]:
    """Embed the train split (+ ``assign_splits``) in strided shards, one per rank, and
    cluster with :func:`pseudo_label`. Returns (labels, fit indices, model, result)."""
    table = datamodule.table
    fit_idx = table.indices("train")
    if k > len(fit_idx):
        raise ValueError(
            f"PseudoLabeler.k={k} is larger than the {len(fit_idx)} training clips to cluster"
        )
    indices = np.sort(np.concatenate([fit_idx, *(table.indices(s) for s in assign_splits)]))
    shard = indices[comm.global_rank :: comm.world_size]
    loader = datamodule.dataloader("train", indices=shard)
    local_idx, local_x, _ = embed(encoder, loader, datamodule.featurize, device=device)
    labels, model, result = pseudo_label(
        comm, local_idx, local_x, fit_idx, len(table.source.records), k=k, **options
    )
    return labels, fit_idx, model, result


class PseudoLabeler(pl.Callback):
    """Cluster the teacher's embeddings of the data set into ``k`` pseudo-classes.

    Runs when training ends (and every ``every_n_epochs`` epochs when > 0, DeepCluster
    style). Embeds the data module's train split without augmentation, PCA-whitens to
    ``pca_dim`` (eigenvalue power ``eig_power``), L2-normalises, fits k-means on the train
    split and assigns the ``assign_splits`` to the same centroids. Writes to
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
    ) -> None:
        if k < 2:
            raise ValueError(f"PseudoLabeler.k must be >= 2, got {k}")
        self.k = k
        self.out_dir = Path(out_dir) / "pseudo_labels"
        self.pca_dim = pca_dim
        self.eig_power = eig_power
        self.normalize = normalize
        self.niter = niter
        self.seed = seed
        self.every_n_epochs = every_n_epochs
        self.assign_splits = tuple(assign_splits)
        self.artifacts: dict[str, str] = {}
        self.metrics: dict[str, float] = {}  # of the latest clustering, on rank 0
        self._previous: np.ndarray | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and epoch < trainer.max_epochs:
            self.label(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.label(trainer, pl_module)

    def label(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        table = trainer.datamodule.table
        labels, fit_idx, _, result = label_dataset(
            trainer.strategy,
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
            "pseudo-labels: k=%d on %d clips, NMI vs labels %s, %d empty clusters re-seeded -> %s",
            self.k,
            len(fit_idx),
            meta.get("nmi"),
            result.n_reseeded,
            self.out_dir,
        )
        return meta
