"""The built-in spoken-word source (espeak-ng): speaker-disjoint splits, caching, errors,
and a pipeline run on it."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import FAST, compose_config

from distillery.config.validation import config_problems
from distillery.data.audio_io import audio_info, read_audio
from distillery.data.checks import check_data_files
from distillery.data.sources import load_source
from distillery.data.speech import SpeechSpec, generate_speech, speaker_voices
from distillery.pipeline.contract import validate
from distillery.pipeline.runner import Runner

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (apt-get install espeak-ng); .ci/run installs it",
)

SMALL = SpeechSpec(
    words=("yes", "no", "stop"),
    speakers=4,
    clips_per_word=2,
    val_speakers=1,
    test_speakers=1,
    sample_rate=8000,
    seed=3,
)


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


@needs_espeak
def test_speakers_are_split_apart_and_every_split_has_every_word(tmp_path):
    rows = _rows(generate_speech(SMALL, tmp_path))
    assert len(rows) == 3 * 4 * 2
    speakers = {
        s: {r["speaker"] for r in rows if r["split"] == s} for s in ("train", "val", "test")
    }
    assert [len(speakers[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert not speakers["train"] & speakers["val"] and not speakers["train"] & speakers["test"]
    assert not speakers["val"] & speakers["test"]
    for split in ("train", "val", "test"):
        assert {r["label"] for r in rows if r["split"] == split} == {"yes", "no", "stop"}
    # Speakers differ in voice (accent + variant) and in rate/pitch.
    voices = speaker_voices(SMALL)
    assert len({v.name for v in voices}) == 4
    assert len({round(v.rate_wpm) for v in voices}) == 4


@needs_espeak
def test_clips_are_speech_at_the_configured_rate_deterministic_and_cached(tmp_path):
    manifest = generate_speech(SMALL, tmp_path / "a")
    again = generate_speech(SMALL, tmp_path / "b")
    files = sorted(manifest.parent.rglob("*.wav"))
    assert [p.read_bytes() for p in files] == [
        (again.parent / p.relative_to(manifest.parent)).read_bytes() for p in files
    ]
    info = audio_info(files[0])
    assert info["sample_rate"] == 8000 and info["frames"] == SMALL.num_samples
    clip = read_audio(files[0], 8000)
    assert np.isfinite(clip).all() and 0 < np.abs(clip).max() <= 1
    # Two utterances of one word differ (jittered rate, pitch, onset and noise).
    a, b = (read_audio(manifest.parent / r["path"], 8000) for r in _rows(manifest)[:2])
    assert not np.array_equal(a, b)
    stamp = manifest.stat().st_mtime_ns
    assert generate_speech(SMALL, tmp_path / "a") == manifest  # reused, not rewritten
    assert manifest.stat().st_mtime_ns == stamp


@needs_espeak
def test_source_table_takes_the_speaker_splits(tmp_path):
    table = load_source("speech", cache_dir=tmp_path, speech=SMALL)
    assert table.class_names == ["no", "stop", "yes"]
    assert [r.split for r in table.records].count("test") == 3 * 2
    assert not table.problems


def test_a_missing_espeak_is_named_at_start_up(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run there
    cfg = compose_config(["data=speech", f"run_dir={tmp_path}/run"])
    problems = config_problems(cfg, check_data_files)
    assert any("espeak-ng" in p and "apt-get install espeak-ng" in p for p in problems), problems
    with pytest.raises(FileNotFoundError, match="needs the program 'espeak-ng'"):
        generate_speech(SMALL, tmp_path)


@needs_espeak
def test_every_recipe_validates_on_speech(tmp_path):
    for experiment in ("supervised", "unfused"):
        validate(compose_config([f"experiment={experiment}", "data=speech", f"run_dir={tmp_path}"]))


def test_impossible_speaker_splits_are_refused_at_start_up(tmp_path):
    cfg = compose_config(
        [
            "data=speech",
            "data.speech.speakers=3",
            "data.speech.val_speakers=2",
            f"run_dir={tmp_path}",
        ]
    )
    problems = config_problems(cfg, check_data_files)
    assert any("data.speech" in p and "leave no train speaker" in p for p in problems), problems


@pytest.mark.slow
@needs_espeak
def test_supervised_pipeline_runs_on_speech(tmp_path, one_thread):
    cfg = compose_config(
        [
            "experiment=supervised",
            "data=speech",
            *FAST,
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "eval.plots=false",
        ]
    )
    stages = Runner(cfg).run()
    assert stages["finetune"].status == "done"
    rows = _rows(next((tmp_path / "cache").glob("speech-*/manifest.csv")))
    assert len(rows) == 10 * 4  # debug=smoke's size: 10 words x 4 speakers x 1
    assert 0.0 <= stages["finetune"].metrics["finetune/test/acc"] <= 1.0
