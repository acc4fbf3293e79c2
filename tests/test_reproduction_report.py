"""What the reproduction reports share: runs grouped by data set, the protocol stated from
the runs' own configs, and seed-paired differences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.data.datamodule import AudioDataModule
from distillery.eval.reproduction import (
    describe_data,
    describe_protocol,
    paired_difference,
    runs_by_data,
)
from tests.helpers import compose_config
from tests.test_cli import distillery


def test_paired_difference_is_taken_seed_by_seed() -> None:
    # Differences 0.1, 0.2, -0.1: mean 0.067, sample std 0.153.
    assert paired_difference([0.5, 0.7, 0.6], [0.4, 0.5, 0.7]) == (
        "+0.067 ± 0.153, higher in 2 of 3 seeds"
    )
    assert paired_difference([0.5], [0.7]) == "-0.200, higher in 0 of 1 seeds"
    assert paired_difference([0.5, 0.7], [0.5, 0.7]) == "+0.000 ± 0.000, higher in 0 of 2 seeds"


def test_runs_are_grouped_by_data_set_and_other_folders_are_left_out(tmp_path: Path) -> None:
    for data, seeds in (("speech", [0, 1]), ("synthetic_hard", [0])):
        for seed in seeds:
            run = tmp_path / data / f"seed{seed}"
            run.mkdir(parents=True)
            stages = {"ssl": {"kind": "ssl", "status": "done", "metrics": {}}}
            (run / "pipeline.json").write_text(json.dumps({"stages": stages}))
    (tmp_path / "labels" / "k16-whiten" / "seed0").mkdir(parents=True)  # another study
    groups = runs_by_data(tmp_path, "seed*/pipeline.json", "reproduce-x")
    assert {data: [p.parent.name for p, _ in runs] for data, runs in groups.items()} == {
        "speech": ["seed0", "seed1"],
        "synthetic_hard": ["seed0"],
    }
    with pytest.raises(SystemExit, match="make reproduce-x"):
        runs_by_data(tmp_path / "labels", "seed*/pipeline.json", "reproduce-x")


@pytest.mark.parametrize("data", ["synthetic", "speech"])
def test_the_stated_test_set_size_is_the_data_modules(data: str, data_cache: Path) -> None:
    cfg = compose_config([f"data={data}", "debug=smoke", f"data.cache_dir={data_cache}"])
    module = AudioDataModule(cfg.data)
    module.setup()
    test_clips = len(module.table.indices("test"))
    assert f", {test_clips} test clips" in describe_data(cfg.data)


def test_the_protocol_is_stated_from_the_runs(tmp_path: Path, data_cache: Path) -> None:
    runs_dir = tmp_path / "runs" / "speech"
    for seed in (0, 1):
        result = distillery(
            "experiment=supervised", "data=speech", "protocol=few_label", "debug=smoke",
            "logger=csv", "trainer.enable_progress_bar=false", f"seed={seed}",
            "+pipeline.stages.finetune.data.label_fraction=0.5",
            f"run_dir={runs_dir / f'seed{seed}'}", cache=data_cache,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    (runs,) = runs_by_data(tmp_path / "runs", "seed*/pipeline.json", "reproduce-x").values()
    text = describe_protocol(runs)
    # Smoke speech: 10 words x 4 speakers x 1 clip, speakers 2/1/1; half of the 20
    # training clips labelled (1 per word); the validation speaker has 1 clip per word,
    # fewer than the protocol's 3 per class, so all 10 stay labelled.
    assert text.startswith("`distillery experiment=supervised data=speech protocol=few_label")
    assert "seeds 0, 1." in text
    assert "10 words (chance 0.100), 4 speakers x 1 clips per word" in text
    assert "split by speaker 2/1/1 (train/val/test), 10 test clips" in text
    assert "`finetune`: 10 / 10" in text
    assert "labelled subsets drawn per seed" in text
    assert "at most 300 optimizer steps, validated every 10 steps, stops after 10 " in text
    assert "tested once, with its best-validation weights" in text
