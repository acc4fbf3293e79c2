"""A progress bar that shows ``train/loss`` rather than ``<stage>/train/loss``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class StageProgressBar(RichProgressBar):
    """Rich progress bar; the stage name is already in the description, not in every key."""

    def __init__(self, stage: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        prefix = f"{self.stage}/"
        metrics = super().get_metrics(trainer, pl_module)
        return {k.removeprefix(prefix): v for k, v in metrics.items() if k != "v_num"}

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{self.stage} " + super()._get_train_description(current_epoch)
