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

#: minutes -> (the default group it was made in, the group). Every rank creates it at the
#: same call; a new default group (the next job of a multirun) gets a new one.
_groups: dict[float, tuple[Any, Any]] = {}


def _patient_group(minutes: float) -> Any:
    world, group = _groups.get(minutes, (None, None))
    if world is not dist.group.WORLD:
        group = dist.new_group(timeout=timedelta(minutes=minutes))
        _groups[minutes] = (dist.group.WORLD, group)
    return group


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
