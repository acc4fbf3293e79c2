"""Speech-model weights from the files users have, as torchaudio ``Wav2Vec2Model`` state dicts.

Formats, detected from the path:

- **Hugging Face** model directory: ``config.json`` (``model_type`` hubert, wav2vec2 or
  wavlm) and ``model.safetensors`` / ``pytorch_model.bin`` (or their sharded ``*.index.json``
  form). Base models and the ``*ForCTC`` / ``*ForPreTraining`` wrappers (their heads are
  ignored). ``transformers`` is not needed.
- **fairseq** checkpoint: a dict with ``cfg`` (or ``args``) and ``model``, as fairseq saves
  pretraining checkpoints of HuBERT and wav2vec 2.0, and the WavLM release does.
  fairseq is not needed, but the file must load with ``torch.load(weights_only=True)``:
  the config as plain dicts (newer fairseq saves it so), no pickled ``argparse.Namespace``
  and no other objects. Fine-tuned (``w2v_encoder.*``) checkpoints are not supported.
- **torchaudio** state dict of ``Wav2Vec2Model`` (``feature_extractor.*``, ``encoder.*``),
  optionally under ``model.``; it has no architecture, so ``arch`` must name one.
- a distillery ``encoder.pt`` of a :class:`~distillery.models.speech.SpeechEncoder`.

Every file is read as data (``weights_only=True``, safetensors); nothing in it is executed.
"""

from __future__ import annotations

import ast
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distillery.models.speech import PRESETS, SHAPE_KEYS, build_architecture, check_architecture

__all__ = ["WeightsError", "check_weights", "detect_format", "load_state", "read_weights"]


class WeightsError(ValueError):
    """A weights file that is missing, of an unknown format, or does not fit."""


def _fail(path: str | os.PathLike, message: str) -> WeightsError:
    return WeightsError(f"weights {os.fspath(path)}: {message}")


def _torch_load(path: Path) -> Any:
    # mmap: a start-up check reads shapes, not gigabytes; files in torch's pre-1.6 format
    # cannot be mapped and are read whole.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - pickle, zip and unpickler errors alike
        raise _fail(
            path,
            "cannot be read with torch.load(weights_only=True) (fairseq checkpoints must hold "
            "their config as plain dicts; re-save as {'cfg': cfg_dict, 'model': state_dict}): "
            f"{str(err).splitlines()[0]}",
        ) from err


def detect_format(path: str | os.PathLike) -> str:
    """``huggingface``, ``fairseq``, ``torchaudio`` or ``distillery`` (see the module doc)."""
    return _read(Path(path))[0]


def read_weights(
    path: str | os.PathLike, arch: str | None
) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
    """(architecture or ``None``, torchaudio state dict) of the file at ``path``.

    With ``arch``, an architecture read from the file must have the preset's shapes.
    """
    _, file_arch, state = _read(Path(path))
    if file_arch is not None and arch is not None:
        preset = PRESETS[arch]
        if diff := {
            k: (file_arch.get(k), preset.get(k))
            for k in SHAPE_KEYS
            if file_arch.get(k) != preset.get(k)
        }:
            raise _fail(path, f"its architecture is not {arch}: (file, {arch}) differ in {diff}")
    return file_arch, state


def resolve(
    arch: str | None, weights: str | os.PathLike | None, architecture: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """The full architecture and the state dict (``None`` without ``weights``) that
    ``SpeechEncoder(arch, weights, architecture)`` builds and loads."""
    if arch is not None and arch not in PRESETS:
        raise ValueError(f"arch must be one of {sorted(PRESETS)}, got {arch!r}")
    file_arch, state = read_weights(weights, arch) if weights is not None else (None, None)
    resolved = file_arch or (dict(PRESETS[arch]) if arch else {})
    if not resolved and not architecture:
        where = (
            f"weights {os.fspath(weights)} (a torchaudio state dict)"
            if weights
            else "SpeechEncoder"
        )
        raise WeightsError(f"{where}: no architecture; set arch (e.g. hubert_base) or architecture")
    try:
        return check_architecture(resolved | dict(architecture or {})), state
    except ValueError as err:
        raise (_fail(weights, str(err)) if weights else err) from err


def check_weights(
    path: str | os.PathLike, arch: str | None = None, architecture: dict[str, Any] | None = None
) -> None:
    """Raise :class:`WeightsError` naming ``path`` unless it loads into the encoder that
    ``SpeechEncoder(arch, path, architecture)`` builds: format, architecture, every key and
    shape (compared on the meta device: no weights are allocated)."""
    full, state = resolve(arch, path, architecture)
    with torch.device("meta"):
        model = build_architecture(full)
    _check_fit(model, state, path)


def load_state(model: nn.Module, state: dict[str, Tensor], path: str | os.PathLike) -> None:
    """Load ``state`` into torchaudio ``model`` strictly, naming ``path`` on any mismatch."""
    _check_fit(model, state, path)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)


