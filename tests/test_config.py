"""Config composition of every experiment, and start-up validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from distillery.cli import CONF_DIR
from distillery.models.io import build_encoder, save_encoder
from distillery.pipeline.contract import ConfigError, validate
from tests.helpers import compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
#: Recipes that read the teacher of another run (its encoder.pt file), by config key.
TEACHER_FILES = {
    "coss_compare": "pipeline.stages.cosine_random.module.teacher",
    "krr_st_compare": "pipeline.stages.distill.module.teacher",
    "pll_noise": "pipeline.stages.gce_00.module.pretrained",
}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "encoder.pt"
    cfg = {"_target_": "distillery.models.encoders.AudioNTT", "n_mels": 64, "channels": 8}
    save_encoder(path, build_encoder(cfg), cfg)
    return path


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("extra", [[], ["debug=smoke"], ["data=folder", "data.root=/tmp/x"]])
def test_every_experiment_composes_and_validates(
    experiment: str,
    extra: list[str],
    teacher_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if experiment in TEACHER_FILES:  # without the file, start-up names the missing file
        # From an empty directory: in a checkout that ran the reproductions the default
        # (relative) teacher path exists.
        monkeypatch.chdir(tmp_path)
        with pytest.raises(
            ConfigError, match=f"{TEACHER_FILES[experiment]}: file .* does not exist"
        ):
            validate(compose_config([f"experiment={experiment}", "run_dir=/tmp/unused", *extra]))
        monkeypatch.undo()
        extra = [*extra, f"{TEACHER_FILES[experiment]}={teacher_file}"]
    cfg = compose_config([f"experiment={experiment}", "run_dir=/tmp/unused", *extra])
    try:
        validate(cfg)
    except ConfigError as err:  # inputs made by other runs, or the made-up data root
        assert all("does not exist" in p for p in err.problems), err
    assert cfg.pipeline.order, experiment
    assert list(cfg.pipeline.order) == list(cfg.pipeline.stages)


def test_swapping_the_encoder_of_one_stage() -> None:
    cfg = compose_config(
        ["experiment=supervised", "model@pipeline.stages.finetune.module.encoder=transformer"]
    )
    validate(cfg)
    assert cfg.pipeline.stages.finetune.module.encoder._target_.endswith("TransformerEncoder")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.bach_size=3", "data.bach_size"),
        ("pipeline.stages.finetune.knd=x", "pipeline.stages.finetune.knd"),
    ],
)
def test_unknown_schema_key_fails_at_composition(override: str, key: str) -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_config(["experiment=supervised", override])
    assert key.split(".")[-1] in str(err.value) + str(err.value.__cause__)


def test_wrong_type_fails_at_composition() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_config(["experiment=supervised", "data.batch_size=many"])
    assert "batch_size" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "+pipeline.stages.finetune.module.learning_rate=0.1",
            "pipeline.stages.finetune.module.learning_rate: unknown argument",
        ),
        (
            "pipeline.stages.finetune.module.mode=half",
            "pipeline.stages.finetune.module.mode: must be one of ['full', 'linear']",
        ),
        (
            "pipeline.stages.finetune.module.encoder.channels=wide",
            "pipeline.stages.finetune.module.encoder.channels: must be int",
        ),
        (
            "+pipeline.stages.finetune.module.optimizer.momentun=0.9",
            "pipeline.stages.finetune.module.optimizer.momentun: unknown argument of AdamW",
        ),
        ("+trainer.max_epoch=3", "trainer.max_epoch: unknown argument of Trainer"),
        (
            "+pipeline.stages.finetune.trainer.callbacks=[]",
            "pipeline.stages.finetune.trainer.callbacks: set by the runner",
        ),
        ("data.label_fraction=0", "data.label_fraction: 0.0 is outside the allowed range (0, 1]"),
        ("data.label_fraction=1.5", "data.label_fraction: 1.5 is outside the allowed range (0, 1]"),
        ("data.source=s3", "data.source: 's3' is not one of"),
        ("data=folder", "data.root: required with data.source=folder"),
        (
            "pipeline.stages.finetune.kind=nope",
            "pipeline.stages.finetune.kind: unknown stage kind 'nope'",
        ),
        (
            "pipeline.order=[finetune,ssl]",
            "pipeline.order: ['ssl'] have no entry in pipeline.stages",
        ),
        (
            "+pipeline.stages.finetune.inputs={module.pretrained: ssl.encoder}",
            "which does not run before this one",
        ),
        (
            "+pipeline.stages.finetune.knd=x",
            "pipeline.stages.finetune.knd: Key 'knd' not in 'StageConfig'",
        ),
        ("+logger.csv.flush_every=3", "logger.csv.flush_every: unknown argument of CSVLogger"),
    ],
)
def test_validation_names_the_key(override: str, expected: str) -> None:
    cfg = compose_config(["experiment=supervised", override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert expected in str(err.value)


def test_validation_reports_every_problem_at_once() -> None:
    cfg = compose_config(["experiment=supervised", "data.label_fraction=2", "+trainer.max_epoch=3"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert len(err.value.problems) == 2
