"""Bad and unusual audio in folder/manifest sources, end to end through AudioDataModule.

Every file here is written by the test: format differences (channels, rate, bit depth,
length, non-ASCII names) must be converted; bad files (truncated, not audio, empty,
zero frames, NaN/Inf, missing, label outside the class list) must be listed together in
one error before training, or skipped and counted with ``data.on_bad_file=skip``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from tests.helpers import FAST, compose_config

from distillery.data.audio_io import AudioFileError
from distillery.data.datamodule import AudioDataModule
from distillery.pipeline.runner import Runner

SR = 16000
CLIP_SECONDS = 0.1
CLIP = round(SR * CLIP_SECONDS)


def sine(seconds: float, sr: int = SR, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float64)


def write(
    path: Path, audio: np.ndarray, sr: int = SR, subtype: str = "PCM_16", fmt: str | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, sr, subtype=subtype, format=fmt)
    return path


def good_files(root: Path) -> dict[Path, tuple[np.ndarray, float]]:
    """Files that differ only in format: path -> (expected mono signal at SR, tolerance)."""
    ref = sine(0.2)
    stereo = np.stack([ref, sine(0.2, freq=1000.0, amp=0.25)], axis=1)
    files = {
        write(root / "pcm16.wav", ref): (ref, 1e-4),
        write(root / "stereo.wav", stereo, subtype="FLOAT"): (stereo.mean(axis=1), 1e-6),
        write(root / "unsigned8.wav", ref, subtype="PCM_U8"): (ref, 1 / 64),
        write(root / "signed8.flac", ref, subtype="PCM_S8"): (ref, 1 / 64),
        write(root / "pcm24.wav", ref, subtype="PCM_24"): (ref, 1e-6),
        write(root / "pcm32.wav", ref, subtype="PCM_32"): (ref, 1e-6),
        write(root / "float32.wav", ref, subtype="FLOAT"): (ref, 1e-6),
        write(root / "float64.wav", ref, subtype="DOUBLE"): (ref, 1e-6),
        write(root / "rate44k.flac", sine(0.2, sr=44100), sr=44100): (ref, 0.02),
        write(root / "rate8k.wav", sine(0.2, sr=8000), sr=8000): (ref, 0.02),
        write(root / "wav_named.mp3", ref, fmt="WAV"): (
            ref,
            1e-4,
        ),  # the content decides, not the name
        write(root / "données" / "ふじ.wav", ref): (ref, 1e-4),
    }
    short = sine(0.01)  # 10 ms: zero-padded to the clip length
    files[write(root / "short10ms.wav", short)] = (short, 1e-4)
    return files


def header_bad_files(root: Path) -> dict[Path, str]:
    """Bad files visible from the header alone: path -> the reason the error must give."""
    root.mkdir(parents=True, exist_ok=True)
    full = write(root / "full.wav", sine(0.2)).read_bytes()
    (root / "full.wav").unlink()
    (root / "truncated.wav").write_bytes(full[: len(full) // 2 + 1])  # cut mid-sample
    (root / "text.wav").write_text("not audio at all\n" * 20)
    (root / "picture.flac").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (root / "empty.wav").write_bytes(b"")
    write(root / "zero_frames.wav", np.zeros(0))
    (root / "folder.wav").mkdir()
    return {
        root / "truncated.wav": "is truncated",
        root / "text.wav": "Format not recognised",
        root / "picture.flac": "Format not recognised",
        root / "empty.wav": "is empty (0 bytes)",
        root / "zero_frames.wav": "contains no audio frames",
        root / "folder.wav": "is not a regular file",
    }


def content_bad_files(root: Path) -> dict[Path, str]:
    """Bad files whose header is fine: found only when the samples are decoded."""
    flac = write(root / "full.flac", sine(1.0)).read_bytes()
    (root / "full.flac").unlink()
    (root / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    return {
        write(root / "all_nan.wav", np.full(800, np.nan), subtype="FLOAT"): "non-finite",
        write(root / "all_inf.wav", np.full(800, np.inf), subtype="DOUBLE"): "non-finite",
        root / "truncated.flac": "cannot be decoded",
    }


def manifest_rows(rows: list[tuple[Path | str, str, str]], manifest: Path) -> Path:
    """A CSV manifest (UTF-8, paths relative to it where possible) with path,label,split."""
    lines = ["path,label,split"]
    for path, label, split in rows:
        text = os.path.relpath(path, manifest.parent) if isinstance(path, Path) else path
        lines.append(f"{text},{label},{split}")
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def datamodule(manifest: Path, **data) -> AudioDataModule:
    cfg = {
        "source": "manifest",
        "path": str(manifest),
        "sample_rate": SR,
        "clip_seconds": CLIP_SECONDS,
        "batch_size": 4,
        "cache_dir": str(manifest.parent / "cache"),  # the header index
        **data,
    }
    return AudioDataModule(cfg)


def mixed_manifest(root: Path) -> tuple[Path, list[Path], dict[Path, str], dict[Path, str]]:
    """Good files in every split and both classes, plus one row for every kind of bad file.

    Returns the manifest, the good files, the bad files found before decoding (header and
    manifest problems), and those found only by decoding.
    """
    good = list(good_files(root / "good"))
    header_bad = header_bad_files(root / "bad")
    content_bad = content_bad_files(root / "bad")
    rows = [(p, "ab"[i % 2], ("train", "train", "val", "test")[i % 4]) for i, p in enumerate(good)]
    rows += [(p, "a", "train") for p in [*header_bad, *content_bad]]
    missing = root / "gone" / "missing.wav"
    rows.append((missing, "a", "train"))
    rows.append((write(root / "mislabelled.wav", sine(0.2)), "c", "test"))
    manifest = manifest_rows(rows, root / "manifest.csv")
    header_bad[missing] = "does not exist"
    # The row is named by its line: 1 header line + one per row before it.
    header_bad[f"line {len(rows) + 1}: "] = "'c' occurs in no train row"
    return manifest, good, header_bad, content_bad


def listing_line(message: str, name: Path | str) -> str:
    lines = [line for line in message.splitlines() if str(name) in line]
    assert len(lines) == 1, f"{name} should be listed once in:\n{message}"
    return lines[0].strip()


# --------------------------------------------------------------------------- error / skip


@pytest.mark.parametrize("preload", [True, False])
def test_every_bad_file_is_listed_in_one_error_before_training(
    tmp_path: Path, preload: bool
) -> None:
    manifest, good, header_bad, content_bad = mixed_manifest(tmp_path)
    expected = header_bad | (content_bad if preload else {})  # preload=false reads headers only
    data = datamodule(manifest, preload=preload)
    with pytest.raises(AudioFileError) as err:
        data.setup()
    message = str(err.value)
    assert (
        message.startswith(f"{len(expected)} bad audio file(s)")
        and "data.on_bad_file=skip" in message
    )
    for name, reason in expected.items():
        assert reason in listing_line(message, name)
    for path in good:
        assert f"'{path}'" not in message


@pytest.mark.parametrize("preload", [True, False])
def test_skip_leaves_out_every_bad_file_and_counts_them(
    tmp_path: Path, preload: bool, caplog: pytest.LogCaptureFixture
) -> None:
    manifest, good, header_bad, content_bad = mixed_manifest(tmp_path)
    bad = header_bad | content_bad  # skipping decodes every file, preload or not
    data = datamodule(manifest, preload=preload, on_bad_file="skip")
    with caplog.at_level(logging.WARNING, logger="distillery.data.datamodule"):
        data.setup()
    assert len(data.skipped_files) == len(bad)
    for name, reason in bad.items():
        assert reason in listing_line("\n".join(data.skipped_files), name)
    assert (
        f"skipped {len(bad)} bad audio file(s)" in caplog.text
        and data.skipped_files[0] in caplog.text
    )

    records = data.table.source.records
    skipped = set(np.flatnonzero(data.table.splits == "skipped").tolist())
    assert len(skipped) == len(bad)
    seen = []
    for split in ("train", "val", "test"):
        for batch in data.dataloader(split):  # not shuffled or cropped: every item once
            assert batch["audio"].shape[1] == CLIP and bool(batch["audio"].isfinite().all())
            seen += batch["index"].tolist()
    assert not skipped & set(seen)
    assert {records[i].path for i in seen} == set(good)  # every good file is still used
    assert data.class_names == ["a", "b"]


def test_skip_with_no_good_train_file_left_is_an_error(tmp_path: Path) -> None:
    bad = header_bad_files(tmp_path / "bad")
    ok = write(tmp_path / "ok.wav", sine(0.2))
    rows = [(p, "a", "train") for p in bad] + [(ok, "a", "test")]
    data = datamodule(manifest_rows(rows, tmp_path / "m.csv"), on_bad_file="skip")
    with pytest.raises(AudioFileError, match="left no train clips"):
        data.setup()


# --------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("preload", [True, False])
def test_format_differences_are_converted(tmp_path: Path, preload: bool) -> None:
    good = good_files(tmp_path)
    manifest = manifest_rows([(p, "a", "train") for p in good], tmp_path / "m.csv")
    data = datamodule(manifest, preload=preload)
    data.setup()
    dataset = data._dataset(np.arange(len(good)), train=False)
    for i, (path, (expected, tolerance)) in enumerate(good.items()):
        item = dataset[i]
        assert data.table.source.records[item["index"]].path == path
        audio = item["audio"].numpy()
        assert audio.dtype == np.float32 and audio.shape == (CLIP,)
        start = max(0, len(expected) - CLIP) // 2  # evaluation reads the centre
        want = np.zeros(CLIP)
        kept = expected[start : start + CLIP]
        want[: len(kept)] = kept
        np.testing.assert_allclose(audio, want, atol=tolerance, err_msg=str(path))


def test_long_clips_keep_only_what_training_reads_in_memory(tmp_path: Path) -> None:
    minute = sine(60.0)
    long_train = write(tmp_path / "long_train.wav", minute)
    long_val = write(tmp_path / "long_val.wav", minute)
    manifest = manifest_rows(
        [(long_train, "a", "train"), (long_val, "a", "val")], tmp_path / "m.csv"
    )
    data = datamodule(manifest, preload=True)
    data.setup()
    train_audio, val_audio = data.cache[0], data.cache[1]
    assert train_audio.shape == (len(minute),)  # random training crops need all of it
    # Evaluation reads the centre crop only: a copy, so the 60 s buffer is not kept alive.
    assert val_audio.shape == (CLIP,) and val_audio.base is None
    centre = (len(minute) - CLIP) // 2
    np.testing.assert_allclose(val_audio, minute[centre : centre + CLIP], atol=1e-4)
    streamed = datamodule(manifest, preload=False)
    streamed.setup()
    for split in ("train", "val"):
        cached = data.dataloader(split).dataset[0]["audio"]
        assert np.array_equal(cached, streamed.dataloader(split).dataset[0]["audio"])
    crops = {
        tuple(data.dataloader("train", train=True).dataset[0]["audio"][:4].tolist())
        for _ in range(5)
    }
    assert len(crops) > 1  # training crops move over the whole minute


def test_nan_file_without_preload_fails_when_read_naming_the_file(tmp_path: Path) -> None:
    ok = [write(tmp_path / f"ok{i}.wav", sine(0.2)) for i in range(3)]
    nan = write(tmp_path / "nan.wav", np.full(800, np.nan), subtype="FLOAT")
    manifest = manifest_rows(
        [(p, "a", "train") for p in ok] + [(nan, "a", "test")], tmp_path / "m.csv"
    )
    data = datamodule(manifest, preload=False)
    data.setup()  # headers are fine; the samples are read only when the clip is used
    with pytest.raises(AudioFileError) as err:
        list(data.test_dataloader())
    assert str(nan) in str(err.value) and "non-finite" in str(err.value)
    assert "data.preload=false" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_listed(tmp_path: Path) -> None:
    ok = write(tmp_path / "ok.wav", sine(0.2))
    locked = write(tmp_path / "locked.wav", sine(0.2))
    locked.chmod(0)
    data = datamodule(
        manifest_rows([(ok, "a", "train"), (locked, "a", "train")], tmp_path / "m.csv")
    )
    with pytest.raises(AudioFileError, match="locked.wav"):
        data.setup()


# --------------------------------------------------------------------------- class list


def test_data_classes_orders_labels_and_rejects_others(tmp_path: Path) -> None:
    files = [write(tmp_path / f"{i}.wav", sine(0.2)) for i in range(4)]
    rows = [(files[0], "bird", "train"), (files[1], "cat", "train"), (files[2], "brid", "train")]
    manifest = manifest_rows([*rows, (files[3], "cat", "test")], tmp_path / "m.csv")
    with pytest.raises(AudioFileError) as err:
        datamodule(manifest, classes=["cat", "bird"]).setup()
    line = listing_line(str(err.value), "'brid'")
    assert (
        line.startswith(f"{manifest}: line 4: ")
        and "2.wav" in line
        and "data.classes ('cat', 'bird')" in line
    )

    data = datamodule(manifest, classes=["cat", "bird", "dog"], on_bad_file="skip")
    data.setup()
    assert data.class_names == ["cat", "bird", "dog"]  # the configured order
    assert [r.label for r in data.table.source.records] == [1, 0, -1, 0]
    assert len(data.skipped_files) == 1


def test_test_only_label_is_accepted_once_listed_in_data_classes(tmp_path: Path) -> None:
    files = [write(tmp_path / f"{i}.wav", sine(0.2)) for i in range(3)]
    rows = [(files[0], "a", "train"), (files[1], "b", "train"), (files[2], "c", "test")]
    manifest = manifest_rows(rows, tmp_path / "m.csv")
    with pytest.raises(AudioFileError, match=r"line 4: .*'c' occurs in no train row"):
        datamodule(manifest).setup()
    data = datamodule(manifest, classes=["a", "b", "c"])
    data.setup()
    assert data.num_classes == 3


@pytest.mark.parametrize(("classes", "message"), [(["a", "b", "a"], "repeated"), ([], "non-empty")])
def test_data_classes_must_be_distinct_names(
    tmp_path: Path, classes: list[str], message: str
) -> None:
    manifest = manifest_rows(
        [(write(tmp_path / "x.wav", sine(0.2)), "a", "train")], tmp_path / "m.csv"
    )
    with pytest.raises(ValueError, match=rf"data\.classes: .*{message}"):
        datamodule(manifest, classes=classes).setup()


def test_folder_source_with_non_ascii_names_and_data_classes(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    fuji = write(root / "données" / "ふじ.wav", sine(0.2))
    other = [write(root / "données" / f"{i}.wav", sine(0.2)) for i in range(2)]
    stray = write(root / "autres" / "x.wav", sine(0.2))
    cfg = {"source": "folder", "root": str(root), "sample_rate": SR, "clip_seconds": CLIP_SECONDS}
    cfg["cache_dir"] = str(tmp_path / "cache")
    data = AudioDataModule(cfg)
    data.setup()
    assert data.class_names == ["autres", "données"]
    with pytest.raises(AudioFileError) as err:
        AudioDataModule(cfg | {"classes": ["données"]}).setup()
    assert "folder 'autres' is not in data.classes" in listing_line(str(err.value), stray)
    data = AudioDataModule(cfg | {"classes": ["données"], "on_bad_file": "skip"})
    data.setup()
    assert {
        r.path for i, r in enumerate(data.table.source.records) if data.table.splits[i] != "skipped"
    } == {
        fuji,
        *other,
    }


# --------------------------------------------------------------------------- pipeline run


@pytest.mark.parametrize("on_bad_file", ["error", "skip"])
def test_pipeline_run_reports_or_skips_bad_files(
    tmp_path: Path, data_cache: Path, on_bad_file: str
) -> None:
    good = list(good_files(tmp_path / "good"))
    bad = header_bad_files(tmp_path / "bad") | content_bad_files(tmp_path / "bad")
    rows = [(p, "ab"[i % 2], "") for i, p in enumerate(good * 2)]  # splits assigned by the runner
    rows += [(p, "a", "") for p in bad] + [(tmp_path / "missing.wav", "a", ""), (good[0], "c", "")]
    manifest = manifest_rows(rows, tmp_path / "manifest.csv")
    run_dir = tmp_path / "run"
    cfg = compose_config(
        ["experiment=supervised", *FAST, f"run_dir={run_dir}", f"data.cache_dir={data_cache}"]
        + [
            "data=manifest",
            f"data.path={manifest}",
            "data.classes=[a,b]",
            f"data.on_bad_file={on_bad_file}",
        ]
        + ["eval.plots=false", "eval.probe_epochs=1"]
    )
    if on_bad_file == "error":
        with pytest.raises(AudioFileError) as err:
            Runner(cfg).run()
        message = str(err.value)
        assert message.startswith(f"{len(bad) + 2} bad audio file(s)")
        assert all(str(p) in message for p in bad) and "missing.wav" in message and "'c'" in message
        assert not list(run_dir.rglob("*.ckpt"))  # stopped before training
    else:
        Runner(cfg).run()
        record = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
        assert record["status"] == "done"
        assert record["metrics"]["finetune/data/skipped_files"] == len(bad) + 2
