"""Tar shards (``data.source=shards``): written by ``distillery-data shards``, read in place,
sharded over ranks with every clip once per epoch, resumed in the same order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset
from tests.clip_log import read_clip_log
from tests.helpers import FAST, REPO, cli_env

from distillery.data.cli import main as data_cli
from distillery.data.datamodule import AudioDataModule, ShardTrainSampler

SR = 16000
SPLITS = ["train"] * 32 + ["val"] * 8 + ["test"] * 8  # 48: what debug=smoke keeps


def clip_set(root: Path, splits: list[str] = SPLITS) -> Path:
    """A manifest of real WAV files, each its own tone (so clips can be told apart)."""
    lines = ["path,label,split"]
    for i, split in enumerate(splits):
        t = np.arange(round(0.2 * SR)) / SR
        sf.write(root / f"{i}.wav", 0.4 * np.sin(2 * np.pi * (200 + 40 * i) * t), SR)
        lines.append(f"{i}.wav,{'lo' if i % 2 else 'hi'},{split}")
    (root / "clips.csv").write_text("\n".join(lines) + "\n")
    return root / "clips.csv"


def data(tmp_path: Path, **cfg) -> AudioDataModule:
    base = {"sample_rate": SR, "clip_seconds": 0.1, "cache_dir": str(tmp_path / "cache")}
    module = AudioDataModule(base | cfg)
    module.setup()
    return module


def test_shards_hold_the_manifest_clips_and_read_back_identically(tmp_path: Path) -> None:
    manifest = clip_set(tmp_path)
    assert (
        data_cli(
            ["shards", str(manifest), "--out", str(tmp_path / "shards"), "--clips-per-shard", "7"]
        )
        == 0
    )
    tars = sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
    assert tars == [
        *(f"test-{i:06d}.tar" for i in range(2)),
        *(f"train-{i:06d}.tar" for i in range(5)),
    ] + [f"val-{i:06d}.tar" for i in range(2)]
    # A plain WebDataset pipeline reads them: the layout is the standard one.
    samples = list(
        webdataset.WebDataset([str(tmp_path / "shards" / t) for t in tars], shardshuffle=False)
    )
    assert len(samples) == 48 and {"wav", "json"} <= set(samples[0])

    plain = data(tmp_path, source="manifest", path=str(manifest))
    sharded = data(tmp_path, source="shards", path=str(tmp_path / "shards"))
    assert sharded.class_names == plain.class_names and not sharded.multi_label
    for split in ("train", "val", "test"):
        loaded = sharded.dataloader(split).dataset
        for position in range(len(loaded)):
            item = loaded[position]
            record = sharded.table.source.records[item["index"]]
            original = int(record.path.name.split(".")[0])  # the key: the manifest row
            assert plain.table.splits[original] == split
            expected = plain.dataloader(split, indices=np.array([original])).dataset[0]
            assert item["label"] == expected["label"]
            assert np.array_equal(item["audio"].numpy(), expected["audio"].numpy())


def test_multi_label_manifest_to_shards(tmp_path: Path) -> None:
    for i in range(4):
        sf.write(tmp_path / f"{i}.wav", np.full(1600, 0.1 * i), SR)
    (tmp_path / "m.csv").write_text("path,labels\n0.wav,a;b\n1.wav,b\n2.wav,a\n3.wav,\n")
    assert data_cli(["shards", str(tmp_path / "m.csv"), "--out", str(tmp_path / "s")]) == 0
    sharded = data(tmp_path, source="shards", path=str(tmp_path / "s"))
    assert sharded.multi_label
    assert [r.labels for r in sharded.table.source.records] == [(0, 1), (1,), (0,), ()]


def test_each_epoch_every_clip_goes_to_one_rank_reading_shard_by_shard() -> None:
    shards = [f"s{i // 7}" for i in range(41)]  # 6 shards of 7 and one of 6
    dataset = list(range(41))
    ranks = [ShardTrainSampler(dataset, shards, 2, rank, seed=5) for rank in (0, 1)]
    orders = []
    for epoch in range(3):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        items = [sampler.epoch_items() for sampler in ranks]
        assert len(items[0]) == len(items[1]) == 20  # equal shares, for DDP
        every = items[0] + items[1]
        assert len(set(every)) == 40  # no clip twice; 41 mod 2 = 1 sits this epoch out
        for share in items:  # shard by shard: a rank's shards are contiguous runs
            runs = [shards[i] for i in share]
            changes = sum(a != b for a, b in zip(runs, runs[1:], strict=False))
            assert changes == len(set(runs)) - 1
        orders.append(every)
    assert orders[0] != orders[1] != orders[2]
    left_out = [set(dataset) - set(order) for order in orders]
    assert len(set(map(frozenset, left_out))) > 1  # not the same clip every epoch


def test_resume_gives_the_uninterrupted_order() -> None:
    shards = [f"s{i // 5}" for i in range(20)]
    uninterrupted = ShardTrainSampler(list(range(20)), shards, 1, 0, seed=3)
    uninterrupted.set_epoch(2)
    expected = list(uninterrupted)
    resumed = ShardTrainSampler(list(range(20)), shards, 1, 0, seed=3)  # a new process
    resumed.set_epoch(2)  # at the epoch boundary
    assert list(resumed) == expected
    resumed.resume_at = (2, 8)  # mid-epoch: the 8 clips trained on are skipped
    assert list(resumed) == expected[8:]
    assert list(resumed) == expected  # the next pass over the epoch is whole again


@pytest.mark.slow  # ~60 s: 2 processes
@pytest.mark.ddp
def test_two_process_pipeline_on_shards_sees_every_clip_once_per_epoch(
    tmp_path: Path, data_cache: Path
) -> None:
    manifest = clip_set(tmp_path)
    assert (
        data_cli(
            ["shards", str(manifest), "--out", str(tmp_path / "shards"), "--clips-per-shard", "5"]
        )
        == 0
    )
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "distillery.cli", "experiment=supervised", *FAST]
    cmd += ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"run_dir={run_dir}"]
    cmd += [
        f"data.cache_dir={data_cache}",
        "data.source=shards",
        f"data.path={tmp_path / 'shards'}",
    ]
    cmd += [
        "debug.trainer.max_epochs=2",
        "debug.trainer.limit_train_batches=1.0",
        "eval.plots=false",
    ]
    cmd += ["+pipeline.stages.finetune.callbacks.clips._target_=tests.clip_log.ClipLog"]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "pipeline.json").read_text())["stages"]["finetune"]
    assert record["status"] == "done" and "finetune/test/acc" in record["metrics"]

    train = data(tmp_path, source="shards", path=str(tmp_path / "shards"), max_clips=48)
    expected = sorted(train.train_indices().tolist())
    orders = []
    for epoch in range(2):
        ranks = [read_clip_log(run_dir / "finetune", rank, epoch) for rank in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 16  # 32 train clips, 2 batches of 8 per rank
        assert sorted(ranks[0] + ranks[1]) == expected  # none lost, none twice
        orders.append(ranks[0] + ranks[1])
    assert orders[0] != orders[1]


@pytest.mark.slow  # ~2 min: three pipeline runs
def test_sigterm_mid_epoch_on_shards_resumes_with_the_uninterrupted_clips(
    tmp_path: Path, data_cache: Path
) -> None:
    manifest = clip_set(tmp_path)
    assert data_cli(["shards", str(manifest), "--out", str(tmp_path / "shards")]) == 0
    args = [sys.executable, "-m", "distillery.cli", "experiment=supervised", *FAST]
    args += [
        f"data.cache_dir={data_cache}",
        "data.source=shards",
        f"data.path={tmp_path / 'shards'}",
    ]
    args += [
        "debug.trainer.max_epochs=2",
        "debug.trainer.limit_train_batches=1.0",
        "eval.plots=false",
    ]
    args += ["+pipeline.stages.finetune.callbacks.clips._target_=tests.clip_log.ClipLog"]

    def run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [*args, f"run_dir={run_dir}", *extra]
        return subprocess.run(
            cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=600
        )

    assert run(tmp_path / "reference").returncode == 0
    signal = "+pipeline.stages.finetune.callbacks.signal"
    stop = [f"{signal}._target_=tests.helpers.SignalAt", f"{signal}.signal=SIGTERM"]
    stop += [f"{signal}.marker={tmp_path / 'sent'}", f"{signal}.epoch=1", f"{signal}.batch=1"]
    assert run(tmp_path / "run", *stop).returncode == 143
    interrupted = read_clip_log(tmp_path / "run" / "finetune", 0, 1)
    assert 0 < len(interrupted) < 32  # stopped mid-epoch
    resumed = run(tmp_path / "run", *stop)  # the marker exists: no second signal
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for epoch in (0, 1):  # the resumed epoch read exactly the clips the reference did, in order
        got = read_clip_log(tmp_path / "run" / "finetune", 0, epoch)
        assert got == read_clip_log(tmp_path / "reference" / "finetune", 0, epoch)
    metrics = [
        json.loads((tmp_path / d / "pipeline.json").read_text())["stages"]["finetune"]["metrics"]
        for d in ("run", "reference")
    ]
    assert metrics[0]["finetune/test/acc"] == metrics[1]["finetune/test/acc"]
