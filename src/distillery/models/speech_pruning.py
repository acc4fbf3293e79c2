"""DPHuBERT's structured pruning of :class:`~distillery.models.speech.SpeechEncoder` (HuBERT,
wav2vec 2.0 and WavLM).

Units: output channels of the conv front-end layers (``conv.i``, all but the last), the
heads (``heads.i``) and FFN units (``ffn.i``) of every transformer layer, and one gate per
whole attention block (``attn_layer.i``) and FFN block (``ffn_layer.i``).

Exports always run: a conv layer keeps at least one channel (a layer without channels
leaves nothing to normalise); an attention block with no head left, or removed by its
layer gate, keeps only its output bias (removed too with the layer gate); the same for an
FFN block without units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distillery.models.encoders import count_parameters
from distillery.models.pruning import PruningSpec, UnitGroup, select_units
from distillery.models.speech import HeadlessAttention, PrunableWavLMAttention

__all__ = ["SpeechPruning"]


def _out_proj(attn: nn.Module) -> nn.Linear:
    return attn.attention.out_proj if isinstance(attn, PrunableWavLMAttention) else attn.out_proj


def _bias(layer: nn.Linear) -> int:
    return layer.bias.numel() if layer.bias is not None else 0


class SpeechPruning(PruningSpec):
    """The last conv layer's channels are kept: they feed the feature projection's LayerNorm,
    whose statistics over masked-to-zero channels differ from those over fewer channels (the
    same holds for every conv layer of a LayerNorm front-end, the Large layout: conv pruning
    needs the GroupNorm front-end of the Base models)."""

    kinds = ("conv", "heads", "ffn", "attn_layer", "ffn_layer")

    def _convs(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.feature_extractor.conv_layers)

    def _layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.encoder.transformer.layers)

    def groups(self, model: nn.Module, kinds: Sequence[str]) -> list[UnitGroup]:
        out = []
        if "conv" in kinds:
            for i, block in enumerate(self._convs(model)[:-1]):
                if block.layer_norm is not None and not isinstance(block.layer_norm, nn.GroupNorm):
                    raise ValueError(
                        "conv pruning needs the group_norm feature extractor (the Base models); "
                        "leave conv out of prune for LayerNorm front-ends (Large)"
                    )
                out.append(
                    self.group(f"conv.{i}", "conv", block.conv.out_channels, block, "output")
                )
        for i, layer in enumerate(self._layers(model)):
            attn, ffn = layer.attention, layer.feed_forward
            out += self.layer_groups(
                i,
                kinds,
                _out_proj(attn),
                attn.num_heads,
                attn.head_dim,
                ffn.output_dense,
                ffn.intermediate_dense.out_features,
            )
            if "attn_layer" in kinds:
                out.append(self.group(f"attn_layer.{i}", "attn_layer", 1, attn, "output"))
            if "ffn_layer" in kinds:
                out.append(self.group(f"ffn_layer.{i}", "ffn_layer", 1, ffn, "output"))
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
            attn_bias, ffn_bias = _bias(_out_proj(attn)), _bias(ffn.output_dense)
            heads = counts.get(f"heads.{i}", float(attn.num_heads))
            ffn_units = counts.get(f"ffn.{i}", float(units))
            # A whole-block gate scales everything the block owns, output bias included.
            variable = variable + counts.get(f"attn_layer.{i}", 1.0) * (
                heads * per_head + attn_bias
            )
            variable = variable + counts.get(f"ffn_layer.{i}", 1.0) * (
                ffn_units * per_unit + ffn_bias
            )
            full_variable += attn.num_heads * per_head + attn_bias + units * per_unit + ffn_bias
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
            self._prune_attention(layer.attention, i, keep, scale)
            self._prune_ffn(layer.feed_forward, i, keep, scale)

    def _block(
        self,
        out: nn.Linear,
        name: str,
        units: str,
        keep: dict[str, Tensor],
        scale: dict[str, Tensor],
    ) -> tuple[Tensor | None, bool]:
        """Fold block gate ``name`` into ``out``; (units to keep, whether the block is removed)."""
        if name in scale:
            out.weight.mul_(scale[name])
            if out.bias is not None:
                out.bias.mul_(scale[name])
        removed = name in keep and keep[name].numel() == 0
        kept = torch.zeros(0, dtype=torch.long) if removed else keep.get(units)
        return kept, removed

    def _prune_attention(
        self, attn: nn.Module, i: int, keep: dict[str, Tensor], scale: dict[str, Tensor]
    ) -> None:
        out = _out_proj(attn)
        heads, removed = self._block(out, f"attn_layer.{i}", f"heads.{i}", keep, scale)
        if heads is not None:
            if (name := f"heads.{i}") in scale:
                out.weight.mul_(scale[name].repeat_interleave(attn.head_dim))
            heads = heads.to(out.weight.device)
            width = attn.num_heads * attn.head_dim
            idx = (
                heads[:, None] * attn.head_dim + torch.arange(attn.head_dim, device=heads.device)
            ).reshape(-1)
            if isinstance(attn, PrunableWavLMAttention):
                mha = attn.attention
                rows = torch.cat([idx, idx + width, idx + 2 * width])  # q, k, v stacked
                mha.in_proj_weight = nn.Parameter(mha.in_proj_weight[rows].clone())
                mha.in_proj_bias = nn.Parameter(mha.in_proj_bias[rows].clone())
                # The position bias spans the original heads: remember which ones remain.
                original = attn.kept_heads[heads] if hasattr(attn, "kept_heads") else heads
                attn.register_buffer("kept_heads", original.clone())
            else:
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    select_units(proj, idx, dim=0)
                if heads.numel() == 0:  # attention kernels reject zero heads
                    attn.__class__ = HeadlessAttention
            select_units(out, idx, dim=1)
            attn.num_heads = int(heads.numel())
        if removed:
            out.bias = None

    def _prune_ffn(
        self, ffn: nn.Module, i: int, keep: dict[str, Tensor], scale: dict[str, Tensor]
    ) -> None:
        out = ffn.output_dense
        units, removed = self._block(out, f"ffn_layer.{i}", f"ffn.{i}", keep, scale)
        if units is not None:
            if (name := f"ffn.{i}") in scale:
                out.weight.mul_(scale[name])
            select_units(ffn.intermediate_dense, units, dim=0)
            select_units(out, units, dim=1)
        if removed:
            out.bias = None
