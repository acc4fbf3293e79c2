"""W&B: one offline run per stage, grouped by the pipeline, carrying the stage's metrics."""

from __future__ import annotations

import json
from pathlib import Path

from distillery.pipeline.runner import Runner
from tests.helpers import compose_config, read_wandb_records


def test_wandb_offline_run_holds_the_stage_metrics(
    tmp_path: Path, data_cache: Path, monkeypatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be chosen by the runner itself
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [
            "experiment=supervised",
            "debug=smoke",
            "logger=wandb",
            "trainer.enable_progress_bar=false",
            f"run_dir={run_dir}",
            f"data.cache_dir={data_cache}",
        ]
    )
    record = Runner(cfg).run()["finetune"]
    manifest = json.loads((run_dir / "pipeline.json").read_text())

    run_files = list(
        (run_dir / "wandb").glob(
            f"offline-run-*-{record.wandb_run_id}/run-{record.wandb_run_id}.wandb"
        )
    )
    assert len(run_files) == 1, list((run_dir / "wandb").iterdir())
    records = read_wandb_records(run_files[0])

    run = next(r.run for r in records if r.HasField("run"))
    assert run.run_id == record.wandb_run_id
    assert run.run_group == manifest["run_id"]
    assert run.job_type == "finetune"

    logged: dict[str, float] = {}
    for r in records:
        if r.HasField("history"):
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                logged[key] = json.loads(item.value_json)
    assert {"finetune/train/loss_epoch", "finetune/val/acc", "finetune/test/acc"} <= set(logged)
    assert abs(logged["finetune/test/acc"] - record.metrics["finetune/test/acc"]) < 1e-6

    config_keys = {item.key for item in run.config.update}
    config_keys |= {item.key for r in records if r.HasField("config") for item in r.config.update}
    assert {"pipeline", "data", "stage"} <= config_keys
