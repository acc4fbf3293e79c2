"""Structured pruning with hard-concrete gates (DPHuBERT) and export of the smaller model.

A :class:`GatedModel` wraps an encoder and puts one :class:`HardConcreteGate` on each group
of prunable units: conv front-end channels, the attention heads of a block, the FFN
hidden units of a block, and (speech encoders) a whole attention or FFN block. The encoder itself is not edited: masks are applied by forward
hooks on the layer that consumes the units (e.g. the input of an attention block's output
projection). Which groups exist, how many parameters each unit costs and how to remove
units physically is architecture knowledge, held by a :class:`PruningSpec` (one for our
:class:`~distillery.models.encoders.TransformerEncoder` here, one for HuBERT, wav2vec 2.0
and WavLM in :mod:`distillery.models.speech_pruning`).

The export is an ordinary encoder artifact (:func:`~distillery.models.io.save_encoder`)
whose config is ``{_target_: distillery.models.pruning.build_pruned, base: <encoder
config>, kept: {<group>: <count>}, _recursive_: false}``, so :func:`load_pruned` (and ``load_encoder``) rebuild
the smaller architecture without any gate and load its weights strictly.
"""

from __future__ import annotations

import copy
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distillery.models.encoders import TransformerEncoder, count_parameters
from distillery.models.io import build_encoder, self_contained_config
from distillery.models.safe_load import check_artifact_config, load_tensors

__all__ = [
    "GatedModel",
    "HardConcreteGate",
    "PruningSpec",
    "TransformerPruning",
    "UnitGroup",
    "build_pruned",
    "load_pruned",
    "pruning_spec",
    "select_units",
]


class HardConcreteGate(nn.Module):
    """Hard-concrete gates over ``n`` units (Louizos et al. 2018, as used by DPHuBERT).

    beta = 2/3, stretched to [-0.1, 1.1] and clamped to [0, 1].

    - training: ``s = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta) * 1.2 - 0.1, 0, 1)``
      with one ``u ~ U(0, 1)`` per unit, drawn anew at every call;
    - :meth:`l0`: expected number of non-zero gates, ``sum sigmoid(log_alpha + 1.599)``
      (``1.599 = -beta ln(0.1 / 1.1)``), differentiable in ``log_alpha``;
    - eval: deterministic mask keeping exactly ``round(l0)`` units, those with the largest
      ``sigmoid(0.8 log_alpha / beta)``; kept units carry that value (not 1), as in the
      reference, and the physical export folds it into the next layer's weights.

    Args:
        n: number of units.
        init_drop_prob: ``p`` of the init ``log_alpha ~ N(log((1-p)/p), 0.01)``.
        min_keep: the eval mask keeps at least this many units (for groups that cannot
            be removed entirely, e.g. conv channels).
    """

    beta = 2.0 / 3.0
    low, high = -0.1, 1.1

    def __init__(self, n: int, init_drop_prob: float = 0.5, min_keep: int = 0) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"a gate needs at least one unit, got n={n}")
        if not 0.0 < init_drop_prob < 1.0:
            raise ValueError(f"init_drop_prob must be in (0, 1), got {init_drop_prob}")
        self.n, self.min_keep = n, min(min_keep, n)
        mean = math.log((1.0 - init_drop_prob) / init_drop_prob)
        self.log_alpha = nn.Parameter(torch.randn(n) * 0.01 + mean)
        self.l0_shift = -self.beta * math.log(-self.low / self.high)  # 1.599

    def l0(self) -> Tensor:
        """Expected number of kept units, a differentiable scalar in [0, n]."""
        return torch.sigmoid(self.log_alpha + self.l0_shift).sum()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """(n,) stochastic mask in [0, 1], differentiable in ``log_alpha``; the noise comes
        from ``generator`` (a CPU generator) if given, else from the global RNG."""
        eps = 1e-6
        if generator is None:
            u = torch.rand_like(self.log_alpha)
        else:
            u = torch.rand(self.n, generator=generator).to(self.log_alpha)
        u = u.clamp(eps, 1.0 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self) -> Tensor:
        """(n,) eval mask: ``max(round(l0), min_keep)`` non-zero entries, the rest exactly 0."""
        k = max(int(torch.round(self.l0()).item()), self.min_keep)
        soft = torch.sigmoid(self.log_alpha / self.beta * 0.8)
        mask = torch.zeros_like(soft)
        if k > 0:
            keep = torch.topk(soft, k).indices
            mask[keep] = soft[keep]
        return mask

    def forward(self, generator: torch.Generator | None = None) -> Tensor:
        return self.sample(generator) if self.training else self.deterministic()


