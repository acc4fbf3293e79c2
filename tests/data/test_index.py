"""The header index, resampling, rate/duration limits and ``data.max_clips``, through
AudioDataModule and the composed config as a user runs them."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
import torchaudio.functional as AF
from tests.data.test_bad_audio import listing_line, manifest_rows, sine, write
from tests.helpers import FAST, compose_config
from tests.test_cli import distillery

from distillery.config.validation import config_problems
from distillery.data import audio_io, datamodule, index
from distillery.data.audio_io import AudioFileError, read_audio
from distillery.data.datamodule import AudioDataModule
from distillery.pipeline.runner import Runner

SR = 16000


def folder(root: Path, classes: int, per_class: int, seconds: float = 0.2) -> list[Path]:
    return [
        write(root / f"class{c}" / f"{i:02d}.wav", sine(seconds, freq=300.0 + 50 * c))
        for c in range(classes)
        for i in range(per_class)
    ]


def folder_data(root: Path, cache: Path, **data) -> AudioDataModule:
    cfg = {"source": "folder", "root": str(root), "sample_rate": SR, "clip_seconds": 0.1}
    return AudioDataModule(cfg | {"cache_dir": str(cache), "batch_size": 4, **data})


@pytest.fixture
def header_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts audio_info calls by file: every header the index reads."""
    reads: Counter = Counter()
    real = audio_io.audio_info

    def counting(path, member=None):
        reads[Path(path)] += 1
        return real(path, member)

    monkeypatch.setattr(audio_io, "audio_info", counting)
    return reads


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize("preload", [True, False])
def test_bad_rates_and_durations_are_named_in_the_one_error(tmp_path: Path, preload: bool) -> None:
    ok = [write(tmp_path / f"ok{i}.wav", sine(0.2)) for i in range(3)]
    # 8000 frames claimed at 1 Hz: 2 h 13 min of "audio" that must never be decoded.
    one_hz = write(tmp_path / "one_hz.wav", sine(0.5), sr=1)
    too_fast = write(tmp_path / "too_fast.wav", sine(0.01, sr=200_000), sr=200_000)
    long = write(tmp_path / "long.wav", sine(3.0))
    rows = [(p, "a", "train") for p in [*ok, one_hz, too_fast, long]]
    rows += [(write(tmp_path / f"{split}.wav", sine(0.2)), "a", split) for split in ("val", "test")]
    manifest = manifest_rows(rows, tmp_path / "m.csv")
    cfg = {"source": "manifest", "path": str(manifest), "sample_rate": SR, "clip_seconds": 0.1}
    cfg |= {"cache_dir": str(tmp_path / "cache"), "preload": preload, "max_clip_seconds": 2.0}
    start = time.perf_counter()
    with pytest.raises(AudioFileError) as err:
        AudioDataModule(cfg).setup()
    assert time.perf_counter() - start < 10  # headers, not hours of samples
    message = str(err.value)
    assert message.startswith("3 bad audio file(s)")
    assert "sample rate 1 Hz is outside 4000-192000 Hz" in listing_line(message, one_hz)
    assert "sample rate 200000 Hz is outside" in listing_line(message, too_fast)
    assert "lasts 3.0 s, more than data.max_clip_seconds=2" in listing_line(message, long)
    assert all(f"'{p}'" not in message for p in ok)

    # The limits are settings: raised, they let the fast and the long file pass.
    with pytest.raises(AudioFileError) as err:
        AudioDataModule(cfg | {"max_sample_rate": 200_000, "max_clip_seconds": 5.0}).setup()
    assert str(err.value).startswith("1 bad audio file(s)") and str(one_hz) in str(err.value)


def test_limit_settings_are_checked_at_start_up() -> None:
    cfg = compose_config(
        [*FAST, "data.sample_rate=2000", "data.max_clip_seconds=0", "data.max_clips=0"]
    )
    problems = "\n".join(config_problems(cfg))
    assert "data.sample_rate: 2000 is outside data.min_sample_rate..max_sample_rate" in problems
    assert "data.max_clip_seconds: 0.0 is outside the allowed range (0, inf)" in problems
    assert "data.max_clips: 0 is outside the allowed range [1, inf)" in problems


