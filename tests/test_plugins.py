"""A user's own stage, encoder, loss and data source, plugged in by config alone.

The plugin package (``tests/plugin/distillery_plugin``) and its config dir
(``tests/plugin/conf``) live outside ``src/``; the CLI reaches them as a user would, through
``PYTHONPATH`` and ``--config-dir``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from distillery.cli import CONF_DIR
from distillery.config.schema import register_configs
from distillery.pipeline.contract import ConfigError, validate

PLUGIN = Path(__file__).parent / "plugin"
README = Path(__file__).parents[1] / "README.md"


def plugin_cli(*args: str, plugin: Path = PLUGIN, cache: Path) -> subprocess.CompletedProcess:
    src = Path(__file__).parents[1] / "src"  # the checkout's code, not an installed copy
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONPATH": f"{plugin}{os.pathsep}{src}"}
    cmd = [
        sys.executable,
        "-m",
        "distillery.cli",
        "--config-dir",
        str(plugin / "conf"),
        *args,
        f"data.cache_dir={cache}",
        "debug=smoke",
        "logger=csv",
        "trainer.enable_progress_bar=false",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def compose_with_plugin(overrides: list[str], monkeypatch: pytest.MonkeyPatch):
    """The real config tree plus the plugin's config dir, as ``--config-dir`` adds it."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"hydra.searchpath=[file://{PLUGIN / 'conf'}]", *overrides],
        )


