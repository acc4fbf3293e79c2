"""A callback that records which clips each rank trains on, per epoch (sharding tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class ClipLog(pl.Callback):
    """Appends every training batch's clip indices to ``<out_dir>/clips/rank<r>-epoch<e>.txt``."""

    def __init__(self, out_dir: str) -> None:
        self.out = Path(out_dir) / "clips"

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        file = self.out / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.txt"
        with file.open("a") as f:
            f.write("".join(f"{int(i)}\n" for i in batch["index"]))


def read_clip_log(stage_dir: Path, rank: int, epoch: int) -> list[int]:
    file = stage_dir / "clips" / f"rank{rank}-epoch{epoch}.txt"
    return [int(line) for line in file.read_text().split()]
