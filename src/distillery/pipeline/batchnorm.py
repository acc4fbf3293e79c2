"""BatchNorm under DDP: the two policies, chosen by the trainer's ``sync_batchnorm``.

- ``sync_batchnorm: true`` (the default of ``trainer=ddp``): while a stage trains under DDP,
  every BatchNorm normalises with the mean and variance of the global batch
  (:class:`GlobalBatchNormSync`, which works on CPU/gloo as well as on GPUs; torch's
  ``SyncBatchNorm`` is GPU-only). The forward pass, the gradients and the running
  statistics are then those of one process with the whole batch, on every rank.
- ``sync_batchnorm: false``: each rank normalises with its own batch (no collective per
  BatchNorm layer). Running statistics drift apart across ranks, so
  :class:`BatchNormStatsSync` averages them over the ranks whenever something reads them:
  before each validation, at the end of each training epoch (the epoch checkpoint is saved
  after it) and at the end of training (before the stage's evaluation, pseudo-labeling and
  export).

A module whose BatchNorms see the same data on every rank (KRR-ST's model pool, trained on
the synthetic set by every rank alike) sets ``batchnorm_sync = False``: both policies leave
its subtree alone.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from lightning.pytorch.plugins import LayerSync
from torch import Tensor, nn

from distillery.precision import at_least_float32


def data_parallel_batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm in ``module`` outside subtrees marked ``batchnorm_sync = False``."""
    if not getattr(module, "batchnorm_sync", True):
        return []
    own = [module] if isinstance(module, nn.modules.batchnorm._BatchNorm) else []
    return own + [bn for child in module.children() for bn in data_parallel_batchnorms(child)]


def batchnorm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The running means and variances of the data-parallel BatchNorms that track them."""
    return [
        buffer
        for layer in data_parallel_batchnorms(module)
        if layer.track_running_stats
        for buffer in (layer.running_mean, layer.running_var)
        if buffer is not None
    ]


class BatchNormStatsSync(pl.Callback):
    """Average every BatchNorm's running mean and variance over the ranks (one all-reduce).

    The average of the ranks' running variances is not the variance of the union of their
    batches (it leaves out the spread between the ranks' means); it is what averaging
    per-rank statistics can give without a collective per layer and step. Use
    ``trainer.sync_batchnorm=true`` for the exact global statistics.
    """

    def sync(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.world_size == 1 or not (buffers := batchnorm_buffers(module)):
            return
        flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        offset = 0
        with torch.no_grad():
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sync(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sync(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sync(trainer, pl_module)


class _GlobalBatchNorm:
    """Mixin over ``nn.BatchNorm{1,2,3}d``: in training under an initialised process group
    of more than one rank, normalise with the statistics of the union of all ranks' batches.

    One differentiable all-gather per forward of each rank's (count, mean, sum of squared
    deviations), combined exactly (Chan et al.); gradients flow back through the gather to
    every rank's inputs, as they would through one process's BatchNorm. Elsewhere (eval, one
    process) it is the plain BatchNorm.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        out_dtype = x.dtype
        x = at_least_float32(x)  # autocast's bfloat16: statistics in the running stats' float32
        dims = [0, *range(2, x.dim())]
        count = x.new_tensor([x.numel() / x.shape[1]])
        mean = x.mean(dims)
        squares = (x - mean.view(1, -1, *[1] * (x.dim() - 2))).square().sum(dims)
        per_rank = torch.stack(dist_fn.all_gather(torch.cat([count, mean, squares])))
        channels = x.shape[1]
        counts = per_rank[:, :1]
        means, rank_squares = per_rank[:, 1 : 1 + channels], per_rank[:, 1 + channels :]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        spread = (counts * (means - global_mean).square()).sum(0)
        var = (rank_squares.sum(0) + spread) / total  # biased: what normalisation uses
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(global_mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        shape = (1, -1, *[1] * (x.dim() - 2))
        y = (x - global_mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(out_dtype)


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    pass


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    pass


class GlobalBatchNorm3d(_GlobalBatchNorm, nn.BatchNorm3d):
    pass


_GLOBAL = {
    nn.BatchNorm1d: GlobalBatchNorm1d,
    nn.BatchNorm2d: GlobalBatchNorm2d,
    nn.BatchNorm3d: GlobalBatchNorm3d,
}


class GlobalBatchNormSync(LayerSync):
    """Lightning's layer-sync plugin for ``sync_batchnorm: true`` (applied by the DDP strategy
    while fitting): every ``nn.BatchNorm{1,2,3}d`` becomes its :class:`_GlobalBatchNorm`
    subclass in place (same parameters and buffers; ``isinstance`` checks still hold), and
    back after fitting."""

    def apply(self, model: nn.Module) -> nn.Module:
        for layer in data_parallel_batchnorms(model):
            if type(layer) in _GLOBAL:
                layer.__class__ = _GLOBAL[type(layer)]
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        plain = {v: k for k, v in _GLOBAL.items()}
        for layer in model.modules():
            if type(layer) in plain:
                layer.__class__ = plain[type(layer)]
        return model
