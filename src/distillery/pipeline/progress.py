"""What the console shows while a pipeline runs.

- ``stage i/n: <name>`` headers with an estimate of the time the pipeline has left;
- :class:`StageProgressBar`: Rich bars whose metrics read ``train/loss``, not
  ``<stage>/train/loss``;
- :class:`EpochSummary`: with bars off (``trainer.enable_progress_bar=false``, as in
  SLURM logs), one line per epoch instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, RichProgressBar

log = logging.getLogger("distillery.pipeline")


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PipelineProgress:
    """Stage headers (``stage 2/3: self_distill``) and the pipeline's ETA.

    The ETA is the mean wall time of the stages finished in this invocation times the
    stages still to run (this one included); stages differ, so it is a rough guide that
    sharpens as stages finish.
    """

    def __init__(self, order: list[str]) -> None:
        self.order = list(order)
        self.finished: list[float] = []
        self.to_run: set[str] = set()

    def eta(self, stage: str) -> float | None:
        """Seconds left before ``stage`` starts (``stage`` and the ones after it)."""
        if not self.finished:
            return None
        left = len(self.order) - self.order.index(stage)
        return sum(self.finished) / len(self.finished) * left

    @rank_zero_only
    def stage_started(self, stage: str, kind: str, action: str) -> None:
        position = self.order.index(stage) + 1
        eta = self.eta(stage)
        left = "" if eta is None else f"; about {format_duration(eta)} left in the pipeline"
        log.info("stage %d/%d: %s (%s, %s)%s", position, len(self.order), stage, kind, action, left)

    def stage_finished(self, stage: str, wall_time_s: float | None) -> None:
        if wall_time_s is not None:
            self.finished.append(wall_time_s)


def _short(value: float) -> str:
    return f"{value:.4g}"


class EpochSummary(Callback):
    """One log line per epoch: ``<stage> epoch 3/10: train/loss=0.51 val/acc=0.81 (4.2 s)``;
    a stage trained by a step budget shows its step (``epoch 7, step 70/300``)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._start = time.perf_counter()
        self._validated = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._validated = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Called after the epoch's validation, if it had one (a step-based interval can skip
        # epochs): val/* are shown only when they are this epoch's values.
        if not trainer.is_global_zero:
            return
        prefix = f"{self.stage}/"
        values = {
            key.removeprefix(prefix).removesuffix("_epoch"): float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith(prefix) and not key.endswith("_step") and value.numel() == 1
        }
        if not self._validated:
            values = {k: v for k, v in values.items() if not k.startswith("val/")}
        shown = " ".join(f"{k}={_short(v)}" for k, v in sorted(values.items()))
        epoch = trainer.current_epoch + 1
        if trainer.max_epochs and trainer.max_epochs > 0:
            of = f"/{trainer.max_epochs}"
        elif trainer.max_steps > 0:
            of = f", step {trainer.global_step}/{trainer.max_steps}"
        else:
            of = ""
        log.info(
            "%s epoch %d%s: %s (%.1f s)",
            self.stage,
            epoch,
            of,
            shown or "(no metrics)",
            time.perf_counter() - self._start,
        )


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
