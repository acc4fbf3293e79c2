"""Test utilities: config composition, fault injection, reading offline W&B runs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from distillery.cli import CONF_DIR
from distillery.config.schema import register_configs

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: offline W&B, this checkout's package first
    (whichever checkout the environment was installed from), then ``tests`` (for
    ``_target_: tests.helpers...``)."""
    path = f"{REPO / 'src'}{os.pathsep}{REPO}"
    return os.environ | {"WANDB_MODE": "offline", "PYTHONPATH": path} | extra


#: Small, fast settings every pipeline test starts from.
#: A two-layer log-mel transformer: the teacher-student stages' smallest real encoder.
TINY_TRANSFORMER = {
    "_target_": "distillery.models.encoders.TransformerEncoder",
    "n_mels": 16,
    "dim": 32,
    "depth": 2,
    "heads": 4,
    "ffn_dim": 64,
    "dropout": 0.0,
}


FAST = ["debug=smoke", "logger=csv", "trainer.enable_progress_bar=false"]


def load_report(path: Path) -> ModuleType:
    """A reproduction report script (``experiments/<method>/report*.py``) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_config(overrides: list[str]) -> DictConfig:
    """The real config tree, composed as the CLI does (no run-dir side effects)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


class FailOnceAtEpoch(pl.Callback):
    """Raise at the start of epoch ``epoch`` on rank ``rank`` (-1: every rank) unless
    ``marker`` exists (then create it).

    The config stays identical between the failing run and the re-run, as after a crash.
    """

    def __init__(self, epoch: int, marker: str, rank: int = -1) -> None:
        self.epoch, self.rank = epoch, rank
        self.marker = Path(marker)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        marker = self.marker.with_name(
            f"{self.marker.name}.rank{trainer.global_rank}"
        )  # every rank fails
        if self.rank not in (-1, trainer.global_rank):
            return
        if trainer.current_epoch == self.epoch and not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected failure at epoch {self.epoch}")


class SlowUntilMarker(pl.Callback):
    """Sleep ``seconds`` at the end of every training epoch (before its checkpoint) until
    :class:`FailOnceAtEpoch`'s ``marker`` exists: a first attempt that takes long."""

    def __init__(self, seconds: float, marker: str) -> None:
        self.seconds, self.marker = seconds, Path(marker)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.marker.with_name(f"{self.marker.name}.rank{trainer.global_rank}").exists():
            time.sleep(self.seconds)


class StopBeforeTraining(pl.Callback):
    """End the fit before its first batch, as a user's budget or stopping callback might:
    the stage takes no optimizer step."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


class NaNWeightsOnce(pl.Callback):
    """Set the first parameter to NaN before batch ``batch`` of epoch ``epoch`` (once per
    ``marker``), so that step's loss and gradients are non-finite."""

    def __init__(self, epoch: int, batch: int, marker: str) -> None:
        self.epoch, self.batch, self.marker = epoch, batch, Path(marker)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        if (trainer.current_epoch, batch_idx) == (
            self.epoch,
            self.batch,
        ) and not self.marker.exists():
            self.marker.touch()
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


class SlowBatches(pl.Callback):
    """Sleep after every training batch: gives a test time to signal a running stage.

    With ``first_run_marker``, only in the first run (the one that creates the marker): a
    resumed run is then fast.
    """

    def __init__(self, seconds: float, first_run_marker: str | None = None) -> None:
        self.seconds, self.marker = seconds, first_run_marker

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.marker:
            marker = Path(f"{self.marker}.rank{trainer.global_rank}")
            if marker.exists():
                self.seconds = 0.0
            marker.touch()

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


