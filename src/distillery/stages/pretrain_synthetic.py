"""Stage ``pretrain_synthetic``: pretrain a fresh encoder on a distilled synthetic set (KRR-ST)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.artifact_kinds import EncoderArtifact, SyntheticSet
from distillery.distill.model_pool import RegressionModel
from distillery.distill.synthetic_set import SyntheticSetDataModule
from distillery.models.io import build_encoder
from distillery.stages.base import StageModule


class PretrainSyntheticStage(StageModule):
    """A fresh encoder + linear head regressed onto the synthetic targets:
    ``MSE(head(encoder(x_syn)), y_syn)`` (SGD lr 0.1, weight decay 1e-3 in KRR-ST).

    ``synthetic_set``: a ``dataset_distill`` stage's ``synthetic_set`` artifact (wired through
    ``inputs``). The stage trains on that set alone (:meth:`configure_data`), in minibatches
    of ``batch_size``: one epoch is one shuffled pass over it. The encoder (head dropped) is
    the exported ``encoder`` artifact, for ``finetune``.
    """

    produces = {"encoder": EncoderArtifact}
    refused_encoder_inputs = {
        "encoder": {"audio": "it trains on a synthetic set of log-mel inputs (dataset_distill's)"}
    }

    def __init__(
        self,
        encoder: dict[str, Any],
        synthetic_set: SyntheticSet,
        stage_name: str = "pretrain_synthetic",
        batch_size: int = 256,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(stage_name, optimizer, scheduler)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters(ignore=["synthetic_set"])
        self.synthetic_set = synthetic_set
        self.encoder_cfg = encoder
        self.model = RegressionModel(build_encoder(encoder), synthetic_set.targets.shape[1])
        self.check_encoder_input("encoder", self.model.encoder)
        self.batch_size = batch_size

    def encoder_for_eval(self) -> nn.Module:
        return self.model.encoder

    def configure_data(self, data: pl.LightningDataModule) -> pl.LightningDataModule:
        return SyntheticSetDataModule(self.synthetic_set, self.batch_size)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.mse_loss(self.model(batch["features"]), batch["target"])
        self.log_split("train", {"loss": loss}, on_step=False, on_epoch=True, prog_bar=True)
        return loss
