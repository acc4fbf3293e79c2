"""The stage data module: items, subsets, and the shards each DDP rank sees."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distillery.data.datamodule import AudioDataModule
from tests.helpers import compose_config


def datamodule(cache: Path, *overrides: str) -> AudioDataModule:
    cfg = compose_config(
        ["experiment=supervised", "debug=smoke", f"data.cache_dir={cache}", *overrides]
    )
    data = AudioDataModule(cfg.data)
    data.setup()
    return data


def loader_indices(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["index"]]


def test_items_and_label_fraction(data_cache: Path) -> None:
    data = datamodule(data_cache, "data.label_fraction=0.25", "data.train_items=labeled")
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"index", "audio", "length", "label"}
    assert batch["audio"].shape[1] == data.num_samples and (batch["label"] >= 0).all()
    train = data.table.indices("train")
    labeled = data.train_indices()
    assert 0 < len(labeled) < len(train)
    # Every class keeps at least one label; hidden labels are -1, true labels are kept aside.
    assert set(data.table.visible_labels[labeled]) == set(range(data.num_classes))
    assert (data.table.visible_labels[np.setdiff1d(train, labeled)] == -1).all()
    features = data.featurize(batch["audio"])
    assert features.shape[:3] == (len(batch["audio"]), 1, 64) and abs(float(features.mean())) < 1.0


def test_ddp_shards_cover_eval_splits_exactly_once(data_cache: Path) -> None:
    data = datamodule(data_cache)
    seen = {"val": [], "test": [], "train": []}
    for rank in (0, 1):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        seen["val"] += loader_indices(data.val_dataloader())
        seen["test"] += loader_indices(data.test_dataloader())
        seen["train"].append(loader_indices(data.train_dataloader()))
    for split in ("val", "test"):
        assert sorted(seen[split]) == sorted(data.table.indices(split).tolist()), split
    shard0, shard1 = seen["train"]
    assert len(shard0) == len(shard1) and not set(shard0) & set(shard1)


def test_normalisation_statistics_do_not_depend_on_the_thread_count(data_cache: Path) -> None:
    """One process (several threads) and each DDP rank (often one) normalise alike, so a
    2-process run trains on the features one process computes (tests/test_ddp_equivalence)."""
    threads = torch.get_num_threads()
    stats = []
    try:
        for n in (1, 3, 4):
            torch.set_num_threads(n)
            features = datamodule(data_cache).features
            stats.append((features.mean, features.std))
    finally:
        torch.set_num_threads(threads)
    # float64 sums: apart by rounding only (~1e-16; float32 sums were ~1e-7 apart)
    for other in stats[1:]:
        assert other == pytest.approx(stats[0], rel=1e-12, abs=0)