class SignalAt(pl.Callback):
    """Send ``signal`` (a name: SIGTERM, SIGUSR2, SIGINT) to this process on rank ``rank``
    (-1: every rank) at the end of training batch ``batch`` of epoch ``epoch``, or at
    ``on_train_end`` when ``epoch`` is -1; once per rank and ``marker``, so a re-run with
    the same config is not signalled again."""

    def __init__(
        self, signal: str, marker: str, epoch: int = -1, batch: int = 0, rank: int = -1
    ) -> None:
        self.signal, self.marker = signal, Path(marker)
        self.epoch, self.batch, self.rank = epoch, batch, rank

    def _send(self, trainer: pl.Trainer) -> None:
        marker = self.marker.with_name(f"{self.marker.name}.rank{trainer.global_rank}")
        if self.rank in (-1, trainer.global_rank) and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), getattr(signal, self.signal))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int
    ) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            self._send(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch == -1:
            self._send(trainer)


def read_wandb_records(path: Path) -> list:
    """Parse an offline ``.wandb`` file: a LevelDB-style log of ``Record`` protobufs.

    Layout: a 7-byte header (':W&B', magic 0xBEE1, version), then 32 KiB blocks of chunks,
    each ``crc32 (4) | length (2, little-endian) | type (1) | data``; types 1 = full,
    2 = first, 3 = middle, 4 = last. A block tail shorter than a chunk header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    block_size, header, pos = 32768, 7, 7
    records, pending = [], b""
    while pos + header <= len(data):
        left_in_block = block_size - pos % block_size
        if left_in_block < header:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        chunk = data[pos + header : pos + header + length]
        pos += header + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class WandbRunLog:
    """What an offline W&B run recorded, read back from its ``.wandb`` file."""

    run: Any  # the RunRecord: run_id, run_group, job_type, display_name, config
    dirs: list[Path] = field(default_factory=list)  # offline-run-* folders, one per attempt
    #: every history value of each key, in logging order (media and tables as their JSON)
    history: dict[str, list[Any]] = field(default_factory=dict)
    #: the final summary, nested keys joined with "/" (``val/acc`` -> ``{"max": 0.9}``)
    summary: dict[str, Any] = field(default_factory=dict)
    #: define_metric records: name -> MetricRecord
    metrics: dict[str, Any] = field(default_factory=dict)
    #: artifacts this run logged: ArtifactRecord (name, type, digest, manifest)
    logged_artifacts: list[Any] = field(default_factory=list)
    #: artifacts this run declared as inputs (offline: logged with ``use_after_commit``)
    used_artifacts: list[Any] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path, timeout: float = 30.0) -> WandbRunLog:
        # W&B's service writes the log asynchronously: a run just finished may not be on
        # disk yet; its last record is the run's exit.
        deadline = time.monotonic() + timeout
        records = read_wandb_records(path)
        while not any(r.HasField("exit") for r in records):
            assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
            time.sleep(0.2)
            records = read_wandb_records(path)
        out = cls(run=next(r.run for r in records if r.HasField("run")), dirs=[Path(path).parent])
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "history":
                for item in r.history.item:
                    out.history.setdefault(_item_key(item), []).append(json.loads(item.value_json))
            elif kind == "summary":
                for item in r.summary.update:
                    key = _item_key(item)
                    if not key.startswith("_"):
                        out.summary[key] = json.loads(item.value_json)
            elif kind == "metric" and r.metric.name:
                out.metrics[r.metric.name] = r.metric
            elif kind == "artifact":
                target = out.used_artifacts if r.artifact.use_after_commit else out.logged_artifacts
                target.append(r.artifact)
            elif kind == "use_artifact":
                out.used_artifacts.append(r.use_artifact)
        return out

    def table(self, key: str) -> dict[str, Any]:
        """The last W&B Table logged under ``key``: ``{"columns": [...], "data": [[...]]}``."""
        relative = self.history[f"{key}/path"][-1]
        path = next(d / "files" / relative for d in self.dirs if (d / "files" / relative).exists())
        return json.loads(path.read_text())


def wandb_runs(run_dir: Path) -> dict[str, WandbRunLog]:
    """Every offline W&B run under ``run_dir/wandb``, by job type (a stage, or ``pipeline``);
    a resumed run's attempts are merged in order."""
    runs: dict[str, WandbRunLog] = {}
    for path in sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        log = WandbRunLog.read(path)
        if (seen := runs.get(log.run.job_type)) is None:
            runs[log.run.job_type] = log
            continue
        for key, values in log.history.items():
            seen.history.setdefault(key, []).extend(values)
        seen.dirs += log.dirs
        seen.summary |= log.summary
        seen.metrics |= log.metrics
        seen.logged_artifacts += log.logged_artifacts
        seen.used_artifacts += log.used_artifacts
    return runs


def close_process_group(fabric) -> None:
    """End a spawned worker's gloo group cleanly: a process that exits with live gloo
    threads can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if fabric.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def pseudo_label_worker(
    fabric, encoder_path: str, overrides: list[str], out_dir: str, k: int
) -> None:
    """Pseudo-label a data set with a saved encoder on every rank of ``fabric``; each rank
    saves the labels it holds as ``labels-w<world>-r<rank>.npy``."""
    import numpy as np

    from distillery.clustering.distributed import label_dataset
    from distillery.data.datamodule import AudioDataModule
    from distillery.models.io import load_encoder

    data = AudioDataModule(compose_config(overrides).data)
    data.setup()
    encoder, _ = load_encoder(encoder_path)
    labels, *_ = label_dataset(fabric, encoder, data, k=k, seed=0)
    np.save(Path(out_dir) / f"labels-w{fabric.world_size}-r{fabric.global_rank}.npy", labels)
    close_process_group(fabric)


def spawn_two_ranks(worker: Callable[..., None], *args: Any) -> None:
    """Run ``worker(rank, port, *args)`` in 2 processes that join one gloo group through the
    environment, as a cluster launcher would start them (the Trainer then starts none)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, *args), nprocs=2)


def join_as_rank(rank: int, port: int) -> None:
    """In a :func:`spawn_two_ranks` worker: the launcher environment of rank ``rank`` of 2."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)


def ddp_trainer(**kwargs: Any) -> pl.Trainer:
    """A quiet 2-process CPU DDP Trainer (no logger, checkpoints, bar or summary)."""
    defaults = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "logger": False}
    defaults |= {
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**(defaults | kwargs))