def _check_fit(model: nn.Module, state: dict[str, Tensor], path: str | os.PathLike) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {items[:5]}{more}")
    if problems:
        raise _fail(path, "does not fit the architecture; " + "; ".join(problems))


# --- reading each format ---------------------------------------------------------------------


def _read(path: Path) -> tuple[str, dict[str, Any] | None, dict[str, Tensor]]:
    if not path.exists():
        raise _fail(path, "no such file or directory")
    if path.is_dir():
        arch, state = _read_huggingface(path)
        return "huggingface", arch, state
    payload = _torch_load(path)
    if not isinstance(payload, dict):
        raise _fail(path, f"expected a dict, found {type(payload).__name__}")
    if "model" in payload and ("cfg" in payload or "args" in payload):
        arch, state = _read_fairseq(path, payload)
        return "fairseq", arch, state
    if "state_dict" in payload and "config" in payload:
        arch = (
            payload["config"].get("architecture") if isinstance(payload["config"], dict) else None
        )
        if arch is None:
            raise _fail(
                path, "is a distillery artifact of another encoder (load it with load_encoder)"
            )
        state = {_strip(k, "model."): v for k, v in payload["state_dict"].items()}
        return "distillery", arch, state
    if payload and all(isinstance(v, Tensor) for v in payload.values()):
        state = {_strip(k, "model."): v for k, v in payload.items()}
        if any(k.startswith(("feature_projection.", "encoder.layers.")) for k in state):
            raise _fail(
                path,
                "looks like a Hugging Face state dict; pass the model directory (with its "
                "config.json) instead",
            )
        return "torchaudio", None, state
    raise _fail(
        path,
        "unknown format: expected a Hugging Face model directory, a fairseq checkpoint "
        f"({{'cfg', 'model'}}) or a torchaudio state dict; found keys {sorted(payload)[:8]}",
    )


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def _fuse_wavlm_qkv(state: dict[str, Tensor], layers: int) -> None:
    """Separate q/k/v projections -> the ``in_proj`` of torchaudio's WavLM attention."""
    for i in range(layers):
        p = f"encoder.transformer.layers.{i}.attention."
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{p}{n}_proj.{kind}", None) for n in "qkv"]
            if all(t is not None for t in parts):
                state[f"{p}attention.in_proj_{kind}"] = torch.cat(parts)
            out = state.pop(f"{p}out_proj.{kind}", None)
            if out is not None:
                state[f"{p}attention.out_proj.{kind}"] = out


# Hugging Face: heads of the task wrappers, and pretraining-only parameters.
_HF_IGNORED = re.compile(
    r"^(masked_spec_embed|lm_head\.|quantizer\.|project_q\.|project_hid\.|projector\.|"
    r"classifier\.|label_embeddings|final_proj\.|dropout_features)"
)


