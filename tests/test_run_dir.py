"""Run dirs are portable and durable: relative artifact paths, umask-honouring atomic
writes, two epoch checkpoints with a fallback past a damaged one, stale temp files
cleaned, and a refused run that leaves the run dir as it was."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from distillery import artifacts
from distillery.pipeline.checkpoints import latest_checkpoint
from distillery.pipeline.runner import Runner
from tests.test_cli import distillery
from tests.test_runner import smoke_config, with_probe_stage


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def two_stage(run_dir: Path, cache: Path, *extra: str):
    return with_probe_stage(smoke_config(run_dir, cache, *extra))


def probe_lr(run_dir: Path, cache: Path, lr: float):
    cfg = two_stage(run_dir, cache)
    cfg.pipeline.stages.probe.module.optimizer.lr = lr
    return cfg


def test_a_moved_or_copied_run_dir_resumes_where_it_is(
    tmp_path: Path, data_cache: Path, umask_002: None
) -> None:
    first = tmp_path / "first"
    Runner(two_stage(first, data_cache)).run()
    stored = json.loads((first / "pipeline.json").read_text())["stages"]
    assert stored["probe"]["artifacts"] == {
        "checkpoint": stored["probe"]["artifacts"]["checkpoint"],
        "encoder": "probe/encoder.pt",
    }
    assert all(not Path(p).is_absolute() for s in stored.values() for p in s["artifacts"].values())
    # Written under umask 002: group-readable and -writable, like any file the user makes.
    for path in (first / "pipeline.json", first / "probe" / "encoder.pt"):
        assert path.stat().st_mode & 0o777 == 0o664, path
    assert latest_checkpoint(first / "probe").stat().st_mode & 0o777 == 0o664

    moved = tmp_path / "moved"
    first.rename(moved)
    assert [p.action for p in Runner(two_stage(moved, data_cache)).plan()] == ["skip", "skip"]
    # The changed probe re-runs on the finetune encoder where it is now.
    stages = Runner(probe_lr(moved, data_cache, 0.01)).run()
    assert stages["probe"].status == "done"
    assert Path(stages["finetune"].artifacts["encoder"]) == moved / "finetune" / "encoder.pt"

    copy = tmp_path / "copy"
    shutil.copytree(moved, copy, symlinks=True)
    (moved / "finetune" / "encoder.pt").write_bytes(b"the original's file, not the copy's")
    runner = Runner(probe_lr(copy, data_cache, 0.02))
    assert [p.action for p in runner.plan()] == ["skip", "fresh"]
    stages = runner.run()
    assert stages["probe"].status == "done"
    assert all(Path(p).is_relative_to(copy) for s in stages.values() for p in s.artifacts.values())


def test_atomic_writes_honour_the_umask_and_fsync_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    for mask, mode in ((0o002, 0o664), (0o022, 0o644), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            artifacts.write_json(tmp_path / "sub" / f"{mask:o}.json", {"a": 1})
        finally:
            os.umask(old)
        assert (tmp_path / "sub" / f"{mask:o}.json").stat().st_mode & 0o777 == mode
    # The file's data, then the directory holding the new name.
    assert synced[-1] == str(tmp_path / "sub")
    assert synced[-2].startswith(str(tmp_path / "sub" / ".77.json."))


def test_stale_temp_files_are_removed_at_start(tmp_path: Path, data_cache: Path) -> None:
    run_dir = tmp_path / "run"
    Runner(smoke_config(run_dir, data_cache)).run()
    stale = [
        run_dir / ".pipeline.json.x1y2.tmp",
        run_dir / "finetune" / "checkpoints" / ".epoch=0-step=3.ckpt.k3j4.tmp",
    ]
    for path in stale:
        path.write_bytes(b"\0" * 4096)
    kept = run_dir / "finetune" / "notes.tmp"  # not one of ours: not hidden
    kept.write_text("mine")
    Runner(smoke_config(run_dir, data_cache)).run()
    assert not any(p.exists() for p in stale)
    assert kept.read_text() == "mine"


def test_two_checkpoints_kept_and_a_damaged_latest_falls_back(
    tmp_path: Path, data_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "failed-once"
    cfg = smoke_config(
        tmp_path / "run",
        data_cache,
        "debug.trainer.max_epochs=4",
        "+pipeline.stages.finetune.callbacks.fault._target_=tests.helpers.FailOnceAtEpoch",
        "+pipeline.stages.finetune.callbacks.fault.epoch=3",
        f"+pipeline.stages.finetune.callbacks.fault.marker={marker}",
    )
    with pytest.raises(RuntimeError, match="injected failure"):
        Runner(cfg).run()
    checkpoints = tmp_path / "run" / "finetune" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("epoch=*.ckpt")) == [
        "epoch=1-step=6.ckpt",
        "epoch=2-step=9.ckpt",
    ]
    newest = checkpoints / "epoch=2-step=9.ckpt"
    assert latest_checkpoint(checkpoints.parent) == newest
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # e.g. a disk error

    with caplog.at_level(logging.WARNING, logger="distillery.pipeline.checkpoints"):
        runner = Runner(cfg)
        plan = runner.plan()
    assert "epoch=2-step=9.ckpt is damaged" in caplog.text
    assert plan[0].action == "resume" and plan[0].reason.endswith("epoch=1-step=6.ckpt")
    assert runner.run()["finetune"].status == "done"
    final = torch.load(latest_checkpoint(checkpoints.parent), weights_only=True)
    assert (final["epoch"], final["global_step"]) == (3, 12)  # epochs 2 and 3 re-done


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow  # three CLI processes
def test_a_refused_run_leaves_the_run_dir_untouched(tmp_path: Path, data_cache: Path) -> None:
    run_dir = tmp_path / "run"
    Runner(smoke_config(run_dir, data_cache)).run()
    # What the CLI's accepted run left next to the results.
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("run_dir: the accepted run's\n")
    (run_dir / "distillery.log").write_text("the accepted run's log\n")
    before = snapshot(run_dir)

    bad_value = distillery(
        "experiment=supervised", "data.batch_size=0", f"run_dir={run_dir}", cache=data_cache
    )
    other_pipeline = distillery(
        "experiment=unfused", "debug=smoke", "logger=csv", f"run_dir={run_dir}", cache=data_cache
    )
    assert bad_value.returncode == 2 and "data.batch_size" in bad_value.stdout + bad_value.stderr
    assert other_pipeline.returncode == 2
    assert "holds pipeline 'supervised'" in other_pipeline.stdout + other_pipeline.stderr
    assert snapshot(run_dir) == before
