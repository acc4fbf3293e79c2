"""Waveform speech encoders: HuBERT, wav2vec 2.0 and WavLM on torchaudio's ``Wav2Vec2Model``.

:class:`SpeechEncoder` builds the architecture from a preset name (``hubert_base``,
``wavlm_large``, ...), from the weights file a user has (:mod:`distillery.models.speech_weights`
detects a Hugging Face directory, a fairseq checkpoint or a torchaudio state dict), or from
an explicit ``architecture`` dict (what its artifacts store, so a saved encoder never needs
the original file again).

Variable-length batches: ``forward_hidden_states(audio, lengths)`` takes the valid sample
count of each zero-padded waveform. Every computation then ignores the padding, so a clip's
hidden states (on its valid frames) and its pooled embedding do not depend on what it was
batched with: the first conv layer's GroupNorm (which normalises over time) uses the valid
frames only, padded frames are zeroed before the positional convolution, and attention
never looks at padded keys.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchaudio.models import wav2vec2_model, wavlm_model
from torchaudio.models.wav2vec2.components import ConvLayerBlock, SelfAttention
from torchaudio.models.wav2vec2.wavlm_attention import WavLMSelfAttention

__all__ = [
    "FAMILIES",
    "PRESETS",
    "SpeechEncoder",
    "build_architecture",
    "frame_lengths",
    "valid_frames",
]

FAMILIES = ("hubert", "wav2vec2", "wavlm")

_CONV = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2  # (channels, kernel, stride)
_BASE: dict[str, Any] = {
    "extractor_mode": "group_norm",
    "extractor_conv_layer_config": _CONV,
    "extractor_conv_bias": False,
    "encoder_embed_dim": 768,
    "encoder_projection_dropout": 0.1,
    "encoder_pos_conv_kernel": 128,
    "encoder_pos_conv_groups": 16,
    "encoder_num_layers": 12,
    "encoder_num_heads": 12,
    "encoder_attention_dropout": 0.1,
    "encoder_ff_interm_features": 3072,
    "encoder_ff_interm_dropout": 0.0,
    "encoder_dropout": 0.1,
    "encoder_layer_norm_first": False,
}
_LARGE = _BASE | {
    "extractor_mode": "layer_norm",
    "encoder_embed_dim": 1024,
    "encoder_num_layers": 24,
    "encoder_num_heads": 16,
    "encoder_ff_interm_features": 4096,
    "encoder_layer_norm_first": True,
}
_WAVLM = {"encoder_num_buckets": 320, "encoder_max_distance": 800}

#: torchaudio's published architectures (its ``hubert_base()``, ``wavlm_large()``, ...).
PRESETS: dict[str, dict[str, Any]] = {
    "hubert_base": {"family": "hubert", **_BASE},
    "hubert_large": {"family": "hubert", **_LARGE},
    "wav2vec2_base": {"family": "wav2vec2", **_BASE},
    "wav2vec2_large": {
        "family": "wav2vec2",
        **_LARGE,
        "extractor_mode": "group_norm",
        "encoder_layer_norm_first": False,
    },
    "wav2vec2_large_lv60k": {"family": "wav2vec2", **_LARGE, "extractor_conv_bias": True},
    "wavlm_base": {"family": "wavlm", **_BASE, **_WAVLM},
    "wavlm_large": {"family": "wavlm", **_LARGE, **_WAVLM},
}

#: Keys that fix the shapes of the weights (the rest are dropout rates).
SHAPE_KEYS = (
    "family",
    "extractor_mode",
    "extractor_conv_layer_config",
    "extractor_conv_bias",
    "encoder_embed_dim",
    "encoder_pos_conv_kernel",
    "encoder_pos_conv_groups",
    "encoder_num_layers",
    "encoder_num_heads",
    "encoder_ff_interm_features",
    "encoder_layer_norm_first",
    "encoder_num_buckets",
    "encoder_max_distance",
)


def check_architecture(arch: dict[str, Any]) -> dict[str, Any]:
    """``arch`` with the conv config as plain lists; raises naming a missing or unknown key."""
    family = arch.get("family")
    if family not in FAMILIES:
        raise ValueError(f"architecture.family must be one of {list(FAMILIES)}, got {family!r}")
    required = set(PRESETS[f"{family}_base"])
    if missing := sorted(required - set(arch)):
        raise ValueError(f"architecture is missing {missing}")
    if unknown := sorted(set(arch) - required):
        raise ValueError(f"architecture has unknown keys {unknown} (allowed: {sorted(required)})")
    out = dict(arch)
    out["extractor_conv_layer_config"] = [
        [int(c) for c in layer] for layer in arch["extractor_conv_layer_config"]
    ]
    return out


def build_architecture(arch: dict[str, Any]) -> nn.Module:
    """torchaudio ``Wav2Vec2Model`` of ``arch`` (random weights, no layer drop), its modules
    switched to the length-aware and prunable variants defined here."""
    kwargs = {k: v for k, v in arch.items() if k != "family"}
    kwargs["extractor_conv_layer_config"] = [tuple(c) for c in arch["extractor_conv_layer_config"]]
    builder = wavlm_model if arch["family"] == "wavlm" else wav2vec2_model
    model = builder(**kwargs, encoder_layer_drop=0.0, aux_num_out=None)
    for module in model.modules():
        if isinstance(module, ConvLayerBlock):
            module.__class__ = LengthAwareConvBlock
        elif isinstance(module, WavLMSelfAttention):
            module.__class__ = PrunableWavLMAttention
            module.total_heads = module.num_heads  # position bias and its gate span all heads
    return model


def frame_lengths(model: nn.Module, lengths: Tensor) -> Tensor:
    """Valid output frames of the conv front-end for ``lengths`` valid samples."""
    for block in model.feature_extractor.conv_layers:
        lengths = torch.div(lengths - block.kernel_size, block.stride, rounding_mode="floor") + 1
        lengths = lengths.clamp(min=0)
    return lengths


def valid_frames(frames: Tensor, num_frames: int) -> Tensor:
    """(B,) valid frame counts -> (B, num_frames) bool, ``True`` on a clip's valid frames.

    The one frame mask of padded waveform batches: attention, pooling and the frame-level
    distillation losses all read it."""
    return torch.arange(num_frames, device=frames.device)[None, :] < frames[:, None]


def _additive_mask(padding: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) bool, ``True`` on padded frames -> (B, 1, 1, T) attention bias: -inf there."""
    zeros = torch.zeros(padding.shape, dtype=dtype, device=padding.device)
    return zeros.masked_fill(padding, float("-inf"))[:, None, None, :]


