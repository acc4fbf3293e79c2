"""torchaudio's HuBERT Base as a distillery encoder, and its structured-pruning spec.

Unlike the log-mel encoders, HuBERT reads raw 16 kHz waveforms: ``input_key = "audio"``
tells the distillation stages to feed it ``batch["audio"]`` (B, samples).
"""

from __future__ import annotations

from typing import Any

import torch
import torchaudio
from torch import Tensor, nn
from torchaudio.models.wav2vec2.components import SelfAttention

from distillery.models.encoders import count_parameters
from distillery.models.pruning import PruningSpec, UnitGroup, register_pruning_spec, select_units

__all__ = ["HuBERTEncoder", "HuBERTPruning"]


class HuBERTEncoder(nn.Module):
    """``torchaudio.models.hubert_base()`` (94.4M parameters) with the encoder interface.

    Layer drop is off: distillation reads every layer's output.

    Shapes:
        audio: (B, samples) at 16 kHz.
        forward_hidden_states: 13 tensors (B, T', 768), T' ~ samples / 320; index 0 is the
            transformer's input (front-end + feature projection + positional conv), index i
            the output of layer i.
        forward: (B, 768), the last layer's output averaged over time.
    """

    input_key = "audio"

    def __init__(
        self, encoder_projection_dropout: float = 0.1, encoder_dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.model = torchaudio.models.hubert_base(
            encoder_projection_dropout=encoder_projection_dropout,
            encoder_dropout=encoder_dropout,
            encoder_layer_drop=0.0,
        )
        self.embed_dim = self.model.encoder.feature_projection.projection.out_features

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accept torchaudio ``Wav2Vec2Model`` state dicts (keys without the ``model.`` prefix)."""
        if any(k.startswith("model.") for k in state):
            return state
        return {f"model.{k}": v for k, v in state.items()}

    def forward_hidden_states(self, audio: Tensor) -> list[Tensor]:
        if audio.dim() != 2:
            raise ValueError(
                f"HuBERT expects waveforms of shape (B, samples), got {tuple(audio.shape)}"
            )
        x, _ = self.model.feature_extractor(audio, None)
        x = self.model.encoder.feature_projection(x)
        transformer = self.model.encoder.transformer
        x = x + transformer.pos_conv_embed(x)  # as torchaudio's Transformer._preprocess
        if transformer.layer_norm_first:
            x = transformer.layer_norm(x)
        x = transformer.dropout(x)
        states = [x]
        for layer in transformer.layers:
            x, _ = layer(x)
            states.append(x)
        return states

    def forward(self, audio: Tensor) -> Tensor:
        return self.forward_hidden_states(audio)[-1].mean(dim=1)


class _HeadlessAttention(SelfAttention):
    """A self-attention whose heads were all pruned: only the output bias remains. Same
    parameters (empty q/k/v/out weights), so its state dict keys do not change."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        return self.out_proj.bias.expand(x.shape[0], x.shape[1], -1), None


class HuBERTPruning(PruningSpec):
    """Units of :class:`HuBERTEncoder`: output channels of conv layers 0-5 (``conv.i``),
    heads (``heads.i``) and FFN units (``ffn.i``) of every transformer layer.

    The last conv layer's channels are kept: they feed the feature projection's LayerNorm,
    whose statistics over masked-to-zero channels differ from those over fewer channels, so
    masking them would not equal removing them.
    """

    def _convs(self, model: HuBERTEncoder) -> list[nn.Module]:
        return list(model.model.feature_extractor.conv_layers)

    def _layers(self, model: HuBERTEncoder) -> list[nn.Module]:
        return list(model.model.encoder.transformer.layers)

    def groups(self, model: nn.Module, kinds: Any) -> list[UnitGroup]:
        out = []
        if "conv" in kinds:
            for i, block in enumerate(self._convs(model)[:-1]):
                if block.layer_norm is not None and not isinstance(block.layer_norm, nn.GroupNorm):
                    raise ValueError(
                        "conv pruning needs the group_norm feature extractor (HuBERT Base)"
                    )
                out.append(
                    UnitGroup(
                        f"conv.{i}",
                        "conv",
                        block.conv.out_channels,
                        self.init_drop_prob["conv"],
                        block,
                        "output",
                    )
                )
        for i, layer in enumerate(self._layers(model)):
            attn, ffn = layer.attention, layer.feed_forward
            out += self.layer_groups(
                i,
                kinds,
                attn.out_proj,
                attn.num_heads,
                attn.head_dim,
                ffn.output_dense,
                ffn.intermediate_dense.out_features,
            )
        return out

    def param_count(self, model: nn.Module, counts: dict[str, Tensor]) -> Tensor:
        def conv_params(n: list[Any]) -> Any:
            total = 0
            for i, block in enumerate(convs):
                n_in = 1 if i == 0 else n[i - 1]
                per_out = n_in * block.conv.kernel_size[0] + (block.conv.bias is not None)
                total = total + n[i] * per_out + (2 * n[i] if block.layer_norm is not None else 0)
            return total

        convs = self._convs(model)
        full = [b.conv.out_channels for b in convs]
        counted = [counts.get(f"conv.{i}", float(c)) for i, c in enumerate(full)]
        variable, full_variable = conv_params(counted), conv_params(full)
        for i, layer in enumerate(self._layers(model)):
            attn, ffn = layer.attention, layer.feed_forward
            dim, units = attn.embed_dim, ffn.intermediate_dense.out_features
            per_head = attn.head_dim * (4 * dim + 3)  # q/k/v rows + biases, out_proj columns
            per_unit = 2 * dim + 1  # intermediate row + bias, output column
            variable = variable + counts.get(f"heads.{i}", float(attn.num_heads)) * per_head
            variable = variable + counts.get(f"ffn.{i}", float(units)) * per_unit
            full_variable += attn.num_heads * per_head + units * per_unit
        fixed = count_parameters(model) - full_variable
        return torch.as_tensor(variable, dtype=torch.float64) + fixed

    @torch.no_grad()
    def prune_(
        self, model: nn.Module, keep: dict[str, Tensor], scale: dict[str, Tensor] | None
    ) -> None:
        scale = scale or {}
        convs = self._convs(model)
        for i, block in enumerate(convs[:-1]):
            if (name := f"conv.{i}") not in keep:
                continue
            following = convs[i + 1].conv
            if name in scale:
                following.weight.mul_(scale[name].view(1, -1, 1))
            select_units(block.conv, keep[name], dim=0)
            if block.layer_norm is not None:
                select_units(block.layer_norm, keep[name], dim=0)
            select_units(following, keep[name], dim=1)
        for i, layer in enumerate(self._layers(model)):
            attn, ffn = layer.attention, layer.feed_forward
            if (name := f"heads.{i}") in keep:
                if name in scale:
                    attn.out_proj.weight.mul_(scale[name].repeat_interleave(attn.head_dim))
                heads = keep[name]
                idx = (heads[:, None] * attn.head_dim + torch.arange(attn.head_dim)).reshape(-1)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    select_units(proj, idx, dim=0)
                select_units(attn.out_proj, idx, dim=1)
                attn.num_heads = int(heads.numel())
                if attn.num_heads == 0:  # attention kernels reject zero heads
                    attn.__class__ = _HeadlessAttention
            if (name := f"ffn.{i}") in keep:
                if name in scale:
                    ffn.output_dense.weight.mul_(scale[name])
                select_units(ffn.intermediate_dense, keep[name], dim=0)
                select_units(ffn.output_dense, keep[name], dim=1)


register_pruning_spec(HuBERTEncoder, HuBERTPruning)
