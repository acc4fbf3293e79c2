"""Pseudo-labeling at scale: fit subsample, chunked assignment, on-disk (float16) features.

Multi-rank runs use threads with an in-process collective, so they are fast and need no
process group; ``tests/test_ddp.py`` covers real processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from torch import nn

from distillery.bench import pseudo_label_scale as bench
from distillery.callbacks.pseudo_labeler import PseudoLabeler
from distillery.clustering import assign
from distillery.clustering import distributed as pl
from distillery.clustering.distributed import (
    LocalComm,
    fit_subset,
    iter_chunks,
    label_dataset,
    pseudo_label,
    take_rows,
)
from distillery.eval.embed import NpyFeatureWriter, embed

K = 6


class _Group:
    """State shared by the ranks of one :class:`ThreadComm` world."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list[Any] = [None] * world_size


class ThreadComm:
    """A collective between threads of one process, with Fabric's semantics."""

    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.world_size, self.global_rank = group, group.world_size, rank

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.group.slots[self.global_rank] = tensor.clone()
        self.group.barrier.wait()
        out = torch.stack(self.group.slots)
        self.group.barrier.wait()  # nobody overwrites a slot before all have read
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.global_rank == src:
            self.group.slots[src] = obj
        self.group.barrier.wait()
        out = self.group.slots[src]
        self.group.barrier.wait()
        return out

    def barrier(self, name: str | None = None) -> None:
        self.group.barrier.wait()


def run_world(world_size: int, fn: Callable[[Any], Any]) -> list[Any]:
    """``fn(comm)`` on every rank of a thread world; the per-rank results."""
    if world_size == 1:
        return [fn(LocalComm())]
    group = _Group(world_size)
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(group, rank))
        except BaseException as err:
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """(1200, 16) float32, K well-separated blobs."""
    x, _ = make_blobs(n_samples=1200, n_features=16, centers=K, cluster_std=0.5, random_state=0)
    return x.astype(np.float32)


class _Table:
    def __init__(self, n: int) -> None:
        self.source = SimpleNamespace(records=[None] * (n + 50))  # + 50 never labeled
        self.splits = {"train": np.arange(0, n - 200), "val": np.arange(n - 200, n)}

    def indices(self, split: str) -> np.ndarray:
        return self.splits[split]


