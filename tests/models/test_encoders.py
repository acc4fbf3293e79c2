"""Shape, gradient and parameter-count tests for the encoders and heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillery.models.encoders import AudioNTT, TransformerEncoder, count_parameters
from distillery.models.heads import MLPHead, ProjectionHead

N_MELS = 64


def _small_ntt() -> AudioNTT:
    return AudioNTT(n_mels=N_MELS, channels=8, dim=32)


def _small_transformer() -> TransformerEncoder:
    return TransformerEncoder(n_mels=N_MELS, dim=32, depth=2, heads=4, ffn_dim=64)


ENCODERS = {"audiontt": _small_ntt, "transformer": _small_transformer}


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("t", [98, 101])
def test_output_shapes(name: str, t: int) -> None:
    torch.manual_seed(0)
    enc = ENCODERS[name]()
    x = torch.randn(3, 1, N_MELS, t)
    out = enc(x)
    exits, final = enc.forward_exits(x)
    assert out.shape == (3, enc.embed_dim)
    assert final.shape == (3, enc.embed_dim)
    assert [e.shape for e in exits] == [torch.Size([3, d]) for d in enc.exit_dims]


def test_default_sizes() -> None:
    x = torch.randn(2, 1, N_MELS, 98)
    ntt = AudioNTT()
    # Exits are averaged over time only: 64 channels x 32, 16, 8 mel bins.
    assert ntt.embed_dim == 2048 and ntt.exit_dims == [2048, 1024, 512]
    exits, final = ntt.forward_exits(x)
    assert final.shape == (2, 2048) and [e.shape for e in exits] == [(2, 2048), (2, 1024), (2, 512)]
    pooled = AudioNTT(exit_pooling="freq_time")
    assert pooled.exit_dims == [64, 64, 64]
    assert [e.shape for e in pooled.forward_exits(x)[0]] == [(2, 64)] * 3
    tr = TransformerEncoder()
    assert tr.embed_dim == 192 and tr.exit_dims == [192] * 4
    exits, final = tr.forward_exits(x)
    assert final.shape == (2, 192) and len(exits) == 4
    hidden = tr.forward_hidden_states(x)
    assert len(hidden) == 5 and all(h.shape == (2, 49, 192) for h in hidden)


@pytest.mark.parametrize("name", ENCODERS)
def test_forward_matches_forward_exits(name: str) -> None:
    torch.manual_seed(0)
    enc = ENCODERS[name]().eval()  # eval: dropout off, BN uses running stats
    x = torch.randn(4, 1, N_MELS, 101)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.forward_exits(x)[1])


@pytest.mark.parametrize("pooling", ["time", "freq_time"])
def test_audiontt_exits_are_block_means(pooling: str) -> None:
    torch.manual_seed(0)
    enc = AudioNTT(n_mels=N_MELS, channels=8, dim=32, exit_pooling=pooling).eval()
    x = torch.randn(2, 1, N_MELS, 98)
    with torch.no_grad():
        exits, _ = enc.forward_exits(x)
        h = x
        for i in range(3):
            h = enc.features[4 * i : 4 * i + 4](h)
            bins = N_MELS // 2 ** (i + 1)
            assert h.shape[1:] == (8, bins, 98 // 2 ** (i + 1))
            if pooling == "time":  # (channel, mel bin) pairs, each averaged over frames
                assert enc.exit_dims[i] == 8 * bins
                expected = torch.stack(
                    [h[:, c, f].mean(dim=-1) for c in range(8) for f in range(bins)], dim=1
                )
            else:
                assert enc.exit_dims[i] == 8
                expected = h.mean(dim=(2, 3))
            torch.testing.assert_close(exits[i], expected)


def test_audiontt_rejects_an_unknown_exit_pooling() -> None:
    with pytest.raises(ValueError, match="exit_pooling must be one of"):
        AudioNTT(exit_pooling="mean")


def test_audiontt_embedding_is_max_plus_mean_over_time() -> None:
    torch.manual_seed(0)
    enc = _small_ntt().eval()
    x = torch.randn(2, 1, N_MELS, 98)
    with torch.no_grad():
        fmap = enc.features(x)  # (B, C, F, T')
        frames = enc.fc(fmap.permute(0, 3, 2, 1).flatten(2))  # (B, T', dim)
        expected = frames.amax(dim=1) + frames.mean(dim=1)
        torch.testing.assert_close(enc(x), expected)


@pytest.mark.parametrize("name", ENCODERS)
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    enc = ENCODERS[name]().train()
    x = torch.randn(3, 1, N_MELS, 98, requires_grad=True)
    exits, final = enc.forward_exits(x)
    (final.pow(2).mean() + sum(e.pow(2).mean() for e in exits)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in enc.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_rejects_wrong_input_shape() -> None:
    with pytest.raises(ValueError, match="n_mels|shape"):
        _small_ntt()(torch.randn(2, 1, 40, 98))
    with pytest.raises(ValueError, match="shape"):
        _small_transformer()(torch.randn(2, N_MELS, 98))
    with pytest.raises(ValueError, match="T >= 8"):
        _small_ntt()(torch.randn(2, 1, N_MELS, 7))


def test_audiontt_parameter_count_by_hand() -> None:
    n_mels, ch, dim = 64, 64, 2048
    conv1 = 1 * ch * 3 * 3 + ch  # weight + bias
    conv23 = 2 * (ch * ch * 3 * 3 + ch)
    bn = 3 * 2 * ch  # gamma, beta (running stats are buffers)
    fc1 = ch * (n_mels // 8) * dim + dim
    fc2 = dim * dim + dim
    expected = conv1 + conv23 + bn + fc1 + fc2
    assert expected == 5_321_856
    model = AudioNTT(n_mels=n_mels, channels=ch, dim=dim)
    n = count_parameters(model)
    print(f"AudioNTT(n_mels=64, channels=64, dim=2048): {n:,} parameters")
    assert n == expected


def test_transformer_parameter_count_by_hand() -> None:
    n_mels, d, depth, f = 64, 192, 4, 768
    frontend = (n_mels * d * 3 + d) + (d * d * 3 + d)
    projection = 2 * d + (d * d + d)
    block = 2 * (2 * d) + 4 * (d * d + d) + (d * f + f) + (f * d + d)
    expected = frontend + projection + depth * block + 2 * d
    model = TransformerEncoder(n_mels=n_mels, dim=d, depth=depth, heads=4, ffn_dim=f)
    n = count_parameters(model)
    print(f"TransformerEncoder(dim=192, depth=4, heads=4, ffn_dim=768): {n:,} parameters")
    assert n == expected == 1_965_120


def test_count_parameters_trainable_only() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # 16 + 10
    model[0].requires_grad_(False)
    assert count_parameters(model) == 26
    assert count_parameters(model, trainable_only=True) == 10


def test_transformer_head_and_ffn_masks() -> None:
    torch.manual_seed(0)
    enc = _small_transformer().eval()
    x = torch.randn(2, 1, N_MELS, 40)
    ones_h = [torch.ones(4) for _ in enc.blocks]
    ones_f = [torch.ones(64) for _ in enc.blocks]
    with torch.no_grad():
        base = enc(x)
        torch.testing.assert_close(enc(x, head_masks=ones_h, ffn_masks=ones_f), base)
        # Zeroing head 1 in block 0 must equal physically removing it.
        masked = enc(x, head_masks=[torch.tensor([1.0, 0.0, 1.0, 1.0]), None])
        assert not torch.allclose(masked, base)
        enc.blocks[0].attn.prune_heads([0, 2, 3])
        enc.blocks[1].ffn.prune_units(list(range(0, 64, 2)))
        unit_mask = torch.zeros(64)
        unit_mask[::2] = 1.0
    assert enc.blocks[0].attn.num_heads == 3 and enc.blocks[0].attn.q_proj.out_features == 24
    assert enc.blocks[1].ffn.ffn_dim == 32
    torch.manual_seed(0)  # same weights as ``enc`` before pruning
    fresh = _small_transformer().eval()
    with torch.no_grad():
        expected = fresh(
            x, head_masks=[torch.tensor([1.0, 0.0, 1.0, 1.0]), None], ffn_masks=[None, unit_mask]
        )
        torch.testing.assert_close(enc(x), expected)
    assert count_parameters(enc) < count_parameters(fresh)


def test_transformer_with_all_heads_pruned_still_runs() -> None:
    torch.manual_seed(0)
    enc = _small_transformer().eval()
    enc.blocks[0].attn.prune_heads([])
    out = enc(torch.randn(2, 1, N_MELS, 20))
    assert out.shape == (2, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("head_cls", [MLPHead, ProjectionHead])
def test_heads(head_cls: type[nn.Module]) -> None:
    head = head_cls(16, 32, 5)
    x = torch.randn(4, 16, requires_grad=True)
    y = head(x)
    assert y.shape == (4, 5)
    y.sum().backward()
    assert x.grad is not None


def test_head_layouts() -> None:
    mlp = MLPHead(16, 32, 5)
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    proj = ProjectionHead(16, 32, 5)
    assert [type(m).__name__ for m in proj.net] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
