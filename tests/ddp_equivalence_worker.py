"""Pipelines run by the Runner on rank ``rank`` of 2 (a process torch.multiprocessing
started), and a callback recording what each rank trained.

Kept out of the test module so that spawned processes can import it.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from distillery.pipeline.runner import Runner
from tests.helpers import join_as_rank


def _copy_state(module: torch.nn.Module, suffixes: tuple[str, ...] = ("",)) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.endswith(suffixes)}


class RecordTraining(pl.Callback):
    """Save this rank's per-step training loss, its BatchNorm statistics after the last
    training step (before anything syncs them) and, at the end of training (after the
    BatchNorm statistics sync, which runs before the stage's callbacks), its module state,
    as ``<stage dir>/record-rank<r>.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.losses: list[float] = []
        self.last_step_stats: dict = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.last_step_stats = _copy_state(pl_module, ("running_mean", "running_var"))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {
            "losses": self.losses,
            "steps": trainer.global_step,
            "state": _copy_state(pl_module),
            "last_step_stats": self.last_step_stats,
        }
        torch.save(record, self.out_dir / f"record-rank{trainer.global_rank}.pt")


def run_pipelines_worker(rank: int, port: int, configs: list[DictConfig]) -> None:
    """Run each config's pipeline as rank ``rank`` of 2, one after the other."""
    join_as_rank(rank, port)
    for cfg in configs:
        Runner(cfg).run()
    if dist.is_initialized():  # end gloo cleanly before the process exits
        dist.barrier()
        dist.destroy_process_group()


def global_batchnorm_worker(rank: int, port: int, out_dir: str, dtype: str) -> None:
    """One forward and backward of a BatchNorm2d converted by ``GlobalBatchNormSync`` on every
    second item of a fixed batch (float64, or bfloat16 inputs to float32 parameters as under
    bf16-mixed autocast); save the output, the input gradient, the rank-summed parameter
    gradients, the running statistics and whether ``revert`` restores the plain class."""
    from distillery.pipeline.batchnorm import GlobalBatchNormSync

    join_as_rank(rank, port)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 4, dtype=torch.float64) * 3 + 1
    target = torch.randn_like(x)
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3)).double()
    torch.nn.init.uniform_(bn[0].weight)
    if dtype == "bfloat16":
        x, target, bn = x.bfloat16(), target.bfloat16(), bn.float()
    GlobalBatchNormSync().apply(bn).train()
    mine = x[rank::2].clone().requires_grad_()
    output = bn(mine)
    (output * target[rank::2]).sum().backward()
    grads = torch.cat([bn[0].weight.grad, bn[0].bias.grad])
    dist.all_reduce(grads)  # the loss is a sum over the ranks: its gradient sums theirs
    record = {
        "output": output.detach(),
        "input_grad": mine.grad,
        "param_grads": grads,
        "running": torch.cat([bn[0].running_mean, bn[0].running_var]),
        "reverted": type(GlobalBatchNormSync().revert(bn)[0]) is torch.nn.BatchNorm2d,
    }
    torch.save(record, Path(out_dir) / f"bn-{dtype}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