@dataclass
class UnitGroup:
    """One group of prunable units and where its mask applies.

    ``site`` is the module whose input (``side="input"``) or output (``side="output"``,
    channel dim 1 of a (B, C, T) tensor or of the first element of a tuple) is multiplied by
    the mask, each mask entry repeated ``repeat`` times along the feature dim (``head_dim``
    for heads).
    """

    name: str
    kind: str  # one of KINDS
    size: int
    init_drop_prob: float
    site: nn.Module
    side: str
    repeat: int = 1
    min_keep: int = 0


#: Unit kinds: conv channels, attention heads, FFN units, whole attention / FFN blocks.
KINDS = ("conv", "heads", "ffn", "attn_layer", "ffn_layer")


class PruningSpec(ABC):
    """What a :class:`GatedModel` needs to know about one architecture."""

    #: The unit kinds this architecture can prune.
    kinds: tuple[str, ...] = ("conv", "heads", "ffn")
    #: ``p`` of the gate init per unit kind (METHODS.md: 0.01 for conv/heads, 0.5 for FFN).
    init_drop_prob = {
        "conv": 0.01,
        "heads": 0.01,
        "ffn": 0.5,
        "attn_layer": 0.01,
        "ffn_layer": 0.01,
    }
    #: Units a group keeps at least: a conv layer without channels cannot run.
    min_keep = {"conv": 1}

    def group(
        self, name: str, kind: str, size: int, site: nn.Module, side: str, repeat: int = 1
    ) -> UnitGroup:
        return UnitGroup(
            name,
            kind,
            size,
            self.init_drop_prob[kind],
            site,
            side,
            repeat,
            self.min_keep.get(kind, 0),
        )

    def layer_groups(
        self,
        i: int,
        kinds: Sequence[str],
        attn_out: nn.Module,
        num_heads: int,
        head_dim: int,
        ffn_out: nn.Module,
        ffn_units: int,
    ) -> list[UnitGroup]:
        """Head and FFN-unit groups of transformer layer ``i``: masks on the inputs of the
        attention's and the FFN's output projections."""
        out = []
        if "heads" in kinds:
            out.append(self.group(f"heads.{i}", "heads", num_heads, attn_out, "input", head_dim))
        if "ffn" in kinds:
            out.append(self.group(f"ffn.{i}", "ffn", ffn_units, ffn_out, "input"))
        return out

    @abstractmethod
    def groups(self, model: nn.Module, kinds: Sequence[str]) -> list[UnitGroup]:
        """The prunable groups of ``model`` whose kind is in ``kinds``."""

    @abstractmethod
    def param_count(self, model: nn.Module, counts: dict[str, Tensor]) -> Tensor:
        """Parameters of ``model`` if group ``g`` kept ``counts[g]`` units (float tensors,
        so the result is differentiable in them); groups not in ``counts`` stay whole."""

    @abstractmethod
    def prune_(
        self, model: nn.Module, keep: dict[str, Tensor], scale: dict[str, Tensor] | None
    ) -> None:
        """Remove in place every unit of group ``g`` not in ``keep[g]`` (sorted indices).
        ``scale[g]`` (full-size mask values), if given, is folded into the weights so the
        pruned model computes what the masked one did."""


def _count_for(counts: dict[str, Tensor], name: str, full: int) -> Tensor | float:
    return counts.get(name, float(full))