class _Data:
    """The part of AudioDataModule label_dataset uses; "audio" are the features."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.table = x, _Table(len(x))

    @staticmethod
    def featurize(audio: torch.Tensor) -> torch.Tensor:
        return audio

    def dataloader(self, split: str, *, indices: np.ndarray) -> list[dict[str, torch.Tensor]]:
        return [
            {
                "index": torch.from_numpy(b),
                "audio": torch.from_numpy(self.x[b]),
                "label": torch.full((len(b),), -1),
            }
            for b in np.array_split(indices, max(1, len(indices) // 64))
        ]


# ----------------------------------------------------------------------------- fit subset


def test_fit_subset_depends_only_on_the_index_set_and_seed() -> None:
    fit = np.arange(0, 9000, 3)
    a = fit_subset(fit, 200, seed=1)
    np.testing.assert_array_equal(a, fit_subset(fit, 200, seed=1))
    # Order and duplicates of the array do not matter: ranks may build it differently.
    np.testing.assert_array_equal(a, fit_subset(np.concatenate([fit[::-1], fit[:10]]), 200, seed=1))
    assert len(a) == 200 and np.all(np.diff(a) > 0) and np.isin(a, fit).all()
    assert not np.array_equal(a, fit_subset(fit, 200, seed=2))
    np.testing.assert_array_equal(fit_subset(fit, None), fit)
    np.testing.assert_array_equal(fit_subset(fit, len(fit)), fit)
    with pytest.raises(ValueError, match="fit_sample"):
        fit_subset(fit, 0)


def test_fit_sample_gathers_the_same_clips_on_every_world_size(
    blobs: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, fit_sample = len(blobs), 300
    fit_indices = np.arange(n - 200)  # the last 200 are only assigned
    gathered: dict[int, np.ndarray] = {}
    real = pl.gather_by_index

    def spy(comm: Any, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx, val = real(comm, indices, values)
        if values.ndim == 2 and comm.global_rank == 0:  # the features, not the labels
            gathered[comm.world_size] = idx
        return idx, val

    monkeypatch.setattr(pl, "gather_by_index", spy)

    def job(comm: Any) -> np.ndarray:
        shard = np.arange(n)[comm.global_rank :: comm.world_size]
        labels, _, _ = pseudo_label(
            comm, shard, blobs[shard], fit_indices, n + 7, k=K, fit_sample=fit_sample, seed=3
        )
        return labels

    expected = fit_subset(fit_indices, fit_sample, seed=3)
    reference = job(LocalComm())
    for world in (1, 2, 3):
        for labels in run_world(world, job):
            np.testing.assert_array_equal(labels, reference)
        np.testing.assert_array_equal(gathered[world], expected)
    assert (reference[:n] >= 0).all() and (reference[n:] == -1).all()
    assert set(reference[:n]) == set(range(K))


# ----------------------------------------------------------------------------- chunking


def test_chunked_assignment_equals_unchunked(blobs: np.ndarray) -> None:
    n, idx = len(blobs), np.arange(len(blobs))
    labels, model, _ = pseudo_label(LocalComm(), idx, blobs, idx, n, k=K, fit_sample=None)
    whole, _ = assign(model.transform(blobs), model.centroids)
    np.testing.assert_array_equal(labels, whole)
    for chunk in (1, 7, 256, n, 10 * n):
        np.testing.assert_array_equal(model.predict(blobs, chunk), whole)
    small, _, _ = pseudo_label(LocalComm(), idx, blobs, idx, n, k=K, fit_sample=500, chunk_size=7)
    large, _, _ = pseudo_label(
        LocalComm(), idx, blobs, idx, n, k=K, fit_sample=500, chunk_size=10 * n
    )
    np.testing.assert_array_equal(small, large)


def test_chunks_of_a_memmap_read_the_same_rows_twice(blobs: np.ndarray, tmp_path: Path) -> None:
    """Unmapping written or consumed pages never loses data: a second pass reads it again."""
    big = np.tile(blobs, (4, 1))  # a few pages per chunk
    writer = NpyFeatureWriter(tmp_path / "x.npy", len(big))
    for lo in range(0, len(big), 333):
        writer.write(big[lo : lo + 333])
    mm = writer.close()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), big)
    for _ in range(2):
        parts = [block.copy() for _, _, block in iter_chunks(mm, 333)]
        np.testing.assert_array_equal(np.concatenate(parts), big)
    mask = np.zeros(len(mm), dtype=bool)
    mask[::5] = True
    np.testing.assert_array_equal(take_rows(mm, mask, 100), big[mask])
    assert take_rows(blobs, np.ones(len(blobs), dtype=bool)) is blobs  # no copy


# ----------------------------------------------------------------------------- on disk


def test_float16_memmap_gives_the_labels_of_float32_in_memory(
    blobs: np.ndarray, tmp_path: Path
) -> None:
    n, idx = len(blobs), np.arange(len(blobs))
    writer = NpyFeatureWriter(tmp_path / "rank0.npy", n, "float16")
    for lo in range(0, n, 100):
        writer.write(blobs[lo : lo + 100])
    mm = writer.close()
    assert isinstance(mm, np.memmap) and mm.dtype == np.float16 and not mm.flags.writeable
    for fit_sample in (None, 500):
        ref, _, _ = pseudo_label(LocalComm(), idx, blobs, idx, n, k=K, fit_sample=fit_sample)
        got, _, _ = pseudo_label(
            LocalComm(), idx, mm, idx, n, k=K, fit_sample=fit_sample, chunk_size=256
        )
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("world", [1, 2])
def test_label_dataset_streams_complete_feature_files(
    blobs: np.ndarray, tmp_path: Path, world: int
) -> None:
    """Each rank's file is a complete .npy of its shard, kept afterwards; same labels."""
    data = _Data(blobs)
    encoder = nn.Identity()
    ref, fit_idx, _, _ = label_dataset(LocalComm(), encoder, data, k=K, fit_sample=400)
    feature_dir = tmp_path / "features"

    def job(comm: Any) -> np.ndarray:
        labels, *_ = label_dataset(
            comm,
            encoder,
            data,
            k=K,
            fit_sample=400,
            feature_dir=feature_dir,
            feature_dtype="float16",
        )
        return labels

    for _ in range(2):  # relabeling re-embeds and replaces the files
        for labels in run_world(world, job):
            np.testing.assert_array_equal(labels, ref)
    np.testing.assert_array_equal(fit_idx, data.table.indices("train"))
    names = sorted(p.name for p in feature_dir.iterdir())
    assert names == [f"rank{r}.npy" for r in range(world)]  # no temporary files left
    labeled = np.arange(len(blobs))
    for r in range(world):
        saved = np.load(feature_dir / f"rank{r}.npy")
        assert saved.dtype == np.float16
        np.testing.assert_allclose(saved, blobs[labeled[r::world]], rtol=1e-3, atol=1e-3)


