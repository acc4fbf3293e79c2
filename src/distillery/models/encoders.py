"""Audio encoders on log-mel input.

Every encoder takes a batch ``x`` of shape ``(B, 1, n_mels, T)`` (float32, already
normalised) and exposes the same small interface:

- ``embed_dim``: size of the final embedding.
- ``exit_dims``: sizes of the intermediate "exit" features, one per block.
- ``forward(x) -> (B, embed_dim)``.
- ``forward_exits(x) -> (exits, final)`` where ``exits[i]`` is ``(B, exit_dims[i])``
  and ``final`` equals ``forward(x)``; both come from a single pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AudioNTT",
    "FeedForward",
    "MultiHeadSelfAttention",
    "TransformerBlock",
    "TransformerEncoder",
    "count_parameters",
]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (only ``requires_grad`` ones if asked).

    Shared parameters are counted once, since ``Module.parameters()`` de-duplicates them.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _check_input(x: Tensor, n_mels: int) -> None:
    if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != n_mels:
        raise ValueError(
            f"expected log-mel input of shape (B, 1, {n_mels}, T), got {tuple(x.shape)}"
        )


class AudioNTT(nn.Module):
    """BYOL-A's "AudioNTT" CNN encoder (also the UnFuSeD student).

    Three blocks of Conv3x3 -> BatchNorm -> ReLU -> MaxPool 2x2, then, per time frame, the
    (channels x n_mels/8) map is flattened and passed through
    Linear -> ReLU -> Dropout -> Linear -> ReLU to ``dim``; the clip embedding is
    max-over-time + mean-over-time.

    Exits (UnFuSeD's multi-exit student): block ``i``'s (B, channels, F_i, T_i) output
    averaged over time and flattened, ``channels * n_mels / 2**(i+1)`` values, as the
    method states (``exit_pooling="time"``); ``"freq_time"`` averages over frequency too
    (``channels`` values per exit: smaller exit heads, less frequency detail).

    Module names and order (``features.*``, ``fc.*``) follow the BYOL-A release, so its
    pretrained state dicts load key for key (with ``channels=64``).

    Args:
        n_mels: number of mel bins of the input (must be >= 8).
        channels: conv channels of every block.
        dim: embedding size.
        dropout: dropout inside the frame-wise FC.
        exit_pooling: ``"time"`` or ``"freq_time"``: what the exits average over.

    Shapes:
        x: (B, 1, n_mels, T) with T >= 8.
        forward: (B, dim).
        forward_exits: ([(B, exit_dims[i]) for i in 0..2], (B, dim)); ``exit_dims`` is
            ``[channels * (n_mels // 2**(i+1))]`` with ``"time"``, ``[channels] * 3`` with
            ``"freq_time"``.
    """

    num_blocks = 3
    EXIT_POOLINGS = ("time", "freq_time")

    def __init__(
        self,
        n_mels: int = 64,
        channels: int = 64,
        dim: int = 2048,
        dropout: float = 0.3,
        exit_pooling: str = "time",
    ) -> None:
        super().__init__()
        if n_mels < 2**self.num_blocks:
            raise ValueError(f"n_mels must be >= {2**self.num_blocks}, got {n_mels}")
        if exit_pooling not in self.EXIT_POOLINGS:
            raise ValueError(
                f"exit_pooling must be one of {list(self.EXIT_POOLINGS)}, got {exit_pooling!r}"
            )
        self.n_mels = n_mels
        self.embed_dim = dim
        self.exit_pooling = exit_pooling
        self.exit_dims = [
            channels * (n_mels // 2 ** (i + 1)) if exit_pooling == "time" else channels
            for i in range(self.num_blocks)
        ]

        layers: list[nn.Module] = []
        in_ch = 1
        for _ in range(self.num_blocks):
            layers += [
                nn.Conv2d(in_ch, channels, kernel_size=3, stride=1, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.MaxPool2d(2, stride=2),
            ]
            in_ch = channels
        self.features = nn.Sequential(*layers)
        # Channels-last conv weights select the much faster CPU conv/max-pool kernels
        # (1.76x finetune throughput measured by `make bench`); values are unchanged.
        self.features.to(memory_format=torch.channels_last)
        # Each pooling floors the frequency axis, so n_mels // 8 bins remain.
        self.fc = nn.Sequential(
            nn.Linear(channels * (n_mels // 2**self.num_blocks), dim),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(dim, dim),
            nn.ReLU(),
        )

    def _frames(self, fmap: Tensor) -> Tensor:
        """(B, C, F, T') conv map -> (B, T', dim) frame embeddings."""
        # (B, T', F, C) then flatten F*C: the BYOL-A ordering, kept for weight compatibility.
        b, c, f, t = fmap.shape
        frames = fmap.permute(0, 3, 2, 1).reshape(b, t, f * c)
        return self.fc(frames)

    @staticmethod
    def _pool_time(frames: Tensor) -> Tensor:
        """(B, T', dim) -> (B, dim): max + mean over time."""
        return frames.max(dim=1).values + frames.mean(dim=1)

    def _check(self, x: Tensor) -> None:
        _check_input(x, self.n_mels)
        if x.shape[-1] < 2**self.num_blocks:  # pooling would leave no time frame
            raise ValueError(f"AudioNTT needs T >= {2**self.num_blocks} frames, got {x.shape[-1]}")

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, n_mels, T) -> (B, dim)."""
        self._check(x)
        return self._pool_time(self._frames(self.features(x)))

    def _exit(self, fmap: Tensor) -> Tensor:
        """(B, C, F, T) block output -> (B, exit_dim): mean over time (and frequency)."""
        if self.exit_pooling == "freq_time":
            return fmap.mean(dim=(2, 3))
        return fmap.mean(dim=3).flatten(1)

    def forward_exits(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """One pass returning the 3 block outputs pooled by ``exit_pooling`` ((B,
        exit_dims[i]) each) and the final embedding (B, dim)."""
        self._check(x)
        exits: list[Tensor] = []
        h = x
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i % 4 == 3:  # after the pooling that closes a block
                exits.append(self._exit(h))
        return exits, self._pool_time(self._frames(h))


def _sinusoidal_positions(
    length: int, dim: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """(length, dim) fixed sine/cosine table (Vaswani et al.); any length, no parameters."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    half = torch.arange(0, dim, 2, device=device, dtype=torch.float32)
    freq = torch.exp(-math.log(10000.0) * half / dim)
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with explicit q/k/v/out projections.

    Heads are laid out contiguously in the q/k/v output features (head ``h`` owns features
    ``h*head_dim:(h+1)*head_dim``), so a structured-pruning stage can mask heads
    (``head_mask``) and later remove them physically (``prune_heads``).

    Shapes:
        x: (B, T, dim) -> (B, T, dim).
        head_mask: (num_heads,) or (B, num_heads), multiplies each head's output.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if dim % heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
            head_dim = dim // heads
        self.dim = dim
        self.num_heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)
        self.attn_dropout = dropout

    def forward(self, x: Tensor, head_mask: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape
        if self.num_heads == 0:  # every head pruned away: only the output bias remains
            return self.out_proj.bias.expand(b, t, self.dim)

        def split(y: Tensor) -> Tensor:  # (B, T, H*Dh) -> (B, H, T, Dh)
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0
        )
        if head_mask is not None:
            out = out * head_mask.reshape(-1 if head_mask.dim() == 2 else 1, self.num_heads, 1, 1)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.out_proj(out)

    @torch.no_grad()
    def prune_heads(self, keep: Sequence[int] | Tensor) -> None:
        """Physically keep only the heads with indices ``keep`` (in that order)."""
        keep_t = torch.as_tensor(keep, dtype=torch.long, device=self.q_proj.weight.device)
        idx = keep_t[:, None] * self.head_dim + torch.arange(self.head_dim, device=keep_t.device)
        idx = idx.reshape(-1)
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, _select_linear(getattr(self, name), idx, dim=0))
        self.out_proj = _select_linear(self.out_proj, idx, dim=1)
        self.num_heads = int(keep_t.numel())


class FeedForward(nn.Module):
    """Position-wise FFN: Linear(dim, ffn_dim) -> GELU -> Dropout -> Linear(ffn_dim, dim).

    Shapes:
        x: (B, T, dim) -> (B, T, dim).
        unit_mask: (ffn_dim,) or (B, ffn_dim), multiplies the hidden units.
    """

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)

    @property
    def ffn_dim(self) -> int:
        return self.fc1.out_features

    def forward(self, x: Tensor, unit_mask: Tensor | None = None) -> Tensor:
        h = F.gelu(self.fc1(x))
        if unit_mask is not None:
            h = h * (unit_mask.unsqueeze(1) if unit_mask.dim() == 2 else unit_mask)
        return self.fc2(self.dropout(h))

    @torch.no_grad()
    def prune_units(self, keep: Sequence[int] | Tensor) -> None:
        """Physically keep only the hidden units with indices ``keep``."""
        idx = torch.as_tensor(keep, dtype=torch.long, device=self.fc1.weight.device)
        self.fc1 = _select_linear(self.fc1, idx, dim=0)
        self.fc2 = _select_linear(self.fc2, idx, dim=1)