class TransformerPruning(PruningSpec):
    """Units of :class:`TransformerEncoder`: the first front-end conv's output channels
    (``conv.0``), each block's heads (``heads.i``) and FFN units (``ffn.i``).

    The second conv's output channels are not pruned: they feed the feature projection's
    LayerNorm, whose statistics over masked-to-zero channels differ from those over the
    channels left after removal (masking would not equal pruning there).
    """

    def groups(self, model: nn.Module, kinds: Sequence[str]) -> list[UnitGroup]:
        out = []
        if "conv" in kinds:
            conv = model.frontend[0]
            out.append(self.group("conv.0", "conv", conv.out_channels, model.frontend[1], "output"))
        for i, block in enumerate(model.blocks):
            attn, ffn = block.attn, block.ffn
            out += self.layer_groups(
                i, kinds, attn.out_proj, attn.num_heads, attn.head_dim, ffn.fc2, ffn.ffn_dim
            )
        return out

    def param_count(self, model: nn.Module, counts: dict[str, Tensor]) -> Tensor:
        conv1, conv2 = model.frontend[0], model.frontend[2]
        c = _count_for(counts, "conv.0", conv1.out_channels)
        k1, k2 = conv1.kernel_size[0], conv2.kernel_size[0]
        # conv1 weights + biases, and conv2's weights over its input channels.
        variable = c * (conv1.in_channels * k1 + 1) + c * conv2.out_channels * k2
        full_variable = (
            conv1.out_channels * (conv1.in_channels * k1 + 1)
            + conv1.out_channels * conv2.out_channels * k2
        )
        for i, block in enumerate(model.blocks):
            attn, ffn, dim = block.attn, block.ffn, block.attn.dim
            heads = _count_for(counts, f"heads.{i}", attn.num_heads)
            units = _count_for(counts, f"ffn.{i}", ffn.ffn_dim)
            # q/k/v weights + biases and out_proj weights per head; FFN fc1 row + bias + fc2 column per unit.
            variable = variable + heads * attn.head_dim * (4 * dim + 3) + units * (2 * dim + 1)
            full_variable += attn.num_heads * attn.head_dim * (4 * dim + 3) + ffn.ffn_dim * (
                2 * dim + 1
            )
        fixed = count_parameters(model) - full_variable
        return torch.as_tensor(variable, dtype=torch.float64) + fixed

    @torch.no_grad()
    def prune_(
        self, model: nn.Module, keep: dict[str, Tensor], scale: dict[str, Tensor] | None
    ) -> None:
        scale = scale or {}
        if "conv.0" in keep:
            idx = keep["conv.0"]
            if "conv.0" in scale:
                model.frontend[2].weight.mul_(scale["conv.0"].view(1, -1, 1))
            select_units(model.frontend[0], idx, dim=0)
            select_units(model.frontend[2], idx, dim=1)
        for i, block in enumerate(model.blocks):
            if (name := f"heads.{i}") in keep:
                if name in scale:
                    block.attn.out_proj.weight.mul_(
                        scale[name].repeat_interleave(block.attn.head_dim)
                    )
                block.attn.prune_heads(keep[name])
            if (name := f"ffn.{i}") in keep:
                if name in scale:
                    block.ffn.fc2.weight.mul_(scale[name])
                block.ffn.prune_units(keep[name])


#: Pruning specs by encoder class; an encoder module registers its own (e.g. ``speech``).
_PRUNING_SPECS: dict[type[nn.Module], type[PruningSpec]] = {}


def register_pruning_spec(encoder_cls: type[nn.Module], spec_cls: type[PruningSpec]) -> None:
    """Make ``encoder_cls`` prunable by ``prune_distill`` through ``spec_cls``."""
    _PRUNING_SPECS[encoder_cls] = spec_cls


def pruning_spec(model: nn.Module) -> PruningSpec:
    """The :class:`PruningSpec` of ``model``'s architecture."""
    for cls in type(model).__mro__:
        if cls in _PRUNING_SPECS:
            return _PRUNING_SPECS[cls]()
    supported = ", ".join(c.__name__ for c in _PRUNING_SPECS)
    raise TypeError(
        f"no structured-pruning support for {type(model).__name__} (supported: {supported})"
    )


register_pruning_spec(TransformerEncoder, TransformerPruning)