def _batches(x: np.ndarray, fail_after: int | None = None) -> Any:
    for i, lo in enumerate(range(0, len(x), 100)):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("loader died")
        b = np.arange(lo, min(lo + 100, len(x)))
        yield {
            "index": torch.from_numpy(b),
            "audio": torch.from_numpy(x[b]),
            "label": torch.full((len(b),), -1),
        }


def test_an_interrupted_embedding_leaves_no_file_to_trust(
    blobs: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "rank0.npy"
    _, first, _ = embed(
        nn.Identity(), _batches(blobs), lambda a: a, out=NpyFeatureWriter(path, len(blobs))
    )
    np.testing.assert_array_equal(first, blobs)
    before = path.read_bytes()

    with pytest.raises(RuntimeError, match="loader died"):
        embed(
            nn.Identity(),
            _batches(-blobs, fail_after=3),
            lambda a: a,
            out=NpyFeatureWriter(path, len(blobs)),
        )
    assert path.read_bytes() == before  # the complete earlier file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["rank0.npy"]

    # Too few rows: refused at close, nothing written.
    short = NpyFeatureWriter(tmp_path / "short.npy", len(blobs) + 1)
    with pytest.raises(ValueError, match="1200 of the 1201"):
        embed(nn.Identity(), _batches(blobs), lambda a: a, out=short)
    assert not (tmp_path / "short.npy").exists()

    # The orphan of a killed writer is removed by the next writer of that file.
    orphan = tmp_path / ".rank0.npy.abc123.tmp"
    orphan.write_bytes(b"half a file")
    embed(
        nn.Identity(),
        _batches(blobs),
        lambda a: a,
        out=NpyFeatureWriter(path, len(blobs), "float16"),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.npy"]

    with pytest.raises(ValueError, match="float16 range"):
        NpyFeatureWriter(tmp_path / "big.npy", 2, "float16").write(np.full((2, 3), 1e6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.npy"]


def test_empty_shard_writes_an_empty_file(tmp_path: Path) -> None:
    idx, x, labels = embed(
        nn.Identity(), [], lambda a: a, out=NpyFeatureWriter(tmp_path / "e.npy", 0)
    )
    assert idx.shape == (0,) and x.shape == (0, 0) and labels.shape == (0,)
    assert np.load(tmp_path / "e.npy").shape == (0, 0)


# ----------------------------------------------------------------------------- callback, bench


def test_callback_options(tmp_path: Path) -> None:
    cb = PseudoLabeler(k=8, out_dir=str(tmp_path), feature_dir="features", feature_dtype="float16")
    assert cb.feature_dir == tmp_path / "features" and cb.fit_sample == pl.DEFAULT_FIT_SAMPLE
    assert PseudoLabeler(out_dir=str(tmp_path), feature_dir="/abs/f").feature_dir == Path("/abs/f")
    assert PseudoLabeler(out_dir=str(tmp_path)).feature_dir is None
    with pytest.raises(ValueError, match="fit_sample"):
        PseudoLabeler(k=8, fit_sample=4)
    with pytest.raises(ValueError, match="feature_dtype"):
        PseudoLabeler(feature_dtype="bfloat16")


def test_benchmark_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's pipeline, with the variants run in-process (no fresh interpreters)."""
    monkeypatch.setattr(bench, "_run_child", bench._child)
    rows = bench.run(quick=True)
    assert [r["variant"] for r in rows] == ["a", "b", "c", "a'"]
    assert rows[0]["nmi_vs_a"] == 1.0 and rows[0]["inertia_ratio"] == 1.0
    assert rows[1]["n_fit"] == rows[2]["n_fit"] == rows[0]["n_fit"] // 4 == rows[3]["n_fit"] // 4
    for r in rows:
        assert r["nmi_vs_a"] > 0.8 and 0.9 < r["inertia_ratio"] < 1.1 and r["peak_rss_mib"] > 0
    assert "| a: in memory" in bench.markdown_table(rows)