def test_read_audio_checks_limits_before_decoding(tmp_path: Path) -> None:
    one_hz = write(tmp_path / "one_hz.wav", sine(0.5), sr=1)
    with pytest.raises(AudioFileError, match="sample rate 1 Hz is outside"):
        read_audio(one_hz, SR)


def test_resampled_clip_equals_soxr_and_matches_torchaudio(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Band-limited content (well below both Nyquist rates), so resamplers must agree.
    t = np.arange(44100) / 44100
    signal = sum(0.2 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (220, 1330, 3100))
    path = write(tmp_path / "x.wav", signal, sr=44100, subtype="FLOAT")
    audio = read_audio(path, SR)
    raw, _ = sf.read(path, dtype="float32")
    assert audio.dtype == np.float32 and audio.shape == (SR,)
    np.testing.assert_array_equal(audio, soxr.resample(raw, 44100, SR, quality="HQ"))
    reference = AF.resample(torch.from_numpy(raw), 44100, SR).numpy()
    inner = slice(200, -200)  # the two differ only in how they treat the edges
    np.testing.assert_allclose(audio[inner], reference[inner], atol=2e-3)

    # A rate sharing no divisor with the target: torchaudio's kernel for it is huge.
    odd = write(tmp_path / "odd.wav", sine(1.0, sr=22051), sr=22051)
    start = time.perf_counter()
    audio = read_audio(odd, SR)
    assert time.perf_counter() - start < 1.0 and audio.shape == (SR,)
    np.testing.assert_allclose(audio[inner], sine(1.0)[inner], atol=2e-3)


# --------------------------------------------------------------------------- max_clips


def test_smoke_limits_a_folder_source_per_class(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    folder(root, classes=3, per_class=30)
    cfg = compose_config([*FAST, "data=folder", f"data.root={root}"])
    cfg.data.cache_dir = str(tmp_path / "cache")
    data = AudioDataModule(cfg.data)
    data.setup()
    records = data.table.source.records
    assert cfg.data.max_clips == 48 and len(records) == 48
    assert Counter(r.label for r in records) == {0: 16, 1: 16, 2: 16}
    assert [r.path for r in records] == sorted(r.path for r in records)  # source order kept

    data = folder_data(root, tmp_path / "cache", max_clips=7)
    data.setup()
    assert sorted(Counter(r.label for r in data.table.source.records).values()) == [2, 2, 3]
    data = folder_data(root, tmp_path / "cache")  # data.max_clips=null: every clip
    data.setup()
    assert len(data.table.source.records) == 90


def test_max_clips_keeps_every_split_of_a_manifest(tmp_path: Path) -> None:
    files = [write(tmp_path / f"{i}.wav", sine(0.2)) for i in range(40)]
    rows = [(p, "ab"[i % 2], "train") for i, p in enumerate(files[:30])]
    rows += [(p, "ab"[i % 2], ("val", "test")[i // 5]) for i, p in enumerate(files[30:])]
    manifest = manifest_rows(rows, tmp_path / "m.csv")
    cfg = {"source": "manifest", "path": str(manifest), "sample_rate": SR, "clip_seconds": 0.1}
    data = AudioDataModule(cfg | {"cache_dir": str(tmp_path / "cache"), "max_clips": 8})
    data.setup()
    groups = Counter((r.split, r.label) for r in data.table.source.records)
    assert len(data.table.source.records) == 8 and set(groups.values()) == {1, 2}
    assert {split for split, _ in groups} == {"train", "val", "test"}


# --------------------------------------------------------------------------- index


def test_index_is_reused_and_a_changed_file_is_read_again(
    tmp_path: Path, header_reads: Counter
) -> None:
    root, cache = tmp_path / "audio", tmp_path / "cache"
    files = folder(root, classes=2, per_class=6)
    (root / "class0" / "bad.wav").write_text("not audio")

    def setup() -> AudioDataModule:
        data = folder_data(root, cache, on_bad_file="skip", preload=False)
        data.setup()
        return data

    first = setup()
    assert sum(header_reads.values()) == 13 and set(header_reads.values()) == {1}
    second = setup()  # e.g. the next stage, or another rank
    assert sum(header_reads.values()) == 13  # no header read again
    assert second.skipped_files == first.skipped_files and "bad.wav" in first.skipped_files[0]

    changed = files[3]
    write(changed, sine(0.05))  # shorter: now zero-padded
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # mtime surely moves
    header_reads.clear()
    third = setup()
    assert header_reads == {changed.resolve(): 1}
    i = [r.path for r in third.table.source.records].index(changed.resolve())
    assert third._file_index()[i].frames == round(0.05 * SR)
    assert first._file_index()[i].frames == round(0.2 * SR)


def test_index_cache_layout_survives_a_corrupt_file(tmp_path: Path, header_reads: Counter) -> None:
    root, cache = tmp_path / "audio", tmp_path / "cache"
    files = folder(root, classes=1, per_class=3)
    entries = index.build_index(files, cache)
    for stored in (cache / "index").glob("*.json"):
        stored.write_text("{not json")  # e.g. a full disk during a write
    header_reads.clear()
    assert index.build_index(files, cache) == entries
    assert sum(header_reads.values()) == 3


def test_two_stage_pipeline_reads_each_header_once(
    tmp_path: Path, header_reads: Counter, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "audio"
    files = folder(root, classes=4, per_class=8, seconds=1.0)
    builds: list[int] = []
    real = index.build_index

    def counting(paths, cache_dir, members=None):
        builds.append(len(paths))
        return real(paths, cache_dir, members)

    monkeypatch.setattr(datamodule, "build_index", counting)
    cfg = compose_config(
        ["experiment=coss", *FAST, f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path}"]
        + ["data=folder", f"data.root={root}", "eval.plots=false", "eval.probe_epochs=1"]
    )
    Runner(cfg).run()
    assert builds == [len(files)] * 2  # one data module per stage: ssl, coss
    assert header_reads == {f.resolve(): 1 for f in files}


# --------------------------------------------------------------------------- preload


def test_lazy_and_preloaded_clips_give_identical_batches(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    folder(root, classes=2, per_class=10, seconds=0.3)  # longer than a clip: random crops
    write(root / "class0" / "rate44k.wav", sine(0.25, sr=44100), sr=44100)
    write(root / "class1" / "short.wav", sine(0.03))  # zero-padded

    def batches(**data) -> tuple[AudioDataModule, list[dict]]:
        module = folder_data(root, tmp_path / "cache", **data)
        module.setup()
        torch.manual_seed(0)  # the train sampler's seed
        loaders = [module.train_dataloader(), module.val_dataloader(), module.test_dataloader()]
        return module, [batch for loader in loaders for batch in loader]

    preloaded, expected = batches(preload=True)
    auto_small, auto_small_batches = batches()  # data.preload=null, 2 MB: preloaded
    auto_large, auto_large_batches = batches(preload_max_mb=0.01)  # null, too big: lazy
    lazy, lazy_batches = batches(preload=False)
    assert (preloaded.preload, auto_small.preload, auto_large.preload, lazy.preload) == (
        True,
        True,
        False,
        False,
    )
    assert preloaded.cache and lazy.cache is None and auto_large.cache is None
    for other in (auto_small_batches, auto_large_batches, lazy_batches):
        assert len(other) == len(expected) > 3
        for got, want in zip(other, expected, strict=True):
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), key


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_and_two_stages_read_each_header_once(tmp_path: Path) -> None:
    root, run_dir = tmp_path / "audio", tmp_path / "run"
    files = folder(root, classes=4, per_class=8, seconds=1.0)
    result = distillery(
        "experiment=coss",
        "debug=smoke",
        "logger=csv",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data=folder",
        f"data.root={root}",
        "eval.plots=false",
        "eval.probe_epochs=1",
        f"run_dir={run_dir}",
        cache=tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = (run_dir / "distillery.log").read_text() + (run_dir / "ddp_rank1.log").read_text()
    built = re.findall(r"data index: (\d+) file\(s\), (\d+) read, (\d+) cached", logs)
    assert len(built) == 4  # 2 stages x 2 ranks
    assert all(int(n) == len(files) for n, _, _ in built)
    assert sum(int(read) for _, read, _ in built) == len(files)  # each header read once
