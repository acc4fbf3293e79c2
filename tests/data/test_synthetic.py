"""The synthetic generator: determinism, caching, class differences, validation."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from tests.helpers import compose_config

from distillery.cli import CONF_DIR
from distillery.data.audio_io import audio_info, read_audio
from distillery.data.synthetic import (
    CLASS_NAMES,
    SyntheticSpec,
    generate_clip,
    generate_synthetic,
    spec_hash,
)
from distillery.pipeline.contract import validate

SMALL = SyntheticSpec(num_classes=3, clips_per_class=4, sample_rate=8000, clip_seconds=0.5, seed=7)


def _files(manifest):
    root = manifest.parent
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.wav"))}


def test_at_least_ten_distinct_kinds():
    assert len(CLASS_NAMES) >= 10
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)


def test_clip_shape_range_and_determinism():
    spec = SyntheticSpec()
    for kind in range(len(CLASS_NAMES)):
        a = generate_clip(kind, np.random.default_rng(3), spec)
        b = generate_clip(kind, np.random.default_rng(3), spec)
        c = generate_clip(kind, np.random.default_rng(4), spec)
        assert a.shape == (spec.num_samples,) and a.dtype == np.float32
        assert np.isfinite(a).all() and np.abs(a).max() <= 1.0
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_generate_writes_manifest_and_wavs(tmp_path):
    manifest = generate_synthetic(SMALL, tmp_path, progress=False)
    assert manifest == tmp_path / f"synthetic-{spec_hash(SMALL)}" / "manifest.csv"
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 4
    assert {r["label"] for r in rows} == set(CLASS_NAMES[:3])
    for row in rows:
        assert row["path"].startswith(f"audio/{row['label']}/")
        info = audio_info(manifest.parent / row["path"])
        assert info["sample_rate"] == 8000 and info["channels"] == 1
        assert info["frames"] == 4000 and info["subtype"] == "PCM_16"


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    first = _files(generate_synthetic(SMALL, tmp_path / "a", progress=False))
    second = _files(generate_synthetic(SMALL, tmp_path / "b", progress=False))
    assert first == second
    other_spec = SyntheticSpec(**{**SMALL.__dict__, "seed": 8})
    other = _files(generate_synthetic(other_spec, tmp_path / "c", progress=False))
    assert other.keys() == first.keys()
    assert all(other[k] != first[k] for k in first)


def test_existing_manifest_is_reused(tmp_path, caplog):
    manifest = generate_synthetic(SMALL, tmp_path, progress=False)
    wav = next(manifest.parent.rglob("*.wav"))
    stamp = (manifest.stat().st_mtime_ns, wav.stat().st_mtime_ns)
    with caplog.at_level(logging.INFO, logger="distillery.data"):
        again = generate_synthetic(SMALL, tmp_path, progress=False)
    assert again == manifest
    assert (manifest.stat().st_mtime_ns, wav.stat().st_mtime_ns) == stamp
    assert "Reusing" in caplog.text and str(manifest.parent) in caplog.text


def test_interrupted_generation_is_redone(tmp_path):
    manifest = generate_synthetic(SMALL, tmp_path, progress=False)
    reference = _files(manifest)
    # Simulate an interrupted run: no manifest, one file missing, one truncated.
    manifest.unlink()
    wavs = sorted(manifest.parent.rglob("*.wav"))
    wavs[0].unlink()
    wavs[1].write_bytes(b"")
    assert generate_synthetic(SMALL, tmp_path, progress=False) == manifest
    assert manifest.is_file()
    assert _files(manifest) == reference


def test_manifest_with_missing_file_is_regenerated(tmp_path):
    manifest = generate_synthetic(SMALL, tmp_path, progress=False)
    victim = sorted(manifest.parent.rglob("*.wav"))[-1]
    victim.unlink()
    generate_synthetic(SMALL, tmp_path, progress=False)
    assert victim.is_file()


def test_different_specs_use_different_folders():
    assert spec_hash(SMALL) == spec_hash(SyntheticSpec(**SMALL.__dict__))
    # Numerically equal values from a config (1 vs 1.0) name the same data set.
    assert spec_hash(SyntheticSpec(clip_seconds=1, sample_rate=16000.0)) == spec_hash(
        SyntheticSpec()
    )
    assert spec_hash(SMALL) != spec_hash(SyntheticSpec(**{**SMALL.__dict__, "snr_db_max": 10.0}))


def _band_features(clip: np.ndarray) -> np.ndarray:
    """(samples,) -> (96,): mean, std and frame-to-frame change of 32 log band energies."""
    frames = np.lib.stride_tricks.sliding_window_view(clip.astype(np.float64), 512)[::256]
    power = np.abs(np.fft.rfft(frames * np.hanning(512), axis=-1)) ** 2
    edges = np.unique(np.geomspace(2, power.shape[1], 33).astype(int))
    bands = np.log(np.add.reduceat(power, edges[:-1], axis=1) + 1e-10)
    return np.concatenate([bands.mean(0), bands.std(0), np.diff(bands, axis=0).std(0)])


def _ridge_predict(x_train, y_train, x_test, num_classes):
    """Closed-form ridge classifier on standardised features (fast, no extra dependency)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-9
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    b = np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ np.eye(num_classes)[y_train])
    return (b @ w).argmax(1)


