"""Training overhead: the ``finetune`` stage through Lightning vs a plain PyTorch loop.

The Lightning side is built by the pipeline's own :class:`~distillery.pipeline.runner.Runner`
code (its ``_build_module`` and ``_build_trainer``): ``FinetuneStage`` on an
``AudioDataModule`` over the built-in synthetic set (preloaded, log-mel in
``on_after_batch_transfer``), epoch checkpointing through ``AtomicCheckpointIO``, a CSV
logger, no progress bar. The plain loop uses the same module class and initial weights,
the same data module's train loader and ``featurize``, the same optimizer (from the
module's ``configure_optimizers``) and does forward, cross-entropy, backward and step.

Both run ``epochs`` epochs; the first ``WARMUP_EPOCHS`` are excluded, so one-time
start-up (Trainer set-up, first-iteration allocations) is not measured. Validation is
off on both sides (``limit_val_batches=0``): this measures training throughput. The
Lightning side additionally updates the stage's accuracy metric, logs the loss every step
(the CSV logger writes every ``log_every_n_steps``) and writes a checkpoint every epoch,
as a pipeline run does.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distillery.bench.common import EXPERIMENT, compose_config
from distillery.bench.timing import Comparison, interleaved, median
from distillery.config.validation import stage_data
from distillery.data.datamodule import AudioDataModule
from distillery.pipeline.checkpoints import CarriedStageState
from distillery.pipeline.runner import Runner
from distillery.pipeline.tracking import build_loggers

STAGE = "finetune"
WARMUP_EPOCHS = 1
GOAL = 0.9  # Lightning throughput / plain-loop throughput


@dataclass(frozen=True)
class Sizes:
    epochs: int  # including the warm-up epoch
    repeats: int
    overrides: tuple[str, ...]


#: Full run: the default synthetic set (800 clips) with every train label visible, so the
#: finetune stage trains on 560 clips = 8 batches of 64 per epoch.
FULL = Sizes(epochs=5, repeats=4, overrides=("data.label_fraction=1.0",))
QUICK = Sizes(
    epochs=3,
    repeats=1,
    overrides=(
        "data.label_fraction=1.0",
        "data.synthetic.num_classes=4",
        "data.synthetic.clips_per_class=12",
        "data.batch_size=8",
        "pseudo_label_k=8",  # the whole pipeline is validated: k at most its ~33 clips
    ),
)


def stage_config(run_dir: Path, cache_dir: Path, sizes: Sizes, extra: tuple[str, ...] = ()) -> Any:
    """The composed ``unfused`` config for the finetune stage, trimmed to ``sizes``."""
    stage = f"pipeline.stages.{STAGE}"
    return compose_config(
        [
            EXPERIMENT,
            "logger=csv",
            f"run_dir={run_dir}",
            f"data.cache_dir={cache_dir}",
            "trainer.enable_progress_bar=false",
            f"{stage}.trainer.max_epochs={sizes.epochs}",
            f"++{stage}.trainer.limit_val_batches=0",
            *sizes.overrides,
            *extra,
        ]
    )


def build_datamodule(cfg: Any, stage: str = STAGE) -> AudioDataModule:
    """The stage's data module, set up as the runner does (synthetic set generated if needed)."""
    datamodule = AudioDataModule(stage_data(cfg, stage))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


class EpochClock(pl.Callback):
    """Wall-clock stamps at every train-epoch start and at train end, and samples per epoch."""

    def __init__(self) -> None:
        self.epoch_starts: list[float] = []
        self.samples: list[int] = []
        self.end = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_starts.append(time.perf_counter())
        self.samples.append(0)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.samples[-1] += int(batch["label"].shape[0])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = time.perf_counter()

    def epochs(self, warmup: int) -> list[tuple[int, float]]:
        """(samples, seconds) of each epoch after ``warmup``, each with its epoch-end work."""
        stamps = [*self.epoch_starts, self.end]
        return [
            (self.samples[e], stamps[e + 1] - stamps[e]) for e in range(warmup, len(self.samples))
        ]


def lightning_fit(cfg: Any, datamodule: AudioDataModule, seed: int) -> list[tuple[int, float]]:
    """Fit the stage through the runner's Trainer; (samples, seconds) of each timed epoch."""
    runner = Runner(cfg)
    stage_dir = Path(cfg.run_dir) / STAGE
    pl.seed_everything(seed, workers=True, verbose=False)
    module = runner._build_module(STAGE, datamodule, {})
    loggers = build_loggers(
        OmegaConf.to_container(cfg.logger, resolve=True),
        stage=STAGE,
        stage_dir=stage_dir,
        run_dir=Path(cfg.run_dir),
        run_id="bench",
        wandb_run_id="bench",
        attempt=1,
        config={},
    )
    stage_state = CarriedStageState()
    trainer = runner._build_trainer(STAGE, stage_dir, loggers, module, stage_state)
    clock = EpochClock()
    trainer.callbacks.append(clock)  # after the runner's callbacks: stamps include their work
    trainer.fit(module, datamodule=datamodule)
    return clock.epochs(WARMUP_EPOCHS)


@dataclass
class LoopTimes:
    """Steady-state totals of :func:`plain_loop`: where the step time went."""

    epochs: list[tuple[int, float]] = field(default_factory=list)  # (samples, seconds) each
    samples: int = 0
    steps: int = 0
    seconds: float = 0.0  # the whole timed epochs
    data_wait: float = 0.0  # blocked on the loader's next batch
    featurize: float = 0.0  # log-mel
    compute: float = 0.0  # forward, loss, backward, optimizer step


