"""Stage ``coss_kd``: kNN batches in a real fit, the projection head, the space term under DDP."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import DictConfig, open_dict
from tests.helpers import FAST, compose_config
from tests.stages.coss_ddp_worker import coss_step_worker

from distillery.artifact_kinds import EncoderArtifact
from distillery.config.validation import stage_data
from distillery.data.datamodule import AudioDataModule
from distillery.data.knn_batches import NeighbourBatchSampler
from distillery.models.encoders import AudioNTT
from distillery.models.io import save_encoder
from distillery.pipeline.runner import Runner
from distillery.stages.coss_kd import CoSSDistillStage

TEACHER = {
    "_target_": "distillery.models.encoders.AudioNTT",
    "n_mels": 64,
    "channels": 8,
    "dim": 48,
}
STUDENT = {
    "_target_": "distillery.models.encoders.AudioNTT",
    "n_mels": 64,
    "channels": 4,
    "dim": 24,
}


def save_teacher(path: Path, cfg: dict) -> Path:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
    save_encoder(path, AudioNTT(**kwargs).eval(), cfg)
    return path


def coss_only(tmp_path: Path, cache: Path, teacher: Path, *extra: str) -> DictConfig:
    """``experiment=coss`` without its SSL stage: the student distils a saved teacher."""
    cfg = compose_config(
        [
            "experiment=coss",
            *FAST,
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={cache}",
            f"pipeline.stages.coss.module.teacher={teacher}",
            *extra,
        ]
    )
    with open_dict(cfg):
        del cfg.pipeline.stages["ssl"]
        cfg.pipeline.order = ["coss"]
        cfg.pipeline.stages.coss.inputs = {}
        cfg.pipeline.stages.coss.module.encoder = STUDENT
    return cfg


def test_stage_runs_on_knn_batches_and_exports_the_student(
    tmp_path: Path, data_cache: Path
) -> None:
    teacher = save_teacher(tmp_path / "teacher.pt", TEACHER)
    record = Runner(coss_only(tmp_path, data_cache, teacher)).run()["coss"]
    assert record.status == "done"
    m = record.metrics
    assert m["coss/eval/params"] < sum(p.numel() for p in AudioNTT(64, 8, 48).parameters())
    assert m["coss/eval/embed_dim"] == 24  # the student, without its projection head
    assert 0 < m["coss/train/loss_epoch"] < 4  # two terms, each in [0, 2]
    for key in (
        "coss/train/cos_epoch",
        "coss/train/space_epoch",
        "coss/eval/knn10_acc",
        "coss/eval/linear_acc",
    ):
        assert key in m, key


def test_the_fit_reads_neighbour_batches(tmp_path: Path, data_cache: Path) -> None:
    teacher = save_teacher(tmp_path / "teacher.pt", TEACHER)
    cfg = coss_only(tmp_path, data_cache, teacher)
    data = AudioDataModule(stage_data(cfg, "coss"))
    data.setup("fit")
    module = CoSSDistillStage(
        encoder=STUDENT, teacher=EncoderArtifact.load(teacher), num_neighbours=3, neighbour_pool=5
    )
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=module.configure_data(data))
    sampler = trainer.train_dataloader.batch_sampler
    assert isinstance(sampler, NeighbourBatchSampler)
    assert sampler.batch_size == 64 and sampler.anchors_per_batch == 16  # data.batch_size / (1 + 3)
    assert len(sampler) == -(-len(data.train_indices()) // 16)
    assert isinstance(module.projection, torch.nn.Sequential)  # 24 -> 48: widths differ

    data.cfg.batch_size = 30  # not a multiple of 1 + 3
    with pytest.raises(ValueError, match="multiple of 1 \\+ num_neighbours"):
        CoSSDistillStage(
            encoder=STUDENT,
            teacher=EncoderArtifact.load(teacher),
            num_neighbours=3,
            neighbour_pool=5,
        ).configure_data(data)


def test_no_projection_when_widths_match(tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "teacher.pt", STUDENT)
    assert isinstance(
        CoSSDistillStage(encoder=STUDENT, teacher=EncoderArtifact.load(teacher)).projection,
        torch.nn.Identity,
    )


@pytest.mark.slow
@pytest.mark.ddp
def test_global_space_term_equals_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    """Two ranks with half the batch each: ``space_batch=global`` gives the one-process loss and
    (after DDP's gradient averaging) its gradient; ``device`` gives a different loss."""
    from lightning.fabric import Fabric

    teacher_cfg = {
        "_target_": "distillery.models.encoders.AudioNTT",
        "n_mels": 16,
        "channels": 4,
        "dim": 24,
    }
    teacher = str(save_teacher(tmp_path / "teacher.pt", teacher_cfg))
    coss_step_worker(Fabric(accelerator="cpu", devices=1), teacher, str(tmp_path))
    Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(
        coss_step_worker, teacher, str(tmp_path)
    )
    one = torch.load(tmp_path / "global-w1-r0.pt")
    for rank in (0, 1):
        two = torch.load(tmp_path / f"global-w2-r{rank}.pt")
        torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two["grads"], one["grads"], rtol=1e-4, atol=1e-6)
    per_device = [torch.load(tmp_path / f"device-w2-r{r}.pt")["loss"] for r in (0, 1)]
    assert all(abs(loss.item() - one["loss"].item()) > 1e-4 for loss in per_device)


