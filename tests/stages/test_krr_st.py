"""KRR-ST stages: dataset_distill (synthetic set, outer loss) and pretrain_synthetic."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tests.helpers import FAST, compose_config

from distillery.artifact_kinds import EncoderArtifact, SyntheticSet
from distillery.data.datamodule import AudioDataModule
from distillery.distill.synthetic_set import load_synthetic_set
from distillery.losses.krr import krr_distill_loss
from distillery.models.encoders import AudioNTT
from distillery.models.io import save_encoder
from distillery.pipeline.contract import ConfigError, validate
from distillery.pipeline.runner import Runner
from distillery.stages.dataset_distill import DatasetDistillStage
from distillery.stages.pretrain_synthetic import PretrainSyntheticStage

#: Smaller inputs than the smoke default (64 mel bins x 1 s): these tests train for real.
SMALL_DATA = ["data.features.n_mels=16", "data.clip_seconds=0.5"]
N_MELS = 16
TINY = {
    "_target_": "distillery.models.encoders.AudioNTT",
    "n_mels": N_MELS,
    "channels": 4,
    "dim": 32,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


@pytest.fixture
def datamodule(data_cache: Path) -> AudioDataModule:
    cfg = compose_config([*FAST, *SMALL_DATA, f"data.cache_dir={data_cache}"])
    data = AudioDataModule(cfg.data)
    data.prepare_data()
    data.setup("fit")
    return data


@pytest.fixture
def teacher(tmp_path: Path) -> str:
    """A random frozen encoder: a fixed target representation is all distillation needs. Its
    output layer is scaled up so that its embeddings vary across clips about as much as a
    trained teacher's (std ~0.3 per dimension; ~0.01 at random initialisation)."""
    torch.manual_seed(0)
    cfg = {**TINY, "channels": 8, "dim": 24}
    encoder = AudioNTT(**{k: v for k, v in cfg.items() if k != "_target_"})
    with torch.no_grad():
        encoder.fc[-2].weight.mul_(30.0)
    path = tmp_path / "teacher.pt"
    save_encoder(path, encoder, cfg)
    return str(path)


