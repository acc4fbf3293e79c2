"""Runner semantics: skip what is done, re-run what changed, resume what was interrupted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from distillery.pipeline.checkpoints import latest_checkpoint
from distillery.pipeline.manifest import RunManifest
from distillery.pipeline.runner import Runner
from tests.helpers import FAST, compose_config
from tests.test_cli import distillery


def smoke_config(run_dir: Path, cache: Path, *extra: str) -> DictConfig:
    return compose_config(
        ["experiment=supervised", *FAST, f"run_dir={run_dir}", f"data.cache_dir={cache}", *extra]
    )


def with_probe_stage(cfg: DictConfig) -> DictConfig:
    """supervised -> a linear probe of the trained encoder: two stages wired by an artifact."""
    with open_dict(cfg):
        probe = OmegaConf.to_container(cfg.pipeline.stages.finetune)
        probe["module"]["mode"] = "linear"
        probe["inputs"] = {"module.pretrained": "finetune.encoder"}
        cfg.pipeline.stages = OmegaConf.merge(cfg.pipeline.stages, {"probe": probe})
        cfg.pipeline.order = ["finetune", "probe"]
    return cfg


def test_stage_runs_records_and_is_skipped_next_time(tmp_path: Path, data_cache: Path) -> None:
    cfg = smoke_config(tmp_path / "run", data_cache)
    stages = Runner(cfg).run()
    record = stages["finetune"]
    assert record.status == "done"
    assert set(record.artifacts) == {"checkpoint", "encoder"}
    assert all(Path(p).exists() for p in record.artifacts.values())
    assert "finetune/test/acc" in record.metrics and "finetune/train/loss_epoch" in record.metrics
    assert record.wall_time_s > 0

    on_disk = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert on_disk["stages"]["finetune"]["status"] == "done"
    assert (tmp_path / "run" / "results.md").read_text().count(
        "finetune/test/acc"
    ) == 0  # keyed by split
    assert "test/acc" in (tmp_path / "run" / "results.md").read_text()

    again = Runner(smoke_config(tmp_path / "run", data_cache))
    assert [p.action for p in again.plan()] == ["skip"]
    assert again.run()["finetune"].finished_at == record.finished_at


def test_changed_stage_reruns_with_everything_after_it(tmp_path: Path, data_cache: Path) -> None:
    run_dir = tmp_path / "run"
    Runner(with_probe_stage(smoke_config(run_dir, data_cache))).run()
    assert [
        p.action for p in Runner(with_probe_stage(smoke_config(run_dir, data_cache))).plan()
    ] == ["skip", "skip"]

    # Changing the probe re-runs the probe only.
    changed_probe = with_probe_stage(smoke_config(run_dir, data_cache))
    changed_probe.pipeline.stages.probe.module.optimizer.lr = 0.01
    assert [p.action for p in Runner(changed_probe).plan()] == ["skip", "fresh"]

    # Changing the first stage re-runs it and the stage that consumes its encoder.
    changed_first = with_probe_stage(
        smoke_config(run_dir, data_cache, "pipeline.stages.finetune.module.optimizer.lr=0.01")
    )
    plan = Runner(changed_first).plan()
    assert [p.action for p in plan] == ["fresh", "fresh"]
    assert "config changed" in plan[0].reason


def test_interrupted_stage_resumes_from_its_last_checkpoint(
    tmp_path: Path, data_cache: Path
) -> None:
    marker = tmp_path / "failed-once"
    cfg = smoke_config(
        tmp_path / "run",
        data_cache,
        "debug.trainer.max_epochs=3",
        "+pipeline.stages.finetune.callbacks.fault._target_=tests.helpers.FailOnceAtEpoch",
        "+pipeline.stages.finetune.callbacks.fault.epoch=2",
        f"+pipeline.stages.finetune.callbacks.fault.marker={marker}",
        "+pipeline.stages.finetune.callbacks.slow._target_=tests.helpers.SlowUntilMarker",
        "+pipeline.stages.finetune.callbacks.slow.seconds=3",
        f"+pipeline.stages.finetune.callbacks.slow.marker={marker}",
    )
    with pytest.raises(RuntimeError, match="injected failure"):
        Runner(cfg).run()
    manifest = RunManifest.load_or_create(tmp_path / "run", "supervised")
    failed = manifest.stages["finetune"]
    assert failed.status == "failed" and "injected failure" in failed.error
    last = latest_checkpoint(tmp_path / "run" / "finetune")
    assert torch.load(last, weights_only=False)["epoch"] == 1  # epochs 0 and 1 completed

    runner = Runner(cfg)
    assert [p.action for p in runner.plan()] == ["resume"]
    second_attempt_start = time.perf_counter()
    record = runner.run()["finetune"]
    second_attempt_s = time.perf_counter() - second_attempt_start
    # The stage's wall time counts the first attempt's two (slow) epochs too.
    assert failed.wall_time_s >= 6
    assert record.wall_time_s > second_attempt_s + 3
    assert record.status == "done" and record.wandb_run_id == failed.wandb_run_id
    checkpoint = torch.load(latest_checkpoint(tmp_path / "run" / "finetune"), weights_only=False)
    assert checkpoint["epoch"] == 2
    # 3 epochs x 3 batches: the resumed run did epoch 2 only, it did not start over.
    assert checkpoint["global_step"] == 9
    assert record.attempts == 2
    logs = tmp_path / "run" / "finetune" / "logs"
    epochs = [
        {
            int(line.split(",")[0])
            for line in (logs / f"attempt-{n}" / "metrics.csv").read_text().splitlines()[1:]
        }
        for n in (1, 2)
    ]
    # Each attempt's history is kept; the second starts at epoch 2 (then the test pass logs).
    assert epochs[0] == {0, 1} and min(epochs[1]) == 2


def synthetic_dir(cache: Path) -> Path:
    """The smoke data set's folder (written by any earlier smoke run, or now)."""
    from distillery.data.datamodule import AudioDataModule

    cfg = compose_config(["experiment=supervised", "debug=smoke", f"data.cache_dir={cache}"])
    AudioDataModule(cfg.data).prepare_data()
    return next(cache.glob("synthetic-*"))


