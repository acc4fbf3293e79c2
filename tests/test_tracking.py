"""Tracking, read back from what W&B and TensorBoard wrote: one offline W&B run per stage
whose artifacts form the pipeline's lineage, metric keys without the stage prefix, one-off
numbers in the run summary, a pipeline-level run with the results table, images in
TensorBoard, and the console lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from distillery.artifact_kinds import SyntheticSet
from distillery.config.validation import ConfigError
from distillery.pipeline.manifest import RunManifest
from distillery.pipeline.progress import PipelineProgress, format_duration
from distillery.pipeline.report import results_table
from distillery.pipeline.runner import Runner
from distillery.pipeline.tracking import wandb_artifact
from tests.helpers import compose_config, wandb_runs

STAGES = ("ssl", "self_distill", "finetune")


@pytest.fixture(scope="module")
def unfused(tmp_path_factory: pytest.TempPathFactory, data_cache: Path):
    """The UnFuSeD pipeline (smoke sizes) with the W&B logger: run dir, pipeline.json, runs."""
    run_dir = tmp_path_factory.mktemp("unfused") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.delenv("WANDB_MODE", raising=False)  # offline must be chosen by the runner itself
        mp.setenv("WANDB_DATA_DIR", str(run_dir.parent / "wandb-data"))  # W&B's staging copies
        cfg = compose_config(
            [
                "experiment=unfused",
                "debug=smoke",
                "logger=wandb",
                "trainer.enable_progress_bar=false",
                f"run_dir={run_dir}",
                f"data.cache_dir={data_cache}",
            ]
        )
        Runner(cfg).run()
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    return run_dir, manifest, wandb_runs(run_dir)


def _outputs(run) -> dict:
    """Stage artifacts a run logged (W&B's own table artifacts left out), by name."""
    return {a.name: a for a in run.logged_artifacts if a.type != "run_table"}


def test_stage_artifacts_form_the_pipeline_lineage(unfused) -> None:
    run_dir, manifest, runs = unfused
    rid = manifest["run_id"]
    assert set(runs) == {*STAGES, "pipeline"}
    assert {run.run.run_group for run in runs.values()} == {rid}

    outputs = {stage: _outputs(runs[stage]) for stage in STAGES}
    assert {s: {n: a.type for n, a in out.items()} for s, out in outputs.items()} == {
        "ssl": {f"{rid}-ssl-encoder": "encoder", f"{rid}-ssl-pseudo_labels": "pseudo_labels"},
        "self_distill": {f"{rid}-self_distill-encoder": "encoder"},
        "finetune": {f"{rid}-finetune-encoder": "encoder"},
    }
    # The pseudo-labels travel with their meta.json; the files are the run dir's files.
    labels = outputs["ssl"][f"{rid}-ssl-pseudo_labels"]
    entries = {e.path: e.size for e in labels.manifest.contents}
    assert {"labels.npy", "centroids.npy", "meta.json"} <= set(entries)
    assert entries["meta.json"] == (run_dir / "ssl/pseudo_labels/meta.json").stat().st_size
    encoder = outputs["self_distill"][f"{rid}-self_distill-encoder"]
    assert [(e.path, e.size) for e in encoder.manifest.contents] == [
        ("encoder.pt", (run_dir / "self_distill/encoder.pt").stat().st_size)
    ]

    # Each stage declares what it reads (its `inputs`) with the producer's name and digest,
    # so W&B resolves both to one artifact version: the lineage graph is the pipeline.
    used = {s: {(a.name, a.type, a.digest) for a in runs[s].used_artifacts} for s in STAGES}
    assert used == {
        "ssl": set(),
        "self_distill": {(labels.name, "pseudo_labels", labels.digest)},
        "finetune": {(encoder.name, "encoder", encoder.digest)},
    }


def test_a_folder_artifact_holds_all_its_files_copied_or_by_reference(tmp_path: Path) -> None:
    stage_dir = tmp_path / "dataset_distill"
    path = SyntheticSet(torch.randn(3, 1, 8, 10), torch.randn(3, 4), {"ridge": 1.0}).save(
        stage_dir / "synthetic_set"
    )
    copied = wandb_artifact("run1", "dataset_distill", "synthetic_set", path, "copy")
    referenced = wandb_artifact("run1", "dataset_distill", "synthetic_set", path, "reference")
    for artifact in (copied, referenced):
        assert (artifact.name, artifact.type) == (
            "run1-dataset_distill-synthetic_set",
            "synthetic_set",
        )
    files = {p.name: p for p in (stage_dir / "synthetic_set").iterdir()}
    assert set(copied.manifest.entries) == set(files) == {"tensors.pt", "meta.json", "examples.png"}
    # The same content either way; a reference only points at the file.
    for name, entry in referenced.manifest.entries.items():
        assert entry.ref == files[name].resolve().as_uri()
        assert entry.digest == copied.manifest.entries[name].digest
        assert entry.size == files[name].stat().st_size


def test_stage_runs_have_unprefixed_keys_best_val_and_constants_in_the_summary(unfused) -> None:
    _, manifest, runs = unfused
    for stage in STAGES:
        run = runs[stage]
        assert [k for k in [*run.history, *run.summary] if k.startswith(f"{stage}/")] == []
        # One-off numbers: in the summary with pipeline.json's values, never a chart.
        metrics = manifest["stages"][stage]["metrics"]
        constants = {
            k.removeprefix(f"{stage}/"): v
            for k, v in metrics.items()
            if k.startswith((f"{stage}/eval/", f"{stage}/pseudo/"))
        }
        assert {k: run.summary[k] for k in constants} == pytest.approx(constants)
        assert set(constants).isdisjoint(run.history), stage
    pseudo = [k for k in runs["ssl"].summary if k.startswith("pseudo/") and "/" not in k[7:]]
    assert len(pseudo) >= 20  # the cluster statistics of meta.json

    finetune = runs["finetune"]
    metrics = manifest["stages"]["finetune"]["metrics"]
    assert finetune.history["test/acc"] == [pytest.approx(metrics["finetune/test/acc"], abs=1e-6)]
    assert finetune.metrics["val/acc"].summary.max
    assert finetune.metrics["val/loss"].summary.min
    assert finetune.metrics["test/acc"].summary.last
    assert finetune.summary["val/acc"] == {"max": pytest.approx(max(finetune.history["val/acc"]))}
    assert runs["ssl"].metrics["val/loss"].summary.min


def test_pipeline_run_holds_the_results_table_and_the_stage_tables(unfused) -> None:
    run_dir, manifest, runs = unfused
    pipeline = runs["pipeline"]
    assert pipeline.run.job_type == "pipeline"
    header, rows = results_table(RunManifest.load_or_create(run_dir, "unfused"))
    table = pipeline.table("results")
    assert table["columns"] == header and "test/acc" in header
    assert table["data"] == rows
    assert [row[0] for row in rows] == list(STAGES)
    # ... and every stage's final metrics under pipeline.json's (prefixed) keys.
    for stage in STAGES:
        for key, value in manifest["stages"][stage]["metrics"].items():
            assert pipeline.summary[key] == pytest.approx(value), key

    scores = runs["ssl"].table("eval/scores")
    assert scores["data"][0][0] == "ssl"
    row = dict(zip(scores["columns"], scores["data"][0], strict=True))
    assert row["knn10_acc"] == pytest.approx(
        manifest["stages"]["ssl"]["metrics"]["ssl/eval/knn10_acc"]
    )


def test_finetune_confusion_matrix_is_the_finetuned_models_own(unfused) -> None:
    run_dir, manifest, runs = unfused
    cells = runs["finetune"].table("test/confusion_matrix_table")
    assert cells["columns"] == ["Actual", "Predicted", "nPredictions"]
    total = sum(n for _, _, n in cells["data"])
    correct = sum(n for actual, predicted, n in cells["data"] if actual == predicted)
    assert total == 8  # debug=smoke: 8 test clips
    assert correct / total == pytest.approx(
        manifest["stages"]["finetune"]["metrics"]["finetune/test/acc"]
    )
    assert imread(run_dir / "finetune/eval/test_confusion.png").shape[0] > 100
    for key in ("test/confusion", "eval/confusion", "eval/embedding_map"):
        assert runs["finetune"].history[f"{key}/_type"] == ["images/separated"], key


def test_stage_run_config_reference_artifacts_and_a_quiet_console(
    tmp_path: Path, data_cache: Path, monkeypatch, capfd
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # what a user sees
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [
            "experiment=supervised",
            "debug=smoke",
            "logger=wandb",
            "logger.wandb.artifacts=reference",
            "trainer.enable_progress_bar=false",
            f"run_dir={run_dir}",
            f"data.cache_dir={data_cache}",
        ]
    )
    record = Runner(cfg).run()["finetune"]
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    run = wandb_runs(run_dir)["finetune"]
    assert run.run.run_id == record.wandb_run_id
    assert run.run.run_group == manifest["run_id"]
    assert run.run.job_type == "finetune"
    config_keys = {item.key for item in run.run.config.update}
    assert {"pipeline", "data", "stage"} <= config_keys
    assert {"train/loss_epoch", "val/acc", "test/acc"} <= set(run.history)

    # By reference: W&B records the file's URI and checksum, not a copy.
    (encoder,) = _outputs(run).values()
    assert [e.ref for e in encoder.manifest.contents] == [
        Path(record.artifacts["encoder"]).resolve().as_uri()
    ]

    console = capfd.readouterr()
    out = console.out + console.err
    assert "Run history" not in out and "Run summary" not in out
    wandb_lines = [line for line in out.splitlines() if line.startswith("wandb:")]
    assert len(wandb_lines) <= 3 * 2  # the offline notice of the stage run and the pipeline run


def test_an_unknown_artifact_mode_fails_at_start_up(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "experiment=supervised",
            "logger=wandb",
            "logger.wandb.artifacts=upload",
            f"run_dir={tmp_path}",
        ]
    )
    with pytest.raises(ConfigError, match=r"logger\.wandb\.artifacts: must be one of"):
        Runner(cfg)


