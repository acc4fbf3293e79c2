"""Callbacks that make a stage safe to stop and to resume: every stage runs with them.

- :class:`FiniteLossGuard` stops a stage at the first non-finite loss or gradient, before
  the optimizer step, so the weights stay good and no checkpoint of a broken model is saved.
- :class:`SignalCheckpoint` stops a stage at the next training batch when any rank received
  a stop signal (:data:`STOP_SIGNALS`), after writing a mid-epoch checkpoint, so the
  requeued job resumes from there; :func:`stop_on_signals` installs the handlers.
- :class:`BatchSeed` re-seeds every process before each training batch, so a resumed stage
  draws the same augmentations as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.strategies import Strategy

from distillery import artifacts
from distillery.pipeline.checkpoints import INTERRUPTED_CHECKPOINT


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient."""


class FiniteLossGuard(pl.Callback):
    """Raise :class:`NonFiniteLossError` naming the stage, step and batch.

    Checked before each optimizer step: every micro-batch's loss since the last step (under
    gradient accumulation too) and, except under fp16 mixed precision, where inf gradients
    are the loss scaler's normal business (it skips the step), the averaged gradients. The
    verdict is reduced over the ranks, so all of them stop at the same step, also when only
    one rank's own loss is bad (no rank is left waiting for another in a collective).
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._loss: float | None = None
        self._bad_loss: float | None = None  # the first non-finite loss since the last step

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss = float(loss.detach())
        if self._bad_loss is None and not math.isfinite(self._loss):
            self._bad_loss = self._loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        bad_loss, self._bad_loss = self._bad_loss, None
        check_grads = not str(trainer.precision).startswith("16")
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        bad_grads = check_grads and bool(grads) and not _all_finite(grads)
        mine = bad_loss is not None or bad_grads
        if trainer.strategy.reduce_boolean_decision(mine, all=False):
            if bad_loss is not None:
                what = f"loss {bad_loss}"
            elif bad_grads:
                what = f"gradients (loss {self._loss})"
            else:
                what = f"loss or gradients on another rank (this rank's loss {self._loss})"
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


#: Signals that ask a run to stop and keep its work: SIGTERM (SLURM before a preemption or a
#: requeue, torchrun, ``kill``), SIGUSR2 (submitit's checkpoint signal before the time limit)
#: and SIGINT (Ctrl-C).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

log = logging.getLogger(__name__)


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """Raised on every rank at the safe point after any rank received a stop signal."""

    def __init__(self, signum: int, where: str) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} {where}")


class _StopFlag:
    """The first stop signal this process received (0: none).

    The handler only records it: a handler runs between two bytecodes of whatever the
    main thread is doing, possibly inside a collective, so it must not communicate (a
    broadcast there hangs every rank when the signal reached a rank other than 0).
    """

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint
        self.signum = self.signum or signum
        log.warning(
            "received %s: saving a checkpoint at the next safe point and stopping "
            "(Ctrl-C twice stops at once)",
            signal.Signals(signum).name,
        )


STOP = _StopFlag()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Record :data:`STOP_SIGNALS` in :data:`STOP` instead of dying (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.signum, STOP.previous = 0, {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, STOP.handle)
    try:
        yield
    finally:
        for signum, handler in STOP.previous.items():
            signal.signal(signum, handler)


def agreed_stop_signal(strategy: Strategy) -> int:
    """The stop signal any rank received, 0 for none: a collective, every rank calls it at
    the same point."""
    local = torch.tensor(STOP.signum, device=strategy.root_device)
    return int(strategy.reduce(local, reduce_op="max"))


def stop_if_requested(strategy: Strategy, where: str) -> None:
    """Raise :class:`StopRequested` on every rank if any rank received a stop signal."""
    if signum := agreed_stop_signal(strategy):
        raise StopRequested(signum, where)


def exit_after_stop(signum: int) -> None:
    """Leave the process as the signal asked, once the stage is saved and recorded.

    A handler that was there before ours (submitit's on SIGUSR2: re-submit the job, then
    requeue it) runs now; then the process exits with 128 + the signal number.
    """
    previous = STOP.previous.get(signum)
    if callable(previous) and previous is not signal.default_int_handler:
        previous(signum, None)
    sys.exit(128 + signum)


def keep_lightning_off_signals(trainer: pl.Trainer) -> None:
    """Keep Lightning from replacing our handlers with its SIGTERM handler, which broadcasts
    from rank 0 inside the handler (see :class:`_StopFlag`)."""
    trainer._signal_connector.register_signal_handlers = lambda: None


class SignalCheckpoint(pl.Callback):
    """After each training batch, all ranks agree whether any of them received a stop
    signal; if one did, save ``checkpoints/interrupted.ckpt`` (mid-epoch, with the train
    sampler's position) and raise :class:`StopRequested` on every rank.

    One small all-reduce per batch is the price of stopping every rank together, whichever
    rank the signal reached. The last batch of an epoch is not a stopping point: its
    validation and epoch checkpoint come first (a resume from there would log that epoch
    differently), then the next batch or the end of training stops.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self.path = Path(checkpoint_dir) / INTERRUPTED_CHECKPOINT

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return
        if signum := agreed_stop_signal(trainer.strategy):
            trainer.save_checkpoint(self.path)
            raise StopRequested(
                signum,
                f"at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {batch_idx})",
            )


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


#: Where each rank of a failed attempt leaves its error: ``<stage>/errors/rank<r>.json``.
ERRORS_DIR = "errors"


def first_rank_error(stage_dir: Path, attempt: int, error: str, grace_s: float = 2.0) -> str:
    """This rank's ``error`` as the stage's error, or under DDP the first one of any rank.

    Every failing rank writes its error; rank 0's then names the rank that failed first:
    a rank that crashes writes before it exits, and only its exit makes the others fail
    ("Connection closed by peer"). Returns ``"rank <r>: <error>"`` under DDP.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return error
    rank = torch.distributed.get_rank()
    errors_dir = Path(stage_dir) / ERRORS_DIR
    mine = {"rank": rank, "attempt": attempt, "error": error, "time": time.time()}
    artifacts.write_json(errors_dir / f"rank{rank}.json", mine)
    if rank != 0:
        return error
    deadline = time.monotonic() + grace_s  # a rank failing at the same moment
    while True:
        reports = [json.loads(p.read_text()) for p in errors_dir.glob("rank*.json")]
        reports = [r for r in reports if r["attempt"] == attempt]
        if len(reports) == torch.distributed.get_world_size() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    first = min(reports, key=lambda r: r["time"])
    return f"rank {first['rank']}: {first['error']}"
