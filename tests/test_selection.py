"""Selection on validation: searches never select on the test split, and a stage is tested
once, with the weights of its best validation epoch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from distillery.config.validation import stage_data
from distillery.data.datamodule import AudioDataModule
from distillery.pipeline.runner import Runner
from distillery.pipeline.sweep import main as sweep_main
from tests.helpers import FAST, REPO, compose_config
from tests.test_cli import distillery


class ZeroHeadFromEpoch(pl.Callback):
    """From epoch ``epoch`` on, the classifier head is zero and the learning rate 0: every
    prediction is class 0, so the last epoch is worse on validation than a trained one."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            torch.nn.init.zeros_(pl_module.head.weight)
            torch.nn.init.zeros_(pl_module.head.bias)
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 0.0


SELECTION_RUN = [
    "experiment=supervised",
    *FAST,
    "data.synthetic.clips_per_class=30",
    "debug.trainer.max_epochs=4",
    "debug.trainer.limit_train_batches=4",
    "pipeline.stages.finetune.module.optimizer.lr=0.003",
    "+pipeline.stages.finetune.callbacks.zero_head={_target_: tests.test_selection.ZeroHeadFromEpoch, epoch: 3}",
]


@pytest.mark.slow  # about 15 s: a 4-epoch finetune
def test_the_stage_is_tested_with_its_best_validation_checkpoint(
    tmp_path: Path, data_cache: Path, one_thread: None
) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config([*SELECTION_RUN, f"run_dir={run_dir}", f"data.cache_dir={data_cache}"])
    record = Runner(cfg).run()["finetune"]

    # The construction: the last epoch (3) predicts class 0 only, a trained epoch is better.
    selected = record.selected
    assert selected["monitor"] == "finetune/val/acc" and selected["mode"] == "max"
    assert selected["epoch"] < 3, selected
    best = run_dir / selected["checkpoint"]
    assert best.parent.name == "best" and f"epoch={selected['epoch']}" in best.name
    # The recorded validation metrics are the selected weights' (re-validated), the
    # "checkpoint" artifact is the selected one, and pipeline.json says which it was.
    assert record.metrics["finetune/val/acc"] == selected["value"]
    assert Path(record.artifacts["checkpoint"]) == best
    on_disk = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    assert on_disk["selected"] == selected

    # An independent test of that checkpoint gives the recorded test metrics; the last
    # epoch's weights would not have.
    def test_metrics(checkpoint: Path) -> dict[str, float]:
        data = AudioDataModule(stage_data(cfg, "finetune"))
        data.prepare_data()
        data.setup("fit")
        module = Runner(cfg)._build_module("finetune", data, {})
        module.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
        trainer = pl.Trainer(
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            limit_test_batches=cfg.debug.trainer.limit_test_batches,
        )  # fmt: skip
        (result,) = trainer.test(module, datamodule=data, verbose=False)
        return {k: round(float(v), 6) for k, v in result.items()}

    tested = test_metrics(best)
    assert tested == {k: record.metrics[k] for k in tested}
    last = test_metrics(run_dir / "finetune" / "checkpoints" / "last.ckpt")
    assert last["finetune/test/loss"] != tested["finetune/test/loss"]


def test_a_selection_on_anything_but_validation_is_refused() -> None:
    from distillery.config.validation import ConfigError
    from distillery.pipeline.contract import validate

    cfg = compose_config(
        ["experiment=supervised", "pipeline.stages.finetune.selection.monitor=test/acc"]
    )
    with pytest.raises(
        ConfigError, match=r"pipeline\.stages\.finetune\.selection\.monitor: 'test/acc'"
    ):
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimized_metric=finetune/test/acc", "seed=0,1"], "optimized_metric: 'finetune/test/acc'"),
        pytest.param(
            ["hparams_search=finetune_optuna", "optimized_metric=finetune/eval/knn10_acc"],
            "optimized_metric: 'finetune/eval/knn10_acc'", marks=pytest.mark.slow,
        ),
        pytest.param(
            ["data.label_fraction=0.05,0.1"],
            "override data.label_fraction=0.05,0.1: data.label_fraction", marks=pytest.mark.slow,
        ),
    ],
)  # fmt: skip
def test_a_sweep_selecting_on_test_data_is_refused_before_any_job(
    tmp_path: Path, data_cache: Path, overrides: list[str], message: str
) -> None:
    sweep = tmp_path / "sweep"
    result = distillery(
        "-m",
        "experiment=supervised",
        *FAST,
        *overrides,
        f"hydra.sweep.dir={sweep}",
        cache=data_cache,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stdout + result.stderr
    assert not list(sweep.glob("*/pipeline.json"))


@pytest.mark.slow  # a CLI process
def test_a_single_run_with_a_test_objective_is_refused(tmp_path: Path, data_cache: Path) -> None:
    result = distillery(
        "experiment=supervised", *FAST, "optimized_metric=finetune/test/acc",
        f"run_dir={tmp_path / 'r'}", cache=data_cache,
    )  # fmt: skip
    assert result.returncode == 2
    assert "optimized_metric: 'finetune/test/acc' is not a validation metric" in result.stdout
    assert not (tmp_path / "r" / "pipeline.json").exists()


def sweep_check(capsys: pytest.CaptureFixture, *files: Path) -> tuple[int, str]:
    """``distillery-sweep check FILE...``: exit status and output."""
    with pytest.raises(SystemExit) as exit_status:
        sweep_main(["check", *map(str, files)])
        sys.exit(0)
    out = capsys.readouterr()
    return exit_status.value.code, out.out + out.err


def test_wandb_sweep_files_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shipped = sorted((REPO / "sweeps").glob("*.yaml"))
    assert shipped and sweep_check(capsys, *shipped)[0] == 0

    text = (REPO / "sweeps" / "wandb_finetune_lr.yaml").read_text()
    on_test = tmp_path / "on_test.yaml"
    on_test.write_text(text.replace("name: finetune/val/acc", "name: finetune/test/acc"))
    status, out = sweep_check(capsys, on_test)
    assert status == 2
    assert f"{on_test}: metric.name: 'finetune/test/acc' is not a validation metric" in out

    searched = tmp_path / "label_fraction.yaml"
    searched.write_text(
        text.replace("parameters:\n", "parameters:\n  data.label_fraction: {values: [0.05, 0.5]}\n")
    )
    status, out = sweep_check(capsys, searched)
    assert status == 2
    assert f"{searched}: parameters.data.label_fraction: data.label_fraction is a setting" in out
