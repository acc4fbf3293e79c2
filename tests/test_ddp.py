"""Two real processes (CPU, gloo): the pipeline and the PseudoLabeler under DDP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distillery.data.datamodule import AudioDataModule
from tests.helpers import compose_config
from tests.test_cli import distillery


@pytest.mark.ddp
def test_unfused_smoke_on_two_processes(tmp_path: Path, data_cache: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = ["experiment=unfused", "debug=smoke", "trainer=ddp", "trainer.devices=2",
                 "trainer.accelerator=cpu", "logger=csv", "pipeline.stages.ssl.callbacks.pseudo_labeler.k=6"]
    result = distillery(*overrides, f"run_dir={run_dir}", cache=data_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    assert [s["status"] for s in manifest["stages"].values()] == ["done"] * 3

    # Every training clip got exactly one pseudo-label although 2 ranks embedded it
    # (32 training clips over 2 ranks, gathered as (index, feature) pairs).
    labels = np.load(manifest["stages"]["ssl"]["artifacts"]["pseudo_labels"])
    data = AudioDataModule(compose_config([*overrides, f"data.cache_dir={data_cache}"]).data)
    data.setup()
    train = data.table.indices("train")
    assert (labels[train] >= 0).all() and (labels[data.table.indices("test")] == -1).all()
    # One run dir for both processes: the child wrote into it, not into a directory of its own.
    assert {p.name for p in run_dir.iterdir()} == {
        ".hydra", "distillery.log", "train_ddp_process_1.log", "pipeline.json", "results.md",
        "ssl", "self_distill", "finetune",
    }
