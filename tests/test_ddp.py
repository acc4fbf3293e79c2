"""Two real processes (CPU, gloo): the pipeline and the PseudoLabeler under DDP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.data.datamodule import AudioDataModule
from tests.helpers import cli_env, compose_config
from tests.test_cli import distillery
from tests.test_unfused import assert_knn_monitor_logged_the_teacher


@pytest.mark.ddp
def test_unfused_smoke_on_two_processes(tmp_path: Path, data_cache: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=unfused",
        "debug=smoke",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "logger=csv",
        "pipeline.stages.ssl.callbacks.pseudo_labeler.k=6",
    ]
    result = distillery(*overrides, f"run_dir={run_dir}", cache=data_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    assert [s["status"] for s in manifest["stages"].values()] == ["done"] * 3

    # Every training clip got exactly one pseudo-label although 2 ranks embedded it
    # (32 training clips over 2 ranks, gathered as (index, feature) pairs).
    labels = np.load(run_dir / manifest["stages"]["ssl"]["artifacts"]["pseudo_labels"])
    data = AudioDataModule(compose_config([*overrides, f"data.cache_dir={data_cache}"]).data)
    data.setup()
    train = data.table.indices("train")
    assert (labels[train] >= 0).all() and (labels[data.table.indices("test")] == -1).all()
    # Both ranks measured the same subsets: the logged kNN monitor value is the
    # single-process one.
    assert_knn_monitor_logged_the_teacher(run_dir, data, seed=0)
    # One run dir for both processes: the child wrote into it, not into a directory of its own.
    assert {p.name for p in run_dir.iterdir()} == {
        ".hydra",
        "distillery.log",
        "ddp_rank1.log",
        "pipeline.json",
        "results.md",
        "ssl",
        "self_distill",
        "finetune",
    }


@pytest.mark.ddp
def test_pseudo_labels_identical_on_every_rank_and_world_size(
    tmp_path: Path, data_cache: Path
) -> None:
    from lightning.fabric import Fabric

    from distillery.models.encoders import AudioNTT
    from distillery.models.io import save_encoder
    from tests.helpers import pseudo_label_worker

    torch.manual_seed(0)
    encoder_cfg = {
        "_target_": "distillery.models.encoders.AudioNTT",
        "n_mels": 64,
        "channels": 8,
        "dim": 64,
    }
    encoder_path = tmp_path / "teacher.pt"
    save_encoder(encoder_path, AudioNTT(n_mels=64, channels=8, dim=64).eval(), encoder_cfg)
    # 3 classes x 15 clips: 33 training + 6 validation clips, an odd count for 2 ranks.
    overrides = [
        "experiment=unfused",
        f"data.cache_dir={data_cache}",
        "data.synthetic.num_classes=3",
        "data.synthetic.clips_per_class=15",
        "data.batch_size=8",
    ]
    data = AudioDataModule(compose_config(overrides).data)
    data.setup()
    labeled = np.concatenate([data.table.indices("train"), data.table.indices("val")])
    assert len(labeled) % 2 == 1

    single = Fabric(accelerator="cpu", devices=1)
    pseudo_label_worker(single, str(encoder_path), overrides, str(tmp_path), 5)
    Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(
        pseudo_label_worker, str(encoder_path), overrides, str(tmp_path), 5
    )
    one = np.load(tmp_path / "labels-w1-r0.npy")
    rank0, rank1 = (np.load(tmp_path / f"labels-w2-r{r}.npy") for r in (0, 1))
    np.testing.assert_array_equal(rank0, rank1)
    np.testing.assert_array_equal(rank0, one)
    # Every train/val clip labeled exactly once, nothing else labeled, all 5 clusters used.
    assert (one[labeled] >= 0).all() and (np.delete(one, labeled) == -1).all()
    assert set(one[labeled]) == set(range(5))


@pytest.mark.ddp
@pytest.mark.slow
def test_multirun_of_ddp_jobs(tmp_path: Path, data_cache: Path) -> None:
    """Each job of a sweep starts its own rank-1 process, in its own run dir."""
    sweep = tmp_path / "sweep"
    result = distillery(
        "-m",
        "experiment=supervised",
        "debug=smoke",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "logger=csv",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        cache=data_cache,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (
            json.loads((sweep / job / "pipeline.json").read_text())["stages"]["finetune"]["status"]
            == "done"
        )
        assert (sweep / job / "ddp_rank1.log").exists()


@pytest.mark.ddp
@pytest.mark.slow  # about a minute; `make test` stays within its time budget
def test_interrupted_ddp_stage_resumes_with_its_wandb_run(tmp_path: Path, data_cache: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "experiment=supervised",
        "debug=smoke",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "logger=wandb",
        "debug.trainer.max_epochs=2",
        f"run_dir={run_dir}",
        "+pipeline.stages.finetune.callbacks.fault._target_=tests.helpers.FailOnceAtEpoch",
        "+pipeline.stages.finetune.callbacks.fault.epoch=1",
        f"+pipeline.stages.finetune.callbacks.fault.marker={tmp_path / 'failed'}",
    ]
    first = distillery(*args, cache=data_cache)
    assert first.returncode != 0 and "injected failure" in first.stderr
    failed = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    assert failed["status"] == "failed"

    second = distillery(*args, cache=data_cache)
    assert second.returncode == 0, second.stderr[-3000:]
    done = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    assert done["status"] == "done" and done["attempts"] == 2
    assert done["wandb_run_id"] == failed["wandb_run_id"]
    # Both attempts wrote to the same W&B run (one offline directory each).
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{done['wandb_run_id']}"))) == 2
    # The second attempt trained epoch 1 only: it resumed, it did not start over.
    rows = (
        (run_dir / "finetune" / "logs" / "attempt-2" / "metrics.csv").read_text().splitlines()[1:]
    )
    assert min(int(row.split(",")[0]) for row in rows) == 1


@pytest.mark.ddp
@pytest.mark.slow
def test_small_labelled_split_trains_on_every_rank(tmp_path: Path, data_cache: Path) -> None:
    """2 ranks, a train split larger than one batch but each rank's share smaller: every
    rank still trains (the ragged batch is kept per rank), and pipeline.json says so."""
    run_dir = tmp_path / "run"
    overrides = ["experiment=supervised", "debug=smoke", "data.batch_size=24"]
    data = AudioDataModule(compose_config([*overrides, f"data.cache_dir={data_cache}"]).data)
    data.setup()
    clips = len(data.train_indices())
    assert 24 < clips <= 48  # more than a batch in all, less than a batch per rank
    result = distillery(
        *overrides,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "logger=csv",
        f"run_dir={run_dir}",
        cache=data_cache,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    finetune = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    assert finetune["status"] == "done"
    assert finetune["optimizer_steps"] == [1, 1]  # one epoch of one (ragged) batch per rank


@pytest.mark.ddp
@pytest.mark.slow
def test_few_label_protocol_validates_by_steps_and_stops_together(
    tmp_path: Path, data_cache: Path
) -> None:
    """protocol=few_label on 2 ranks: validation every 2 steps across one-step epochs, early
    stopping reached by both ranks at the same step, the tested checkpoint a validated one."""
    run_dir = tmp_path / "run"
    result = distillery(
        "experiment=supervised", "logger=csv", "trainer.enable_progress_bar=false",
        "protocol=few_label", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        "data.synthetic.num_classes=4", "data.synthetic.clips_per_class=30",
        "data.batch_size=4", "data.label_fraction=0.1",  # 8 labelled clips: 1 step per epoch
        "stage_kind_settings.finetune.trainer.max_steps=12",
        "stage_kind_settings.finetune.trainer.val_check_interval=2",
        "stage_kind_settings.finetune.selection.patience=2",
        "pipeline.stages.finetune.evaluate=false", f"run_dir={run_dir}", cache=data_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    finetune = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    steps = finetune["optimizer_steps"]
    assert steps[0] == steps[1] and steps[0] % 2 == 0 and 6 <= steps[0] <= 12
    assert finetune["selected"]["step"] % 2 == 0


DDP_SMOKE = [
    "experiment=supervised",
    "debug=smoke",
    "trainer=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "debug.trainer.max_epochs=3",
]


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("name", "rank", "code"),
    [
        ("SIGTERM", 1, 143),  # only rank 1: Lightning's handler would hang every rank here
        pytest.param("SIGUSR2", 0, 140, marks=pytest.mark.slow),
        pytest.param("SIGINT", -1, 130, marks=pytest.mark.slow),  # Ctrl-C reaches every rank
    ],
)
def test_signal_to_any_rank_stops_every_rank_and_the_rerun_resumes(
    tmp_path: Path, data_cache: Path, name: str, rank: int, code: int
) -> None:
    run_dir = tmp_path / "run"
    key = "+pipeline.stages.finetune.callbacks.signal"
    args = [
        *DDP_SMOKE,
        f"run_dir={run_dir}",
        f"{key}._target_=tests.helpers.SignalAt",
        f"{key}.signal={name}",
        f"{key}.rank={rank}",
        f"{key}.epoch=1",
        f"{key}.batch=0",
        f"{key}.marker={tmp_path / 'sent'}",
    ]
    first = distillery(*args, cache=data_cache)
    finished = time.time()
    assert first.returncode == code, first.stderr[-3000:]
    sent = min(p.stat().st_mtime for p in tmp_path.glob("sent.rank*"))
    assert finished - sent < 60  # every rank stopped, none hung in a collective
    # Stopped together at the next batch that does not end an epoch (2 batches per epoch):
    # batch 1 of epoch 1 ends it, so the first batch of epoch 2.
    assert f"stopped by {name} at global step 5 (epoch 2, batch 0)" in first.stdout, first.stdout
    record = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    assert record["status"] == "interrupted"

    second = distillery(*args, cache=data_cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"interrupted by {name}" in second.stdout
    record = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    assert record["status"] == "done" and record["attempts"] == 2


@pytest.mark.ddp
@pytest.mark.slow
def test_crash_on_one_rank_stops_all_and_is_recorded_with_its_rank(
    tmp_path: Path, data_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    key = "+pipeline.stages.finetune.callbacks.fault"
    started = time.monotonic()
    result = distillery(
        *DDP_SMOKE,
        f"run_dir={run_dir}",
        f"{key}._target_=tests.helpers.FailOnceAtEpoch",
        f"{key}.epoch=1",
        f"{key}.rank=1",
        f"{key}.marker={tmp_path / 'failed'}",
        cache=data_cache,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 120
    record = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    assert record["status"] == "failed"
    assert record["error"] == "rank 1: RuntimeError: injected failure at epoch 1", record["error"]


@pytest.mark.ddp
@pytest.mark.slow
def test_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """What fp16 (loss checked, gradients not) needs: a rank whose own loss is NaN must not
    stop alone while the others wait for it in the next gradient all-reduce."""
    from tests.fault_ddp_worker import BAD_STEP, nan_worker
    from tests.helpers import spawn_two_ranks

    spawn_two_ranks(nan_worker, str(tmp_path))
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert outcomes == [f"NonFiniteLossError {BAD_STEP}"] * 2


@pytest.mark.ddp
@pytest.mark.slow
def test_ranks_started_by_torchrun_share_the_default_run_dir(
    tmp_path: Path, data_cache: Path
) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "distillery.cli",
            *DDP_SMOKE,
            f"data.cache_dir={data_cache}",
        ],
        cwd=tmp_path,
        env=cli_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").iterdir()  # one directory for both ranks
    assert run_dir.name.startswith("torchrun-")
    record = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    assert record["status"] == "done"


@pytest.mark.ddp
@pytest.mark.slow  # about 50 s
def test_pseudo_label_stage_on_two_processes(tmp_path: Path, data_cache: Path) -> None:
    """The no-training stage under DDP (a module with nothing to train): the labels of the
    teacher's own PseudoLabeler, every training clip labelled once."""
    run_dir = tmp_path / "run"
    same = ["k=6", "pca_dim=8"]
    result = distillery(
        "experiment=unfused_labels",
        "debug=smoke",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "logger=csv",
        "pipeline.order=[ssl,pseudo_label]",
        "~pipeline.stages.self_distill",
        "~pipeline.stages.student_few",
        "+callback@pipeline.stages.ssl.callbacks.pseudo_labeler=pseudo_labeler",
        *(
            f"pipeline.stages.{s}.callbacks.pseudo_labeler.{v}"
            for s in ("ssl", "pseudo_label")
            for v in same
        ),
        f"run_dir={run_dir}",
        cache=data_cache,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    assert manifest["stages"]["pseudo_label"]["optimizer_steps"] == [0, 0]
    labels = np.load(run_dir / manifest["stages"]["pseudo_label"]["artifacts"]["pseudo_labels"])
    on_ssl = np.load(run_dir / manifest["stages"]["ssl"]["artifacts"]["pseudo_labels"])
    np.testing.assert_array_equal(labels, on_ssl)
    assert (labels >= 0).sum() > 0 and set(np.unique(labels[labels >= 0])) == set(range(6))