@torch.no_grad()
def select_units(layer: nn.Module, idx: Tensor, dim: int) -> None:
    """Keep output (``dim=0``) or input (``dim=1``) units ``idx`` of a Linear, Conv1d or
    per-channel GroupNorm (``dim=0`` only), in place."""
    idx = idx.to(layer.weight.device)
    if isinstance(layer, nn.GroupNorm):
        if layer.num_groups != layer.num_channels or dim != 0:
            raise ValueError(
                "only per-channel GroupNorm (num_groups == num_channels) can be pruned"
            )
        layer.weight = nn.Parameter(layer.weight[idx].clone())
        layer.bias = nn.Parameter(layer.bias[idx].clone())
        layer.num_groups = layer.num_channels = int(idx.numel())
        return
    if not isinstance(layer, nn.Linear | nn.Conv1d):
        raise TypeError(f"cannot select units of {type(layer).__name__}")
    if isinstance(layer, nn.Conv1d) and layer.groups != 1:
        raise ValueError("grouped convolutions cannot be pruned")
    requires_grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(
        layer.weight.index_select(dim, idx).clone(), requires_grad=requires_grad
    )
    if dim == 0 and layer.bias is not None:
        layer.bias = nn.Parameter(
            layer.bias.index_select(0, idx).clone(), requires_grad=requires_grad
        )
    n = int(idx.numel())
    if isinstance(layer, nn.Linear):
        if dim == 0:
            layer.out_features = n
        else:
            layer.in_features = n
    elif dim == 0:
        layer.out_channels = n
    else:
        layer.in_channels = n


def _mask_hook(group: UnitGroup, masks: dict[str, Tensor]) -> Callable[..., Any]:
    """Hook multiplying the site's input or output by the group's current mask, if any."""

    def expand(mask: Tensor, x: Tensor) -> Tensor:
        m = mask.repeat_interleave(group.repeat) if group.repeat > 1 else mask
        return m.view(1, -1, 1) if group.side == "output" else m  # (B, C, T) vs (..., F)

    if group.side == "input":

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            if (mask := masks.get(group.name)) is None:
                return None
            return (args[0] * expand(mask, args[0]), *args[1:])

        return pre_hook

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if (mask := masks.get(group.name)) is None:
            return None
        if isinstance(output, tuple):  # e.g. torchaudio's conv blocks return (x, lengths)
            return (output[0] * expand(mask, output[0]), *output[1:])
        return output * expand(mask, output)

    return hook


