"""Multi-label manifests (``labels`` column, classes separated by ``;``): parsing, checks,
multi-hot targets, and a finetune pipeline scored by mAP through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from tests.helpers import FAST, REPO, cli_env

from distillery.data.audio_io import AudioFileError
from distillery.data.datamodule import AudioDataModule
from distillery.data.sources import read_manifest
from distillery.pipeline.contract import StageContract
from distillery.stages.finetune import FinetuneStage
from distillery.stages.partial_label_sd import PartialLabelSDStage

SR = 16000
TONES = {"low": 300.0, "mid": 1200.0, "high": 4000.0}


def clip(path: Path, classes: list[str], seed: int) -> Path:
    """0.2 s of the classes' tones (plus a little noise): each class is audible."""
    t = np.arange(round(0.2 * SR)) / SR
    audio = 0.02 * np.random.default_rng(seed).normal(size=len(t))
    for name in classes:
        audio += 0.3 * np.sin(2 * np.pi * TONES[name] * t)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, SR)
    return path


def manifest(tmp_path: Path, rows: list[tuple[str, str, str]], name: str = "m.csv") -> Path:
    lines = ["path,labels,split", *(f"{p},{labels},{split}" for p, labels, split in rows)]
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return tmp_path / name


def test_labels_column_gives_every_class_of_a_clip(tmp_path: Path) -> None:
    for i, classes in enumerate([["low", "mid"], ["high"], ["mid"]]):
        clip(tmp_path / f"{i}.wav", classes, i)
    path = manifest(
        tmp_path, [("0.wav", "low; mid", ""), ("1.wav", "high", ""), ("2.wav", "mid", "")]
    )
    table = read_manifest(path)
    assert table.multi_label and table.class_names == ["high", "low", "mid"]
    assert [r.labels for r in table.records] == [(1, 2), (0,), (2,)]
    assert [r.label for r in table.records] == [1, 0, 2]  # the first listed class

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        '{"path": "0.wav", "labels": ["mid", "low"]}\n{"path": "1.wav", "labels": ""}\n'
    )
    table = read_manifest(jsonl)
    assert [r.labels for r in table.records] == [(1, 0), ()]
    assert [r.label for r in table.records] == [1, -1]  # no class: unlabelled


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        ("path,label,labels", "0.wav,a,a;b", "line 2: has both 'label' and 'labels'"),
        ("path,labels", "0.wav,a;;b", "line 2: key 'labels': an empty class name in 'a;;b'"),
        ("path,labels", "0.wav,a;b;a", "line 2: key 'labels': 'a' listed twice"),
    ],
)
def test_malformed_labels_name_the_line(
    tmp_path: Path, header: str, row: str, message: str
) -> None:
    (tmp_path / "m.csv").write_text(f"{header}\n{row}\n")
    with pytest.raises(ValueError, match=message):
        read_manifest(tmp_path / "m.csv")


def test_a_bad_label_in_the_list_is_named_in_the_bad_file_error(tmp_path: Path) -> None:
    rows = [(f"{i}.wav", labels, "") for i, labels in enumerate(["low;mid", "mid;lwo", "high"])]
    for i, (_, labels, _) in enumerate(rows):
        clip(tmp_path / f"{i}.wav", [n for n in labels.split(";") if n in TONES], i)
    path = manifest(tmp_path, rows)
    cfg = {"source": "manifest", "path": str(path), "sample_rate": SR, "clip_seconds": 0.1}
    cfg |= {"cache_dir": str(tmp_path / "cache"), "classes": list(TONES)}
    with pytest.raises(AudioFileError) as err:
        AudioDataModule(cfg).setup()
    assert f"{path}: line 3: audio file" in str(err.value)
    assert "key 'labels': 'lwo' is not in data.classes" in str(err.value)


def test_items_carry_multi_hot_targets(tmp_path: Path) -> None:
    sets = [["low", "mid"], ["high"], ["mid", "high"], ["low"]] * 3
    rows = [(f"{i}.wav", ";".join(c), "train" if i < 8 else "test") for i, c in enumerate(sets)]
    for i, classes in enumerate(sets):
        clip(tmp_path / f"{i}.wav", classes, i)
    cfg = {"source": "manifest", "path": str(manifest(tmp_path, rows)), "sample_rate": SR}
    data = AudioDataModule(cfg | {"clip_seconds": 0.1, "cache_dir": str(tmp_path / "cache")})
    data.setup()
    assert data.multi_label and data.class_names == ["high", "low", "mid"]
    expected = np.array([[0, 1, 1], [1, 0, 0], [1, 0, 1], [0, 1, 0]] * 3, dtype=np.float32)
    batch = next(iter(data.dataloader("train", indices=np.arange(12))))
    assert np.array_equal(batch["targets"].numpy(), expected[batch["index"].numpy()])
    assert np.array_equal(data.multi_hot(np.arange(12)), expected)


def test_a_single_label_stage_is_refused_on_multi_label_data() -> None:
    data = SimpleNamespace(num_classes=3, multi_label=True, num_pseudo_classes=None)
    assert StageContract(FinetuneStage).injected(data)["multi_label"] is True
    with pytest.raises(ValueError, match="PartialLabelSDStage trains on one class per clip"):
        StageContract(PartialLabelSDStage).injected(data)


@pytest.mark.slow  # ~35 s: a CLI pipeline run
def test_finetune_on_a_multi_label_manifest_reports_map(tmp_path: Path, data_cache: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        classes = [n for n in TONES if rng.random() < 0.5] or ["mid"]
        clip(tmp_path / "audio" / f"{i}.wav", classes, i)
        rows.append((f"audio/{i}.wav", ";".join(classes), ["train", "val", "test"][i % 3]))
    path = manifest(tmp_path, rows)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "distillery.cli", "experiment=supervised", *FAST]
    cmd += [f"run_dir={run_dir}", f"data.cache_dir={data_cache}", "data=manifest"]
    cmd += [f"data.path={path}", "data.clip_seconds=0.2", "eval.plots=false", "eval.probe_epochs=5"]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]["metrics"]
    # mAP is at least each class's base rate (a random ranking's AP), at most 1.
    assert 0.3 < metrics["finetune/test/map"] <= 1.0
    assert 0.3 < metrics["finetune/eval/linear_map"] <= 1.0
    assert "finetune/test/acc" not in metrics and "finetune/eval/linear_acc" not in metrics
