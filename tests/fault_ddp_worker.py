"""A tiny model whose loss is NaN on rank 1 only (gradients stay finite), trained under the
Trainer's DDP strategy with the FiniteLossGuard, in a process torch.multiprocessing started.

Kept out of the test module so that spawned processes can import it.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from distillery.pipeline.faults import FiniteLossGuard
from tests.helpers import ddp_trainer, join_as_rank

BAD_STEP = 1


class NanLossOnRankOne(pl.LightningModule):
    """A linear regression whose reported loss is NaN on rank 1 at ``BAD_STEP``; the NaN is a
    constant added to the loss, so the gradients (all DDP averages) stay finite."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        if self.global_rank == 1 and self.global_step == BAD_STEP:
            loss = loss + torch.tensor(float("nan"))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def nan_worker(rank: int, port: int, out_dir: str) -> None:
    """Train until the guard stops; write what stopped this rank, and at which step."""
    join_as_rank(rank, port)
    torch.manual_seed(0)
    trainer = ddp_trainer(
        # A rank left waiting in a collective fails after 20 s instead of 30 minutes.
        strategy=DDPStrategy(timeout=datetime.timedelta(seconds=20)),
        max_steps=4,
        callbacks=[FiniteLossGuard("toy")],
    )
    outcome = "finished"
    try:
        trainer.fit(NanLossOnRankOne(), DataLoader(torch.randn(16, 4), batch_size=2))
    except Exception as err:  # noqa: BLE001 - the test reads which error it was
        outcome = type(err).__name__
    Path(out_dir, f"rank{rank}.txt").write_text(f"{outcome} {trainer.global_step}")
