"""How Lightning re-launches this program for the other DDP processes of a node.

Lightning starts ranks 1..N-1 by re-running ``sys.argv`` with ``hydra.run.dir`` set to the
config's ``hydra.run.dir``. Under a Hydra multirun that is wrong twice: the arguments hold
the whole sweep (``-m seed=0,1``), so each child would start a sweep of its own, and the
job's directory is the sweep's sub-directory, not ``hydra.run.dir``. The children must run
exactly the current job: its own overrides, single-run, in its output directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

import __main__


def child_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command line of DDP process ``local_rank``: this job's overrides, its run dir."""
    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        program = [sys.executable, sys.argv[0]]
    else:
        program = [sys.executable, "-m", __main__.__spec__.name]
    job_overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.run.dir=")]
    return [
        *program,
        *job_overrides,
        f"hydra.run.dir={hydra_cfg.runtime.output_dir}",
        "hydra.output_subdir=null",  # the parent already saved the config there
        f"hydra.job.name=ddp_rank{local_rank}",
    ], get_original_cwd()


def install() -> None:
    """Make Lightning's subprocess launchers (Trainer's and Fabric's) use :func:`child_command`."""
    trainer_launcher._hydra_subprocess_cmd = child_command
    fabric_launcher._hydra_subprocess_cmd = child_command


#: Set by Lightning in the process that starts the other ranks; they describe those ranks.
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def job_processes() -> Iterator[None]:
    """Scope DDP processes this program starts to one job.

    Child ranks run a single job and exit, so before the next job of a multirun the
    process group is torn down and the launcher's variables removed: the next job's
    Trainer then starts fresh children. Ranks started from outside (torchrun, SLURM) are
    left alone.
    """
    started_here = "LOCAL_RANK" not in os.environ
    try:
        yield
    finally:
        if started_here and int(os.environ.get("LOCAL_RANK", 0)) == 0:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            for name in _LAUNCHER_ENV:
                os.environ.pop(name, None)


def cluster_plugins() -> list:
    """Trainer plugins naming who started the ranks, where Lightning would guess wrong:
    torchrun inside a SLURM allocation (Lightning would read the SLURM task count)."""
    return [TorchElasticEnvironment()] if TorchElasticEnvironment.detect() else []


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.rank, self.inner = rank, inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return f"[rank {self.rank}] {self.inner.format(record)}"


def tag_rank_logs(rank: int) -> None:
    """Rank 0 logs as configured. Other ranks repeat rank 0's progress, so their console
    shows only warnings and errors, each line starting with ``[rank N]``."""
    if rank == 0:
        return
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RankFormatter(rank, handler.formatter))
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


def fresh_store_after_torchrun_restart() -> None:
    """Give ranks restarted by ``torchrun --max-restarts`` a store of their own.

    torchrun's store outlives a restart with the dead ranks' addresses in it, and a
    restarted rank can read those and fail to connect ("Connection refused";
    pytorch/pytorch#167288). On one node, from the first restart on, rank 0 hosts a fresh
    store on ``MASTER_PORT + restart count`` instead.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    one_node = os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    if restart and one_node and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + restart)