class GatedModel(nn.Module):
    """``model`` with a hard-concrete gate per prunable group (masks applied by hooks).

    In training mode every forward draws new masks (from the generator in :attr:`noise` if
    set, else from the global RNG); in eval mode the deterministic ones. ``model`` is used
    in place (pass a copy of a teacher).

    Args:
        model: an encoder with a :class:`PruningSpec` (see :func:`pruning_spec`).
        kinds: unit kinds to prune: any of :data:`KINDS` the architecture supports.
        base_config: the ``_target_`` config that builds ``model`` (for the export).
    """

    def __init__(self, model: nn.Module, kinds: Sequence[str], base_config: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.spec = pruning_spec(model)
        if set(kinds) - set(self.spec.kinds) or not kinds:
            raise ValueError(
                f"prune kinds must be a non-empty subset of {list(self.spec.kinds)} for "
                f"{type(model).__name__}, got {list(kinds)}"
            )
        self.base_config = dict(self_contained_config(model, base_config))
        self.groups = self.spec.groups(model, kinds)
        self.gates = nn.ModuleDict(
            {
                g.name.replace(".", "_"): HardConcreteGate(g.size, g.init_drop_prob, g.min_keep)
                for g in self.groups
            }
        )
        self.full_params = count_parameters(model)
        self._masks: dict[str, Tensor] = {}
        self.noise: torch.Generator | None = None
        for group in self.groups:
            hook = _mask_hook(group, self._masks)
            if group.side == "input":
                group.site.register_forward_pre_hook(hook)
            else:
                group.site.register_forward_hook(hook)

    def gate(self, name: str) -> HardConcreteGate:
        return self.gates[name.replace(".", "_")]

    def _run(self, fn: Callable[[], Any]) -> Any:
        self._masks.update({g.name: self.gate(g.name)(self.noise) for g in self.groups})
        try:
            return fn()
        finally:
            self._masks.clear()

    def forward_hidden_states(self, x: Tensor, *args: Tensor) -> list[Tensor]:
        """The wrapped model's ``forward_hidden_states`` under one draw of the masks
        (``args``: e.g. the lengths a waveform encoder takes)."""
        return self._run(lambda: self.model.forward_hidden_states(x, *args))

    def forward(self, x: Tensor, *args: Tensor) -> Tensor:
        return self._run(lambda: self.model(x, *args))

    def expected_counts(self) -> dict[str, Tensor]:
        # float64: parameter counts near 1e8 are not exact in float32.
        return {g.name: self.gate(g.name).l0().double() for g in self.groups}

    def expected_params(self) -> Tensor:
        """Expected parameter count of the pruned model, differentiable in the gates."""
        return self.spec.param_count(self.model, self.expected_counts())

    def expected_sparsity(self) -> Tensor:
        """``1 - expected params / params of the unpruned model``."""
        return (1.0 - self.expected_params() / self.full_params).float()

    def kept_by_kind(self) -> dict[str, float]:
        """Expected kept units summed per kind (``conv``, ``heads``, ...)."""
        out: dict[str, float] = {}
        for g in self.groups:
            out[g.kind] = out.get(g.kind, 0.0) + float(self.gate(g.name).l0().detach())
        return out

    @torch.no_grad()
    def deterministic_params(self) -> int:
        """Parameter count implied by the eval masks: exactly what :meth:`export` yields."""
        counts = {
            g.name: torch.count_nonzero(self.gate(g.name).deterministic()).double()
            for g in self.groups
        }
        return int(round(float(self.spec.param_count(self.model, counts))))

    @torch.no_grad()
    def export(self) -> tuple[nn.Module, dict[str, Any]]:
        """Physically pruned copy (deterministic masks folded in, no gates) and its config."""
        masks = {g.name: self.gate(g.name).deterministic() for g in self.groups}
        keep = {name: torch.nonzero(m).flatten() for name, m in masks.items()}
        pruned = copy.deepcopy(self.model)
        for module in pruned.modules():  # the copy must not carry the gates' hooks
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        self.spec.prune_(pruned, keep, masks)
        config = {
            "_target_": "distillery.models.pruning.build_pruned",
            "_recursive_": False,  # `base` is built by build_pruned itself
            "base": self.base_config,
            "kept": {name: int(idx.numel()) for name, idx in keep.items()},
        }
        return pruned, config


def build_pruned(base: dict[str, Any], kept: dict[str, int]) -> nn.Module:
    """The architecture of ``base`` with group ``g`` cut to ``kept[g]`` units (weights
    arbitrary; load them from the artifact)."""
    model = build_encoder(base)
    spec = pruning_spec(model)
    groups = {g.name: g for g in spec.groups(model, {name.split(".")[0] for name in kept})}
    for name, n in kept.items():
        if name not in groups or not groups[name].min_keep <= n <= groups[name].size:
            bounds = f"[{groups[name].min_keep}, {groups[name].size}]" if name in groups else None
            raise ValueError(
                f"kept.{name}={n}: no such group or outside {bounds} (groups: {sorted(groups)})"
            )
    spec.prune_(model, {name: torch.arange(n) for name, n in kept.items()}, None)
    return model


def load_pruned(path: str | os.PathLike) -> nn.Module:
    """The pruned encoder exported by the ``prune_distill``/``final_distill`` stages: a plain
    ``nn.Module`` without gates, weights loaded strictly."""
    payload = load_tensors(path)
    target = payload.get("config", {}).get("_target_") if isinstance(payload, dict) else None
    if target != "distillery.models.pruning.build_pruned":
        raise ValueError(
            f"{os.fspath(path)} is not a pruned-model artifact (its config builds {target!r})"
        )
    check_artifact_config(payload["config"], path)
    model = build_encoder(payload["config"])
    model.load_state_dict(payload["state_dict"], strict=True)
    return model
