"""Collective waits that are long by design, on a process group of their own.

The default group's timeout (``trainer.strategy.timeout``; 10 minutes with ``trainer=ddp``)
bounds how long a hung rank stalls the others. While rank 0 alone works (k-means, the
shared evaluation, exports), the other ranks wait for it on a second group whose timeout
is ``rank_zero_wait_min``, so only those waits are allowed to be long.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import Strategy

#: One group per (default group, minutes): every rank creates it at the same call.
_groups: dict[tuple[int, float], Any] = {}


def _patient_group(minutes: float) -> Any:
    key = (id(dist.group.WORLD), minutes)
    if key not in _groups:
        _groups[key] = dist.new_group(timeout=timedelta(minutes=minutes))
    return _groups[key]


class RankZeroWait:
    """A :class:`~distillery.callbacks.pseudo_labeler.Collective` whose broadcast and
    barrier wait up to ``minutes`` (the other ranks wait there while rank 0 works alone);
    ``all_gather`` keeps the strategy's own timeout."""

    def __init__(self, strategy: Strategy, minutes: float) -> None:
        self.strategy = strategy
        self.world_size, self.global_rank = strategy.world_size, strategy.global_rank
        distributed = dist.is_available() and dist.is_initialized() and self.world_size > 1
        self.group = _patient_group(minutes) if distributed else None

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.strategy.all_gather(tensor)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self, name: str | None = None) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)
