"""Stage ``self_distill``: a fresh multi-exit student trained on pseudo-labels (UnFuSeD)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from distillery.artifact_kinds import EncoderArtifact
from distillery.losses import multi_exit_loss
from distillery.models.heads import MLPHead
from distillery.models.io import build_encoder
from distillery.stages.base import StageModule, encoder_inputs, freeze_unused


class SelfDistillStage(StageModule):
    """Student with an exit head on every block, distilled from its own final classifier.

    ``L = exit_ce_weight * sum_i CE(h_i, y) + CE(c, y) + exit_kl_weight * sum_i
    KL(softmax(c) || softmax(h_i)) + exit_cos_weight * sum_i (2 - 2 cos(h_i, c))`` with ``y`` the pseudo-labels. Head and classifier
    widths are the number of pseudo-classes, read from the pseudo-label artifact
    (``num_pseudo_classes``, filled in by the runner), never typed by hand.
    ``detach_teacher`` stops the KL/cosine gradients into the final classifier; the
    reference implementation does not detach (default False). Validation logs each exit
    head's accuracy against the pseudo-labels (``val/exit<i>_pseudo_acc``, i = 1, 2, ...)
    next to the final classifier's (``val/pseudo_acc``).

    The encoder reads what it declares (log-mel, or waveforms and lengths); its exits are
    its blocks (a speech encoder's transformer layers up to ``embedding_layer``, each
    pooled over the valid frames).
    """

    produces = {"encoder": EncoderArtifact}
    encoder_requirements = {"encoder": ("embed_dim", "exit_dims", "forward_exits")}

    def __init__(
        self,
        encoder: dict[str, Any],
        num_pseudo_classes: int,
        stage_name: str = "self_distill",
        head_hidden_dim: int = 512,
        exit_ce_weight: float = 0.7,
        exit_kl_weight: float = 0.3,
        exit_cos_weight: float = 0.003,
        detach_teacher: bool = False,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(stage_name, optimizer, scheduler)
        self.save_hyperparameters()
        self.encoder, self.encoder_cfg = build_encoder(encoder), encoder
        freeze_unused(self.encoder, "forward")
        k = num_pseudo_classes
        self.exit_heads = nn.ModuleList(
            MLPHead(dim, head_hidden_dim, k) for dim in self.encoder.exit_dims
        )
        self.classifier = nn.Linear(self.encoder.embed_dim, k)
        self.loss_weights = {
            "exit_ce_weight": exit_ce_weight,
            "exit_kl_weight": exit_kl_weight,
            "exit_cos_weight": exit_cos_weight,
            "detach_teacher": detach_teacher,
        }
        self.accuracy = nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(k, average="micro") for s in ("train", "val")}
        )
        # Each exit head's agreement with the pseudo-labels on the validation split.
        self.exit_accuracy = nn.ModuleList(
            MulticlassAccuracy(k, average="micro") for _ in self.encoder.exit_dims
        )

    def encoder_for_eval(self) -> nn.Module:
        return self.encoder

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        exits, embedding = self.encoder.forward_exits(*encoder_inputs(self.encoder, batch))
        exit_logits = [head(z) for head, z in zip(self.exit_heads, exits, strict=True)]
        final_logits = self.classifier(embedding)
        targets = batch["pseudo_label"]
        loss, terms = multi_exit_loss(exit_logits, final_logits, targets, **self.loss_weights)
        labeled = targets >= 0
        train = split == "train"
        if labeled.any():
            self.accuracy[f"{split}_acc"](final_logits[labeled], targets[labeled])
            if not train:
                for metric, logits in zip(self.exit_accuracy, exit_logits, strict=True):
                    metric(logits[labeled], targets[labeled])
        if not train:
            self.log_split(
                split,
                {f"exit{i}_pseudo_acc": m for i, m in enumerate(self.exit_accuracy, start=1)},
                on_step=False,
                on_epoch=True,
            )
        self.log_split(split, {"loss": loss}, on_step=train, on_epoch=True, prog_bar=True)
        self.log_split(
            split, {k: v for k, v in terms.items() if k != "total"}, on_step=False, on_epoch=True
        )
        self.log_split(
            split,
            {"pseudo_acc": self.accuracy[f"{split}_acc"]},
            on_step=False,
            on_epoch=True,
            prog_bar=not train,
        )
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
