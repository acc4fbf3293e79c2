"""Faults and interruptions: a non-finite loss, SIGTERM, SIGKILL at any point, a run dir of
other code or another pipeline. Nothing computed is lost and a re-run finishes the job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from distillery.pipeline.checkpoints import latest_checkpoint
from distillery.pipeline.faults import NonFiniteLossError
from distillery.pipeline.manifest import RunDirError, RunManifest
from distillery.pipeline.runner import Runner
from tests.helpers import FAST, REPO, cli_env, compose_config

#: UnFuSeD with 3 epochs per stage, each batch slowed a little so a test can land a signal mid-stage.
UNFUSED = [
    "experiment=unfused",
    *FAST,
    "debug.trainer.max_epochs=3",
    "+pipeline.stages.ssl.callbacks.slow._target_=tests.helpers.SlowBatches",
    "+pipeline.stages.ssl.callbacks.slow.seconds=0.2",
]


def cli(
    *args: str, cache: Path, script: tuple[str, ...] = ("-m", "distillery.cli")
) -> subprocess.Popen:
    env = cli_env()
    return subprocess.Popen(
        [sys.executable, *script, *args, f"data.cache_dir={cache}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, (
            f"finished before {path} appeared:\n{proc.stdout.read()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "pipeline.json").read_text())


def computed(metrics: dict) -> dict:
    """The metrics a run computes, without the measured speeds (wall-clock rates)."""
    return {k: v for k, v in metrics.items() if not k.endswith("/throughput_clips_s")}


def assert_same_results(run: Path, reference: Path) -> None:
    """Every stage done, with bit-identical artifacts and the same metrics as the reference
    (speeds aside)."""
    got, want = manifest(run)["stages"], manifest(reference)["stages"]
    assert list(got) == list(want)
    for name, record in got.items():
        assert record["status"] == "done", (name, record["error"])
        assert set(record["artifacts"]) == set(want[name]["artifacts"])
        for artifact, path in record["artifacts"].items():
            ours, theirs = run / path, reference / want[name]["artifacts"][artifact]
            if ours.suffix == ".npy":
                assert np.array_equal(np.load(ours), np.load(theirs)), (name, artifact)
            elif artifact == "encoder":
                a, b = (torch.load(p, weights_only=False)["state_dict"] for p in (ours, theirs))
                assert all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys(), name
        got_metrics, want_metrics = computed(record["metrics"]), computed(want[name]["metrics"])
        assert got_metrics == pytest.approx(want_metrics, abs=1e-6), name


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """The pipeline run once without interruption."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, out = finish(cli(*UNFUSED, f"run_dir={run_dir}", cache=data_cache))
    assert code == 0, out[-3000:]
    return run_dir


def test_sigkill_mid_stage_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, data_cache: Path, reference_run: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = cli(*UNFUSED, f"run_dir={run_dir}", cache=data_cache)
    wait_for(run_dir / "ssl" / "checkpoints" / "last.ckpt", proc)  # epoch 0 saved, epoch 1 running
    proc.kill()
    proc.wait()
    assert manifest(run_dir)["stages"]["ssl"]["status"] == "running"

    code, out = finish(cli(*UNFUSED, f"run_dir={run_dir}", cache=data_cache))
    assert code == 0, out[-3000:]
    assert "resuming from" in out
    assert manifest(run_dir)["stages"]["ssl"]["attempts"] == 2
    assert_same_results(run_dir, reference_run)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("file_name", "occurrence"),
    [
        ("labels.npy", 1),  # the pseudo-labels, after the teacher's last checkpoint
        ("pipeline.json", 2),  # the record of the teacher stage being done
        ("encoder.pt", 2),  # the student's encoder artifact
    ],
)
def test_sigkill_while_writing_then_resume_matches(
    tmp_path: Path, data_cache: Path, reference_run: Path, file_name: str, occurrence: int
) -> None:
    run_dir = tmp_path / "run"
    killed = cli(
        file_name,
        str(occurrence),
        *UNFUSED,
        f"run_dir={run_dir}",
        cache=data_cache,
        script=("tests/fault_cli.py",),
    )
    code, out = finish(killed)
    assert code == -signal.SIGKILL, out[-3000:]
    manifest(run_dir)  # still a complete JSON document
    for partial in run_dir.rglob(f".{file_name}.*.tmp"):  # the write in flight stayed temporary
        assert not (partial.parent / file_name).exists() or occurrence > 1

    code, out = finish(cli(*UNFUSED, f"run_dir={run_dir}", cache=data_cache))
    assert code == 0, out[-3000:]
    assert_same_results(run_dir, reference_run)


