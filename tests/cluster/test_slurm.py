"""On a real (one-node) SLURM cluster: a sweep of 2-task DDP jobs through the submitit
launcher, a job requeued mid-stage, a job past its time limit, a torchrun job that loses a
worker. Start the cluster with ``tests/cluster/slurm.sh start`` (``make test-cluster`` does)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env, read_wandb_records
from tests.test_faults import assert_same_results, manifest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: A 2-rank CPU (gloo) DDP pipeline at smoke size.
DDP = [
    "experiment=supervised",
    "debug=smoke",
    "trainer=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]
#: Job settings for this node: CPU tasks, no GPUs.
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
]
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def slow(stage: str, seconds: float, *options: str) -> list[str]:
    key = f"+pipeline.stages.{stage}.callbacks.slow"
    return [f"{key}._target_=tests.helpers.SlowBatches", f"{key}.seconds={seconds}"] + [
        f"{key}.{option}" for option in options
    ]


def distillery_cmd(*args: str, cache: Path) -> str:
    return " ".join([sys.executable, "-m", "distillery.cli", *args, f"data.cache_dir={cache}"])


def sbatch(slurm: dict, tmp_path: Path, command: str, *options: str) -> str:
    """Submit ``command`` as a batch job in ``tmp_path``; its output is appended to job.out."""
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n{command}\n")
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--open-mode=append",
            f"--output={tmp_path / 'job.out'}",
            f"--chdir={tmp_path}",
            "--mem=4G",
            *options,
            str(script),
        ],
        env=slurm | cli_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def submit_sweep(
    slurm: dict, sweep: Path, cache: Path, *overrides: str
) -> subprocess.CompletedProcess:
    """``distillery -m`` through the submitit SLURM launcher, each job a 2-task DDP run;
    returns when every job of the sweep has ended."""
    return subprocess.run(
        [sys.executable, "-m", "distillery.cli", "-m", *DDP, *LAUNCHER, *overrides,
         f"hydra.sweep.dir={sweep}", f"data.cache_dir={cache}"],
        env=slurm | cli_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip


def job_info(slurm: dict, job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=slurm, capture_output=True, text=True
    ).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_job(slurm: dict, job: str, timeout: float = 900) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (info := job_info(slurm, job)).get("JobState") not in DONE_STATES:
        assert time.monotonic() < deadline, f"job {job} still {info.get('JobState')}"
        time.sleep(2)
    return info


def wait_for(path: Path, slurm: dict, job: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = job_info(slurm, job).get("JobState")
        assert state not in DONE_STATES, f"job {job} ended ({state}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.5)


def test_sweep_of_two_ddp_jobs_through_the_submitit_launcher(
    slurm: dict, tmp_path: Path, data_cache: Path
) -> None:
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    result = submit_sweep(slurm, sweep, data_cache, "logger=wandb", "seed=0,1")
    print(f"sweep of 2 jobs: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    groups = set()
    for job in ("0", "1"):
        record = manifest(sweep / job)["stages"]["finetune"]
        assert record["status"] == "done", record["error"]
        run_file = next((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        run = next(r.run for r in read_wandb_records(run_file) if r.HasField("run"))
        assert run.run_group == manifest(sweep / job)["run_id"]
        groups.add(run.run_group)
        # Both tasks of the job trained: each wrote its own submitit log.
        assert len(list((sweep / ".submitit").glob("*/*_log.out"))) >= 4
    assert len(groups) == 2


def test_job_requeued_mid_stage_resumes_and_matches_an_uninterrupted_run(
    slurm: dict, tmp_path: Path, data_cache: Path
) -> None:
    args = [*DDP, "logger=csv", "debug.trainer.max_epochs=4", *slow("finetune", 0.5)]
    reference = tmp_path / "reference"
    for jobs in ("reference-job", "job"):
        (tmp_path / jobs).mkdir()
    command = "srun " + distillery_cmd(*args, f"run_dir={reference}", cache=data_cache)
    job = sbatch(slurm, tmp_path / "reference-job", command, "--ntasks-per-node=2")
    assert wait_job(slurm, job)["JobState"] == "COMPLETED"

    # The default run dir: both tasks, and the requeued job, name it by the job and step.
    command = "srun " + distillery_cmd(*args, cache=data_cache)
    job = sbatch(slurm, tmp_path / "job", command, "--ntasks-per-node=2", "--requeue")
    run_dir = tmp_path / "job" / "outputs" / f"slurm-{job}.0"
    wait_for(run_dir / "finetune" / "checkpoints" / "last.ckpt", slurm, job)  # in epoch 1
    started = time.monotonic()
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)
    info = wait_job(slurm, job)
    print(f"requeued job finished {time.monotonic() - started:.0f} s after the requeue")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    log = (tmp_path / "job" / "job.out").read_text()
    assert "stopped by SIGTERM" in log, log[-3000:]  # SLURM's SIGTERM: a checkpoint, then exit
    assert manifest(run_dir)["stages"]["finetune"]["attempts"] == 2
    assert [p.name for p in (tmp_path / "job" / "outputs").iterdir()] == [run_dir.name]
    assert_same_results(run_dir, reference)


def test_job_past_its_time_limit_checkpoints_is_requeued_and_finishes(
    slurm: dict, tmp_path: Path, data_cache: Path
) -> None:
    """SIGUSR2 150 s before a 4-minute limit. The first run is slow (it needs 200 s of
    training), the requeued ones are not; submitit requeues up to 3 times."""
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    result = submit_sweep(
        slurm,
        sweep,
        data_cache,
        "hydra.launcher.timeout_min=4",
        "hydra.launcher.signal_delay_s=150",
        "logger=csv",
        "debug.trainer.max_epochs=20",
        *slow("finetune", 5.0, f"first_run_marker={tmp_path / 'slow'}"),
    )
    print(f"time-limited job: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    record = manifest(sweep / "0")["stages"]["finetune"]
    assert record["status"] == "done" and record["attempts"] >= 2, record
    assert (sweep / "0" / "finetune" / "checkpoints" / "interrupted.ckpt").exists()
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "stopped by SIGUSR2" in logs and "Requeued job" in logs


def test_torchrun_job_survives_a_killed_worker(
    slurm: dict, tmp_path: Path, data_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    (tmp_path / "job").mkdir()
    key = "+pipeline.stages.finetune.callbacks.kill"
    args = [
        *DDP,
        "logger=csv",
        "debug.trainer.max_epochs=3",
        f"{key}._target_=tests.helpers.SignalAt",
        f"{key}.signal=SIGKILL",
        f"{key}.rank=1",
        f"{key}.epoch=1",
        f"{key}.batch=0",
        f"{key}.marker={tmp_path / 'killed'}",
        f"run_dir={run_dir}",
        f"data.cache_dir={data_cache}",
    ]
    torchrun = Path(sys.executable).with_name("torchrun")
    command = (
        f"{torchrun} --standalone --nproc-per-node=2 --max-restarts=1 -m distillery.cli "
        + " ".join(args)
    )
    started = time.monotonic()
    job = sbatch(slurm, tmp_path / "job", command, "--ntasks-per-node=1", "--cpus-per-task=2")
    info = wait_job(slurm, job)
    print(f"torchrun job with a killed worker: {time.monotonic() - started:.0f} s")
    log = (tmp_path / "job" / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert (tmp_path / "killed.rank1").exists()  # the worker was killed once
    record = manifest(run_dir)["stages"]["finetune"]
    assert record["status"] == "done" and record["attempts"] >= 2, record
