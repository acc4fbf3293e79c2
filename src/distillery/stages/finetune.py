"""Stage ``finetune``: supervised training of an encoder + linear classifier on real labels."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from distillery.artifact_kinds import EncoderArtifact
from distillery.eval.metrics import MeanAveragePrecision
from distillery.models.io import build_encoder
from distillery.stages.base import StageModule, encoder_inputs, freeze_unused


class FinetuneStage(StageModule):
    """Encoder + linear head trained with cross-entropy on ``label``, or on multi-label
    data (``multi_label``, from the data module) with binary cross-entropy per class on
    the multi-hot ``targets``, scored by mAP (``val_map``, ``test_map``) instead of accuracy.

    ``mode=full`` trains everything; ``mode=linear`` freezes the encoder (kept in eval mode,
    so its BatchNorm statistics do not move) and trains the head only: a linear probe.
    ``pretrained`` is an earlier stage's encoder artifact (or an ``encoder.pt`` file); without it the encoder
    is built from ``encoder`` with random weights (training from scratch).
    """

    produces = {"encoder": EncoderArtifact}

    def __init__(
        self,
        encoder: dict[str, Any],
        num_classes: int,
        stage_name: str = "finetune",
        mode: Literal["full", "linear"] = "full",
        pretrained: EncoderArtifact | None = None,
        label_smoothing: float = 0.0,
        multi_label: bool = False,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(stage_name, optimizer, scheduler)
        self.save_hyperparameters(ignore=["pretrained"])
        if pretrained is not None:
            self.encoder, self.encoder_cfg = pretrained.module, pretrained.config
        else:
            self.encoder, self.encoder_cfg = build_encoder(encoder), encoder
        self.mode = mode
        if mode == "linear":
            self.encoder.requires_grad_(False)
        freeze_unused(self.encoder, "forward")
        self.head = nn.Linear(self.encoder.embed_dim, num_classes)
        self.label_smoothing = label_smoothing
        self.multi_label = multi_label
        if multi_label:  # gathered over ranks by torchmetrics
            self.scores = nn.ModuleDict(
                {"val_map": MeanAveragePrecision(), "test_map": MeanAveragePrecision()}
            )
        else:
            self.accuracy = nn.ModuleDict(
                {
                    f"{split}_acc": MulticlassAccuracy(num_classes, average="micro")
                    for split in ("train", "val", "test")
                }
            )
            # Summed over ranks by torchmetrics; read by the runner after `trainer.test`.
            self.test_confusion_metric = MulticlassConfusionMatrix(num_classes)

    def encoder_for_eval(self) -> nn.Module:
        return self.encoder

    def on_train_epoch_start(self) -> None:
        if self.mode == "linear":
            self.encoder.eval()

    def forward(self, x: torch.Tensor, *lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, *lengths))

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        logits = self(*encoder_inputs(self.encoder, batch))  # log-mel, or waveforms + lengths
        if self.multi_label:
            return self._multi_label_step(logits, batch["targets"], split)
        labels = batch["label"]
        loss = F.cross_entropy(
            logits, labels, label_smoothing=self.label_smoothing if split == "train" else 0.0
        )
        accuracy = self.accuracy[f"{split}_acc"]
        accuracy(logits, labels)
        if split == "test":
            self.test_confusion_metric.update(logits, labels)
        on_step = split == "train"
        self.log_split(split, {"loss": loss}, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log_split(
            split, {"acc": accuracy}, on_step=False, on_epoch=True, prog_bar=split != "train"
        )
        return loss

    def _multi_label_step(
        self, logits: torch.Tensor, targets: torch.Tensor, split: str
    ) -> torch.Tensor:
        smoothing = self.label_smoothing if split == "train" else 0.0
        loss = F.binary_cross_entropy_with_logits(logits, targets * (1 - smoothing) + smoothing / 2)
        on_step = split == "train"
        self.log_split(split, {"loss": loss}, on_step=on_step, on_epoch=True, prog_bar=True)
        if split != "train":
            score = self.scores[f"{split}_map"]
            score.update(logits, targets)
            self.log_split(split, {"map": score}, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_test_epoch_end(self) -> None:
        if self.multi_label:
            return
        self.test_confusion = self.test_confusion_metric.compute().cpu().numpy()
        self.test_confusion_metric.reset()
