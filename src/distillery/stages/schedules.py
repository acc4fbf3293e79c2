"""Learning-rate schedules stepped per optimizer step: linear warmup, then linear or cosine decay.

Used through a stage's ``scheduler`` config with ``interval: step``::

    scheduler:
      _target_: distillery.stages.schedules.warmup_decay
      _partial_: true
      interval: step       # stepped after every optimizer step (default: epoch)
      warmup: 0.1          # fraction of the stage's optimizer steps
      decay: linear        # or cosine
      final_lr_factor: 0.0

``total_steps`` is filled in from the trainer (``estimated_stepping_batches``: epochs,
batches per rank, ``accumulate_grad_batches`` and ``max_steps`` all counted). The factor
multiplies every parameter group's own learning rate, so groups with their own rate (the
gates and multipliers of ``prune_distill``) follow the same shape.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("linear", "cosine", "constant")


def warmup_decay_factor(
    step: int, total_steps: int, warmup: float, decay: str, final_lr_factor: float
) -> float:
    """The learning-rate factor after ``step`` optimizer steps: 0 -> 1 linearly over the first
    ``warmup`` fraction of ``total_steps``, then ``decay`` to ``final_lr_factor`` at the end."""
    warmup_steps = round(warmup * total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # the first step already trains (1/warmup_steps)
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return final_lr_factor + (1.0 - final_lr_factor) * shape


def warmup_decay(
    optimizer: Optimizer,
    total_steps: int,
    warmup: float = 0.0,
    decay: str = "linear",
    final_lr_factor: float = 0.0,
) -> LambdaLR:
    """A :class:`LambdaLR` of :func:`warmup_decay_factor`, to be stepped per optimizer step."""
    if not 0.0 <= warmup < 1.0:
        raise ValueError(
            f"scheduler.warmup must be a fraction of the steps in [0, 1), got {warmup}"
        )
    if decay not in DECAYS:
        raise ValueError(f"scheduler.decay must be one of {DECAYS}, got {decay!r}")
    if not 0.0 <= final_lr_factor <= 1.0:
        raise ValueError(f"scheduler.final_lr_factor must be in [0, 1], got {final_lr_factor}")
    return LambdaLR(
        optimizer,
        lambda step: warmup_decay_factor(step, total_steps, warmup, decay, final_lr_factor),
    )
