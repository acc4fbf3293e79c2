"""Per-stage experiment loggers: one W&B run per stage, grouped by the pipeline run.

What a W&B user gets, and where it is made:
- :class:`StageWandbLogger`: inside a stage's run metric keys lose the stage prefix
  (``test/acc``, not ``finetune/test/acc``), so charts overlay the stages of a group and
  the same stage across groups; each key's summary is defined (best ``val/*acc`` and
  ``val/*loss``, last ``test/*``).
- :func:`log_stage_artifacts` / :func:`use_stage_artifacts`: every stage logs its outputs
  as W&B Artifacts and declares the earlier stages' outputs it reads, so the group's
  lineage graph is the pipeline.
- :func:`log_pipeline_summary`: a small ``pipeline`` run in the same group holding the
  results table and every stage's final metrics.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from hydra.utils import get_class
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from distillery.pipeline.manifest import RunManifest
from distillery.pipeline.report import results_table

log = logging.getLogger(__name__)

#: Recorded artifacts not logged to W&B: checkpoints are resume points (Lightning's own
#: ``log_model`` uploads them when asked).
UNLOGGED_ARTIFACTS = ("checkpoint",)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def metric_summary(key: str) -> str | None:
    """The W&B summary of an unprefixed metric key: best validation value, last test value."""
    split, _, name = key.partition("/")
    if split == "val" and "acc" in name:
        return "max"
    if split == "val" and "loss" in name:
        return "min"
    if split == "test":
        return "last"
    return None


class StageWandbLogger(WandbLogger):
    """``WandbLogger`` for one stage's run.

    Args:
        stage: the stage whose ``<stage>/`` prefix is dropped from metric keys (filled in by
            the runner); ``None`` keeps keys as they are (the pipeline-level run).
        artifacts: how stage outputs are logged as W&B Artifacts: ``copy`` (W&B copies the
            files into its staging area and uploads them) or ``reference`` (only a
            ``file://`` reference and checksum: for large files on a shared file system).
        **kwargs: ``WandbLogger`` / ``wandb.init`` arguments.
    """

    def __init__(
        self,
        stage: str | None = None,
        artifacts: Literal["copy", "reference"] = "copy",
        **kwargs: Any,
    ) -> None:
        if artifacts not in ("copy", "reference"):
            raise ValueError(f"logger.wandb.artifacts must be copy or reference, got {artifacts!r}")
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:  # W&B warns about the unused setting
            self._wandb_init.pop("anonymous", None)
        self.stage = stage
        self.artifact_mode = artifacts
        self._defined: set[str] = set()

    def unprefixed(self, key: str) -> str:
        return key.removeprefix(f"{self.stage}/") if self.stage else key

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        metrics = {self.unprefixed(k): v for k, v in metrics.items()}
        for key in metrics.keys() - self._defined:
            numeric = isinstance(metrics[key], int | float)
            if numeric and (summary := metric_summary(key)):
                # Same x-axis as Lightning's default ``*`` definition, which this one replaces.
                self.experiment.define_metric(
                    key, step_metric="trainer/global_step", step_sync=True, summary=summary
                )
            self._defined.add(key)
        super().log_metrics(metrics, step)

    @rank_zero_only
    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """One-off values (cluster statistics, evaluation scores): run summary, no chart."""
        self.experiment.summary.update({self.unprefixed(k): v for k, v in metrics.items()})


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
    job_type: str | None = None,
) -> list[Logger]:
    """Instantiate the configured loggers with the stage's names and directories filled in.

    W&B resumes the stage's run across attempts; file loggers write one folder per attempt
    (``logs/attempt-<n>``) so a resumed stage never overwrites the history before it.
    ``job_type`` names a run that summarises others (``pipeline``, ``sweep``) instead of a
    stage's run: its metric keys keep their prefixes.
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
                "job_type": job_type or stage,
                "id": wandb_run_id,
                "resume": "allow",
                "config": config,
            }
            if issubclass(cls, StageWandbLogger):
                extra["stage"] = None if job_type else stage
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


def _png_array(path: str) -> np.ndarray:
    """(H, W, 3) float RGB of a PNG, for TensorBoard."""
    from matplotlib.image import imread

    return imread(path)[..., :3]


