"""One run dir, one writer: a second run is refused, a dead run's lock is taken over."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillery.pipeline import run_lock
from distillery.pipeline.run_lock import RunDirLocked
from tests.test_faults import cli, finish, manifest, wait_for


def holder_of(proc: subprocess.Popen) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": proc.pid,
        "process_start": run_lock._process_start(proc.pid),
        "started_at": "2026-01-01T00:00:00+0000",
        "slurm_job_id": None,
    }


def test_live_holder_refuses_dead_or_same_job_holder_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = tmp_path / run_lock.LOCK_NAME
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps(holder_of(sleeper)))
        with pytest.raises(
            RunDirLocked, match=rf"in use by another run \(pid {sleeper.pid} on host"
        ):
            run_lock.acquire(tmp_path)
        lock.write_text(json.dumps(holder_of(sleeper) | {"host": "elsewhere"}))
        with pytest.raises(RunDirLocked, match="on host elsewhere"):  # cannot tell: refuse
            run_lock.acquire(tmp_path)
        monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued onto another node
        lock.write_text(
            json.dumps(holder_of(sleeper) | {"host": "elsewhere", "slurm_job_id": "77"})
        )
        assert json.loads(run_lock.acquire(tmp_path).read_text())["pid"] == run_lock.os.getpid()
        monkeypatch.delenv("SLURM_JOB_ID")
        # The holder's pid now runs another program (a different start time): stale.
        lock.write_text(json.dumps(holder_of(sleeper) | {"process_start": "1"}))
        run_lock.acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(json.dumps(holder_of(sleeper)))  # killed: its pid runs nothing now
    with run_lock.hold(tmp_path, writer=True):
        assert json.loads(lock.read_text())["pid"] == run_lock.os.getpid()
    assert not lock.exists()


@pytest.mark.slow
def test_second_run_on_a_live_run_dir_is_refused_and_a_killed_runs_lock_taken_over(
    tmp_path: Path, data_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [
        "experiment=supervised",
        "debug=smoke",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "debug.trainer.max_epochs=20",  # slow: 60 s, until it is killed; the resumed run is fast
        "+pipeline.stages.finetune.callbacks.slow._target_=tests.helpers.SlowBatches",
        "+pipeline.stages.finetune.callbacks.slow.seconds=1.0",
        f"+pipeline.stages.finetune.callbacks.slow.first_run_marker={tmp_path / 'slow'}",
        f"run_dir={run_dir}",
    ]
    first = cli(*args, cache=data_cache)
    wait_for(run_dir / "finetune" / "checkpoints" / "last.ckpt", first)
    code, out = finish(cli(*args, cache=data_cache))
    assert code == 2, out[-3000:]
    assert f"is in use by another run (pid {first.pid} on host {socket.gethostname()}" in out
    assert first.poll() is None  # the first run was left alone
    assert manifest(run_dir)["stages"]["finetune"]["attempts"] == 1

    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (run_dir / run_lock.LOCK_NAME).exists()
    started = time.monotonic()
    code, out = finish(cli(*args, cache=data_cache))
    assert code == 0, out[-3000:]
    assert manifest(run_dir)["stages"]["finetune"]["status"] == "done"
    assert not (run_dir / run_lock.LOCK_NAME).exists()
    assert time.monotonic() - started < 300
