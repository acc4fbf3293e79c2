"""One rank of a ``partial_label_sd`` pipeline started as a cluster launcher would.

Kept out of the test module so that spawned processes can import it.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from tests.helpers import join_as_rank

from distillery.pipeline.runner import Runner

DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


def pll_rank_worker(
    rank: int, port: int, tmp: str, cache: str, encoder: str, extra: list[str]
) -> None:
    from tests.stages.test_partial_label_sd import pll_only

    join_as_rank(rank, port)
    Runner(pll_only(Path(tmp), Path(cache), Path(encoder), *DDP, *extra)).run()
    if dist.is_initialized():  # exit with no live gloo threads
        dist.barrier()
        dist.destroy_process_group()
