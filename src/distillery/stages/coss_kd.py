"""Stage ``coss_kd``: unsupervised distillation of a frozen teacher into a smaller student
with the CoSS loss (per-sample cosine + per-dimension "space" cosine)."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from distillery.artifact_kinds import EncoderArtifact
from distillery.data.knn_batches import NeighbourBatchDataModule
from distillery.losses import coss_loss
from distillery.models.io import build_encoder
from distillery.stages.base import StageModule, encoder_inputs, freeze_unused


class CoSSDistillStage(StageModule):
    """A fresh student encoder learns to reproduce a frozen teacher's embeddings, no labels.

    ``L = cosine_weight * mean_i (1 - cos(t_i, s_i)) + space_weight * mean_j (1 - cos(t^_j, s^_j))`` on the
    (B, D) teacher and (projected) student embeddings of the same clips
    (:func:`~distillery.losses.coss_loss`); each encoder reads the input it declares (log-mel,
    or waveforms and their lengths: either may be a speech encoder); ``space_weight = 0`` is plain cosine distillation. When
    the student's width differs from the teacher's, a projection head Linear-ReLU-Linear
    (hidden width ``projection_hidden_dim``, default the teacher's width) maps it to the
    teacher's; it is dropped afterwards, the exported encoder is the student alone.

    ``batches``: ``random`` (the data module's shuffled batches) or ``knn``: anchors plus
    ``num_neighbours`` of their ``neighbour_pool`` nearest neighbours in the teacher's
    embedding space (exact cosine kNN over the training clips, computed once when training starts, on every
    rank; :class:`~distillery.data.knn_batches.NeighbourBatchDataModule`).
    A kNN batch has as many items as a random one (``data.batch_size``, which must be a
    multiple of ``1 + num_neighbours``); an epoch of kNN batches makes every clip an anchor
    once, so it is ``1 + num_neighbours`` times longer than a random epoch: compare the two
    at equal steps (``trainer.max_steps``).

    DDP (``space_batch``): the space term normalises each feature dimension over the batch,
    so it depends on which items share a batch. ``global`` (default) gathers the student
    and teacher embeddings of all ranks (with gradients) and computes both terms on the
    global batch: the loss and its gradient are those of one process with the whole batch,
    whatever the number of devices. ``device`` is the reference behaviour: each rank uses
    its own batch only, a noisier per-dimension cosine when per-device batches are small.
    """

    produces = {"encoder": EncoderArtifact}

    def __init__(
        self,
        encoder: dict[str, Any],
        teacher: EncoderArtifact,
        stage_name: str = "coss_kd",
        cosine_weight: float = 1.0,
        space_weight: float = 1.0,
        batches: Literal["random", "knn"] = "knn",
        num_neighbours: int = 15,
        neighbour_pool: int = 31,
        space_batch: Literal["global", "device"] = "global",
        projection_hidden_dim: int | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(stage_name, optimizer, scheduler)
        if batches not in ("random", "knn"):
            raise ValueError(f"batches must be 'random' or 'knn', got {batches!r}")
        if space_batch not in ("global", "device"):
            raise ValueError(f"space_batch must be 'global' or 'device', got {space_batch!r}")
        if not 1 <= num_neighbours <= neighbour_pool:
            raise ValueError(
                f"need 1 <= num_neighbours <= neighbour_pool, got {num_neighbours}, {neighbour_pool}"
            )
        self.save_hyperparameters(ignore=["teacher"])
        self.encoder, self.encoder_cfg = build_encoder(encoder), encoder
        freeze_unused(self.encoder, "forward")
        self.teacher = teacher.module.requires_grad_(False).eval()
        student_dim, teacher_dim = self.encoder.embed_dim, self.teacher.embed_dim
        self.projection: nn.Module = nn.Identity()
        if student_dim != teacher_dim:
            hidden = projection_hidden_dim or teacher_dim
            self.projection = nn.Sequential(
                nn.Linear(student_dim, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, teacher_dim),
            )
        self.weights = {"cosine_weight": float(cosine_weight), "space_weight": float(space_weight)}
        self.batches, self.space_batch = batches, space_batch
        self.num_neighbours, self.neighbour_pool = num_neighbours, neighbour_pool

    def encoder_for_eval(self) -> nn.Module:
        return self.encoder

    def train(self, mode: bool = True) -> CoSSDistillStage:
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm statistics and dropout stay as trained
        return self

    # -- data -----------------------------------------------------------------------------
    def configure_data(self, data: pl.LightningDataModule) -> pl.LightningDataModule:
        if self.batches == "random":
            return data
        return NeighbourBatchDataModule(
            data, self.teacher, self.num_neighbours, self.neighbour_pool
        )

    # -- objective ------------------------------------------------------------------------
    def _gathers(self, split: str) -> bool:
        # Validation shards are strided without padding (unequal sizes across ranks), and
        # all_gather needs equal shapes: validation is always per device, averaged by logging.
        return split == "train" and self.space_batch == "global" and self.trainer.world_size > 1

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        with torch.no_grad():  # each reads what it declares: log-mel, or waveforms + lengths
            teacher = self.teacher(*encoder_inputs(self.teacher, batch))
        student = self.projection(self.encoder(*encoder_inputs(self.encoder, batch)))
        gathered = self._gathers(split)
        if gathered:  # (world, B, D) -> (world * B, D); gradients flow back to each rank's part
            student = self.all_gather(student, sync_grads=True).flatten(0, 1)
            teacher = self.all_gather(teacher).flatten(0, 1)
        loss, terms = coss_loss(student, teacher, **self.weights)
        train = split == "train"
        # A gathered loss is already the global-batch loss on every rank: nothing to average.
        metrics = {"loss": loss, "cos": terms["cos"], "space": terms["space"]}
        self.log_split(
            split, metrics, on_step=train, on_epoch=True, prog_bar=True, sync_dist=not gathered
        )
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