def log_to_loggers(
    loggers: list[Logger],
    metrics: dict[str, float],
    *,
    step: int,
    images: dict[str, str] | None = None,
    tables: dict[str, tuple[list[str], list[list[Any]]]] | None = None,
    constant: bool = False,
) -> None:
    """Log results computed outside the training loop.

    ``constant`` metrics (one-off numbers such as cluster statistics or evaluation scores)
    go to a W&B run's summary rather than to charts; file loggers record them as usual.
    ``images`` (PNG paths) go to W&B and TensorBoard; ``tables`` (columns, rows) to W&B.
    """
    for logger in loggers:
        if constant and isinstance(logger, StageWandbLogger):
            logger.log_summary(metrics)
        elif metrics:
            logger.log_metrics(metrics, step=step)
        if isinstance(logger, WandbLogger):
            for key, path in (images or {}).items():
                logger.log_image(key=key, images=[path], step=step)
            for key, (columns, rows) in (tables or {}).items():
                logger.log_table(key=key, columns=columns, data=rows, step=step)
        elif isinstance(logger, TensorBoardLogger) and images:
            for key, path in images.items():
                logger.experiment.add_image(key, _png_array(path), step, dataformats="HWC")


def log_confusion_matrix(
    loggers: list[Logger],
    key: str,
    counts: np.ndarray,
    class_names: list[str],
    *,
    title: str,
    step: int,
) -> None:
    """W&B's interactive confusion matrix from (C, C) counts (rows: true class)."""
    import wandb

    counts = np.asarray(counts, dtype=np.int64)
    true, pred = np.nonzero(counts)
    reps = counts[true, pred]
    names = [class_names[i] if i < len(class_names) else str(i) for i in range(len(counts))]
    chart = wandb.plot.confusion_matrix(
        y_true=np.repeat(true, reps).tolist(),
        preds=np.repeat(pred, reps).tolist(),
        class_names=names,
        title=title,
    )
    for logger in loggers:
        if isinstance(logger, StageWandbLogger):
            logger.log_metrics({key: chart}, step=step)


@rank_zero_only
def log_evaluation(
    loggers: list[Logger],
    stage: str,
    metrics: dict[str, float],
    images: dict[str, str],
    *,
    step: int,
) -> None:
    """A stage's encoder evaluation: scores in the run summary (and as a one-row
    ``eval/scores`` table, which W&B stacks across the runs of a group), plots as images."""
    prefix = f"{stage}/eval/"
    columns = ["stage", *(k.removeprefix(prefix) for k in metrics)]
    log_to_loggers(
        loggers,
        metrics,
        step=step,
        images=images,
        tables={f"{prefix}scores": (columns, [[stage, *metrics.values()]])},
        constant=True,
    )


@rank_zero_only
def log_test_confusion(
    loggers: list[Logger],
    stage: str,
    module: Any,
    class_names: list[str],
    stage_dir: Path,
) -> None:
    """The stage's own classifier on the test split (``StageModule.test_confusion``, when
    the stage sets it): ``eval/test_confusion.png``, logged as an image, and W&B's
    interactive confusion matrix."""
    counts = getattr(module, "test_confusion", None)
    if counts is None:
        return
    from distillery.eval.plots import plot_confusion_counts

    accuracy = float(np.trace(counts) / max(counts.sum(), 1))
    title = f"{stage}, test split: {stage} model, accuracy {accuracy:.3f}"
    path = plot_confusion_counts(
        counts, class_names, stage_dir / "eval" / "test_confusion.png", title=title
    )
    step = module.trainer.global_step
    log_to_loggers(loggers, {}, step=step, images={f"{stage}/test/confusion": str(path)})
    log_confusion_matrix(
        loggers, f"{stage}/test/confusion_matrix", counts, class_names, title=title, step=step
    )