def signal_at(stage: str, name: str, marker: Path, **where: int) -> list[str]:
    """Overrides that make ``stage`` send itself signal ``name`` (see tests.helpers.SignalAt)."""
    key = f"+pipeline.stages.{stage}.callbacks.signal"
    return [
        f"{key}._target_=tests.helpers.SignalAt",
        f"{key}.signal={name}",
        f"{key}.marker={marker}",
        *(f"{key}.{k}={v}" for k, v in where.items()),
    ]


@pytest.mark.parametrize(
    ("name", "code", "where"),
    [
        ("SIGTERM", 143, {"epoch": 1, "batch": 0}),  # mid-epoch: the next batch is the safe point
        # Before the last batch of epoch 0 (3 per epoch): stops after batch 0 of epoch 1.
        pytest.param("SIGUSR2", 140, {"epoch": 0, "batch": 1}, marks=pytest.mark.slow),
        # Ctrl-C while the pseudo-labeler clusters at the end of training.
        pytest.param("SIGINT", 130, {"epoch": -1}, marks=pytest.mark.slow),
    ],
)
def test_stop_signal_saves_marks_interrupted_and_resume_is_bit_identical(
    tmp_path: Path, data_cache: Path, reference_run: Path, name: str, code: int, where: dict
) -> None:
    run_dir = tmp_path / "run"
    args = [*UNFUSED, f"run_dir={run_dir}", *signal_at("ssl", name, tmp_path / "sent", **where)]
    code_, out = finish(cli(*args, cache=data_cache))
    assert code_ == code, out[-3000:]
    assert f"stopped by {name}" in out and "Traceback" not in out, out[-3000:]
    record = manifest(run_dir)["stages"]["ssl"]
    assert record["status"] == "interrupted" and record["error"].startswith(name)
    checkpoint = torch.load(latest_checkpoint(run_dir / "ssl"), weights_only=False)
    if where["epoch"] >= 0:  # saved after the next batch that does not end an epoch
        assert latest_checkpoint(run_dir / "ssl").name == "interrupted.ckpt"
        batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
        epoch, batch = where["epoch"], where["batch"] + 1
        if batch == 2:  # the last of the epoch's 3 batches
            epoch, batch = epoch + 1, 0
        assert (checkpoint["epoch"], batches["processed"]) == (epoch, batch + 1)

    code_, out = finish(cli(*args, cache=data_cache))
    assert code_ == 0, out[-3000:]
    assert f"interrupted by {name}" in out and "resuming from" in out
    assert manifest(run_dir)["stages"]["ssl"]["attempts"] == 2
    assert_same_results(run_dir, reference_run)


def test_non_finite_loss_fails_the_stage_keeps_the_good_checkpoint_and_resumes(
    tmp_path: Path, data_cache: Path
) -> None:
    cfg = compose_config(
        [
            "experiment=supervised",
            *FAST,
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={data_cache}",
            "debug.trainer.max_epochs=3",
            "+pipeline.stages.finetune.callbacks.nan._target_=tests.helpers.NaNWeightsOnce",
            "+pipeline.stages.finetune.callbacks.nan.epoch=2",
            "+pipeline.stages.finetune.callbacks.nan.batch=1",
            f"+pipeline.stages.finetune.callbacks.nan.marker={tmp_path / 'nan-once'}",
        ]
    )
    with pytest.raises(
        NonFiniteLossError,
        match=r"stage 'finetune': non-finite .* at global step 7 \(epoch 2, batch 1\)",
    ):
        Runner(cfg).run()
    record = RunManifest.load_or_create(tmp_path / "run", "supervised").stages["finetune"]
    assert record.status == "failed" and "NonFiniteLossError" in record.error
    good = torch.load(latest_checkpoint(tmp_path / "run" / "finetune"), weights_only=False)
    assert good["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in good["state_dict"].values() if v.is_floating_point()
    )

    record = Runner(cfg).run()["finetune"]  # same config: resumes from epoch 1's checkpoint
    assert record.status == "done" and record.attempts == 2
    final = torch.load(latest_checkpoint(tmp_path / "run" / "finetune"), weights_only=False)
    assert final["global_step"] == 9
    assert all(
        torch.isfinite(v).all() for v in final["state_dict"].values() if v.is_floating_point()
    )


