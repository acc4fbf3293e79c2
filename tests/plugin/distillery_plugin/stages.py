"""A user's stages: plain ``LightningModule`` subclasses, no distillery base class."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from distillery.artifact_kinds import EncoderArtifact


class EmbeddingKD(pl.LightningModule):
    """Distil a frozen teacher's clip embeddings into a fresh student, with any loss."""

    # What this stage hands to later stages (name -> kind); the runner saves it.
    produces = {"encoder": EncoderArtifact}

    def __init__(
        self,
        teacher: EncoderArtifact,  # an earlier stage's encoder, wired by `inputs`
        student: dict[str, Any],  # the student encoder's `_target_` config
        loss: dict[str, Any],  # a `_partial_` loss(student, teacher) -> scalar
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.teacher = teacher.module.requires_grad_(False)
        self.student_config = student
        self.student = instantiate(student)
        self.project = nn.Linear(self.student.embed_dim, self.teacher.embed_dim)
        self.loss = instantiate(loss)
        self.lr = lr

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()  # frozen: its BatchNorm statistics stay as trained

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["features"]  # (B, 1, n_mels, T) log-mel from the shared data module
        with torch.no_grad():
            target = self.teacher(x)
        loss = self.loss(self.project(self.student(x)), target)
        self.log("kd/train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([*self.student.parameters(), *self.project.parameters()], self.lr)

    def encoder_for_eval(self) -> nn.Module:  # scored by the shared evaluation
        return self.student

    def export_artifacts(self) -> dict[str, EncoderArtifact]:
        return {"encoder": EncoderArtifact(self.student, self.student_config)}


class PitchClassifier(pl.LightningModule):
    """A linear classifier on a given encoder: nothing declared beyond its arguments."""

    def __init__(self, encoder: EncoderArtifact, num_classes: int, lr: float = 1e-2) -> None:
        super().__init__()
        self.encoder = encoder.module
        self.head = nn.Linear(self.encoder.embed_dim, num_classes)
        self.lr = lr

    def _logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.head(self.encoder(batch["features"]))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self._logits(batch), batch["label"])
        self.log("classify/train/loss", loss)
        return loss

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        accuracy = (self._logits(batch).argmax(1) == batch["label"]).float().mean()
        self.log("classify/test/acc", accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), self.lr)