def _trainer(root: Path, **kwargs) -> pl.Trainer:
    defaults = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False}
    defaults |= {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(default_root_dir=str(root), **(defaults | kwargs))


def _distill_stage(teacher: str, **kwargs) -> DatasetDistillStage:
    kwargs = {
        "size": 8,
        "pool_size": 2,
        "pool_max_steps": 10,
        "augment": None,
        "optimizer": {
            "_target_": "torch.optim.AdamW",
            "_partial_": True,
            "lr": 1e-2,
            "weight_decay": 0.0,
        },
    } | kwargs
    return DatasetDistillStage(TINY, EncoderArtifact.load(teacher), **kwargs)


def test_smoke_pipeline_writes_the_synthetic_set(tmp_path: Path, data_cache: Path) -> None:
    cfg = compose_config(
        [
            "experiment=krr_st",
            *FAST,
            *SMALL_DATA,
            f"run_dir={tmp_path}",
            f"data.cache_dir={data_cache}",
            "pipeline.stages.dataset_distill.module.size=6",
            "pipeline.stages.dataset_distill.module.pool_size=2",
            "pipeline.stages.dataset_distill.module.pool_max_steps=5",
            "pipeline.stages.ssl.module.projection_hidden_dim=64",
            "eval.plots=false",
        ]
    )
    stages = Runner(cfg).run()
    assert [s.status for s in stages.values()] == ["done"] * 4

    path = Path(stages["dataset_distill"].artifacts["synthetic_set"])
    inputs, targets, meta = load_synthetic_set(path)
    frames = 1 + int(cfg.data.sample_rate * cfg.data.clip_seconds) // cfg.data.features.hop_length
    assert inputs.shape == (6, 1, N_MELS, frames) and targets.shape == (
        6,
        512,
    )  # teacher: audiontt_small
    assert torch.isfinite(inputs).all() and torch.isfinite(targets).all()
    assert meta["size"] == 6 and meta["outer_steps"] == 3 and not meta["init_only"]
    assert meta["input_shift_rms"] > 0 and meta["target_shift_rms"] > 0  # the outer steps moved it
    assert len(meta["initial_indices"]) == 6
    assert (path.parent / "examples.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((path.parent / "meta.json").read_text()) == meta
    # The pretrained encoder is what the finetune stage starts from, and it was evaluated.
    assert stages["finetune"].metrics["finetune/test/acc"] >= 0.0
    assert "pretrain_synthetic/eval/knn10_acc" in stages["pretrain_synthetic"].metrics


def test_outer_loss_decreases(tmp_path: Path, datamodule: AudioDataModule, teacher: str) -> None:
    """The KRR loss of the set on the training clips, under each pool member as it was at the
    first step (frozen copies: the live members keep training), falls over 30 outer steps."""
    train = datamodule.train_indices()
    real = torch.cat(
        [datamodule.featurize(b["audio"]) for b in datamodule.dataloader("train", indices=train)]
    )
    measured: dict[str, torch.Tensor] = {}

    def losses_under(pool: torch.nn.Module, module: DatasetDistillStage) -> torch.Tensor:
        n = module.size
        with torch.no_grad():
            targets = module.teacher(real)
            losses = []
            for i in range(len(pool)):
                features = pool.features(i, torch.cat([module.synthetic_inputs, real]))
                losses.append(
                    krr_distill_loss(features[n:], features[:n], module.synthetic_targets, targets)
                )
            return torch.stack(losses)

    class Measure(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, module: DatasetDistillStage, *args
        ) -> None:
            if trainer.global_step == 0:  # the pool is initialised by now (on_train_start)
                self.frozen = copy.deepcopy(module.pool)
                measured["before"] = losses_under(self.frozen, module)

        def on_train_end(self, trainer: pl.Trainer, module: DatasetDistillStage) -> None:
            measured["after"] = losses_under(self.frozen, module)

    torch.manual_seed(0)
    # Plain SGD for the pool: this measures the outer optimisation under kernels frozen at
    # the first step. With the default momentum 0.9 members move ~10x further per step, so
    # those kernels say less about the later ones (measured: mean 0.207 -> 0.175, -16%,
    # every member lower).
    module = _distill_stage(teacher, pool_momentum=0.0)
    _trainer(tmp_path, max_steps=30, limit_val_batches=0, callbacks=[Measure()]).fit(
        module, datamodule=datamodule
    )
    before, after = measured["before"], measured["after"]
    assert (after < before).all(), measured
    assert after.mean() < 0.8 * before.mean(), measured


def test_init_only_keeps_the_same_real_subset_as_the_distilled_set(
    tmp_path: Path, datamodule: AudioDataModule, teacher: str
) -> None:
    modules = []
    for init_only in (False, True):
        pl.seed_everything(3, verbose=False)
        module = _distill_stage(teacher, init_only=init_only)
        _trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, datamodule=datamodule)
        modules.append(module)
    distilled, baseline = modules
    assert baseline.pool is None
    assert torch.equal(baseline.initial_indices, distilled.initial_indices)
    assert torch.equal(baseline.synthetic_inputs, baseline.initial_inputs)  # untouched
    with torch.no_grad():
        assert torch.allclose(baseline.synthetic_targets, baseline.teacher(baseline.initial_inputs))
    assert not torch.equal(distilled.synthetic_inputs, distilled.initial_inputs)
    meta = baseline.export_artifacts()["synthetic_set"].meta
    assert meta["init_only"] and meta["outer_steps"] == 0 and meta["input_shift_rms"] == 0.0


def test_size_larger_than_the_training_set_is_a_clear_error(
    tmp_path: Path, datamodule: AudioDataModule, teacher: str
) -> None:
    module = _distill_stage(teacher, size=10_000)
    with pytest.raises(
        ValueError, match=r"size=10000 synthetic examples but only \d+ training clips"
    ):
        _trainer(tmp_path, max_steps=1).fit(module, datamodule=datamodule)


def test_pretrain_synthetic_regresses_onto_the_targets(
    tmp_path: Path, datamodule: AudioDataModule, teacher: str
) -> None:
    torch.manual_seed(0)
    module = _distill_stage(teacher, init_only=True)
    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=datamodule)
    synthetic = module.export_artifacts()["synthetic_set"]
    path = synthetic.save(tmp_path / "distill" / "synthetic_set")

    stage = PretrainSyntheticStage(
        TINY,
        SyntheticSet.load(path),
        batch_size=4,
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05},
    )
    inputs, targets, _ = load_synthetic_set(path)

    def mse() -> float:
        stage.model.eval()
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(stage.model(inputs), targets))

    before = mse()
    trainer = _trainer(tmp_path, max_epochs=20, limit_val_batches=0)
    trainer.fit(stage, datamodule=stage.configure_data(datamodule))
    assert trainer.global_step == 20 * 2  # 8 examples in minibatches of 4: two steps per pass
    assert mse() < 0.5 * before
    exported = stage.export_artifacts()["encoder"]
    assert exported.module is stage.model.encoder


def test_missing_or_bad_synthetic_set_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_synthetic_set(tmp_path / "nope.pt")
    torch.save(
        {"inputs": torch.zeros(3, 1, 4, 4), "targets": torch.zeros(2, 5)}, tmp_path / "bad.pt"
    )
    with pytest.raises(ValueError, match="same N"):
        load_synthetic_set(tmp_path / "bad.pt")


def test_config_ranges_are_checked_at_start_up(teacher: str) -> None:
    cfg = compose_config(
        [
            "experiment=krr_st",
            "pipeline.stages.dataset_distill.module.final_lr_factor=0",
            "pipeline.stages.dataset_distill.module.ridge=-1",
            "pipeline.stages.pretrain_synthetic.module.batch_size=0",
        ]
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert sorted(err.value.problems) == [
        "pipeline.stages.dataset_distill.module.final_lr_factor: 0 is outside the allowed range (0, 1]",
        "pipeline.stages.dataset_distill.module.ridge: -1 is outside the allowed range (0, inf)",
        "pipeline.stages.pretrain_synthetic.module.batch_size: 0 is outside the allowed range [1, inf)",
    ]
    validate(compose_config(["experiment=krr_st"]))  # the recipe itself is valid
    validate(
        compose_config(
            ["experiment=krr_st_compare", f"pipeline.stages.distill.module.teacher={teacher}"]
        )
    )