def _read_huggingface(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise _fail(path, "a directory without config.json is not a Hugging Face model")
    config = json.loads(config_file.read_text())
    arch = _hf_architecture(path, config)
    raw = _hf_state(path)
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        for prefix in ("hubert.", "wav2vec2.", "wavlm."):
            key = _strip(key, prefix)
        if _HF_IGNORED.match(key):
            continue
        if key.startswith("feature_projection."):
            key = "encoder." + key
        elif key.startswith("encoder."):
            key = "encoder.transformer." + key[len("encoder.") :]
        key = key.replace("conv.weight_g", "conv.parametrizations.weight.original0")
        key = key.replace("conv.weight_v", "conv.parametrizations.weight.original1")
        state[key] = value
    if arch["family"] == "wavlm":
        _fuse_wavlm_qkv(state, arch["encoder_num_layers"])
    return arch, state


def _hf_state(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        shards = [path / single]
        if (path / index_name).is_file():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            shards = [path / name for name in sorted(set(weight_map.values()))]
        if all(s.is_file() for s in shards):
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(
                    load_file(shard) if shard.suffix == ".safetensors" else _torch_load(shard)
                )
            return state
    raise _fail(path, "no model.safetensors or pytorch_model.bin (or their index) in the directory")


def _hf_architecture(path: Path, c: dict[str, Any]) -> dict[str, Any]:
    family = c.get("model_type")
    if family not in ("hubert", "wav2vec2", "wavlm"):
        raise _fail(
            path, f"config.json model_type must be hubert, wav2vec2 or wavlm, got {family!r}"
        )
    unsupported = {
        "feat_extract_norm": ("group", "layer"),
        "feat_proj_layer_norm": (True,),
        "conv_pos_batch_norm": (False,),
        "add_adapter": (False,),
        "hidden_act": ("gelu",),
        "feat_extract_activation": ("gelu",),
        "layer_norm_eps": (1e-5,),
    }
    for key, allowed in unsupported.items():
        if key in c and c[key] not in allowed:
            raise _fail(
                path, f"config.json {key}={c[key]!r} is not supported (supported: {list(allowed)})"
            )
    try:
        arch = {
            "family": family,
            "extractor_mode": f"{c.get('feat_extract_norm', 'group')}_norm",
            "extractor_conv_layer_config": [
                list(t) for t in zip(c["conv_dim"], c["conv_kernel"], c["conv_stride"], strict=True)
            ],
            "extractor_conv_bias": c.get("conv_bias", False),
            "encoder_embed_dim": c["hidden_size"],
            "encoder_projection_dropout": c.get("feat_proj_dropout", 0.0),
            "encoder_pos_conv_kernel": c["num_conv_pos_embeddings"],
            "encoder_pos_conv_groups": c["num_conv_pos_embedding_groups"],
            "encoder_num_layers": c["num_hidden_layers"],
            "encoder_num_heads": c["num_attention_heads"],
            "encoder_attention_dropout": c.get("attention_dropout", 0.1),
            "encoder_ff_interm_features": c["intermediate_size"],
            "encoder_ff_interm_dropout": c.get("activation_dropout", 0.1),
            "encoder_dropout": c.get("hidden_dropout", 0.1),
            "encoder_layer_norm_first": c.get("do_stable_layer_norm", False),
        }
    except (KeyError, ValueError) as err:
        raise _fail(path, f"config.json lacks or mismatches {err}") from err
    if family == "wavlm":
        arch["encoder_num_buckets"] = c.get("num_buckets", 320)
        arch["encoder_max_distance"] = c.get("max_bucket_distance", 800)
    return arch


# fairseq parameter names -> torchaudio's (as torchaudio's import_fairseq_model maps them),
# plus the WavLM release's gated relative-position attention.
_FAIRSEQ_KEYS = [
    (
        r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)",
        r"feature_extractor.conv_layers.0.layer_norm.\1",
    ),
    (
        r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)",
        r"feature_extractor.conv_layers.\1.conv.\2",
    ),
    (
        r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)",
        r"feature_extractor.conv_layers.\1.layer_norm.\2",
    ),
    (r"post_extract_proj\.(weight|bias)", r"encoder.feature_projection.projection.\1"),
    (r"layer_norm\.(weight|bias)", r"encoder.feature_projection.layer_norm.\1"),
    (r"encoder\.pos_conv\.0\.bias", r"encoder.transformer.pos_conv_embed.conv.bias"),
    (
        r"encoder\.pos_conv\.0\.weight_g",
        r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0",
    ),
    (
        r"encoder\.pos_conv\.0\.weight_v",
        r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1",
    ),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.transformer.layer_norm.\1"),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.((?:k|v|q|out)_proj\.(?:weight|bias))",
        r"encoder.transformer.layers.\1.attention.\2",
    ),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.grep_linear\.(weight|bias)",
        r"encoder.transformer.layers.\1.attention.gru_rel_pos_linear.\2",
    ),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.grep_a",
        r"encoder.transformer.layers.\1.attention.gru_rel_pos_const",
    ),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight",
        r"encoder.transformer.layers.\1.attention.rel_attn_embed.weight",
    ),
    (
        r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)",
        r"encoder.transformer.layers.\1.layer_norm.\2",
    ),
    (
        r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)",
        r"encoder.transformer.layers.\1.feed_forward.intermediate_dense.\2",
    ),
    (
        r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)",
        r"encoder.transformer.layers.\1.feed_forward.output_dense.\2",
    ),
    (
        r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)",
        r"encoder.transformer.layers.\1.final_layer_norm.\2",
    ),
]
# Pretraining-only parameters: mask embedding, quantizer, target projections, label embeddings.
_FAIRSEQ_IGNORED = re.compile(r"^(mask_emb|quantizer\.|project_q\.|final_proj\.|label_embs_concat)")