def test_plugin_pipeline_runs_then_reruns_only_the_edited_stage(
    tmp_path: Path, data_cache: Path
) -> None:
    plugin = tmp_path / "plugin"  # a copy, so that the test can edit the user's code
    shutil.copytree(PLUGIN, plugin, ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = tmp_path / "run"
    first = plugin_cli("experiment=tones_kd", f"run_dir={run_dir}", plugin=plugin, cache=data_cache)
    assert first.returncode == 0, first.stderr[-4000:]
    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert [s["status"] for s in stages.values()] == ["done"] * 3
    # The user's source fed every stage: its classes are the tones' pitches.
    assert (data_cache / "tones" / "tone2_011.wav").exists()
    # The user's stage produced an encoder (the user's TinyCNN), which was evaluated; the
    # plain classifier took it and was tested, without declaring anything.
    assert (run_dir / stages["kd"]["artifacts"]["encoder"]).exists()  # relative to the run dir
    assert "kd/eval/knn10_acc" in stages["kd"]["metrics"]
    assert "kd/train/loss" in stages["kd"]["metrics"]
    assert 0.0 <= stages["classify"]["metrics"]["classify/test/acc"] <= 1.0
    assert set(stages["classify"]["artifacts"]) == {"checkpoint"}
    # The hash covers the user's modules that the config names.
    assert set(stages["kd"]["config"]["code"]) == {
        "distillery_plugin.encoders",
        "distillery_plugin.losses",
        "distillery_plugin.sources",
        "distillery_plugin.stages",
    }

    # Unchanged: everything is skipped. Edited loss: its stage and the ones after it re-run.
    again = plugin_cli("experiment=tones_kd", f"run_dir={run_dir}", plugin=plugin, cache=data_cache)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads((run_dir / "pipeline.json").read_text())["stages"] == stages
    losses = plugin / "distillery_plugin" / "losses.py"
    losses.write_text(losses.read_text().replace("return scale *", "return 2.0 * scale *"))
    edited = plugin_cli(
        "experiment=tones_kd", f"run_dir={run_dir}", plugin=plugin, cache=data_cache
    )
    assert edited.returncode == 0, edited.stderr[-4000:]
    log = edited.stdout + edited.stderr
    assert re.search(r"ssl\s+skip", log)
    assert re.search(r"kd\s+fresh\s+source changed \(distillery_plugin\.losses\)", log), log[-3000:]
    rerun = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert rerun["ssl"] == stages["ssl"]
    assert rerun["kd"]["config_hash"] != stages["kd"]["config_hash"]
    assert rerun["kd"]["metrics"]["kd/train/loss"] != stages["kd"]["metrics"]["kd/train/loss"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["pipeline.stages.kd.module._target_=distillery_plugin.broken.NotAModule"],
            r"pipeline.stages.kd.module: distillery_plugin.broken.NotAModule is not a "
            r"LightningModule subclass",
        ),
        (
            [
                "pipeline.stages.kd.module._target_=distillery_plugin.broken.NoOptimizer",
                "~pipeline.stages.kd.module.student",
                "~pipeline.stages.kd.module.loss",
                "+pipeline.stages.kd.module.width=4",
                "pipeline.stages.kd.inputs={}",
            ],
            r"(?s)NoOptimizer defines no configure_optimizers\(\).*"
            r"NoOptimizer.produces must map artifact names to kinds",
        ),
        (
            ["+pipeline.stages.kd.inputs={module.techer: ssl.encoder}"],
            r"pipeline.stages.kd.inputs.module.techer: EmbeddingKD has no constructor "
            r"argument 'techer' \(arguments: teacher, student, loss, lr\)",
        ),
        (
            [
                "+callback@pipeline.stages.ssl.callbacks.pseudo_labeler=pseudo_labeler",
                "pipeline.stages.ssl.callbacks.pseudo_labeler.k=3",
                "pipeline.stages.kd.inputs={module.teacher: ssl.pseudo_labels}",
            ],
            r"pipeline.stages.kd.inputs.module.teacher: 'ssl.pseudo_labels' is a PseudoLabels, "
            r"but module.teacher takes a EncoderArtifact",
        ),
        (
            ["pipeline.stages.classify.inputs={module.encoder: ssl.checkpoint}"],
            r"'ssl.checkpoint' is a Checkpoint, but module.encoder takes a EncoderArtifact",
        ),
        (
            ["pipeline.stages.classify.inputs={module.encoder: kd.heads}"],
            r"stage 'kd' produces no 'heads' \(it produces: \['checkpoint', 'encoder'\]\)",
        ),
    ],
    ids=["not-a-module", "missing-pieces", "wrong-input-name", "wrong-kind", "checkpoint", "none"],
)
def test_a_broken_contract_fails_at_start_up_with_the_key_path(
    overrides: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_with_plugin(["experiment=tones_kd", *overrides], monkeypatch)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_an_encoder_without_exits_cannot_be_a_multi_exit_student(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = compose_with_plugin(
        ["experiment=unfused", "model@pipeline.stages.self_distill.module.encoder=tiny_cnn"],
        monkeypatch,
    )
    with pytest.raises(
        ConfigError,
        match=r"pipeline.stages.self_distill.module.encoder: TinyCNN lacks exit_dims, "
        r"forward_exits, which SelfDistillStage needs",
    ):
        validate(cfg)


def test_a_required_artifact_that_nothing_provides(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_with_plugin(
        [
            "experiment=supervised",
            "+stage@pipeline.stages.kd=coss_kd",
            "pipeline.order=[finetune,kd]",
        ],
        monkeypatch,
    )
    with pytest.raises(
        ConfigError,
        match=r"pipeline.stages.kd.module.teacher: required by CoSSDistillStage; set it in the "
        r"config or wire it through pipeline.stages.kd.inputs",
    ):
        validate(cfg)


def test_a_broken_contract_stops_the_cli_before_any_stage_trains(
    tmp_path: Path, data_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    result = plugin_cli(
        "experiment=tones_kd",
        f"run_dir={run_dir}",
        "pipeline.stages.classify.inputs={module.encoder: kd.heads}",
        cache=data_cache,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "pipeline.stages.classify.inputs.module.encoder" in result.stdout + result.stderr
    assert not (run_dir / "pipeline.json").exists()
    assert not any((run_dir / name).exists() for name in ("ssl", "kd", "classify"))


def test_a_stage_added_from_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_with_plugin(
        [
            "experiment=supervised",
            "+stage@pipeline.stages.probe=finetune",
            "pipeline.stages.probe.module.mode=linear",
            "+pipeline.stages.probe.inputs={module.pretrained: finetune.encoder}",
            "pipeline.order=[finetune,probe]",
        ],
        monkeypatch,
    )
    validate(cfg)
    assert cfg.pipeline.stages.probe.kind == "finetune"


def test_the_readme_example_is_the_tested_plugin_stage() -> None:
    """README "Write your own stage" shows tests/plugin/distillery_plugin/stages.py's stage."""
    readme = README.read_text()
    section = readme[readme.index("## Write your own stage") :]
    shown = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    source = (PLUGIN / "distillery_plugin" / "stages.py").read_text()
    assert shown.strip() in source, "README example drifted from tests/plugin/.../stages.py"