def test_classes_are_learnable_from_spectra_but_not_from_loudness():
    spec = SyntheticSpec(num_classes=len(CLASS_NAMES), clip_seconds=0.5)
    n = 30
    clips = [
        generate_clip(k, np.random.default_rng([1, k, i]), spec)
        for k in range(spec.num_classes)
        for i in range(n)
    ]
    labels = np.repeat(np.arange(spec.num_classes), n)
    train = np.tile(np.arange(n) < n // 2, spec.num_classes)
    chance = 1.0 / spec.num_classes

    features = np.stack([_band_features(c) for c in clips])
    pred = _ridge_predict(features[train], labels[train], features[~train], spec.num_classes)
    truth = labels[~train]
    assert (pred == truth).mean() > 0.5
    for k in range(spec.num_classes):
        # Some tone kinds resemble each other in band statistics; each must still beat chance.
        assert (pred[truth == k] == k).mean() > chance, CLASS_NAMES[k]

    loudness = np.array([[np.log(np.mean(c.astype(np.float64) ** 2))] for c in clips])
    pred = _ridge_predict(loudness[train], labels[train], loudness[~train], spec.num_classes)
    assert (pred == truth).mean() < 2 * chance


def test_chirp_direction_is_visible_in_time():
    spec = SyntheticSpec(sample_rate=16000, snr_db_min=30.0, snr_db_max=30.0)
    up, down = CLASS_NAMES.index("chirp_up"), CLASS_NAMES.index("chirp_down")

    def centroid_slope(kind: int) -> float:
        clip = generate_clip(kind, np.random.default_rng(0), spec).astype(np.float64)
        frames = clip[: clip.shape[0] // 512 * 512].reshape(-1, 512)
        power = np.abs(np.fft.rfft(frames * np.hanning(512), axis=-1)) ** 2
        loud = power.sum(1) > 0.1 * power.sum(1).max()
        centroid = (power * np.arange(power.shape[1])).sum(1) / power.sum(1)
        return float(np.polyfit(np.flatnonzero(loud), centroid[loud], 1)[0])

    assert centroid_slope(up) > 0 > centroid_slope(down)


def test_generated_audio_reads_back(tmp_path):
    manifest = generate_synthetic(SMALL, tmp_path, progress=False)
    wav = next(manifest.parent.rglob("*.wav"))
    assert read_audio(wav, 8000).shape == (4000,)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_classes", len(CLASS_NAMES) + 1, f"between 1 and {len(CLASS_NAMES)}"),
        ("num_classes", 0, "num_classes"),
        ("clips_per_class", 0, "clips_per_class"),
        ("sample_rate", 4000, "sample_rate"),
        ("clip_seconds", 0.0, "clip_seconds"),
        ("seed", -1, "seed"),
        ("seed", 1.5, "integer"),
        ("snr_db_min", 30.0, "snr_db_min"),
    ],
)
def test_spec_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        SyntheticSpec(**{field: value})


def _band_accuracy(spec: SyntheticSpec, n: int = 30) -> float:
    """Test accuracy of a ridge classifier on band statistics, n/2 train clips per class."""
    clips = [
        generate_clip(k, np.random.default_rng([1, k, i]), spec)
        for k in range(spec.num_classes)
        for i in range(n)
    ]
    labels = np.repeat(np.arange(spec.num_classes), n)
    train = np.tile(np.arange(n) < n // 2, spec.num_classes)
    features = np.stack([_band_features(c) for c in clips])
    pred = _ridge_predict(features[train], labels[train], features[~train], spec.num_classes)
    return float((pred == labels[~train]).mean())


def test_hard_setting_is_harder_than_the_default():
    """data=synthetic_hard (20 kinds with confusable twins, lower SNR) is much harder for the
    same simple classifier than the default 8 kinds (0.46 vs 0.78 when written)."""
    hard = OmegaConf.load(Path(CONF_DIR) / "data" / "synthetic_hard.yaml").synthetic
    assert hard.num_classes == len(CLASS_NAMES)
    easy = _band_accuracy(SyntheticSpec(clip_seconds=0.5))
    hard_acc = _band_accuracy(
        SyntheticSpec(
            num_classes=hard.num_classes,
            clip_seconds=0.5,
            snr_db_min=hard.snr_db_min,
            snr_db_max=hard.snr_db_max,
        )
    )
    assert 1.0 / hard.num_classes + 0.1 < hard_acc < easy - 0.2
    validate(compose_config(["experiment=unfused", "data=synthetic_hard", "run_dir=/tmp/unused"]))
