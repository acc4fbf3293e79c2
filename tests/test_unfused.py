"""UnFuSeD end to end: SSL teacher -> pseudo-labels -> self-distilled student -> finetune."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.callbacks.knn_monitor import monitor_subsets
from distillery.data.datamodule import AudioDataModule
from distillery.eval.embed import embed
from distillery.eval.metrics import knn_accuracy
from distillery.models.io import load_encoder
from distillery.pipeline.runner import Runner
from tests.helpers import FAST, compose_config


def assert_knn_monitor_logged_the_teacher(run_dir: Path, data: AudioDataModule, seed: int) -> None:
    """The SSL teacher's online kNN monitor ran after its (only) epoch, on the encoder it
    saved: the logged accuracy is the one recomputed from encoder.pt on the same subsets."""
    rows = list(csv.DictReader((run_dir / "ssl/logs/attempt-1/metrics.csv").open()))
    key = "ssl/val/online_knn10_acc"
    logged = [float(r[key]) for r in rows if r[key]]
    teacher, _ = load_encoder(run_dir / "ssl/encoder.pt")
    bank, val = monitor_subsets(data.table, 2048, 512, seed)
    # All of them at smoke size: the labelled 10% of train as neighbours, all of val scored.
    train = data.table.indices("train")
    assert len(bank) == (data.table.visible_labels[train] >= 0).sum() == 4
    assert len(val) == len(data.table.indices("val"))
    _, bank_x, bank_y = embed(teacher, data.dataloader("train", indices=bank), data.featurize)
    _, val_x, val_y = embed(teacher, data.dataloader("val", indices=val), data.featurize)
    assert logged == [pytest.approx(knn_accuracy(bank_x, bank_y, val_x, val_y, k=10))]


def test_smoke_runs_every_stage_and_writes_pseudo_labels(tmp_path: Path, data_cache: Path) -> None:
    cfg = compose_config(
        [
            "experiment=unfused",
            *FAST,
            f"run_dir={tmp_path}",
            f"data.cache_dir={data_cache}",
            "pipeline.stages.ssl.callbacks.pseudo_labeler.k=6",
        ]
    )
    stages = Runner(cfg).run()
    assert [s.status for s in stages.values()] == ["done", "done", "done"]

    labels = np.load(stages["ssl"].artifacts["pseudo_labels"])
    meta = json.loads(
        (Path(stages["ssl"].artifacts["pseudo_labels"]).parent / "meta.json").read_text()
    )
    data = AudioDataModule(cfg.data)
    data.setup()
    train, val, test = (data.table.indices(s) for s in ("train", "val", "test"))
    assert labels.dtype == np.int64 and labels.shape == (len(data.table.source.records),)
    assert (labels[train] >= 0).all() and (labels[val] >= 0).all() and (labels[test] == -1).all()
    assert set(np.unique(labels[train])) == set(range(6))  # no empty cluster
    for key in ("k", "seed", "niter", "inertia", "n_empty", "n_tiny", "imbalance", "nmi", "ari"):
        assert key in meta, key
    assert meta["n_clustered"] == len(train)
    # The teacher (audiontt_small) embeds to 512 dims, so PCA-whitening to 128 ran.
    assert meta["embed_dim"] == 512 and meta["pca_dim"] == 128 and meta["eig_power"] == -0.5
    assert 1 <= meta["n_iter"] <= meta["niter"] == 20
    # The student's exit heads read time-averaged block outputs: 16 channels x 32, 16 and
    # 8 mel bins (audiontt_tiny, 64 mels), not 16 channel means.
    ckpt = torch.load(tmp_path / "self_distill/checkpoints/last.ckpt", weights_only=True)
    widths = [ckpt["state_dict"][f"exit_heads.{i}.net.0.weight"].shape[1] for i in range(3)]
    assert widths == [512, 256, 128]
    assert_knn_monitor_logged_the_teacher(tmp_path, data, cfg.seed)
    # Every exit head's agreement with the pseudo-labels is logged on validation.
    logged = (tmp_path / "self_distill/logs/attempt-1/metrics.csv").read_text().splitlines()[0]
    for i in (1, 2, 3):
        assert f"self_distill/val/exit{i}_pseudo_acc" in logged.split(",")
    # The student's heads are as wide as k, taken from the artifact.
    assert "self_distill/eval/knn10_acc" in stages["self_distill"].metrics
    assert "finetune/test/acc" in stages["finetune"].metrics


def test_student_learns_well_above_chance(tmp_path: Path, data_cache: Path) -> None:
    """Small but real: 4 classes (chance 0.25), a few epochs per stage, half the labels."""
    cfg = compose_config(
        [
            "experiment=unfused",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"run_dir={tmp_path}",
            f"data.cache_dir={data_cache}",
            "data.synthetic.num_classes=4",
            "data.synthetic.clips_per_class=40",
            "data.batch_size=32",
            "data.label_fraction=0.5",
            "pipeline.stages.ssl.callbacks.pseudo_labeler.k=8",
            *[
                f"model@pipeline.stages.{s}.module.encoder=audiontt_small"
                for s in ("ssl", "self_distill")
            ],
            "pipeline.stages.ssl.trainer.max_epochs=6",
            "pipeline.stages.self_distill.trainer.max_epochs=6",
            "pipeline.stages.finetune.trainer.max_epochs=8",
            "eval.plots=false",
        ]
    )
    stages = Runner(cfg).run()
    student = stages["finetune"].metrics
    assert student["finetune/test/acc"] >= 0.5, student
    # The student's frozen embedding alone (no real labels in its training) is above chance too.
    assert stages["self_distill"].metrics["self_distill/eval/knn10_acc"] >= 0.25 + 0.1