@pytest.mark.parametrize("source", ["folder", "manifest"])
def test_user_data_sources_run_with_any_experiment(
    tmp_path: Path, data_cache: Path, source: str
) -> None:
    root = synthetic_dir(data_cache)
    data = (
        ["data=folder", f"data.root={root / 'audio'}"]
        if source == "folder"
        else ["data=manifest", f"data.path={root / 'manifest.csv'}"]
    )
    record = Runner(smoke_config(tmp_path / "run", data_cache, *data)).run()["finetune"]
    assert record.status == "done" and 0 <= record.metrics["finetune/test/acc"] <= 1


@pytest.mark.parametrize("logger", ["tensorboard", "none"])
def test_other_loggers(tmp_path: Path, data_cache: Path, logger: str) -> None:
    cfg = smoke_config(tmp_path / "run", data_cache, f"logger={logger}")
    assert Runner(cfg).run()["finetune"].status == "done"
    event_files = list((tmp_path / "run" / "finetune" / "logs").rglob("events.out.tfevents.*"))
    assert bool(event_files) == (logger == "tensorboard")


@pytest.mark.parametrize("on_bad_file", ["error", "skip"])
def test_bad_audio_files_are_reported_together_or_skipped(
    tmp_path: Path, data_cache: Path, on_bad_file: str
) -> None:
    import shutil

    root = tmp_path / "audio"
    shutil.copytree(synthetic_dir(data_cache) / "audio", root)
    first, second = sorted(p for p in root.iterdir() if p.is_dir())[:2]
    bad = [first / "broken.wav", second / "empty.wav"]
    bad[0].write_bytes(b"RIFF not really a wav file")
    bad[1].write_bytes(b"")
    cfg = smoke_config(
        tmp_path / "run",
        data_cache,
        "data=folder",
        f"data.root={root}",
        f"data.on_bad_file={on_bad_file}",
        "data.max_clips=null",  # smoke's clip limit could leave the bad files out
    )
    if on_bad_file == "error":
        with pytest.raises(ValueError) as err:
            Runner(cfg).run()
        assert all(str(p) in str(err.value) for p in bad) and "data.on_bad_file=skip" in str(
            err.value
        )
        failed = RunManifest.load_or_create(tmp_path / "run", "supervised").stages["finetune"]
        assert failed.status == "failed" and "AudioFileError" in failed.error
    else:
        record = Runner(cfg).run()["finetune"]
        assert record.status == "done" and record.metrics["finetune/data/skipped_files"] == 2


@pytest.mark.slow
def test_stage_without_an_optimizer_step_fails_naming_the_sizes(
    tmp_path: Path, data_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    result = distillery(
        "experiment=supervised",
        "debug=smoke",
        "logger=csv",
        "+pipeline.stages.finetune.callbacks.stop._target_=tests.helpers.StopBeforeTraining",
        f"run_dir={run_dir}",
        cache=data_cache,
    )
    assert result.returncode != 0
    assert "took no optimizer step" in result.stderr and "world size 1" in result.stderr
    finetune = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    assert finetune["status"] == "failed" and "NoTrainingError" in finetune["error"]
