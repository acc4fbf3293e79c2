"""Stage checkpoints: written atomically, found again after any interruption."""

from __future__ import annotations

import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from distillery import artifacts

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
#: Written on SIGTERM, mid-epoch (see distillery.pipeline.faults).
INTERRUPTED_CHECKPOINT = "interrupted.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file, then rename: a killed process never leaves a
    truncated checkpoint behind. Checkpoints load as data (``weights_only``): ours hold
    only tensors and plain containers, so a planted file cannot run code on resume."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        artifacts.write_torch(path, checkpoint)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class CarriedStageState(Callback):
    """Carries the stage's latest metrics and its elapsed time in its checkpoints.

    A stage resumed from a checkpoint whose training had already finished (killed between
    its last checkpoint and the end of the stage) trains and logs nothing; ``carried`` then
    holds what the finished training had reported. :meth:`elapsed_s` counts the earlier
    attempts up to the checkpoint this one resumed from (the work after it, lost with the
    killed process, is not counted) plus this attempt since the callback was made.
    """

    KEY = "distillery_metrics"
    SECONDS_KEY = "distillery_stage_seconds"

    def __init__(self) -> None:
        self.carried: dict[str, float] = {}
        self.started = time.perf_counter()  # this attempt began
        self.earlier_s = 0.0

    def elapsed_s(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[self.KEY] = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if isinstance(v, torch.Tensor) and v.numel() == 1
        }
        checkpoint[self.SECONDS_KEY] = self.elapsed_s()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.carried = dict(checkpoint.get(self.KEY, {}))
        self.earlier_s = float(checkpoint.get(self.SECONDS_KEY, 0.0))


def epoch_checkpointing(stage_dir: Path) -> ModelCheckpoint:
    """Keep the two newest epochs' checkpoints (a damaged newest one still leaves one to
    resume from), with ``last.ckpt`` linking to the newest."""
    return ModelCheckpoint(
        dirpath=stage_dir / CHECKPOINT_DIR,
        filename="{epoch}-{step}",
        monitor="step",  # Lightning ranks checkpoints by a metric; the newest is the best
        mode="max",
        save_top_k=2,
        save_last="link",
        every_n_epochs=1,
        # Also when the epoch ran no validation (check_val_every_n_epoch > 1): otherwise the
        # last epochs after the last validation, or a whole short stage, keep no checkpoint.
        save_on_train_epoch_end=True,
    )


#: The selected (best validation) checkpoint, apart from the ones a stage resumes from.
BEST_DIR = "best"


class BestCheckpoint(ModelCheckpoint):
    """The checkpoint with the best ``monitor`` value (a validation metric), kept in
    ``checkpoints/best/``: :func:`latest_checkpoint` never resumes from it."""

    def __init__(self, stage_dir: Path, monitor: str, mode: str) -> None:
        super().__init__(
            dirpath=stage_dir / CHECKPOINT_DIR / BEST_DIR,
            filename="{epoch}-{step}",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
        )


def is_intact(path: Path) -> bool:
    """Whether a checkpoint reads back completely: ``torch.save`` writes a zip archive
    with a CRC per entry, so truncation and flipped bits are found without unpickling."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest intact checkpoint of a stage (epoch or SIGTERM checkpoint).

    A damaged one (a disk error, a file cut short outside our atomic writes) is skipped
    with a warning, so the run resumes from the one before instead of failing the same
    way on every re-run. ``last.ckpt`` only links to the newest epoch checkpoint, which
    is among the candidates anyway (the link can dangle after a crash between a save and
    its re-creation).
    """
    directory = stage_dir / CHECKPOINT_DIR
    candidates = [p for p in directory.glob("*.ckpt") if p.name != LAST_CHECKPOINT and p.is_file()]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if is_intact(path):
            return path
        log.warning("checkpoint %s is damaged (not a complete archive); using an older one", path)
    return None
