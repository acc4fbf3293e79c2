"""The pipeline runner: stages in order, each one skipped, resumed or run from scratch."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig, OmegaConf

from distillery import artifacts
from distillery.artifact_kinds import Artifact
from distillery.config.validation import (
    changed_keys,
    stage_data,
    stage_trainer,
    with_stage_kind_settings,
)
from distillery.data.datamodule import AudioDataModule
from distillery.eval.report import evaluate_encoder
from distillery.models.safe_load import trust_config_targets
from distillery.pipeline import launch
from distillery.pipeline.batchnorm import BatchNormStatsSync, GlobalBatchNormSync
from distillery.pipeline.checkpoints import (
    CHECKPOINT_DIR,
    AtomicCheckpointIO,
    BestCheckpoint,
    CarriedStageState,
    epoch_checkpointing,
    latest_checkpoint,
)
from distillery.pipeline.collectives import RankZeroWait
from distillery.pipeline.contract import (
    stage_contract,
    stage_produces,
    validate,
)
from distillery.pipeline.faults import (
    BatchSeed,
    FiniteLossGuard,
    SignalCheckpoint,
    StopRequested,
    first_rank_error,
    keep_lightning_off_signals,
    stop_if_requested,
    stop_on_signals,
)
from distillery.pipeline.manifest import (
    RunDirError,
    RunManifest,
    StageRecord,
    code_version,
    now_iso,
    relative_paths,
    source_hashes,
)
from distillery.pipeline.progress import EpochSummary, PipelineProgress, StageProgressBar
from distillery.pipeline.report import write_results
from distillery.pipeline.stage_cache import StageCache, started_alone
from distillery.pipeline.tracking import (
    build_loggers,
    finish_loggers,
    log_evaluation,
    log_pipeline_summary,
    log_stage_artifacts,
    log_test_confusion,
    use_stage_artifacts,
)

log = logging.getLogger(__name__)

#: Trainer settings that change how a stage is shown, not what it computes.
UNHASHED_TRAINER_KEYS = ("enable_progress_bar", "log_every_n_steps", "enable_model_summary")


def stage_settings(cfg: DictConfig, name: str) -> dict[str, Any]:
    """Everything that determines a stage's result: its config, and the source of the
    code outside distillery that the config names (a user's stage, loss, encoder, data
    source), so that editing that code re-runs the stage."""
    trainer = {k: v for k, v in stage_trainer(cfg, name).items() if k not in UNHASHED_TRAINER_KEYS}
    stage = OmegaConf.to_container(cfg.pipeline.stages[name], resolve=True)
    data = OmegaConf.to_container(stage_data(cfg, name), resolve=True)
    targets = [stage_contract(cfg, name).name, data["source"], stage, trainer]
    return json.loads(
        json.dumps(
            {
                "stage": stage,
                "data": data,
                "trainer": trainer,
                "seed": cfg.seed,
                "code": source_hashes(targets),
            },
            default=str,
        )
    )


def stage_config_hash(settings: dict[str, Any], upstream_hash: str) -> str:
    """Hash of a stage's settings, chained to the stages before it."""
    text = json.dumps(settings | {"upstream": upstream_hash}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StagePlan:
    name: str
    kind: str
    config_hash: str
    settings: dict[str, Any]
    action: str  # skip | resume | fresh
    reason: str


class Runner:
    """Runs ``cfg.pipeline`` in ``cfg.run_dir``.

    Every rank runs the same plan: it is derived from ``pipeline.json`` alone, which only
    rank 0 writes, and all ranks meet at a barrier after each stage's artifacts are written.
    """

    def __init__(self, cfg: DictConfig) -> None:
        cfg = with_stage_kind_settings(cfg)  # e.g. a protocol's finetune budget
        validate(cfg)
        trust_config_targets(cfg)  # artifacts may build what the user's config names
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.is_rank_zero = rank_zero_only.rank == 0
        self.manifest = RunManifest.load_or_create(self.run_dir, cfg.pipeline.name)
        # Rank 0 of a run whose other ranks (if any) Lightning starts: they start after the
        # cache lookups and read the reused stages from pipeline.json.
        self.cache = StageCache(cfg.stage_cache) if cfg.stage_cache and started_alone() else None
        if cfg.stage_cache and self.cache is None and self.is_rank_zero:
            log.info("stage cache %s: not used by ranks started together", cfg.stage_cache)

    # -- planning -------------------------------------------------------------------------
    def plan(self) -> list[StagePlan]:
        """What each stage does now, from ``pipeline.json``: skip, resume or run afresh.

        A stage whose settings changed is re-run with every stage after it (its previous
        outputs move to ``superseded/``). Results of another code version are not reused
        silently: ``on_code_change`` says whether to stop (default), re-run or reuse them.
        """
        if self.manifest.stages and self.manifest.pipeline != self.cfg.pipeline.name:
            raise RunDirError(
                f"run_dir {self.run_dir} holds pipeline {self.manifest.pipeline!r} "
                f"(run {self.manifest.run_id}), not {self.cfg.pipeline.name!r}: choose another run_dir"
            )
        plans, upstream, rerun_upstream, stale = [], "", False, []
        for name in self.cfg.pipeline.order:
            kind = self.cfg.pipeline.stages[name].kind
            settings = stage_settings(self.cfg, name)
            config_hash = upstream = stage_config_hash(settings, upstream)
            record = self.manifest.stages.get(name)
            code_changed = (
                record is not None and record.config_hash and record.code_version != code_version()
            )
            if record is None or not record.config_hash:
                action, reason = "fresh", "not run before"
            elif record.config_hash != config_hash:
                keys = changed_keys(record.config, settings)
                code = [k.removeprefix("code.") for k in keys if k.startswith("code.")]
                config = [k for k in keys if not k.startswith("code.")]
                action, reason = "fresh", _change_reason(config, code)
            elif rerun_upstream:
                action, reason = "fresh", "an earlier stage is re-run"
            elif code_changed and self.cfg.on_code_change == "rerun":
                action, reason = (
                    "fresh",
                    f"code changed ({record.code_version} -> {code_version()})",
                )
            elif record.status == "done" and all(
                record.artifact_path(a).exists() for a in record.artifacts
            ):
                action, reason = "skip", "done with the same config"
            elif (last := latest_checkpoint(self.run_dir / name)) is not None:
                was = (
                    f"interrupted by {record.error}"
                    if record.status == "interrupted"
                    else record.status
                )
                action, reason = "resume", f"{was}; resuming from {last}"
            else:
                action, reason = "fresh", f"{record.status} without a checkpoint"
            if code_changed and action in ("skip", "resume"):
                stale.append(f"{name} ({record.code_version or 'unknown version'})")
            rerun_upstream |= action != "skip"
            plans.append(StagePlan(name, kind, config_hash, settings, action, reason))
        if stale and self.cfg.on_code_change == "error":
            raise RunDirError(
                f"run_dir {self.run_dir} holds stages made by other code: {', '.join(stale)}; "
                f"this is {code_version()}. Set on_code_change=rerun to recompute them, "
                "on_code_change=reuse to keep them, or choose another run_dir"
            )
        return plans

    # -- execution ------------------------------------------------------------------------
    def run(self) -> dict[str, StageRecord]:
        with stop_on_signals():
            return self._run()

    def _run(self) -> dict[str, StageRecord]:
        plans = self.plan()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_rank_zero and (stale := artifacts.remove_stale_temp_files(self.run_dir)):
            log.info("removed %d temporary file(s) left by a killed run", len(stale))
        log.info("pipeline %s in %s", self.cfg.pipeline.name, self.run_dir)
        for p in plans:
            log.info("  %-16s %-6s %s", p.name, p.action, p.reason)
        progress = PipelineProgress([p.name for p in plans])
        reusable = self.cache is not None  # the leading stages: none computed before them
        for plan in plans:
            if plan.action == "skip":
                continue
            progress.stage_started(plan.name, plan.kind, plan.action)
            reusable &= plan.action == "fresh"
            if self.cache is None:
                self._run_stage(plan)
            else:
                entry = self.cache.entry(plan.name, plan.config_hash)
                # Reusable: wait while another run computes it, then reuse it.
                with self.cache.computing(entry) if reusable else contextlib.nullcontext():
                    if not (reusable and self._reuse(plan, entry)):
                        reusable = False
                        self._run_stage(plan)
                        self.cache.store(
                            entry, self.run_dir, plan.name, self.manifest.stages[plan.name]
                        )
            progress.stage_finished(plan.name, self.manifest.stages[plan.name].wall_time_s)
        if self.is_rank_zero:
            table = write_results(self.run_dir, self.manifest)
            log.info("results (also in %s):\n%s", self.run_dir / "results.md", table)
            log_pipeline_summary(self.cfg, self.manifest)
        return self.manifest.stages

    def _reuse(self, plan: StagePlan, entry: Path) -> bool:
        """Take a stage from the stage cache into the run dir, if ``entry`` holds it."""
        start = time.perf_counter()
        previous = self.manifest.stages.get(plan.name)
        if not (entry / "record.json").exists():
            return False
        if previous is not None and previous.config_hash and (self.run_dir / plan.name).exists():
            self._supersede(plan.name, previous)
        record = self.cache.restore(entry, self.run_dir, plan.name)
        record.wall_time_s = round(time.perf_counter() - start, 2)
        self.manifest.stages[plan.name] = record
        self._save_manifest()
        log.info(
            "stage %s reused from cache %s (computed in %s)",
            plan.name, entry, record.reused_from["run_dir"],
        )  # fmt: skip
        return True

    def _save_manifest(self) -> None:
        if self.is_rank_zero:
            self.manifest.save()

    def _record_failure(
        self,
        record: StageRecord,
        err: BaseException,
        stage_state: CarriedStageState,
        stage_dir: Path,
    ) -> None:
        error = first_rank_error(stage_dir, record.attempts, f"{type(err).__name__}: {err}")
        record.status, record.error = "failed", error
        record.wall_time_s = round(stage_state.elapsed_s(), 2)
        self._save_manifest()

    def _supersede(self, name: str, record: StageRecord) -> None:
        """Move a stage's previous outputs to ``superseded/<stage>-<hash>`` instead of deleting them."""
        target = self.run_dir / "superseded" / f"{name}-{record.config_hash}"
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.run_dir / name).rename(target)
        log.info("stage %s: previous outputs moved to %s", name, target)

    def _resolve_inputs(self, name: str) -> tuple[dict[str, Any], dict[str, Artifact]]:
        """Module and data keyword arguments: earlier stages' artifacts wired by ``inputs``,
        and artifact files named in the module config, each loaded into the kind its
        argument is annotated with (an argument without a kind gets the file's path)."""
        stage_cfg = self.cfg.pipeline.stages[name]
        contract = stage_contract(self.cfg, name)
        module_kwargs: dict[str, Any] = {}
        data_kwargs: dict[str, Artifact] = {}
        for dest, source in stage_cfg.inputs.items():
            producer, _, artifact = source.partition(".")
            path = self.manifest.stages[producer].artifact_path(artifact)
            if path is None:
                raise RuntimeError(
                    f"pipeline.stages.{name}.inputs.{dest}: stage {producer!r} finished "
                    f"without writing {artifact!r} (see {self.manifest.path})"
                )
            target, _, arg = dest.partition(".")
            if target == "module" and not contract.input_kinds(arg):
                module_kwargs[arg] = str(path)  # an argument that takes a file (e.g. weights)
                continue
            kind = stage_produces(self.cfg, producer)[artifact]
            (module_kwargs if target == "module" else data_kwargs)[arg] = kind.load(path)
        for arg, kinds in contract.artifact_args().items():
            value = stage_cfg.module.get(arg)
            if isinstance(value, str) and arg not in module_kwargs:
                module_kwargs[arg] = kinds[0].load(value)
        return module_kwargs, data_kwargs

    def _run_stage(self, plan: StagePlan) -> None:
        name, cfg = plan.name, self.cfg
        stage_cfg = cfg.pipeline.stages[name]
        stage_dir = self.run_dir / name
        record = self.manifest.stage(name, plan.kind)
        if plan.action == "fresh":  # a fresh stage starts empty; earlier results are kept aside
            # Only results of an earlier run: under DDP another rank may already have
            # created this run's (empty) stage dir.
            if self.is_rank_zero and record.config_hash and stage_dir.exists():
                self._supersede(name, record)
            record = self.manifest.stages[name] = StageRecord(kind=plan.kind)
        record.wandb_run_id = record.wandb_run_id or uuid.uuid4().hex[:8]
        record.status, record.config_hash, record.started_at = (
            "running",
            plan.config_hash,
            now_iso(),
        )
        record.code_version, record.config = code_version(), plan.settings
        record.error, record.attempts = None, record.attempts + 1
        self._save_manifest()
        stage_dir.mkdir(parents=True, exist_ok=True)

        # Carried in the stage's checkpoints: a resumed stage's wall time includes its
        # earlier attempts, its metrics those of a training that had already finished.
        stage_state = CarriedStageState()
        try:  # bad data or a bad artifact fails the stage in pipeline.json too
            pl.seed_everything(cfg.seed, workers=True, verbose=False)
            module_inputs, data_inputs = self._resolve_inputs(name)
            audio = AudioDataModule(stage_data(cfg, name), **data_inputs)
            audio.prepare_data()
            audio.setup("fit")
            module = self._build_module(name, audio, module_inputs)
            # The stage's own data (default: the shared audio, which evaluation always uses).
            configure_data = getattr(module, "configure_data", None)
            datamodule = configure_data(audio) if configure_data else audio
            loggers = build_loggers(
                OmegaConf.to_container(cfg.logger, resolve=True),
                stage=name,
                stage_dir=stage_dir,
                run_dir=self.run_dir,
                run_id=self.manifest.run_id,
                wandb_run_id=record.wandb_run_id,
                attempt=record.attempts,
                config=OmegaConf.to_container(cfg, resolve=True) | {"stage": name},
            )
            use_stage_artifacts(loggers, self.manifest, stage_cfg.inputs)
            trainer = self._build_trainer(name, stage_dir, loggers, module, stage_state)
        except BaseException as err:
            self._record_failure(record, err, stage_state, stage_dir)
            raise
        log.info("stage %s (%s): %s -> %s", name, plan.kind, plan.action, stage_dir)
        try:
            ckpt = str(latest_checkpoint(stage_dir)) if plan.action == "resume" else None
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
            record.optimizer_steps = _optimizer_steps_per_rank(
                name, trainer, required=getattr(module, "takes_optimizer_steps", True)
            )
            _finish_artifact_callbacks(trainer, module)
            stop_if_requested(trainer.strategy, "after training")  # e.g. during k-means
            metrics = stage_state.carried | _floats(trainer.callback_metrics)
            metrics[f"{name}/data/skipped_files"] = float(len(audio.skipped_files))
            if audio.cfg.train_items == "labeled":  # the labels it learns and selects with
                metrics |= _label_counts(name, audio)
            if (selected := self._load_selected(name, trainer, module)) is not None:
                record.selected = selected  # val metrics below: those of the selected weights
                for result in trainer.validate(module, datamodule=datamodule, verbose=False):
                    metrics.update(_floats(result))
            if stage_cfg.evaluate and _overrides(module, "test_step"):
                for result in trainer.test(module, datamodule=datamodule, verbose=False):
                    metrics.update(_floats(result))
            for callback in trainer.callbacks:  # e.g. the PseudoLabeler's cluster statistics
                if isinstance(extra := getattr(callback, "metrics", None), dict):
                    metrics |= extra
            if self.is_rank_zero:
                record.artifacts = self._export(module, trainer, stage_dir)
                log_stage_artifacts(trainer.loggers, self.manifest, name)
                log_test_confusion(trainer.loggers, name, module, audio.class_names, stage_dir)
                encoder = _encoder_for_eval(module)
                if stage_cfg.evaluate and encoder is not None:
                    metrics |= self._evaluate(name, encoder, audio, trainer, stage_dir)
        except StopRequested as stop:
            record.status, record.error = "interrupted", str(stop)
            record.wall_time_s = round(stage_state.elapsed_s(), 2)
            self._save_manifest()
            raise StageInterrupted(
                f"stage {name!r} stopped by {stop}; checkpoint {latest_checkpoint(stage_dir)}; "
                "run the same command to resume",
                signum=stop.signum,
            ) from None
        except BaseException as err:
            self._record_failure(record, err, stage_state, stage_dir)
            raise
        finally:
            finish_loggers(loggers)
        record.metrics = metrics
        record.status, record.finished_at = "done", now_iso()
        record.wall_time_s = round(stage_state.elapsed_s(), 2)
        self._save_manifest()
        RankZeroWait(trainer.strategy, cfg.rank_zero_wait_min).barrier()  # rank 0 evaluated
        if not self.is_rank_zero:  # pick up the artifact paths rank 0 recorded
            self.manifest = RunManifest.load_or_create(self.run_dir, cfg.pipeline.name)
        log.info(
            "stage %s done in %.1f s; artifacts: %s", name, record.wall_time_s, record.artifacts
        )

    def _load_selected(
        self, name: str, trainer: pl.Trainer, module: pl.LightningModule
    ) -> dict[str, Any] | None:
        """With ``selection.monitor``: load the best-validation checkpoint's weights into
        ``module`` (what the stage is tested with and hands on) and describe it."""
        best = _best_checkpoint(trainer)
        if best is None:
            return None
        if not best.best_model_path:
            raise RuntimeError(
                f"stage {name!r}: no validation value of {best.monitor!r} was logged, so no "
                f"checkpoint could be selected (pipeline.stages.{name}.selection)"
            )
        checkpoint = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(checkpoint["state_dict"])
        return {
            "checkpoint": str(Path(best.best_model_path).resolve().relative_to(self.run_dir)),
            "epoch": int(checkpoint["epoch"]),
            "step": int(checkpoint["global_step"]),
            "monitor": best.monitor,
            "mode": best.mode,
            "value": round(float(best.best_model_score), 6),
        }

    def _build_module(
        self, name: str, data: AudioDataModule, inputs: dict[str, Artifact]
    ) -> pl.LightningModule:
        stage_cfg = self.cfg.pipeline.stages[name]
        module_cfg = OmegaConf.to_container(stage_cfg.module, resolve=True)
        contract = stage_contract(self.cfg, name)
        module_cfg.pop("_target_", None)
        injected = contract.injected(data) | (
            {"stage_name": name} if "stage_name" in contract.params else {}
        )
        return contract.cls(**(module_cfg | inputs | injected))  # artifacts wired by `inputs` win

    def _build_trainer(
        self,
        name: str,
        stage_dir: Path,
        loggers: list,
        module: pl.LightningModule,
        stage_state: CarriedStageState,
    ) -> pl.Trainer:
        stage_cfg = self.cfg.pipeline.stages[name]
        trainer_args = {  # e.g. `strategy: {_target_: DDPStrategy, timeout: ...}`
            k: instantiate(v) if isinstance(v, dict) and "_target_" in v else v
            for k, v in stage_trainer(self.cfg, name).items()
        }
        callbacks: list[pl.Callback] = [
            epoch_checkpointing(stage_dir),
            stage_state,
            FiniteLossGuard(name),
            SignalCheckpoint(stage_dir / CHECKPOINT_DIR),
            BatchSeed(self.cfg.seed),
        ]
        # The BatchNorm policy (pipeline/batchnorm.py): statistics of the global batch, or
        # per-rank statistics averaged before use (before the stage's callbacks run).
        sync_batchnorm = trainer_args.pop("sync_batchnorm", False)
        layer_sync = [GlobalBatchNormSync()] if sync_batchnorm else []
        if not sync_batchnorm:
            callbacks.append(BatchNormStatsSync())
        selection = stage_cfg.selection
        if selection.monitor:
            monitor = f"{name}/{selection.monitor}"
            callbacks.append(BestCheckpoint(stage_dir, monitor, selection.mode))
            if selection.patience:
                callbacks.append(
                    EarlyStopping(monitor, patience=selection.patience, mode=selection.mode)
                )
        for callback_cfg in OmegaConf.to_container(stage_cfg.callbacks, resolve=True).values():
            if callback_cfg:
                callbacks.append(_instantiate_callback(callback_cfg, stage_dir))
        if trainer_args.get("enable_progress_bar", True):
            callbacks.append(StageProgressBar(name, leave=True))
        else:  # e.g. SLURM logs: one line per epoch instead of a bar
            callbacks.append(EpochSummary(name))
        trainer = pl.Trainer(
            **trainer_args,
            default_root_dir=str(stage_dir),
            callbacks=callbacks,
            logger=loggers or False,
            plugins=[AtomicCheckpointIO(), *launch.cluster_plugins(), *layer_sync],
            use_distributed_sampler=False,  # the data module shards itself, without padding eval sets
        )
        keep_lightning_off_signals(trainer)
        return trainer

    def _evaluate(
        self,
        name: str,
        encoder: torch.nn.Module,
        datamodule: AudioDataModule,
        trainer: pl.Trainer,
        stage_dir: Path,
    ) -> dict[str, float]:
        """The shared encoder evaluation (kNN, linear probe, clustering, plots) on rank 0."""
        table = datamodule.table
        train = table.indices("train")
        labeled = train[table.visible_labels[train] >= 0]
        eval_cfg = self.cfg.eval
        scores, plots = evaluate_encoder(
            encoder,
            datamodule.dataloader("train", indices=labeled),
            datamodule.dataloader("test"),
            datamodule.featurize,
            class_names=datamodule.class_names,
            out_dir=stage_dir / "eval",
            knn_k=tuple(eval_cfg.knn_k),
            probe_epochs=eval_cfg.probe_epochs,
            plots=eval_cfg.plots,
            device=trainer.strategy.root_device,
            seed=self.cfg.seed,
            name=name,
            multi_hot=datamodule.multi_hot if datamodule.multi_label else None,
        )
        metrics = {f"{name}/eval/{k}": float(v) for k, v in scores.items()}
        images = {f"{name}/eval/{k}": v for k, v in plots.items()}
        log_evaluation(trainer.loggers, name, metrics, images, step=trainer.global_step)
        return metrics

    def _export(
        self, module: pl.LightningModule, trainer: pl.Trainer, stage_dir: Path
    ) -> dict[str, str]:
        """Save what the stage returns; record every artifact's path relative to the run dir."""
        best = _best_checkpoint(trainer)  # the selected weights, when the stage selects
        checkpoint = Path(best.best_model_path) if best else latest_checkpoint(stage_dir)
        # A stage that takes no optimizer step by design has no checkpoint (never "None").
        written = {} if checkpoint is None else {"checkpoint": checkpoint}
        export = getattr(module, "export_artifacts", None)
        for name, artifact in (export() if export else {}).items():
            suffix = Path(type(artifact).filename).suffix
            written[name] = artifact.save(stage_dir / f"{name}{suffix}")
        for callback in trainer.callbacks:
            written |= {k: Path(v) for k, v in getattr(callback, "artifacts", {}).items()}
        recorded = {k: str(v) for k, v in written.items()}
        artifacts.write_json(stage_dir / "artifacts.json", relative_paths(recorded, self.run_dir))
        return recorded  # absolute here; pipeline.json stores them relative (RunManifest.save)


