"""Callbacks that make a stage safe to stop and to resume: every stage runs with them.

- :class:`FiniteLossGuard` stops a stage at the first non-finite loss or gradient, before
  the optimizer step, so the weights stay good and no checkpoint of a broken model is saved.
- :class:`SigtermCheckpoint` writes a checkpoint when SIGTERM (what SLURM sends before a
  preemption or the time limit) stops training, so the requeued job resumes from there.
- :class:`BatchSeed` re-seeds every process before each training batch, so a resumed stage
  draws the same augmentations as an uninterrupted run.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from distillery.pipeline.checkpoints import INTERRUPTED_CHECKPOINT


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient."""


class FiniteLossGuard(pl.Callback):
    """Raise :class:`NonFiniteLossError` naming the stage, step and batch.

    The gradient check runs after DDP has averaged the gradients, so a NaN on any rank
    reaches every rank and all of them stop at the same step (no rank waits for another in
    a collective). Under fp16 mixed precision, inf gradients are the loss scaler's normal
    business (it skips the step), so only the loss is checked there.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._loss: float | None = None

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss = float(loss.detach())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        bad_loss = self._loss is not None and not math.isfinite(self._loss)
        check_grads = not str(trainer.precision).startswith("16")
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        bad_grads = check_grads and bool(grads) and not _all_finite(grads)
        if bad_loss or bad_grads:
            what = f"loss {self._loss}" if bad_loss else f"gradients (loss {self._loss})"
            raise NonFiniteLossError(
                f"stage {self.stage!r}: non-finite {what} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}); "
                "the optimizer step was not taken and the last epoch checkpoint is kept"
            )


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    norms = torch._foreach_norm(
        tensors
    )  # one fused pass; a NaN/Inf anywhere makes its norm non-finite
    return bool(torch.isfinite(torch.stack(norms)).all())


class SigtermCheckpoint(pl.Callback):
    """On SIGTERM, save ``checkpoints/interrupted.ckpt`` (mid-epoch) before the stage exits.

    Lightning turns SIGTERM into a ``SIGTERMException`` at the next batch boundary on every
    rank; ``on_exception`` runs on all of them before teardown, which the collective
    checkpoint save needs.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self.path = Path(checkpoint_dir) / INTERRUPTED_CHECKPOINT

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)


class BatchSeed(pl.Callback):
    """Seed Python, NumPy and torch from (seed, epoch, batch, global rank) before each
    training batch.

    What a training step draws (augmentations, dropout) is then a function of where the
    step is, not of how many draws came before it: a stage resumed from a checkpoint draws
    what the uninterrupted run drew, and DDP ranks draw differently from each other. The
    data side is seeded by :class:`~distillery.data.datamodule.TrainSampler`.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        key = [self.seed, trainer.current_epoch, batch_idx, trainer.global_rank]
        value = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint32)[0])
        random.seed(value)
        np.random.seed(value)  # noqa: NPY002 - the global RNG is what data code draws from
        torch.manual_seed(value)
