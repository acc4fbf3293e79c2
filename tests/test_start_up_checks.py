"""Every value a user can set is checked before anything runs, named by its key path."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import open_dict

from distillery.config.schema import Config
from distillery.config.validation import SCHEMA_RANGES
from distillery.pipeline.contract import ConfigError, validate
from tests.helpers import compose_config
from tests.test_cli import distillery


def problems(overrides: list[str], edit=None) -> list[str]:
    cfg = compose_config(["experiment=supervised", "run_dir=/tmp/unused", *overrides])
    if edit is not None:
        with open_dict(cfg):
            edit(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return err.value.problems


def renamed(name: str):
    def edit(cfg) -> None:
        cfg.pipeline.order = [name]
        cfg.pipeline.stages = {name: cfg.pipeline.stages.finetune}

    return edit


@pytest.mark.parametrize(
    "name", ["../../x", "a/b", "..", "x.y", ".hidden", "-x", "with space", "superseded"]
)
def test_unsafe_stage_names_fail_with_their_key(name: str) -> None:
    found = problems([], renamed(name))
    assert any(p.startswith(f"pipeline.order[0]: stage name {name!r}") for p in found), found
    assert any(p.startswith(f"pipeline.stages.{name}: stage name") for p in found), found


def test_a_safe_stage_name_passes() -> None:
    cfg = compose_config(["experiment=supervised", "run_dir=/tmp/unused"])
    with open_dict(cfg):
        renamed("finetune-2_b")(cfg)
    validate(cfg)


def class_folder(root: Path, classes: list[str], loose: int = 0) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        sf.write(root / name / "a.wav", np.zeros(800, dtype=np.float32), 8000)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(loose):
        sf.write(root / f"{i}.wav", np.zeros(800, dtype=np.float32), 8000)
    return root


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["pipeline.stages.finetune.module.optimizer.lr=-0.1"],
            "pipeline.stages.finetune.module.optimizer.lr: -0.1 is outside the allowed range (0, inf)",
        ),
        (
            ["+pipeline.stages.finetune.module.optimizer.betas=[0.9,1.5]"],
            "pipeline.stages.finetune.module.optimizer: AdamW rejects these arguments (Invalid beta",
        ),
        (["data.num_workers=-1"], "data.num_workers: -1 is outside the allowed range [0, inf)"),
        (
            ["data.val_fraction=0", "data.test_fraction=0"],
            "data.test_fraction: 0.0 is outside the allowed range (0, 1)",
        ),
        (["eval.knn_k=[10,0]"], "eval.knn_k[1]: 0 is outside the allowed range [1, inf)"),
        (["eval.probe_epochs=-1"], "eval.probe_epochs: -1 is outside the allowed range [1, inf)"),
        (["trainer.max_epochs=0"], "trainer.max_epochs: 0 is outside the allowed range [1, inf)"),
        (["trainer.max_epochs=-1"], "trainer.max_epochs: -1 trains without end"),
        (
            ["+pipeline.stages.finetune.trainer.max_epochs=-1"],
            "pipeline.stages.finetune.trainer.max_epochs: -1 trains without end",
        ),
        (
            ["+trainer.limit_train_batches=0"],
            "trainer.limit_train_batches: 0 must be >= 1 batches",
        ),
        (
            ["pipeline.stages.finetune.module.pretrained=/no/such/encoder.pt"],
            "pipeline.stages.finetune.module.pretrained: file /no/such/encoder.pt does not exist",
        ),
        (["data.classes=[up]"], "data.classes: lists 1 class(es) ['up']; at least 2 are needed"),
        (
            ["data.synthetic.clips_per_class=3"],
            "data.val_fraction: 0.15 of 3 clips per class gives an empty val split",
        ),
    ],
)
def test_bad_values_fail_at_start_up_with_their_key(overrides: list[str], expected: str) -> None:
    found = problems(overrides)
    assert any(p.startswith(expected) for p in found), found


def test_one_cluster_fails_with_its_key() -> None:
    cfg = compose_config(["experiment=unfused", "pipeline.stages.ssl.callbacks.pseudo_labeler.k=1"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert (
        "pipeline.stages.ssl.callbacks.pseudo_labeler.k: 1 is outside the allowed range [2, inf)"
        in (err.value.problems)
    )


def test_missing_teacher_weights_fail_with_their_key(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "experiment=dphubert",
            f"pipeline.stages.prune_distill.module.teacher_weights={tmp_path}/t.pt",
        ]
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert any(
        p.startswith("pipeline.stages.prune_distill.module.teacher_weights: file")
        for p in err.value.problems
    ), err.value


@pytest.mark.parametrize(("classes", "loose"), [(["up"], 0), ([], 3)], ids=["one", "none"])
def test_a_folder_with_fewer_than_two_classes_fails(
    tmp_path: Path, classes: list[str], loose: int
) -> None:
    root = class_folder(tmp_path / "data", classes, loose)
    found = problems(["data=folder", f"data.root={root}"])
    assert (
        f"data.root: {str(root)!r} has {len(classes)} class(es) {classes}; at least 2 are needed (or list them in data.classes)"
        in found
    )


def test_a_folder_with_two_classes_passes(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "data", ["go", "up"])
    validate(compose_config(["experiment=supervised", "data=folder", f"data.root={root}"]))


# -- the schema sweep: every numeric field, one value outside its range ----------------------


def numeric_fields(cls: type, prefix: str = "") -> dict[str, type]:
    """Dotted key -> type of every int/float (or list of int/float) field of the schema."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if type(None) in typing.get_args(kind) and len(args) == 1:  # optional: null or a value
            kind = args[0]
        if dataclasses.is_dataclass(kind):
            out |= numeric_fields(kind, f"{prefix}{f.name}.")
        elif kind in (int, float) or kind in (list[int], list[float]):
            out[f"{prefix}{f.name}"] = kind
    return out