def _read_fairseq(path: Path, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg = payload.get("cfg")
    if isinstance(cfg, dict):  # fairseq nests the model's config, the WavLM release does not
        model_cfg = cfg["model"] if isinstance(cfg.get("model"), dict) else cfg
    else:
        model_cfg = payload.get("args")
    if not isinstance(model_cfg, dict):
        raise _fail(path, "fairseq checkpoint without a model config dict (cfg.model or args)")
    if "w2v_args" in model_cfg or "w2v_path" in model_cfg:
        raise _fail(
            path, "fine-tuned fairseq checkpoints are not supported; use the pretrained one"
        )
    arch = _fairseq_architecture(path, model_cfg)
    state: dict[str, Tensor] = {}
    unknown = []
    for key, value in payload["model"].items():
        if _FAIRSEQ_IGNORED.match(key):
            continue
        for pattern, target in _FAIRSEQ_KEYS:
            if re.fullmatch(pattern, key):
                state[re.sub(pattern, target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise _fail(path, f"unknown fairseq parameters {unknown[:5]}")
    if arch["family"] == "wavlm":
        _fuse_wavlm_qkv(state, arch["encoder_num_layers"])
    return arch, state


def _conv_layers(spec: str, path: Path) -> list[list[int]]:
    """fairseq's ``conv_feature_layers`` string, e.g. ``[(512,10,5)] + [(512,3,2)] * 4``,
    evaluated without ``eval``: only list/tuple literals of ints, ``+`` and ``*``."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List | ast.Tuple):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise _fail(path, f"conv_feature_layers {spec!r} is not a list expression")

    return [list(layer) for layer in value(ast.parse(spec, mode="eval").body)]


def _fairseq_architecture(path: Path, c: dict[str, Any]) -> dict[str, Any]:
    name = str(c.get("_name") or c.get("arch") or "")
    family = (
        "wavlm"
        if c.get("relative_position_embedding")
        else "hubert"
        if "hubert" in name
        else "wav2vec2"
    )
    if family == "wavlm" and not c.get("gru_rel_pos", True):
        raise _fail(
            path, "WavLM without gated relative positions (gru_rel_pos=false) is not supported"
        )
    mode = c.get("extractor_mode", "default")
    if mode not in ("default", "layer_norm"):
        raise _fail(path, f"extractor_mode {mode!r} is not supported")
    arch = {
        "family": family,
        "extractor_mode": "group_norm" if mode == "default" else "layer_norm",
        "extractor_conv_layer_config": _conv_layers(
            c.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"), path
        ),
        "extractor_conv_bias": c.get("conv_bias", False),
        "encoder_embed_dim": c.get("encoder_embed_dim", 768),
        "encoder_projection_dropout": c.get("dropout_input", 0.0),
        "encoder_pos_conv_kernel": c.get("conv_pos", 128),
        "encoder_pos_conv_groups": c.get("conv_pos_groups", 16),
        "encoder_num_layers": c.get("encoder_layers", 12),
        "encoder_num_heads": c.get("encoder_attention_heads", 12),
        "encoder_attention_dropout": c.get("attention_dropout", 0.1),
        "encoder_ff_interm_features": c.get("encoder_ffn_embed_dim", 3072),
        "encoder_ff_interm_dropout": c.get("activation_dropout", 0.0),
        "encoder_dropout": c.get("dropout", 0.1),
        "encoder_layer_norm_first": c.get("layer_norm_first", False),
    }
    if family == "wavlm":
        arch["encoder_num_buckets"] = c.get("num_buckets", 320)
        arch["encoder_max_distance"] = c.get("max_distance", 1280)
    return arch
