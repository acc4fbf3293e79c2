"""Per-step learning-rate schedules: warmup then linear or cosine decay, every parameter group."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from tests.helpers import TINY_TRANSFORMER
from torch.utils.data import DataLoader

from distillery.stages.prune_distill import PruneDistillStage
from distillery.stages.schedules import warmup_decay_factor


class LearningRates(pl.Callback):
    """Every parameter group's learning rate at each optimizer step."""

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.seen.append([group["lr"] for group in optimizer.param_groups])


def test_factor_warms_up_then_decays() -> None:
    linear = [warmup_decay_factor(s, 10, 0.2, "linear", 0.0) for s in range(10)]
    assert linear[:3] == pytest.approx([0.5, 1.0, 1.0])  # 2 warmup steps, then decay from 1
    assert linear[2:] == pytest.approx([1 - i / 8 for i in range(8)])
    cosine = [warmup_decay_factor(s, 10, 0.0, "cosine", 0.1) for s in range(11)]
    assert cosine[0] == pytest.approx(1.0) and cosine[10] == pytest.approx(0.1)
    assert cosine[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_prune_distill_lr_follows_the_schedule_per_optimizer_step(decay: str) -> None:
    """8 optimizer steps of 2 accumulated micro-batches: both groups (weights at 1e-3,
    gates and multipliers at gate_lr) get base lr x factor(step) at every step."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stage = PruneDistillStage(
        TINY_TRANSFORMER,
        distill_layers=[0, 1, 2],
        gate_lr=0.02,
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        scheduler={
            "_target_": "distillery.stages.schedules.warmup_decay",
            "_partial_": True,
            "interval": "step",
            "warmup": 0.25,
            "decay": decay,
        },
    )
    clips = [{"features": torch.randn(1, 16, 16)} for _ in range(32)]
    lrs = LearningRates()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=2,
        callbacks=[lrs],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(stage, DataLoader(clips, batch_size=2))
    assert trainer.global_step == 8
    factors = [warmup_decay_factor(s, 8, 0.25, decay, 0.0) for s in range(8)]
    expected = [[1e-3 * f, 0.02 * f] for f in factors]
    assert lrs.seen == [pytest.approx(e) for e in expected]
