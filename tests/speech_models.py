"""Tiny random-weight HuBERT / wav2vec 2.0 / WavLM models written in the formats users have.

The models come from ``transformers`` (no download); the fairseq checkpoint is written as
fairseq lays out its pretraining checkpoints (``{"cfg": {"model": ...}, "model": ...}``,
fairseq's parameter names, configs as plain dicts), without fairseq.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

FAMILIES = ("hubert", "wav2vec2", "wavlm")

#: Small enough for seconds-long tests; 3 conv layers (16 channels), 2 transformer layers.
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "conv_dim": (16, 16, 16),
    "conv_kernel": (10, 3, 3),
    "conv_stride": (5, 2, 2),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
}


def hf_model(family: str, large: bool = False, seed: int = 0, **overrides: Any) -> nn.Module:
    """A random-weight ``HubertModel`` / ``Wav2Vec2Model`` / ``WavLMModel`` in eval mode.
    ``large``: the Large layout (LayerNorm front-end with conv bias, pre-LN transformer)."""
    import transformers

    config_cls, model_cls = {
        "hubert": (transformers.HubertConfig, transformers.HubertModel),
        "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
        "wavlm": (transformers.WavLMConfig, transformers.WavLMModel),
    }[family]
    layout = {"feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True}
    config = config_cls(**TINY, **(layout if large else {}), **overrides)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "gru_rel_pos_const" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def write_huggingface(model: nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def write_torchaudio(model: nn.Module, path: Path) -> Path:
    """torchaudio's own conversion of the HF model, saved as a plain state dict."""
    from torchaudio.models.wav2vec2.utils import import_huggingface_model

    torch.save(import_huggingface_model(model).state_dict(), path)
    return path


_TO_FAIRSEQ = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"feature_projection\.projection\.", "post_extract_proj."),
    (r"feature_projection\.layer_norm\.", "layer_norm."),
    (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
    (
        r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0",
        "encoder.pos_conv.0.weight_g",
    ),
    (
        r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1",
        "encoder.pos_conv.0.weight_v",
    ),
    (
        r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.",
        r"encoder.layers.\1.self_attn.grep_linear.",
    ),
    (
        r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const",
        r"encoder.layers.\1.self_attn.grep_a",
    ),
    (
        r"encoder\.layers\.(\d+)\.attention\.rel_attn_embed\.",
        r"encoder.layers.\1.self_attn.relative_attention_bias.",
    ),
    (r"encoder\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
    (r"encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
]


def write_fairseq(model: nn.Module, path: Path, family: str) -> Path:
    """The HF model as a fairseq pretraining checkpoint, loadable with weights_only=True."""
    c = model.config
    large = c.do_stable_layer_norm
    state = {}
    for key, value in model.state_dict().items():
        if key == "masked_spec_embed":
            continue
        if m := re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(\w+)", key):
            # fairseq: GroupNorm at index 2 of layer 0; LayerNorm inside a Sequential at 2.1.
            key = f"feature_extractor.conv_layers.{m[1]}.2{'.1' if large else ''}.{m[2]}"
        for pattern, target in _TO_FAIRSEQ:
            key = re.sub(f"^{pattern}", target, key)
        state[key] = value.clone()
    state["mask_emb"] = torch.randn(c.hidden_size)  # pretraining-only parameters, ignored
    state["final_proj.weight"] = torch.randn(8, c.hidden_size)
    conv = " + ".join(
        f"[({d}, {k}, {s})]"
        for d, k, s in zip(c.conv_dim, c.conv_kernel, c.conv_stride, strict=True)
    )
    cfg = {
        "_name": "hubert" if family == "hubert" else "wav2vec2",
        "extractor_mode": "layer_norm" if large else "default",
        "conv_feature_layers": conv,
        "conv_bias": c.conv_bias,
        "encoder_embed_dim": c.hidden_size,
        "encoder_layers": c.num_hidden_layers,
        "encoder_attention_heads": c.num_attention_heads,
        "encoder_ffn_embed_dim": c.intermediate_size,
        "layer_norm_first": large,
        "conv_pos": c.num_conv_pos_embeddings,
        "conv_pos_groups": c.num_conv_pos_embedding_groups,
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "dropout_input": 0.1,
    }
    if family == "wavlm":  # the WavLM release: a flat model config
        cfg |= {
            "relative_position_embedding": True,
            "num_buckets": c.num_buckets,
            "max_distance": c.max_bucket_distance,
            "gru_rel_pos": True,
        }
        payload = {"cfg": cfg, "model": state}
    else:
        payload = {"cfg": {"model": cfg, "task": {"sample_rate": 16000}}, "model": state}
    torch.save(payload, path)
    return path


def write(model: nn.Module, family: str, fmt: str, tmp_path: Path) -> Path:
    """Write ``model`` in format ``fmt`` (huggingface, fairseq or torchaudio) under tmp_path."""
    if fmt == "huggingface":
        return write_huggingface(model, tmp_path / f"{family}-hf")
    if fmt == "fairseq":
        return write_fairseq(model, tmp_path / f"{family}-fairseq.pt", family)
    return write_torchaudio(model, tmp_path / f"{family}-torchaudio.pt")


def tiny_architecture(family: str, large: bool = False) -> dict[str, Any]:
    """The ``SpeechEncoder`` architecture of :func:`hf_model` (for torchaudio state dicts)."""
    arch = {
        "family": family,
        "extractor_mode": "layer_norm" if large else "group_norm",
        "extractor_conv_layer_config": [
            list(t)
            for t in zip(TINY["conv_dim"], TINY["conv_kernel"], TINY["conv_stride"], strict=True)
        ],
        "extractor_conv_bias": large,
        "encoder_embed_dim": TINY["hidden_size"],
        "encoder_projection_dropout": 0.0,
        "encoder_pos_conv_kernel": TINY["num_conv_pos_embeddings"],
        "encoder_pos_conv_groups": TINY["num_conv_pos_embedding_groups"],
        "encoder_num_layers": TINY["num_hidden_layers"],
        "encoder_num_heads": TINY["num_attention_heads"],
        "encoder_attention_dropout": 0.1,
        "encoder_ff_interm_features": TINY["intermediate_size"],
        "encoder_ff_interm_dropout": 0.1,
        "encoder_dropout": 0.1,
        "encoder_layer_norm_first": large,
    }
    if family == "wavlm":
        arch |= {"encoder_num_buckets": 320, "encoder_max_distance": 800}
    return arch