# -- artifacts ------------------------------------------------------------------------------
def artifact_name(run_id: str, stage: str, artifact: str) -> str:
    """``<pipeline run id>-<stage>-<artifact>``, in the characters W&B allows."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run_id}-{stage}-{artifact}")


def artifact_files(path: str | Path, artifact: str) -> Path:
    """What an artifact consists of: the folder named after it when its recorded file lies
    in one (``pseudo_labels/labels.npy`` with its ``meta.json`` and centroids), else the file."""
    path = Path(path)
    return path.parent if path.parent.name == artifact else path


def wandb_artifact(run_id: str, stage: str, artifact: str, path: str | Path, mode: str) -> Any:
    """The same W&B Artifact for the producing and every consuming run (same name, same
    files, so the same digest: W&B keeps one version and links both runs to it)."""
    import wandb

    root = artifact_files(path, artifact)
    entry = wandb.Artifact(
        artifact_name(run_id, stage, artifact),
        type=re.sub(r"[^A-Za-z0-9_.-]", "_", artifact),
        metadata={"pipeline_run": run_id, "stage": stage, "path": root.name},
    )
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        name = str(file.relative_to(root)) if root.is_dir() else file.name
        if mode == "reference":
            entry.add_reference(file.resolve().as_uri(), name=name)
        else:
            entry.add_file(str(file), name=name)
    return entry


@rank_zero_only
def log_stage_artifacts(loggers: list[Logger], manifest: RunManifest, stage: str) -> None:
    """Log a stage's recorded outputs as W&B Artifacts, each of the type of its name
    (``encoder``, ``pseudo_labels``, ``synthetic_set``, ...)."""
    for logger in loggers:
        if not isinstance(logger, StageWandbLogger):
            continue
        for artifact, path in manifest.stages[stage].artifacts.items():
            if artifact in UNLOGGED_ARTIFACTS or not Path(path).exists():
                continue
            entry = wandb_artifact(manifest.run_id, stage, artifact, path, logger.artifact_mode)
            logger.experiment.log_artifact(entry)


@rank_zero_only
def use_stage_artifacts(
    loggers: list[Logger], manifest: RunManifest, inputs: Mapping[str, str]
) -> None:
    """Declare the earlier stages' artifacts a stage reads (its ``inputs``,
    ``{dest: "<producer>.<artifact>"}``) as the inputs of its W&B run."""
    for logger in loggers:
        if not isinstance(logger, StageWandbLogger):
            continue
        run = logger.experiment
        for source in sorted(set(inputs.values())):
            producer, _, artifact = source.partition(".")
            path = manifest.stages[producer].artifacts[artifact]
            entry = wandb_artifact(manifest.run_id, producer, artifact, path, logger.artifact_mode)
            if run.settings._offline:
                # Offline ``use_artifact`` refuses to run; this is the record it sends for a
                # draft artifact online (log it, then mark it used): on ``wandb sync`` the
                # identical digest resolves to the producer's version, linking both runs.
                run._log_artifact(entry, is_user_created=True, use_after_commit=True)
            else:
                run.use_artifact(entry)


# -- pipeline- and sweep-level runs -------------------------------------------------------------
def summary_loggers(
    logger_cfg: dict[str, Any], *, run_dir: Path, group: str, job_type: str, config: dict[str, Any]
) -> list[StageWandbLogger]:
    """The configured W&B logger for a run of ``job_type`` in ``group`` that summarises
    others (no stage prefix); none without a W&B logger. Its run id is stable per group,
    so a resumed pipeline updates the same run."""
    wandb_cfg = {
        k: v
        for k, v in logger_cfg.items()
        if v and issubclass(get_class(v["_target_"]), StageWandbLogger)
    }
    return build_loggers(  # type: ignore[return-value]
        wandb_cfg,
        stage=job_type,
        stage_dir=run_dir,
        run_dir=run_dir,
        run_id=group,
        wandb_run_id=hashlib.sha1(f"{group}/{job_type}".encode()).hexdigest()[:8],
        attempt=0,
        config=config,
        job_type=job_type,
    )


def log_pipeline_summary(cfg: DictConfig, manifest: RunManifest) -> None:
    """A ``pipeline`` run in the group: the results table, and every stage's final metrics
    (``<stage>/<split>/<name>``) and wall time in its summary, so pipelines compare side by
    side."""
    run_dir = manifest.path.parent
    loggers = summary_loggers(
        OmegaConf.to_container(cfg.logger, resolve=True),
        run_dir=run_dir,
        group=manifest.run_id,
        job_type="pipeline",
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    if not loggers:
        return
    metrics = {k: v for record in manifest.stages.values() for k, v in record.metrics.items()}
    metrics |= {
        f"{name}/wall_time_s": record.wall_time_s
        for name, record in manifest.stages.items()
        if record.wall_time_s is not None
    }
    try:
        log_to_loggers(
            loggers, metrics, step=0, tables={"results": results_table(manifest)}, constant=True
        )
        offline = loggers[0].experiment.settings._offline
    finally:
        finish_loggers(loggers)
    if offline:
        log.info(
            "W&B runs are offline in %s; upload them with: wandb sync %s",
            run_dir / "wandb",
            run_dir / "wandb" / "offline-run-*",
        )


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