class LengthAwareConvBlock(ConvLayerBlock):
    """torchaudio's conv block whose GroupNorm (per channel, over time) uses valid frames only.

    Output frames before the valid length read valid input samples only (no conv padding),
    so with this normalisation they equal those of the clip run alone.
    """

    def forward(self, x: Tensor, length: Tensor | None) -> tuple[Tensor, Tensor | None]:
        x = self.conv(x)
        if length is not None:
            length = torch.div(length - self.kernel_size, self.stride, rounding_mode="floor") + 1
            length = length.clamp(min=0)
        norm = self.layer_norm
        if isinstance(norm, nn.GroupNorm) and length is not None:
            mask = valid_frames(length, x.shape[-1])[:, None, :].to(x.dtype)  # (B, 1, T)
            count = mask.sum(-1, keepdim=True).clamp(min=1.0)
            mean = (x * mask).sum(-1, keepdim=True) / count
            var = ((x - mean).square() * mask).sum(-1, keepdim=True) / count
            x = (x - mean) * torch.rsqrt(var + norm.eps)
            x = x * norm.weight[:, None] + norm.bias[:, None]
        elif norm is not None:
            x = norm(x)
        return F.gelu(x), length


class HeadlessAttention(SelfAttention):
    """A self-attention whose heads were all pruned: only the output bias (if any) remains.
    Same parameter names (empty q/k/v/out weights), so its state dict keys do not change."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        return self.out_proj(x.new_zeros(*x.shape[:-1], 0)), None


class PrunableWavLMAttention(WavLMSelfAttention):
    """WavLM's gated relative-position attention, correct after head pruning.

    The position bias (computed by layer 0, passed on to every layer) and its gate span all
    ``total_heads`` heads; a layer whose heads were pruned selects its own (``kept_heads``,
    a buffer registered by the pruning). Padded keys are masked with ``-inf``.
    """

    total_heads: int

    def forward(
        self,
        query: Tensor,
        key_padding_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        bsz, seq_len, _ = query.shape
        if self.rel_attn_embed is not None and position_bias is None:
            position_bias = self.compute_bias(seq_len, seq_len).unsqueeze(0).expand(bsz, -1, -1, -1)
        if position_bias is None:
            raise ValueError("WavLM layers after the first need the position bias of layer 0")
        heads = query.view(bsz, seq_len, self.total_heads, -1).permute(0, 2, 1, 3)
        gate = self.gru_rel_pos_linear(heads).view(bsz, self.total_heads, seq_len, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(gate).chunk(2, dim=-1)
        gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0
        bias = gate * position_bias  # (B, total_heads, T, T)
        if hasattr(self, "kept_heads"):
            bias = bias.index_select(1, self.kept_heads)
        if key_padding_mask is not None:
            bias = bias + _additive_mask(key_padding_mask, bias.dtype)
        out_proj = self.attention.out_proj
        if self.num_heads == 0:
            return out_proj(query.new_zeros(bsz, seq_len, 0)), position_bias
        qkv = F.linear(query, self.attention.in_proj_weight, self.attention.in_proj_bias)
        # A view of the contiguous projection (not reshapes of its chunks): no copy, and no
        # stride-dependent branch that would tie an exported program to the batch size.
        qkv = qkv.view(bsz, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.num_heads * self.head_dim)
        return out_proj(out), position_bias


class SpeechEncoder(nn.Module):
    """HuBERT, wav2vec 2.0 or WavLM (any size) with the encoder interface.

    Args:
        arch: a preset in :data:`PRESETS` (e.g. ``hubert_base``, ``wavlm_large``).
        weights: a Hugging Face model directory, a fairseq checkpoint or a torchaudio state
            dict (format detected from the file). HF and fairseq files carry their
            architecture; a torchaudio state dict needs ``arch`` or ``architecture``.
            When both the file and ``arch`` give an architecture, they must agree.
        architecture: explicit architecture (``family`` + torchaudio ``wav2vec2_model``
            arguments), or overrides of the preset's/file's values (e.g. dropout rates).
        embedding_layer: the hidden state ``forward`` pools (index into
            ``forward_hidden_states``; -1: the last). Layers above it are not computed.
            E.g. HuBERT's second iteration clusters layer 6 of the first.
        pooling: ``mean`` or ``max`` over the valid frames.

    Shapes:
        audio: (B, samples) at 16 kHz, zero-padded; lengths: (B,) valid samples or ``None``.
        forward_hidden_states: ``num_layers + 1`` tensors (B, T', D), T' ~ samples / 320: the
            transformer's input, then each layer's output, as Hugging Face's
            ``hidden_states`` (pre-LN models: without the final LayerNorm, as torchaudio's
            ``extract_features``).
        forward: (B, D), hidden state ``embedding_layer`` pooled over the valid frames.
        forward_exits: ([(B, D)] * embedding_layer, (B, D)): layers ``1..embedding_layer``
            pooled as ``forward`` pools, and the embedding (multi-exit students).
        frame_mask: (B, T') bool, the valid frames (frame-level losses average over them).
    """

    input_key = "audio"

    def __init__(
        self,
        arch: str | None = None,
        weights: str | None = None,
        architecture: dict[str, Any] | None = None,
        embedding_layer: int = -1,
        pooling: Literal["mean", "max"] = "mean",
    ) -> None:
        super().__init__()
        from distillery.models.speech_weights import load_state, resolve  # (import cycle)

        self.architecture, state = resolve(arch, weights, architecture)
        states = self.architecture["encoder_num_layers"] + 1
        if not -states <= embedding_layer < states:
            raise ValueError(f"embedding_layer={embedding_layer} outside [{-states}, {states - 1}]")
        if pooling not in ("mean", "max"):
            raise ValueError(f"pooling must be mean or max, got {pooling!r}")
        self.embedding_layer, self.pooling = embedding_layer % states, pooling
        self.model = build_architecture(self.architecture)
        self.embed_dim = self.architecture["encoder_embed_dim"]
        if state is not None:
            load_state(self.model, state, weights)

    def architecture_config(self) -> dict[str, Any]:
        """The config that rebuilds this architecture without reading any weights file."""
        return {
            "_target_": f"{SpeechEncoder.__module__}.SpeechEncoder",
            "architecture": self.architecture,
            "embedding_layer": self.embedding_layer,
            "pooling": self.pooling,
        }

    def load_weights(self, path: str) -> None:
        """Load any supported weights file (see ``weights``) into this architecture, strictly."""
        from distillery.models.speech_weights import load_state, read_weights

        _, state = read_weights(path, None)
        load_state(self.model, state, path)

    @property
    def exit_dims(self) -> list[int]:
        """Widths of the exits of :meth:`forward_exits`: one per computed transformer layer."""
        return [self.embed_dim] * self.embedding_layer

    @property
    def outside_hidden_states(self) -> tuple[str, ...]:
        """Submodules :meth:`forward_hidden_states` does not run: the transformer's final
        LayerNorm in the Large (pre-LN) layout, which torchaudio applies after the last layer
        only. A stage that trains on the hidden states freezes them
        (:func:`~distillery.stages.base.freeze_unused`)."""
        final_norm_last = not self.model.encoder.transformer.layer_norm_first  # torchaudio's flag
        return ("model.encoder.transformer.layer_norm",) if final_norm_last else ()

    def outside_hidden_states_to(self, index: int) -> tuple[str, ...]:
        """Submodules that hidden states 0..``index`` do not depend on: those outside every
        hidden state and the transformer layers after layer ``index``."""
        layers = range(index, len(self.model.encoder.transformer.layers))
        return self.outside_hidden_states + tuple(
            f"model.encoder.transformer.layers.{i}" for i in layers
        )

    @property
    def outside_forward(self) -> tuple[str, ...]:
        """Submodules :meth:`forward` and :meth:`forward_exits` do not run: those outside the
        hidden states, and the transformer layers above ``embedding_layer``."""
        above = range(self.embedding_layer, len(self.model.encoder.transformer.layers))
        return self.outside_hidden_states + tuple(
            f"model.encoder.transformer.layers.{i}" for i in above
        )

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        return frame_lengths(self.model, lengths)

    def frame_mask(self, lengths: Tensor | None, num_frames: int) -> Tensor | None:
        """(B, num_frames) bool, ``True`` on the valid frames of clips of ``lengths`` valid
        samples (``None`` without lengths: every frame is valid)."""
        return None if lengths is None else valid_frames(self.frame_lengths(lengths), num_frames)

    def forward_hidden_states(
        self, audio: Tensor, lengths: Tensor | None = None, num_layers: int | None = None
    ) -> list[Tensor]:
        """The transformer's input and each layer's output (the first ``num_layers`` only)."""
        if audio.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} expects waveforms of shape (B, samples), "
                f"got {tuple(audio.shape)}"
            )
        x, frames = self.model.feature_extractor(audio, lengths)
        encoder = self.model.encoder
        x = encoder.feature_projection(x)
        padding = None
        if frames is not None:
            padding = ~valid_frames(frames, x.shape[1])
            x = x.masked_fill(padding[..., None], 0.0)  # the positional conv reads neighbours
        transformer = encoder.transformer
        x = x + transformer.pos_conv_embed(x)
        if transformer.layer_norm_first:  # torchaudio's flag: post-LN models normalise here
            x = transformer.layer_norm(x)
        x = transformer.dropout(x)
        wavlm = self.architecture["family"] == "wavlm"
        additive = None
        if padding is not None and not wavlm:  # (B, 1, T, T): the shape torchaudio checks
            additive = _additive_mask(padding, x.dtype).expand(-1, 1, x.shape[1], -1)
        states = [x]
        position_bias = None
        for layer in transformer.layers[:num_layers]:
            x, position_bias = layer(
                x,
                additive,
                position_bias=position_bias,
                key_padding_mask=padding if wavlm else None,
            )
            states.append(x)
        return states

    def pool(self, hidden: Tensor, lengths: Tensor | None) -> Tensor:
        """(B, T', D) -> (B, D): ``pooling`` over the valid frames of each clip."""
        if lengths is None:
            return hidden.mean(dim=1) if self.pooling == "mean" else hidden.amax(dim=1)
        valid = self.frame_mask(lengths, hidden.shape[1])
        if self.pooling == "max":
            return hidden.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
        counts = valid.sum(dim=1, keepdim=True).clamp(min=1)
        return torch.einsum("bt,btd->bd", valid.to(hidden.dtype) / counts.to(hidden.dtype), hidden)

    def forward(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        states = self.forward_hidden_states(audio, lengths, num_layers=self.embedding_layer)
        return self.pool(states[-1], lengths)

    def forward_exits(
        self, audio: Tensor, lengths: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """One pass: transformer layers ``1..embedding_layer`` each pooled as ``forward``
        pools (the multi-exit interface; the last exit is the embedding's layer), and the
        embedding (B, D)."""
        states = self.forward_hidden_states(audio, lengths, num_layers=self.embedding_layer)
        pooled = [self.pool(state, lengths) for state in states]
        return pooled[1:], pooled[-1]


def _register_pruning() -> None:
    # The spec uses this module's classes, so it lives in its own module, imported here.
    from distillery.models.pruning import register_pruning_spec
    from distillery.models.speech_pruning import SpeechPruning

    register_pruning_spec(SpeechEncoder, SpeechPruning)


_register_pruning()