def _select_linear(layer: nn.Linear, idx: Tensor, dim: int) -> nn.Linear:
    """Copy of ``layer`` keeping output features (dim=0) or input features (dim=1) ``idx``."""
    weight = layer.weight.index_select(dim, idx)
    bias = layer.bias
    if bias is not None and dim == 0:
        bias = bias.index_select(0, idx)
    # skip_init: the weights are overwritten below (and empty layers would warn on init).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        new = torch.nn.utils.skip_init(
            nn.Linear,
            weight.shape[1],
            weight.shape[0],
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + FFN(LN(x)).

    Shapes: x (B, T, dim) -> (B, T, dim).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout=dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, head_mask: Tensor | None = None, ffn_mask: Tensor | None = None
    ) -> Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), head_mask=head_mask))
        return x + self.dropout(self.ffn(self.norm2(x), unit_mask=ffn_mask))


class TransformerEncoder(nn.Module):
    """Small audio transformer on log-mel frames.

    Front-end: two 1-D convolutions over time with the mel bins as input channels
    (kernel 3; the second with stride 2, halving the frame rate), GELU after each; then a
    feature projection LayerNorm -> Linear(dim, dim) -> Dropout (the "layer 0" features a
    distillation loss can target). Sinusoidal positions are added (so any T works), followed
    by ``depth`` pre-norm blocks, a final LayerNorm and mean pooling over time.

    Shapes:
        x: (B, 1, n_mels, T), T >= 1; the blocks see T' = ceil(T / 2) frames.
        forward: (B, dim).
        forward_exits: ([(B, dim)] * depth, (B, dim)); exit i is block i's output averaged
            over time (before the final LayerNorm).
        forward_hidden_states: [(B, T', dim)] * (depth + 1): the blocks' input, then every
            block's output.
    """

    #: Submodules :meth:`forward_hidden_states` does not run: layer-wise distillation
    #: cannot train them (and DDP rejects parameters without a gradient).
    outside_hidden_states: ClassVar[tuple[str, ...]] = ("final_norm",)

    def outside_hidden_states_to(self, index: int) -> tuple[str, ...]:
        """Submodules that hidden states 0..``index`` do not depend on: those outside every
        hidden state and the blocks after block ``index``."""
        return (
            *self.outside_hidden_states,
            *(f"blocks.{i}" for i in range(index, len(self.blocks))),
        )

    def __init__(
        self,
        n_mels: int = 64,
        dim: int = 192,
        depth: int = 4,
        heads: int = 4,
        ffn_dim: int = 768,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.embed_dim = dim
        self.exit_dims = [dim] * depth
        self.frontend = nn.Sequential(
            nn.Conv1d(n_mels, dim, kernel_size=3, stride=1, padding=1),
            nn.GELU(),
            nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
        )
        self.feature_projection = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Dropout(dropout)
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, ffn_dim, dropout=dropout) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim)

    def _embed(self, x: Tensor) -> Tensor:
        """(B, 1, n_mels, T) -> (B, T', dim) block input."""
        _check_input(x, self.n_mels)
        frames = self.frontend(x.squeeze(1)).transpose(1, 2)  # (B, T', dim)
        frames = self.feature_projection(frames)
        pos = _sinusoidal_positions(frames.shape[1], frames.shape[2], frames.device, frames.dtype)
        return frames + pos

    def _run_blocks(
        self,
        x: Tensor,
        head_masks: Sequence[Tensor | None] | None,
        ffn_masks: Sequence[Tensor | None] | None,
    ) -> list[Tensor]:
        """Block input (B, T', dim) -> list of every block's output (B, T', dim)."""
        for masks in (head_masks, ffn_masks):
            if masks is not None and len(masks) != len(self.blocks):
                raise ValueError(f"expected {len(self.blocks)} masks, got {len(masks)}")
        outs = []
        h = x
        for i, block in enumerate(self.blocks):
            h = block(
                h,
                head_mask=None if head_masks is None else head_masks[i],
                ffn_mask=None if ffn_masks is None else ffn_masks[i],
            )
            outs.append(h)
        return outs

    def forward_hidden_states(
        self,
        x: Tensor,
        *,
        head_masks: Sequence[Tensor | None] | None = None,
        ffn_masks: Sequence[Tensor | None] | None = None,
    ) -> list[Tensor]:
        """Frame-level features for layer-wise distillation: ``depth + 1`` tensors of
        shape (B, T', dim); index 0 is the blocks' input, index i the output of block i."""
        h0 = self._embed(x)
        return [h0, *self._run_blocks(h0, head_masks, ffn_masks)]

    def forward_exits(
        self,
        x: Tensor,
        *,
        head_masks: Sequence[Tensor | None] | None = None,
        ffn_masks: Sequence[Tensor | None] | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """One pass: every block's output mean-pooled over time (B, dim), and the final
        embedding (B, dim). Optional per-block head/FFN masks (see the block modules)."""
        h0 = self._embed(x)
        outs = self._run_blocks(h0, head_masks, ffn_masks)
        last = outs[-1] if outs else h0
        final = self.final_norm(last).mean(dim=1)
        return [o.mean(dim=1) for o in outs], final

    def forward(
        self,
        x: Tensor,
        *,
        head_masks: Sequence[Tensor | None] | None = None,
        ffn_masks: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        """(B, 1, n_mels, T) -> (B, dim)."""
        return self.forward_exits(x, head_masks=head_masks, ffn_masks=ffn_masks)[1]