def test_tensorboard_gets_the_images_and_the_console_one_line_per_epoch(
    tmp_path: Path, data_cache: Path, caplog
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    caplog.set_level(logging.INFO, logger="distillery")
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [
            "experiment=supervised",
            "debug=smoke",
            "logger=tensorboard",
            "trainer.enable_progress_bar=false",
            "debug.trainer.max_epochs=2",
            f"run_dir={run_dir}",
            f"data.cache_dir={data_cache}",
        ]
    )
    Runner(cfg).run()
    events = EventAccumulator(str(run_dir / "finetune/logs/attempt-1"), {IMAGES: 0}).Reload()
    images = set(events.Tags()["images"])
    assert {
        "finetune/test/confusion",
        "finetune/eval/confusion",
        "finetune/eval/embedding_map",
    } <= images
    (image,) = events.Images("finetune/test/confusion")
    png = imread(run_dir / "finetune/eval/test_confusion.png")
    assert (image.height, image.width) == png.shape[:2]

    messages = [r.getMessage() for r in caplog.records]
    assert "stage 1/1: finetune (finetune, fresh)" in messages
    epochs = [m for m in messages if m.startswith("finetune epoch ")]
    assert [m.split(":")[0] for m in epochs] == ["finetune epoch 1/2", "finetune epoch 2/2"]
    assert all("train/loss=" in m and "val/acc=" in m for m in epochs)


def test_pipeline_eta_is_the_mean_finished_stage_time_per_stage_left() -> None:
    progress = PipelineProgress(["a", "b", "c", "d"])
    assert progress.eta("a") is None  # nothing finished yet
    progress.stage_finished("a", 10.0)
    progress.stage_finished("b", 30.0)
    assert progress.eta("c") == pytest.approx(20.0 * 2)
    assert [format_duration(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]
