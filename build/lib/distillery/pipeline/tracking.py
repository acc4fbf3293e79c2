"""Per-stage experiment loggers: one W&B run per stage, grouped by the pipeline run."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_loggers(
    logger_cfg: dict[str, Any],
    *,
    stage: str,
    stage_dir: Path,
    run_dir: Path,
    run_id: str,
    wandb_run_id: str,
    attempt: int,
    config: dict[str, Any],
) -> list[Logger]:
    """Instantiate the configured loggers with the stage's names and directories filled in.

    W&B resumes the stage's run across attempts; file loggers write one folder per attempt
    (``logs/attempt-<n>``) so a resumed stage never overwrites the history before it.
    """
    loggers: list[Logger] = []
    for cfg in logger_cfg.values():
        if not cfg:
            continue
        cls = get_class(cfg["_target_"])
        extra: dict[str, Any]
        if issubclass(cls, WandbLogger):
            if "offline" not in cfg and not wandb_has_credentials():
                os.environ.setdefault("WANDB_MODE", "offline")
            extra = {
                "save_dir": str(run_dir),
                "name": f"{run_id}/{stage}",
                "group": run_id,
                "job_type": stage,
                "id": wandb_run_id,
                "resume": "allow",
                "config": config,
            }
        elif issubclass(cls, (CSVLogger, TensorBoardLogger)):
            extra = {"save_dir": str(stage_dir), "name": "logs", "version": f"attempt-{attempt}"}
        else:
            extra = {}
        # Built directly, not with hydra's instantiate: the logged config holds `_target_`
        # nodes that must stay plain data.
        args = {k: v for k, v in cfg.items() if k != "_target_"}
        loggers.append(cls(**(args | extra)))
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs so the next stage (or the next multirun job) starts a new one."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def log_to_loggers(
    loggers: list[Logger],
    metrics: dict[str, float],
    *,
    images: dict[str, str] | None = None,
    step: int,
) -> None:
    """Log metrics computed outside the training loop; images (PNG paths) go to W&B."""
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if images and isinstance(logger, WandbLogger):
            for key, path in images.items():
                logger.log_image(key=key, images=[path], step=step)


def report_to_wandb_sweep(metrics: dict[str, float]) -> None:
    """Under ``wandb agent``, log the pipeline's final metrics to the agent's own run.

    The agent watches the run it created (``WANDB_RUN_ID``); the stages log to runs of their
    own, so the sweep's objective (e.g. ``finetune/test/acc``) is reported here too.
    """
    if not os.environ.get("WANDB_SWEEP_ID"):
        return
    import wandb

    run = wandb.init()
    run.summary.update(metrics)
    run.log(metrics)
    run.finish()
