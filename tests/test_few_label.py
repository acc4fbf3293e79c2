"""The few-label protocol: validation labels limited like the training labels, label
subsets drawn per seed, finetuning by a step budget with early stopping on validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distillery.config.validation import ConfigError, stage_trainer, with_stage_kind_settings
from distillery.data.datamodule import AudioDataModule
from distillery.pipeline.runner import Runner
from tests.helpers import compose_config


def table(cache: Path, *overrides: str):
    cfg = compose_config(["experiment=supervised", f"data.cache_dir={cache}", *overrides])
    data = AudioDataModule(cfg.data)
    data.setup()
    return data.table


@pytest.mark.slow  # four data modules over the 800-clip set
def test_validation_labels_are_limited_per_class_and_subsets_follow_their_seed(
    data_cache: Path,
) -> None:
    # The built-in set: 8 classes of 100 clips, 15% of each class in validation.
    full = table(data_cache, "data.label_fraction=0.05")
    few = table(data_cache, "data.label_fraction=0.05", "data.val_labels_per_class=3")
    val, few_val = full.indices("val"), few.indices("val")
    assert len(val) == 8 * 15 and len(few_val) == 8 * 3
    assert np.bincount(few.visible_labels[few_val]).tolist() == [3] * 8
    assert set(few_val) < set(val)
    # The other validation clips are unlabelled training clips; test is untouched.
    moved = np.setdiff1d(val, few_val)
    assert (few.splits[moved] == "train").all() and (few.visible_labels[moved] == -1).all()
    assert np.array_equal(few.indices("test"), full.indices("test"))
    labeled = few.indices("train")[few.visible_labels[few.indices("train")] >= 0]
    assert len(labeled) == 8 * 4  # round(0.05 * 70) per class, as without the option

    # The labelled subsets: the same for every run by default (split_seed), drawn anew
    # with label_subset_seed; the splits themselves do not move.
    def labelled(t) -> set[int]:
        return set(np.flatnonzero(t.visible_labels >= 0).tolist()) - set(t.indices("test"))

    again = table(data_cache, "data.label_fraction=0.05", "data.val_labels_per_class=3")
    other = table(
        data_cache, "data.label_fraction=0.05", "data.val_labels_per_class=3",
        "data.label_subset_seed=1",
    )  # fmt: skip
    assert labelled(again) == labelled(few) != labelled(other)
    assert len(labelled(other)) == len(labelled(few))
    assert np.array_equal(full.splits == "test", other.splits == "test")


def test_few_label_protocol_finetunes_by_steps_and_stops_early(
    tmp_path: Path, data_cache: Path, one_thread: None, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [
            "experiment=supervised", "logger=csv", "trainer.enable_progress_bar=false",
            "protocol=few_label", "data.synthetic.num_classes=4",
            "data.synthetic.clips_per_class=30", "data.batch_size=8", "data.label_fraction=0.1",
            "stage_kind_settings.finetune.trainer.max_steps=12",
            "stage_kind_settings.finetune.selection.patience=2",
            "stage_kind_settings.finetune.trainer.val_check_interval=2",
            # A linear probe (frozen encoder) at a tiny learning rate does not improve on
            # validation: it stops `patience` validations after its first.
            "pipeline.stages.finetune.module.mode=linear",
            "pipeline.stages.finetune.module.optimizer.lr=1e-6",
            "pipeline.stages.finetune.evaluate=false",
            f"run_dir={run_dir}", f"data.cache_dir={data_cache}",
        ]
    )  # fmt: skip
    with caplog.at_level("INFO"):
        record = Runner(cfg).run()["finetune"]
    # 4 classes x 30 clips: 20 train clips per class, 10% labelled -> 2 each; 3 val labels each.
    assert record.metrics["finetune/data/labeled_train"] == 8
    assert record.metrics["finetune/data/labeled_val"] == 12
    # An epoch is one step (8 clips, batch 8); validation is every 2 steps all the same
    # (per epoch it would stop at step 3): first at step 2, stopped 2 validations later.
    steps = record.optimizer_steps[0]
    assert 6 <= steps < 12 and steps % 2 == 0
    assert record.selected["step"] % 2 == 0 and record.selected["step"] <= steps - 4
    # The epoch lines count steps against the budget and show val/* only after a validation.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finetune epoch")]
    assert [line.split(":")[0] for line in lines[:2]] == [
        "finetune epoch 1, step 1/12",
        "finetune epoch 2, step 2/12",
    ]
    assert ["val/acc=" in line for line in lines] == [step % 2 == 0 for step in range(1, steps + 1)]
    results = (run_dir / "results.md").read_text()
    assert "labeled_train" in results and "| 8 | 12 |" in results
    assert json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]["selected"]


def test_the_protocol_budgets_every_finetune_stage_of_any_pipeline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = compose_config(
        [
            "experiment=unfused_compare", "protocol=few_label",
            "+pipeline.stages.teacher_few.trainer.max_epochs=7",
        ]
    )  # fmt: skip
    with caplog.at_level("INFO"):
        applied = with_stage_kind_settings(cfg)
    finetunes = [n for n, s in cfg.pipeline.stages.items() if s.kind == "finetune"]
    assert len(finetunes) == 6
    for name in cfg.pipeline.order:
        trainer = stage_trainer(applied, name)
        if name in finetunes:
            assert (trainer["max_epochs"], trainer["max_steps"]) == (-1, 300), name
            assert trainer["check_val_every_n_epoch"] is None
            assert trainer["val_check_interval"] == 10
            assert applied.pipeline.stages[name].selection.patience == 10
        else:  # the SSL teacher and the student keep the experiment's epochs
            assert trainer["max_epochs"] == stage_trainer(cfg, name)["max_epochs"] != -1
            assert "max_steps" not in trainer
    assert "pipeline.stages.teacher_few.trainer.max_epochs=7 replaced by " in caplog.text
    assert "stage_kind_settings.finetune.trainer.max_epochs=-1" in caplog.text
    assert cfg.pipeline.stages.teacher_few.selection.patience is None  # cfg itself unchanged


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+stage_kind_settings.finetun.trainer.max_steps=3", "stage_kind_settings.finetun: no stage kind"),
        ("+stage_kind_settings.finetune.epochs=3", "stage_kind_settings.finetune.epochs: not a stage setting"),
    ],
)  # fmt: skip
def test_settings_for_a_kind_that_does_not_exist_are_refused(override: str, message: str) -> None:
    cfg = compose_config(["experiment=supervised", override])
    with pytest.raises(ConfigError, match=message):
        with_stage_kind_settings(cfg)
