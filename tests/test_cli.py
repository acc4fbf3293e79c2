"""The `distillery` console script, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, cli_env


def distillery(*args: str, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distillery.cli", *args, f"data.cache_dir={cache}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=600)


def test_smoke_run_then_skip(tmp_path: Path, data_cache: Path) -> None:
    run_dir = tmp_path / "run"
    first = distillery(
        "experiment=supervised", "debug=smoke", "logger=csv", f"run_dir={run_dir}", cache=data_cache
    )
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    assert manifest["stages"]["finetune"]["status"] == "done"
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "| finetune | finetune | done |" in (run_dir / "results.md").read_text()

    second = distillery(
        "experiment=supervised", "debug=smoke", "logger=csv", f"run_dir={run_dir}", cache=data_cache
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skip" in second.stdout + second.stderr
    assert json.loads((run_dir / "pipeline.json").read_text()) == manifest


def test_typo_fails_at_start_up_naming_the_key(tmp_path: Path, data_cache: Path) -> None:
    result = distillery(
        "experiment=supervised",
        "+pipeline.stages.finetune.module.lr=0.1",
        f"run_dir={tmp_path / 'r'}",
        cache=data_cache,
    )
    assert result.returncode != 0
    assert (
        "pipeline.stages.finetune.module.lr: unknown argument of FinetuneStage"
        in result.stdout + result.stderr
    )
    assert not (tmp_path / "r" / "pipeline.json").exists()


def test_help_lists_groups_and_experiments(data_cache: Path) -> None:
    result = distillery("--help", cache=data_cache)
    assert result.returncode == 0
    assert "experiment: " in result.stdout and "supervised" in result.stdout


def test_multirun_gives_each_job_its_run_dir_and_wandb_group_and_ends_with_a_sweep_table(
    tmp_path: Path, data_cache: Path
) -> None:
    from tests.helpers import read_wandb_records, wandb_runs

    sweep = tmp_path / "sweep"
    result = distillery(
        "-m",
        "experiment=supervised",
        "debug=smoke",
        "logger=wandb",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        cache=data_cache,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    groups = set()
    for job in ("0", "1"):
        manifest = json.loads((sweep / job / "pipeline.json").read_text())
        record = manifest["stages"]["finetune"]
        assert record["status"] == "done"
        (run_file,) = (sweep / job / "wandb").glob(
            f"offline-run-*/run-{record['wandb_run_id']}.wandb"
        )
        run = next(r.run for r in read_wandb_records(run_file) if r.HasField("run"))
        assert run.run_group == manifest["run_id"]
        groups.add(run.run_group)
    assert len(groups) == 2

    # The sweep's own table (sweep_results.md and a `sweep` W&B run): a row per job, with
    # the override that differs and the job's final metrics.
    text = (sweep / "sweep_results.md").read_text()
    assert [line.split(" | ")[1] for line in text.splitlines()[2:]] == ["seed=0", "seed=1"]
    (sweep_run,) = wandb_runs(sweep).values()
    assert sweep_run.run.job_type == "sweep"
    table = sweep_run.table("results")
    assert len(table["data"]) == 2
    for job, row in enumerate(table["data"]):
        manifest = json.loads((sweep / str(job) / "pipeline.json").read_text())
        cells = dict(zip(table["columns"], row, strict=True))
        assert (cells["job"], cells["overrides"]) == (str(job), f"seed={job}")
        assert cells["run id"] == manifest["run_id"]
        acc = manifest["stages"]["finetune"]["metrics"]["finetune/test/acc"]
        assert cells["finetune/test/acc"] == acc
