"""Batches of teacher-space neighbourhoods (CoSS): anchors plus some of their nearest
neighbours, so that a batch holds locally similar items.

:func:`teacher_neighbours` finds each item's nearest neighbours in a frozen teacher's
embedding space (FAISS, exact cosine); :class:`NeighbourBatchSampler` turns them into
batches. Positions are row numbers of the embeddings, i.e. positions in the dataset the
sampler's loader reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import faiss
import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from distillery.eval.embed import embed

__all__ = ["NeighbourBatchDataModule", "NeighbourBatchSampler", "teacher_neighbours"]


def teacher_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` most cosine-similar *other* rows, most similar first.

    Args:
        embeddings: (n, d) teacher embeddings.
        k: neighbours per row, ``1 <= k < n``.

    Returns:
        (n, k) int64 row indices.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected (n, d) embeddings, got shape {x.shape}")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, n-1={n - 1}], got {k}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, k + 1)
    # Drop the row itself wherever it appears (with duplicate rows it need not come first);
    # a stable sort keeps the similarity order of the others.
    is_self = found == np.arange(n)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(found, order, axis=1)[:, :k].astype(np.int64)


class NeighbourBatchSampler(Sampler[list]):
    """Batches of ``anchors_per_batch`` anchors, each followed by ``num_neighbours`` items
    drawn without replacement from its row of ``neighbours`` (e.g. 15 of the top 31).

    Every item is an anchor once per epoch (a seeded permutation, new each epoch through
    :meth:`set_epoch`), so an epoch covers the data set and has ``(1 + num_neighbours)``
    times as many items as it. An item can occur twice in a batch (a neighbour of two
    anchors); batches are not de-duplicated, so every batch has the same size.

    DDP: every rank draws the same permutation; batch ``b`` of rank ``r`` takes the
    ``r``-th block of anchors of round ``b``, so ranks get disjoint anchors. When the
    number of items is not a multiple of ``anchors_per_batch * world_size``, the
    permutation wraps around to give every rank the same number of full batches (a few
    anchors then appear twice in the epoch).

    ``keyed``: yield ``(seed, epoch, position)`` items, as a ``TrainSampler`` does, so that
    a training data set draws each item's random crop from its own seeded stream (the
    crops then do not depend on when the loader runs, and a resumed epoch is exact).
    """

    def __init__(
        self,
        neighbours: np.ndarray,
        anchors_per_batch: int,
        num_neighbours: int = 15,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        keyed: bool = False,
    ) -> None:
        self.neighbours = np.asarray(neighbours, dtype=np.int64)
        if self.neighbours.ndim != 2:
            raise ValueError(f"neighbours must be (n, pool), got shape {self.neighbours.shape}")
        pool = self.neighbours.shape[1]
        if not 0 <= num_neighbours <= pool:
            raise ValueError(
                f"num_neighbours must be in [0, {pool}] (the neighbour pool), got {num_neighbours}"
            )
        if anchors_per_batch < 1:
            raise ValueError(f"anchors_per_batch must be >= 1, got {anchors_per_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.anchors_per_batch = anchors_per_batch
        self.num_neighbours = num_neighbours
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.keyed = keyed
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.anchors_per_batch * (1 + self.num_neighbours)

    @property
    def sampler(self) -> NeighbourBatchSampler:
        # Lightning calls ``batch_sampler.sampler.set_epoch(epoch)`` every epoch.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.neighbours) / (self.anchors_per_batch * self.world_size))

    def __iter__(self) -> Iterator[list]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n, per_round = len(self.neighbours), self.anchors_per_batch * self.world_size
        anchors = rng.permutation(n)
        anchors = np.resize(anchors, len(self) * per_round)  # wraps around
        shape = (len(self), self.world_size, self.anchors_per_batch)
        mine = anchors.reshape(shape)[:, self.rank]
        positions = np.arange(anchors.size).reshape(shape)[:, self.rank]
        pool = self.neighbours.shape[1]
        for batch_anchors, batch_positions in zip(mine, positions, strict=True):
            batch: list[int] = []
            for anchor, position in zip(batch_anchors, batch_positions, strict=True):
                # Keyed by the anchor's position in the epoch: the same neighbours whatever
                # the number of ranks, so a round's batches are one process's batch split up.
                picker = np.random.default_rng([self.seed, self.epoch, int(position)])
                picks = self.neighbours[
                    anchor, picker.choice(pool, size=self.num_neighbours, replace=False)
                ]
                batch += [int(anchor), *picks.tolist()]
            yield [(self.seed, self.epoch, i) for i in batch] if self.keyed else batch


class NeighbourBatchDataModule(pl.LightningDataModule):
    """The shared audio data with training batches of teacher-space neighbourhoods.

    Training reads the same items as ``data`` (random crops), only the batch composition
    changes: ``data.batch_size // (1 + num_neighbours)`` anchors, each with
    ``num_neighbours`` drawn from its ``neighbour_pool`` nearest neighbours. The neighbours
    are found once, when training first asks for its loader, from the frozen ``teacher``'s
    embeddings of the centre crops (on every rank alike). Validation, test and features
    are ``data``'s.
    """

    def __init__(
        self, data: Any, teacher: nn.Module, num_neighbours: int, neighbour_pool: int
    ) -> None:
        super().__init__()
        group = 1 + num_neighbours
        if data.cfg.batch_size % group:
            raise ValueError(
                f"data.batch_size={data.cfg.batch_size} must be a multiple of 1 + num_neighbours "
                f"= {group} for kNN batches (anchors plus their neighbours)"
            )
        self.data, self.teacher = data, teacher
        self.num_neighbours, self.neighbour_pool = num_neighbours, neighbour_pool

    def train_dataloader(self) -> DataLoader:
        data, trainer = self.data, self.trainer
        device = trainer.strategy.root_device
        in_order = data.dataloader("train")  # centre crops, data-set order
        _, embeddings, _ = embed(self.teacher.to(device), in_order, data.featurize, device)
        neighbours = teacher_neighbours(embeddings, min(self.neighbour_pool, len(embeddings) - 1))
        sampler = NeighbourBatchSampler(
            neighbours,
            anchors_per_batch=data.cfg.batch_size // (1 + self.num_neighbours),
            num_neighbours=min(self.num_neighbours, neighbours.shape[1]),
            seed=torch.initial_seed() % 2**31,  # the run's seed, the same on every rank
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            keyed=True,
        )
        dataset = data.dataloader("train", train=True).dataset  # random crops, as training
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=data.cfg.num_workers,
            persistent_workers=data.cfg.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self.data.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.data.test_dataloader()

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return self.data.on_after_batch_transfer(batch, dataloader_idx)
