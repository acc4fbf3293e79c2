"""Two steps of the BYOL ``ssl`` stage under the Trainer's DDP strategy, a checkpoint, and a
restore from it, in a process torch.multiprocessing started.

Kept out of the test module so that spawned processes can import it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tests.helpers import ddp_trainer, join_as_rank
from torch.utils.data import DataLoader

from distillery.augment import MixupWithPastBatches
from distillery.stages.ssl import SSLStage

ENCODER = {
    "_target_": "distillery.models.encoders.AudioNTT",
    "n_mels": 16,
    "channels": 8,
    "dim": 32,
    "dropout": 0.0,
}


def _stage() -> SSLStage:
    torch.manual_seed(0)
    return SSLStage(ENCODER, projection_dim=16, projection_hidden_dim=32)


def _memory(stage: SSLStage) -> torch.Tensor:
    mixup = next(m for m in stage.modules() if isinstance(m, MixupWithPastBatches))
    return mixup.memory[: len(mixup)].cpu()


def mixup_worker(rank: int, port: int, out_dir: str) -> None:
    """Train, checkpoint, restore; save this rank's memory before and after the restore."""
    join_as_rank(rank, port)
    clips = [{"features": torch.randn(1, 16, 24, generator=torch.Generator().manual_seed(i))}
             for i in range(16)]  # fmt: skip
    stage, trainer = _stage(), ddp_trainer(max_steps=2, default_root_dir=out_dir)
    trainer.fit(stage, DataLoader(clips, batch_size=4))  # each rank: its half, 2 batches
    ckpt = Path(out_dir) / "ssl.ckpt"
    trainer.save_checkpoint(ckpt)
    trained = _memory(stage)
    restored, trainer = _stage(), ddp_trainer(max_steps=2, default_root_dir=out_dir)
    trainer.fit(restored, DataLoader(clips, batch_size=4), ckpt_path=ckpt)  # done: no step
    torch.save({"trained": trained, "restored": _memory(restored)}, Path(out_dir) / f"{rank}.pt")
