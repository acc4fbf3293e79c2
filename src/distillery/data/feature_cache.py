"""A frozen encoder's features of the labelled clips, computed once, as a DataModule.

Linear probes on a fixed encoder (``partial_label_sd``) train for many epochs on the same
features: embedding every clip once and training on the cached (n, d) tensors is orders of
magnitude faster than decoding and embedding them again for every pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from distillery.eval.embed import embed

SPLITS = ("train", "val", "test")


class _Rows(Dataset):
    """Items ``{"row", "features", "label"}`` of one split's cached tensors."""

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, row: int) -> dict[str, Any]:
        return {"row": row, "features": self.features[row], "label": self.labels[row]}


class RoundBatchSampler(Sampler[list[int]]):
    """The training batches of one round: ``passes`` shuffled passes over ``n`` rows.

    Each pass is a fresh permutation from one generator seeded by ``seed * 1000 + round``
    (``round`` from ``current_round()``, read when the epoch's batches are drawn), cut into
    batches of ``batch_size``; a pass's last batch may be smaller. The order depends on
    (seed, round) alone, so a round resumed from a checkpoint sees the same batches.
    """

    def __init__(
        self, n: int, batch_size: int, passes: int, seed: int, current_round: Callable[[], int]
    ) -> None:
        self.n, self.batch_size, self.passes, self.seed = n, batch_size, passes, seed
        self.current_round = current_round

    @property
    def batches_per_pass(self) -> int:
        return -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return self.passes * self.batches_per_pass

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.current_round())
        for _ in range(self.passes):
            order = torch.randperm(self.n, generator=generator).tolist()
            for start in range(0, self.n, self.batch_size):
                yield order[start : start + self.batch_size]


class FeatureCache(pl.LightningDataModule):
    """Standardised features of ``encoder`` for the labelled clips of every split.

    At set-up, the centre crops of the train, val and test clips of ``data`` that carry a
    label are embedded once (on the trainer's device, every rank alike) and standardised
    with the train statistics: ``features[split]`` (n, d) float32 and ``labels[split]``
    (n,) int64. Training batches come from a :class:`RoundBatchSampler` (one epoch =
    ``passes`` passes over the train rows, shuffled by ``(seed, epoch)``); the test loader
    takes a strided shard per rank. Batches are ``{"row", "features", "label"}``.
    """

    def __init__(
        self, data: Any, encoder: nn.Module, *, batch_size: int, passes: int, seed: int
    ) -> None:
        super().__init__()
        self.data, self.encoder = data, encoder
        self.batch_size, self.passes, self.seed = batch_size, passes, seed
        self.features: dict[str, Tensor] = {}
        self.labels: dict[str, Tensor] = {}
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    def setup(self, stage: str | None = None) -> None:
        if self.features:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
        self.encoder.to(device)
        raw = {}
        for split in SPLITS:
            _, x, labels = embed(
                self.encoder, self.data.dataloader(split), self.data.featurize, device
            )
            keep = labels >= 0  # unlabeled train items (label_fraction < 1) cannot be probed
            raw[split] = (torch.from_numpy(x[keep]), torch.from_numpy(labels[keep]))
        self.mean, self.std = raw["train"][0].mean(0), raw["train"][0].std(0).clamp(min=1e-6)
        for split, (x, labels) in raw.items():
            self.features[split], self.labels[split] = (x - self.mean) / self.std, labels

    def train_dataloader(self) -> DataLoader:
        sampler = RoundBatchSampler(
            len(self.features["train"]),
            self.batch_size,
            self.passes,
            self.seed,
            current_round=lambda: self.trainer.current_epoch,
        )
        return DataLoader(
            _Rows(self.features["train"], self.labels["train"]), batch_sampler=sampler
        )

    def test_dataloader(self) -> DataLoader:
        rows = _Rows(self.features["test"], self.labels["test"])
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        )
        shard = list(range(rank, len(rows), world))
        return DataLoader(rows, batch_size=self.batch_size, sampler=shard)
