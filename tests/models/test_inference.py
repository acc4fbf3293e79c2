"""Inference rewrites keep a model's outputs."""

from __future__ import annotations

import torch
from torch import nn

from distillery.models.encoders import AudioNTT, TransformerEncoder
from distillery.models.inference import fuse_conv_bn


def _trained_like(model: AudioNTT) -> AudioNTT:
    """Non-trivial BatchNorm statistics and affine parameters, as after training."""
    gen = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1, generator=gen)
        bn.running_var.uniform_(0.5, 2, generator=gen)
        bn.weight.data.uniform_(0.5, 1.5, generator=gen)
        bn.bias.data.uniform_(-1, 1, generator=gen)
    return model.eval()


def test_fused_audiontt_matches_the_original_and_leaves_it_untouched() -> None:
    model = _trained_like(AudioNTT(n_mels=32, channels=8, dim=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_conv_bn(model)
    x = torch.randn(4, 1, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
        (exits_a, z_a), (exits_b, z_b) = fused.forward_exits(x), model.forward_exits(x)
        for a, b in zip([*exits_a, z_a], [*exits_b, z_b], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fused.features[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_model_without_conv_bn_pairs_is_returned_as_is() -> None:
    model = TransformerEncoder(n_mels=16, dim=32, depth=1, heads=2, ffn_dim=64)
    assert fuse_conv_bn(model) is model
