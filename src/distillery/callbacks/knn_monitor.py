"""``KNNMonitor``: online kNN accuracy of a stage's encoder while it trains (e.g. SSL).

Every ``every_n_epochs`` epochs (and after the last one) the frozen encoder embeds a fixed
random subset of the labelled training clips (the neighbour bank) and of the labelled
validation clips, and the cosine kNN accuracy of the validation subset is logged as
``<stage>/val/online_knn<k>_acc``. Labels are only read, never trained on: this is a
monitor of representation quality, not part of the method.

Under DDP every rank embeds the same subsets (no collective; the weights are equal on all
ranks), so the logged value is the same on each.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np

from distillery.eval.embed import embed
from distillery.eval.metrics import knn_accuracy

__all__ = ["KNNMonitor", "monitor_subsets"]

log = logging.getLogger(__name__)


def monitor_subsets(
    table: object, max_bank_clips: int, max_val_clips: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the labelled train clips (the bank) and labelled val clips that
    the monitor embeds: at most ``max_*_clips`` of each, drawn once from ``seed``."""
    rng = np.random.default_rng(seed)
    chosen = []
    for split, limit in (("train", max_bank_clips), ("val", max_val_clips)):
        idx = table.indices(split)
        idx = idx[table.visible_labels[idx] >= 0]
        if len(idx) > limit:
            idx = np.sort(rng.choice(idx, size=limit, replace=False))
        chosen.append(idx)
    return chosen[0], chosen[1]


class KNNMonitor(pl.Callback):
    """Log the kNN accuracy of the stage's encoder on a validation subset during training.

    Args:
        every_n_epochs: epochs between measurements (the last epoch is always measured).
        k: neighbour counts, one metric each.
        max_bank_clips: labelled training clips used as neighbours, at most.
        max_val_clips: labelled validation clips scored, at most.
        seed: draws the two subsets (the same subsets at every measurement).
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        k: Sequence[int] = (10,),
        max_bank_clips: int = 2048,
        max_val_clips: int = 512,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"KNNMonitor.every_n_epochs must be >= 1, got {every_n_epochs}")
        if min(max_bank_clips, max_val_clips) < 1 or not k or min(k) < 1:
            raise ValueError("KNNMonitor: k, max_bank_clips and max_val_clips must be >= 1")
        self.every_n_epochs = every_n_epochs
        self.k = tuple(int(v) for v in k)
        self.max_bank_clips = max_bank_clips
        self.max_val_clips = max_val_clips
        self.seed = seed
        self._warned = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs not in (None, -1) and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        data = trainer.datamodule
        bank, val = monitor_subsets(data.table, self.max_bank_clips, self.max_val_clips, self.seed)
        if not len(bank) or not len(val):
            if not self._warned:
                log.warning("KNNMonitor: no labelled train or val clips; nothing to monitor")
                self._warned = True
            return
        encoder, device = pl_module.encoder_for_eval(), pl_module.device
        _, bank_x, bank_y = embed(
            encoder, data.dataloader("train", indices=bank), data.featurize, device
        )
        _, val_x, val_y = embed(
            encoder, data.dataloader("val", indices=val), data.featurize, device
        )
        scores = {
            f"online_knn{k}_acc": knn_accuracy(bank_x, bank_y, val_x, val_y, k=k) for k in self.k
        }
        pl_module.log_split("val", scores, on_step=False, on_epoch=True)