NUMERIC = numeric_fields(Config)
#: Fields whose range depends on another field (their own is unbounded).
CROSS_FIELD = {"data.synthetic.snr_db_min": "30.0", "data.synthetic.snr_db_max": "-1.0"}


def outside(key: str) -> str:
    """A value just outside ``SCHEMA_RANGES[key]``, as an override string."""
    if key in CROSS_FIELD:
        return CROSS_FIELD[key]
    low, high, low_open, _ = SCHEMA_RANGES[key]
    integer = NUMERIC[key] in (int, list[int])
    below = low if low_open else low - (1 if integer else 0.5)
    value = below if math.isfinite(low) else high + 1
    value = int(value) if integer else float(value)
    return f"[{value}]" if NUMERIC[key] in (list[int], list[float]) else str(value)


def test_every_numeric_schema_field_has_a_declared_range() -> None:
    assert set(NUMERIC) == set(SCHEMA_RANGES)


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_an_out_of_range_value_of_each_numeric_field_fails_at_start_up(key: str) -> None:
    found = problems([f"{key}={outside(key)}"])
    assert any(p.startswith(key) or f" {key}=" in p for p in found), (key, outside(key), found)


def test_the_cli_refuses_every_out_of_range_value_at_once_with_exit_2(
    tmp_path: Path, data_cache: Path
) -> None:
    """As a user would see it: exit status 2, every key named, no traceback, nothing written."""
    run_dir = tmp_path / "run"
    result = distillery(
        "experiment=unfused",
        "logger=csv",
        f"run_dir={run_dir}",
        *(f"{key}={outside(key)}" for key in sorted(NUMERIC)),
        "pipeline.stages.ssl.callbacks.pseudo_labeler.k=1",
        "trainer.max_epochs=0",
        "pipeline.stages.finetune.module.optimizer.lr=-1",
        cache=data_cache,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    for key in [
        *NUMERIC,
        "pipeline.stages.ssl.callbacks.pseudo_labeler.k",
        "trainer.max_epochs",
        "pipeline.stages.finetune.module.optimizer.lr",
    ]:
        assert f"  - {key}" in output or f" {key}=" in output, key
    assert list(run_dir.iterdir()) == []
