"""Classes that break the stage contract, for the start-up checks."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import Tensor, nn


class NotAModule(nn.Module):
    """An ``nn.Module``, not a ``LightningModule``."""


class NoOptimizer(pl.LightningModule):
    """Has a training step but neither an optimizer nor ``produces`` of the right shape."""

    produces = ("encoder",)

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(width, width)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.layer(batch["features"]).sum()