def test_loss_weights_must_not_be_negative(tmp_path: Path) -> None:
    from distillery.pipeline.contract import ConfigError, validate

    cfg = compose_config(
        ["experiment=coss", f"run_dir={tmp_path}", "pipeline.stages.coss.module.space_weight=-0.5"]
    )
    with pytest.raises(
        ConfigError,
        match=r"pipeline.stages.coss.module.space_weight: -0.5 is outside the allowed range \[0, inf\)",
    ):
        validate(cfg)


@pytest.mark.slow
def test_coss_experiment_smoke(tmp_path: Path, data_cache: Path) -> None:
    cfg = compose_config(
        ["experiment=coss", *FAST, f"run_dir={tmp_path}", f"data.cache_dir={data_cache}"]
    )
    stages = Runner(cfg).run()
    assert [s.status for s in stages.values()] == ["done", "done"]
    assert stages["coss"].metrics["coss/eval/params"] < stages["ssl"].metrics["ssl/eval/params"]


@pytest.mark.slow
@pytest.mark.ddp
def test_coss_smoke_on_two_processes(tmp_path: Path, data_cache: Path) -> None:
    """kNN batches (one share of anchors per rank) and the gathered space term in a real
    two-process fit: all_gather needs equal batch shapes on both ranks, or it hangs."""
    import json

    from tests.test_cli import distillery

    run_dir = tmp_path / "run"
    overrides = [
        "experiment=coss",
        "debug=smoke",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "logger=csv",
        f"run_dir={run_dir}",
    ]
    result = distillery(*overrides, cache=data_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert [s["status"] for s in stages.values()] == ["done", "done"]
    assert "coss/eval/knn10_acc" in stages["coss"]["metrics"]


def test_knn_batches_crop_each_item_from_its_own_seed(tmp_path: Path) -> None:
    """The kNN loader's random crops depend on (seed, epoch, item) only, not on what drew
    from the global RNG before: the same batch twice, with the global state moved."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):  # 1.5 s clips, 0.5 s crops: training crops are random
        (tmp_path / "clips" / label).mkdir(parents=True)
        for i in range(8):
            sf.write(tmp_path / "clips" / label / f"{i}.wav", rng.normal(size=24000), 16000)
    data = AudioDataModule(
        {"source": "folder", "root": str(tmp_path / "clips"), "clip_seconds": 0.5,
         "batch_size": 16, "preload": False, "val_fraction": 0.25, "test_fraction": 0.25}
    )  # fmt: skip
    data.setup("fit")
    teacher = save_teacher(tmp_path / "teacher.pt", TEACHER)
    module = CoSSDistillStage(
        encoder=STUDENT, teacher=EncoderArtifact.load(teacher), num_neighbours=3, neighbour_pool=5
    )
    knn = module.configure_data(data)
    knn.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    loader = knn.train_dataloader()
    batches = []
    for scramble in (1, 2):
        np.random.seed(scramble)  # noqa: NPY002 - what the crops must not depend on
        torch.rand(scramble)  # moves the global stream (the run's seed stays the same)
        batches.append(next(iter(loader)))
    assert torch.equal(batches[0]["index"], batches[1]["index"])
    assert torch.equal(batches[0]["audio"], batches[1]["audio"])