def test_sigterm_saves_a_checkpoint_and_the_requeued_run_resumes(
    tmp_path: Path, data_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [
        "experiment=supervised",
        *FAST,
        "debug.trainer.max_epochs=4",
        "+pipeline.stages.finetune.callbacks.slow._target_=tests.helpers.SlowBatches",
        "+pipeline.stages.finetune.callbacks.slow.seconds=0.3",
        f"run_dir={run_dir}",
    ]
    proc = cli(*args, cache=data_cache)
    wait_for(run_dir / "finetune" / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143, out[-3000:]
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    record = manifest(run_dir)["stages"]["finetune"]
    assert record["status"] == "interrupted"
    interrupted = run_dir / "finetune" / "checkpoints" / "interrupted.ckpt"
    assert latest_checkpoint(run_dir / "finetune") == interrupted
    step = torch.load(interrupted, weights_only=False)["global_step"]
    assert 3 <= step < 12  # saved where the signal landed: after the first epoch, before the end

    code, out = finish(cli(*args, cache=data_cache))
    assert code == 0, out[-3000:]
    record = manifest(run_dir)["stages"]["finetune"]
    assert record["status"] == "done" and record["attempts"] == 2
    assert (
        torch.load(latest_checkpoint(run_dir / "finetune"), weights_only=False)["global_step"] == 12
    )


def test_run_dir_of_other_code_or_pipeline_is_not_mixed(tmp_path: Path, data_cache: Path) -> None:
    base = [
        "experiment=supervised",
        *FAST,
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={data_cache}",
    ]
    Runner(compose_config(base)).run()
    path = tmp_path / "run" / "pipeline.json"
    saved = json.loads(path.read_text())
    saved["stages"]["finetune"]["code_version"] = "0.0.1+gdeadbeef"
    path.write_text(json.dumps(saved))

    with pytest.raises(RunDirError, match=r"finetune \(0\.0\.1\+gdeadbeef\).*on_code_change=rerun"):
        Runner(compose_config(base)).plan()
    assert [p.action for p in Runner(compose_config([*base, "on_code_change=reuse"])).plan()] == [
        "skip"
    ]
    rerun = Runner(compose_config([*base, "on_code_change=rerun"]))
    assert [(p.action, p.reason.split(" (")[0]) for p in rerun.plan()] == [
        ("fresh", "code changed")
    ]
    rerun.run()
    assert (
        tmp_path / "run" / "superseded"
    ).is_dir()  # the earlier result is kept aside, not deleted

    with pytest.raises(RunDirError, match="holds pipeline 'supervised'"):
        Runner(compose_config(["experiment=unfused", *base[1:]])).plan()


def test_changed_setting_is_named_when_a_stage_reruns(tmp_path: Path, data_cache: Path) -> None:
    base = [
        "experiment=supervised",
        *FAST,
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={data_cache}",
    ]
    Runner(compose_config(base)).run()
    plan = Runner(
        compose_config([*base, "pipeline.stages.finetune.module.optimizer.lr=0.01"])
    ).plan()
    assert plan[0].action == "fresh" and "stage.module.optimizer.lr" in plan[0].reason


def test_more_clusters_than_clips_fails_at_start_up(tmp_path: Path, data_cache: Path) -> None:
    from distillery.config.validation import ConfigError

    cfg = compose_config(
        [
            "experiment=unfused",
            *FAST,
            f"run_dir={tmp_path}",
            "pipeline.stages.ssl.callbacks.pseudo_labeler.k=500",
        ]
    )
    with pytest.raises(
        ConfigError, match=r"pipeline\.stages\.ssl\.callbacks\.pseudo_labeler\.k: 500 clusters"
    ):
        Runner(cfg)


def test_an_epoch_without_validation_is_checkpointed(tmp_path: Path) -> None:
    """check_val_every_n_epoch=5 and 1 epoch (KRR-ST's distill at smoke size): the stage
    still keeps the checkpoint of its last epoch."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from distillery.pipeline.checkpoints import epoch_checkpointing

    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        check_val_every_n_epoch=5,
        callbacks=[epoch_checkpointing(tmp_path)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    assert latest_checkpoint(tmp_path).name == "epoch=0-step=2.ckpt"
