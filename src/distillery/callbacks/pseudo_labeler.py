"""``PseudoLabeler``: k-means on a teacher's embeddings -> pseudo-labels for the next stage."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch

from distillery import artifacts
from distillery.clustering import assign, cluster_stats, kmeans, l2_normalize, pca_whiten
from distillery.eval.embed import embed
from distillery.eval.plots import plot_cluster_sizes
from distillery.pipeline.tracking import log_to_loggers

log = logging.getLogger(__name__)


def gather_embeddings(
    trainer: pl.Trainer, encoder: torch.nn.Module, datamodule: Any, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Embed ``indices`` (dataset indices), split across ranks; every rank gets all of them.

    Each rank embeds a strided shard; shards are padded to equal length with index -1,
    gathered as (index, feature) pairs and put back in dataset-index order, so the result
    never depends on gather order or on the padding a sampler adds.
    """
    world, rank = trainer.world_size, trainer.global_rank
    shard = indices[rank::world]
    loader = datamodule.dataloader("train", indices=shard)
    got_idx, feats, _ = embed(encoder, loader, datamodule.featurize, device=trainer.strategy.root_device)
    if world == 1:
        order = np.argsort(got_idx)
        return got_idx[order], feats[order]
    size = -(-len(indices) // world)
    idx_t = torch.full((size,), -1, dtype=torch.long)
    idx_t[: len(got_idx)] = torch.from_numpy(got_idx)
    feat_t = torch.zeros(size, feats.shape[1])
    feat_t[: len(feats)] = torch.from_numpy(feats)
    device = trainer.strategy.root_device
    all_idx = trainer.strategy.all_gather(idx_t.to(device)).reshape(-1).cpu().numpy()
    all_feat = trainer.strategy.all_gather(feat_t.to(device)).reshape(-1, feats.shape[1]).cpu().numpy()
    keep = all_idx >= 0
    unique_idx, first = np.unique(all_idx[keep], return_index=True)
    return unique_idx, all_feat[keep][first]


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
        datamodule = trainer.datamodule
        table = datamodule.table
        fit_idx = table.indices("train")
        extra_idx = np.concatenate([table.indices(s) for s in self.assign_splits] or [np.empty(0, int)])
        indices = np.sort(np.concatenate([fit_idx, extra_idx]))
        if self.k > len(fit_idx):
            raise ValueError(
                f"PseudoLabeler.k={self.k} is larger than the {len(fit_idx)} training clips to cluster"
            )
        got_idx, feats = gather_embeddings(trainer, pl_module.encoder_for_eval(), datamodule, indices)
        meta: dict[str, Any] = {}
        if trainer.is_global_zero:
            meta = self._cluster_and_write(got_idx, feats, fit_idx, table.true_labels, trainer.current_epoch)
            self.metrics = {
                f"{pl_module.stage_name}/pseudo/{k}": float(v)
                for k, v in meta.items()
                if isinstance(v, float | int) and not isinstance(v, bool)
            }
            log_to_loggers(trainer.loggers, self.metrics, step=trainer.global_step)
        trainer.strategy.barrier("pseudo-labels-written")
        self.artifacts = {"pseudo_labels": str(self.out_dir / "labels.npy")}
        return meta

    def _cluster_and_write(
        self, indices: np.ndarray, feats: np.ndarray, fit_idx: np.ndarray, true_labels: np.ndarray, epoch: int
    ) -> dict[str, Any]:
        is_fit = np.isin(indices, fit_idx)
        x = feats.astype(np.float32)
        if self.pca_dim and self.pca_dim < x.shape[1]:
            x_fit, whitening = pca_whiten(x[is_fit], dim=self.pca_dim, eig_power=self.eig_power, seed=self.seed)
            x = whitening.apply(x)
            x[is_fit] = x_fit
        if self.normalize:
            x = l2_normalize(x)
        result = kmeans(x[is_fit], self.k, seed=self.seed, niter=self.niter)
        labels = np.full(len(true_labels), -1, dtype=np.int64)
        labels[indices[is_fit]] = result.labels
        if (~is_fit).any():
            labels[indices[~is_fit]], _ = assign(x[~is_fit], result.centroids)
        stats = cluster_stats(
            result.labels,
            self.k,
            true_labels=true_labels[indices[is_fit]],
            previous_labels=None if self._previous is None else self._previous[indices[is_fit]],
        )
        meta = {
            "k": self.k, "seed": self.seed, "niter": self.niter, "epoch": epoch,
            "n_clustered": int(is_fit.sum()), "n_assigned": int((~is_fit).sum()),
            "inertia": float(result.inertia), "n_reseeded": int(result.n_reseeded),
            "pca_dim": self.pca_dim, "eig_power": self.eig_power, "normalize": self.normalize,
            **stats,
        }
        artifacts.write_numpy(self.out_dir / "labels.npy", labels)
        artifacts.write_numpy(self.out_dir / "centroids.npy", result.centroids)
        artifacts.write_json(self.out_dir / "meta.json", meta)
        plot_cluster_sizes(result.labels, self.k, self.out_dir / "cluster_sizes.png", title=f"k-means, k={self.k}, epoch {epoch}")
        self._previous = labels
        log.info(
            "pseudo-labels: k=%d on %d clips, NMI vs labels %s, %d empty clusters re-seeded -> %s",
            self.k, int(is_fit.sum()), meta.get("nmi"), result.n_reseeded, self.out_dir,
        )
        return meta