def plain_loop(
    module: Any,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[dict[str, Any]],
    featurize: Callable[[torch.Tensor], torch.Tensor] | None,
    epochs: int,
) -> LoopTimes:
    """Train ``module`` (a ``FinetuneStage``) without Lightning; times epochs after the warm-up.

    ``featurize`` maps a batch's ``audio`` to encoder input; ``None`` takes precomputed
    ``features`` from the batch instead.
    """
    module.train()
    times, start = LoopTimes(), time.perf_counter()
    for epoch in range(epochs):
        if epoch == WARMUP_EPOCHS:
            times = LoopTimes()
            start = time.perf_counter()
        epoch_start, epoch_samples = time.perf_counter(), times.samples
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            times.data_wait += t1 - t0
            if batch is None:
                break
            features = batch["features"] if featurize is None else featurize(batch["audio"])
            t2 = time.perf_counter()
            logits = module(features)
            loss = F.cross_entropy(logits, batch["label"], label_smoothing=module.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            t3 = time.perf_counter()
            times.featurize += t2 - t1
            times.compute += t3 - t2
            times.samples += int(batch["label"].shape[0])
            times.steps += 1
        times.epochs.append((times.samples - epoch_samples, time.perf_counter() - epoch_start))
    times.seconds = time.perf_counter() - start
    return times


def fresh_module(
    cfg: Any, datamodule: AudioDataModule, seed: int
) -> tuple[Any, torch.optim.Optimizer]:
    """The stage module and its optimizer, built by the runner with seeded initial weights."""
    pl.seed_everything(seed, workers=True, verbose=False)
    module = Runner(cfg)._build_module(STAGE, datamodule, {})
    return module, module.configure_optimizers()


def plain_fit(
    cfg: Any, datamodule: AudioDataModule, seed: int, epochs: int
) -> list[tuple[int, float]]:
    """The same training steps without Lightning; (samples, seconds) of each timed epoch."""
    module, optimizer = fresh_module(cfg, datamodule, seed)
    times = plain_loop(
        module, optimizer, datamodule.train_dataloader(), datamodule.featurize, epochs
    )
    return times.epochs


def epoch_throughput(epochs: list[tuple[int, float]]) -> list[float]:
    """Samples/s of each (samples, seconds) epoch."""
    return [samples / seconds for samples, seconds in epochs]


def run(quick: bool, cache_dir: Path, seed: int = 0) -> tuple[dict[str, Any], list[Comparison]]:
    """Interleaved Lightning and plain-loop fits; median samples/s over all timed epochs.

    The median is taken over the epochs of all repeats, not over whole runs: a burst of
    background load then spoils single epochs, which the median drops, rather than a run.
    """
    sizes = QUICK if quick else FULL
    epochs: dict[str, list[tuple[int, float]]] = {"lightning": [], "plain": []}

    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        cfg = stage_config(Path(tmp) / "run", cache_dir, sizes)
        datamodule = build_datamodule(cfg)
        counter = itertools.count()

        def lightning() -> float:
            # A fresh stage directory per repeat, as for a fresh stage of a new run.
            run_cfg = stage_config(Path(tmp) / f"run{next(counter)}", cache_dir, sizes)
            timed = lightning_fit(run_cfg, datamodule, seed)
            epochs["lightning"] += timed
            return sum(seconds for _, seconds in timed)

        def plain() -> float:
            timed = plain_fit(cfg, datamodule, seed, sizes.epochs)
            epochs["plain"] += timed
            return sum(seconds for _, seconds in timed)

        seconds = interleaved({"lightning": lightning, "plain": plain}, sizes.repeats)
        steps_per_epoch = len(datamodule.train_dataloader())
        batch_size = datamodule.cfg.batch_size

    throughput = {side: epoch_throughput(timed) for side, timed in epochs.items()}
    lightning_sps, plain_sps = median(throughput["lightning"]), median(throughput["plain"])
    epoch_s = {side: median([s for _, s in timed]) for side, timed in epochs.items()}
    raw = {
        "stage": STAGE,
        "epochs": sizes.epochs,
        "warmup_epochs": WARMUP_EPOCHS,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "repeats": sizes.repeats,
        "epoch_samples_per_s": throughput,
        "run_seconds": seconds,
        "median_samples_per_s": {"lightning": lightning_sps, "plain": plain_sps},
        "median_epoch_s": epoch_s,
        "median_step_ms": {side: 1e3 * s / steps_per_epoch for side, s in epoch_s.items()},
        # Lightning's extra time per epoch (checkpoint, logging, hooks), from the medians.
        "overhead_ms_per_epoch": 1e3 * (epoch_s["lightning"] - epoch_s["plain"]),
        "ratio": lightning_sps / plain_sps,
        "goal": GOAL,
        "goal_met": lightning_sps / plain_sps >= GOAL,
    }
    timed_epochs = (sizes.epochs - WARMUP_EPOCHS) * sizes.repeats
    row = Comparison(
        benchmark="training overhead",
        measure="finetune train throughput, steady state",
        unit="samples/s",
        candidate="Lightning Trainer (runner: ckpt/epoch, CSV log)",
        baseline="plain PyTorch loop",
        candidate_value=lightning_sps,
        baseline_value=plain_sps,
        higher_is_better=True,
        goal=GOAL,
        note=f"median of {timed_epochs} epochs of {steps_per_epoch} steps x {batch_size} "
        f"per side (epoch 1 of each run excluded: start-up)",
    )
    return raw, [row]
