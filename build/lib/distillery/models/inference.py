"""Inference-only rewrites of trained models (embedding, export): same outputs, less work."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _fusable_pairs(module: nn.Module) -> list[tuple[nn.Sequential, int]]:
    return [
        (seq, i)
        for seq in module.modules()
        if isinstance(seq, nn.Sequential)
        for i in range(len(seq) - 1)
        if isinstance(seq[i], nn.Conv2d)
        and isinstance(seq[i + 1], nn.BatchNorm2d)
        and seq[i + 1].track_running_stats
    ]


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each Conv2d -> BatchNorm2d pair of an
    ``nn.Sequential`` folded into the convolution (the BatchNorm becomes an Identity, so
    positions in the Sequential do not move).

    In eval mode BatchNorm is an affine map per channel, which the conv's weights and bias
    absorb: outputs equal the original's up to float rounding, one pass over each conv map
    is saved. ``model`` itself is not changed; without such pairs it is returned as is.
    """
    if not _fusable_pairs(model):
        return model
    fused = copy.deepcopy(model).eval()
    for seq, i in _fusable_pairs(fused):
        conv = seq[i]
        channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last)
        seq[i] = fuse_conv_bn_eval(conv, seq[i + 1])
        if channels_last:
            seq[i].to(memory_format=torch.channels_last)
        seq[i + 1] = nn.Identity()
    return fused
