"""Stage checkpoints: written atomically, found again after any interruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from distillery import artifacts

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
#: Written on SIGTERM, mid-epoch (see distillery.pipeline.faults).
INTERRUPTED_CHECKPOINT = "interrupted.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file, then rename: a killed process never leaves a
    truncated checkpoint behind."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        artifacts.write_torch(path, checkpoint)


class CheckpointedMetrics(Callback):
    """Carries the stage's latest metrics in its checkpoints.

    A stage resumed from a checkpoint whose training had already finished (killed between
    its last checkpoint and the end of the stage) trains and logs nothing; ``carried`` then
    holds what the finished training had reported.
    """

    KEY = "distillery_metrics"

    def __init__(self) -> None:
        self.carried: dict[str, float] = {}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[self.KEY] = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if isinstance(v, torch.Tensor) and v.numel() == 1
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.carried = dict(checkpoint.get(self.KEY, {}))


def epoch_checkpointing(stage_dir: Path) -> ModelCheckpoint:
    """Keep the newest epoch's checkpoint, with ``last.ckpt`` linking to it."""
    return ModelCheckpoint(
        dirpath=stage_dir / CHECKPOINT_DIR,
        filename="{epoch}-{step}",
        save_top_k=1,
        save_last="link",
        every_n_epochs=1,
    )


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest checkpoint of a stage: ``last.ckpt``'s target or a SIGTERM checkpoint.

    The link is re-created after each save, so a crash in between can leave it dangling;
    then the newest epoch checkpoint is used.
    """
    directory = stage_dir / CHECKPOINT_DIR
    last = directory / LAST_CHECKPOINT
    if last.exists():
        candidates = [last.resolve()]
    else:
        candidates = [p for p in directory.glob("*.ckpt") if p.name != LAST_CHECKPOINT]
    candidates += [p for p in [directory / INTERRUPTED_CHECKPOINT] if p.exists()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