class StageInterrupted(RuntimeError):
    """A stage stopped on request (a stop signal) after saving a checkpoint to resume from."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _finish_artifact_callbacks(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    """Run ``on_train_end`` of artifact-producing callbacks that missed it.

    Lightning skips the train-end hooks when the checkpoint it resumes from had already
    finished training (the process was killed after the last epoch's checkpoint but before
    the stage's artifacts were written); the artifacts are made from the restored model.
    """
    for callback in trainer.callbacks:
        if getattr(callback, "produces", None) and not getattr(callback, "artifacts", True):
            callback.on_train_end(trainer, module)


def _best_checkpoint(trainer: pl.Trainer) -> BestCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, BestCheckpoint)), None)


def _label_counts(name: str, audio: AudioDataModule) -> dict[str, float]:
    """How many labelled clips a stage trains on and validates with (the few-label protocol)."""
    table = audio.table
    train, val = table.indices("train"), table.indices("val")
    return {
        f"{name}/data/labeled_train": float((table.visible_labels[train] >= 0).sum()),
        f"{name}/data/labeled_val": float((table.visible_labels[val] >= 0).sum()),
    }


def _encoder_for_eval(module: pl.LightningModule) -> torch.nn.Module | None:
    """The stage's encoder for the shared evaluation; a stage without one is not evaluated."""
    encoder_for_eval = getattr(module, "encoder_for_eval", None)
    return encoder_for_eval() if callable(encoder_for_eval) else None


def _change_reason(config_keys: list[str], code_targets: list[str]) -> str:
    parts = []
    if config_keys:
        parts.append(f"config changed ({', '.join(config_keys[:8])})")
    if code_targets:
        parts.append(f"source changed ({', '.join(code_targets[:8])})")
    return "; ".join(parts) or "an earlier stage changed"


def _instantiate_callback(cfg: dict[str, Any], stage_dir: Path) -> pl.Callback:
    cls = get_class(cfg["_target_"])
    extra = {"out_dir": str(stage_dir)} if "out_dir" in inspect.signature(cls).parameters else {}
    return instantiate(cfg, **extra)


class NoTrainingError(RuntimeError):
    """A stage took no optimizer step on some rank: its result would be untrained."""


def _optimizer_steps_per_rank(name: str, trainer: pl.Trainer, required: bool) -> list[int]:
    """Every rank's optimizer steps (``global_step``); unless the stage takes none by design
    (not ``required``), raise :class:`NoTrainingError` if any rank took none, naming what
    decides the batch count: split size, batch size, world size."""
    steps = trainer.strategy.all_gather(torch.tensor(trainer.global_step))
    per_rank = [int(s) for s in steps.reshape(-1)]
    if min(per_rank) > 0 or not required:
        return per_rank
    loader = trainer.train_dataloader  # what fit iterated
    dataset = getattr(loader, "dataset", None)
    items = len(dataset) if dataset is not None else "unknown"
    raise NoTrainingError(
        f"stage {name!r} took no optimizer step on some rank (steps per rank: {per_rank}): "
        f"train split of {items} items, batch size {getattr(loader, 'batch_size', 'unknown')}, "
        f"world size {trainer.world_size}, max_epochs {trainer.max_epochs}, "
        f"accumulate_grad_batches {trainer.accumulate_grad_batches}. Each rank needs at least "
        "one batch per optimizer step: lower data.batch_size, use fewer devices or train longer"
    )


def _overrides(module: pl.LightningModule, hook: str) -> bool:
    return getattr(type(module), hook) is not getattr(pl.LightningModule, hook)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, int | float):
            out[key] = round(float(value), 6)
    return out
