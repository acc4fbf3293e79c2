"""Stage ``pretrain_synthetic``: pretrain a fresh encoder on a distilled synthetic set (KRR-ST)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from distillery.distill.model_pool import RegressionModel
from distillery.distill.synthetic_set import load_synthetic_set
from distillery.models.io import build_encoder
from distillery.stages.base import StageModule


class PretrainSyntheticStage(StageModule):
    """A fresh encoder + linear head regressed onto the synthetic targets:
    ``MSE(head(encoder(x_syn)), y_syn)`` (SGD lr 0.1, weight decay 1e-3 in KRR-ST).

    ``synthetic_set``: a ``dataset_distill`` stage's ``synthetic_set`` artifact (wired through
    ``inputs``). The encoder (head dropped) is the exported ``encoder.pt``, for ``finetune``.

    The runner feeds every stage the data module's real clips, but this stage must learn
    from the synthetic set alone. So each training step is one shuffled pass, in minibatches
    of ``batch_size``, over its own DataLoader of the synthetic tensors, and the real batch is
    not read; the stage config sets ``trainer.limit_train_batches: 1`` so that one epoch is
    one pass over the synthetic set. Optimisation is manual because a step holds several
    optimizer steps; a ``scheduler`` is stepped once per epoch.
    """

    produces = ("checkpoint", "encoder")

    def __init__(
        self,
        encoder: dict[str, Any],
        synthetic_set: str | None,
        stage_name: str = "pretrain_synthetic",
        batch_size: int = 256,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(stage_name, optimizer, scheduler)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not synthetic_set:
            raise ValueError(
                f"{stage_name}: module.synthetic_set is required (a dataset_distill stage's "
                "artifact, e.g. inputs: {module.synthetic_set: dataset_distill.synthetic_set})"
            )
        self.save_hyperparameters()
        self.automatic_optimization = False
        inputs, targets, _ = load_synthetic_set(synthetic_set)
        self.encoder_cfg = encoder
        self.model = RegressionModel(build_encoder(encoder), targets.shape[1])
        # Not persistent: they come from the artifact, so checkpoints need not repeat them.
        self.register_buffer("inputs", inputs, persistent=False)
        self.register_buffer("targets", targets, persistent=False)
        self.batch_size = batch_size

    def encoder_for_eval(self) -> nn.Module:
        return self.model.encoder

    def synthetic_loader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.inputs, self.targets), batch_size=self.batch_size, shuffle=True
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        losses = []
        for x, y in self.synthetic_loader():
            optimizer.zero_grad()
            loss = F.mse_loss(self.model(x), y)
            self.manual_backward(loss)
            optimizer.step()
            losses.append(loss.detach())
        self.log_split(
            "train",
            {"loss": torch.stack(losses).mean()},
            on_step=False,
            on_epoch=True,
            prog_bar=True,
        )

    def on_train_epoch_end(self) -> None:
        if self.scheduler_cfg:
            self.lr_schedulers().step()
