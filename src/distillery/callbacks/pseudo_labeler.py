"""``PseudoLabeler``: k-means on a teacher's embeddings -> pseudo-labels for the next stage.

A thin callback over :mod:`distillery.clustering.distributed`, which keeps memory bounded
however many clips there are.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np

from distillery.artifact_kinds import PseudoLabels
from distillery.clustering import KMeansResult, cluster_stats
from distillery.clustering.distributed import DEFAULT_FIT_SAMPLE, ClusterModel, label_dataset
from distillery.eval.embed import FEATURE_DTYPES
from distillery.eval.plots import plot_cluster_sizes
from distillery.pipeline.collectives import RankZeroWait
from distillery.pipeline.tracking import log_to_loggers

log = logging.getLogger(__name__)


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
    imbalance, NMI/ARI against true labels where known, the preprocessing actually applied
    and the k-means iterations actually run) and ``cluster_sizes.png``.
    Whitening is skipped when the embeddings have ``pca_dim`` dims or fewer;
    ``meta.json`` then says ``pca_dim: null`` (``pca_dim_requested`` keeps the setting).
    """

    produces: ClassVar[dict[str, type]] = {"pseudo_labels": PseudoLabels}

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
        labels, fit_idx, model, result = label_dataset(
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
            stage = pl_module.stage_name
            meta = self._write(
                labels,
                result,
                model,
                fit_idx,
                n_assigned,
                table.true_labels,
                trainer.current_epoch,
                stage,
            )
            self.metrics = {
                f"{stage}/pseudo/{k}": float(v)
                for k, v in meta.items()
                if isinstance(v, float | int) and not isinstance(v, bool)
            }
            # Clustered once per stage: the statistics are one-off numbers, not curves.
            log_to_loggers(
                trainer.loggers,
                self.metrics,
                step=trainer.global_step,
                images={f"{stage}/pseudo/cluster_sizes": str(self.out_dir / "cluster_sizes.png")},
                constant=not self.every_n_epochs,
            )
        self._previous = labels
        trainer.strategy.barrier("pseudo-labels-written")
        self.artifacts = {"pseudo_labels": str(self.out_dir / "labels.npy")}
        return meta

    def _preprocessing(self, model: ClusterModel) -> dict[str, Any]:
        """What was applied to the embeddings before k-means, which is not always what was
        asked for: PCA is skipped when the embeddings have no more than ``pca_dim`` dims."""
        whitening = model.whitening
        embed_dim = model.centroids.shape[1] if whitening is None else whitening.components.shape[1]
        steps = []
        if whitening is not None:
            steps.append(f"pca to {whitening.dim} dims (eig_power {self.eig_power:g})")
        elif self.pca_dim:
            steps.append(f"no pca ({embed_dim}-dim embeddings, pca_dim {self.pca_dim})")
        if self.normalize:
            steps.append("l2-normalize")
        return {
            "embed_dim": int(embed_dim),
            "pca_dim_requested": self.pca_dim,
            "pca_dim": None if whitening is None else whitening.dim,  # applied; null: no PCA
            "eig_power": None if whitening is None else self.eig_power,
            "normalize": self.normalize,
            "preprocessing": ", ".join(steps) or "none",
        }

    def _write(
        self,
        labels: np.ndarray,
        result: KMeansResult,
        model: ClusterModel,
        fit_idx: np.ndarray,
        n_assigned: int,
        true_labels: np.ndarray,
        epoch: int,
        stage: str,
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
            "niter": self.niter,  # the most Lloyd iterations asked for
            "n_iter": int(result.n_iter),  # those run: FAISS stops early once converged
            "epoch": epoch,
            "n_clustered": len(fit_idx),
            "n_assigned": n_assigned,
            "fit_sample": self.fit_sample,
            "n_fit": len(result.labels),  # clips k-means was fitted on; inertia is over them
            "inertia": float(result.inertia),
            "n_reseeded": int(result.n_reseeded),
            **self._preprocessing(model),
            **stats,
        }
        PseudoLabels(labels, self.k, result.centroids, meta).save(self.out_dir)
        plot_cluster_sizes(
            labels[fit_idx],
            self.k,
            self.out_dir / "cluster_sizes.png",
            title=f"{stage}, train split: k-means pseudo-labels, k={self.k}, epoch {epoch}",
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
