"""A few training steps of ``prune_distill`` or ``final_distill`` under the Trainer's DDP
strategy, in a process :func:`torch.multiprocessing.spawn` started (the gated student's
mask hooks cannot be pickled, so each process builds its own stage).

Kept out of the test module so that spawned processes can import it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tests.helpers import TINY_TRANSFORMER, ddp_trainer, join_as_rank
from torch.utils.data import DataLoader

from distillery.stages.final_distill import FinalDistillStage
from distillery.stages.prune_distill import PruneDistillStage

STEPS = 3


def fit_worker(rank: int, port: int, kind: str, out_dir: str, layers: list[int]) -> None:
    """Train ``STEPS`` steps as rank ``rank`` of 2, distilling hidden states ``layers``;
    save the student's weights."""
    join_as_rank(rank, port)
    torch.manual_seed(0)  # the same initial student on both ranks
    if kind == "prune_distill":
        stage = PruneDistillStage(TINY_TRANSFORMER, distill_layers=layers)
    else:
        stage = FinalDistillStage(
            TINY_TRANSFORMER, student_encoder=TINY_TRANSFORMER, distill_layers=layers
        )
    clips = [{"features": torch.randn(1, 16, 16)} for _ in range(4 * STEPS)]
    trainer = ddp_trainer(max_steps=STEPS)
    trainer.fit(stage, DataLoader(clips, batch_size=2))
    state = {k: v for k, v in stage.state_dict().items() if not k.startswith("teacher.")}
    torch.save({"steps": trainer.global_step, "state": state}, Path(out_dir) / f"rank{rank}.pt")
