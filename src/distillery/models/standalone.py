"""Speech encoders saved in forms that load without distillery.

- :func:`export_program`: a ``torch.export`` program (``encoder.pt2``) and its description
  (``encoder.json``). Load with torch alone::

      program = torch.export.load("encoder.pt2").module()
      embedding, hidden_states = program(audio, lengths)

  ``audio`` (B, samples) float32 16 kHz waveforms, zero-padded; ``lengths`` (B,) int64 valid
  samples; ``embedding`` (B, D) hidden state ``embedding_layer`` pooled over valid frames;
  ``hidden_states`` (layers + 1, B, frames, D). Batch size and length are dynamic.
- :func:`save_huggingface`: a Hugging Face model directory (``config.json`` +
  ``model.safetensors``) for ``transformers``' ``AutoModel``. Only for unpruned
  architectures: Hugging Face configs give every layer the same number of heads (of width
  ``hidden_size / heads``) and FFN units, which a pruned model no longer has.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from distillery import artifacts

if TYPE_CHECKING:
    from distillery.models.speech import SpeechEncoder

__all__ = ["export_program", "hf_representable", "save_huggingface", "standalone_artifacts"]


class _Program(nn.Module):
    """The exported signature: (audio, lengths) -> (embedding, stacked hidden states)."""

    def __init__(self, encoder: SpeechEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        states = self.encoder.forward_hidden_states(audio, lengths)
        embedding = self.encoder.pool(states[self.encoder.embedding_layer], lengths)
        return embedding, torch.stack(states)


@torch.no_grad()
def export_program(
    encoder: SpeechEncoder, directory: str | os.PathLike, config: dict[str, Any]
) -> Path:
    """Write ``encoder.pt2`` and ``encoder.json`` into ``directory``; return the program's path.

    ``config`` is the encoder's distillery config, recorded in the json for reference only.
    The encoder is exported in eval mode on the CPU (a copy; ``encoder`` is not changed).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = _Program(copy.deepcopy(encoder).cpu().eval())
    sample_rate = 16000
    audio = torch.randn(2, sample_rate)
    lengths = torch.tensor([sample_rate, 3 * sample_rate // 4])
    batch = torch.export.Dim("batch", min=1, max=4096)
    samples = torch.export.Dim.AUTO  # its lower bound follows from the conv front-end
    program = torch.export.export(
        model,
        (audio, lengths),
        dynamic_shapes={"audio": {0: batch, 1: samples}, "lengths": {0: batch}},
        strict=False,
    )
    path = directory / "encoder.pt2"
    with artifacts.atomic_open(path) as f:
        torch.export.save(program, f)
    num_states = len(encoder.model.encoder.transformer.layers) + 1
    artifacts.write_json(
        directory / "encoder.json",
        {
            "format": "torch.export",
            "program": path.name,
            "load": "torch.export.load(program).module()(audio, lengths)",
            "inputs": {
                "audio": "(B, samples) float32, 16 kHz mono, zero-padded",
                "lengths": "(B,) int64, valid samples of each row",
            },
            "outputs": {
                "embedding": (
                    f"(B, {encoder.embed_dim}) {encoder.pooling} of hidden state "
                    f"{encoder.embedding_layer} over valid frames"
                ),
                "hidden_states": f"({num_states}, B, frames, {encoder.embed_dim})",
            },
            "sample_rate": sample_rate,
            "embed_dim": encoder.embed_dim,
            "num_hidden_states": num_states,
            "torch_version": torch.__version__,
            "config": config,
        },
    )
    return path


def hf_representable(encoder: SpeechEncoder) -> bool:
    """Whether every weight still has the shape of ``encoder.architecture`` (not pruned)."""
    from distillery.models.speech import build_architecture

    with torch.device("meta"):
        full = build_architecture(encoder.architecture).state_dict()
    state = encoder.model.state_dict()
    return set(full) == set(state) and all(full[k].shape == state[k].shape for k in full)


_HF_CLASSES = {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model", "wavlm": "WavLMModel"}


def save_huggingface(encoder: SpeechEncoder, directory: str | os.PathLike) -> Path:
    """Write a Hugging Face model directory; raises for a pruned architecture (see the module doc)."""
    from safetensors.torch import save

    if not hf_representable(encoder):
        raise ValueError(
            "a pruned encoder has no Hugging Face config (heads and FFN units differ per "
            "layer); use export_program"
        )
    arch = encoder.architecture
    family = arch["family"]
    conv = arch["extractor_conv_layer_config"]
    config = {
        "model_type": family,
        "architectures": [_HF_CLASSES[family]],
        "conv_dim": [c[0] for c in conv],
        "conv_kernel": [c[1] for c in conv],
        "conv_stride": [c[2] for c in conv],
        "num_feat_extract_layers": len(conv),
        "conv_bias": arch["extractor_conv_bias"],
        "feat_extract_norm": arch["extractor_mode"].removesuffix("_norm"),
        "feat_extract_activation": "gelu",
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "hidden_size": arch["encoder_embed_dim"],
        "num_hidden_layers": arch["encoder_num_layers"],
        "num_attention_heads": arch["encoder_num_heads"],
        "intermediate_size": arch["encoder_ff_interm_features"],
        "num_conv_pos_embeddings": arch["encoder_pos_conv_kernel"],
        "num_conv_pos_embedding_groups": arch["encoder_pos_conv_groups"],
        "do_stable_layer_norm": arch["encoder_layer_norm_first"],
        "feat_proj_dropout": arch["encoder_projection_dropout"],
        "attention_dropout": arch["encoder_attention_dropout"],
        "activation_dropout": arch["encoder_ff_interm_dropout"],
        "hidden_dropout": arch["encoder_dropout"],
        "layerdrop": 0.0,
    }
    if family == "hubert":
        config["feat_proj_layer_norm"] = True
    if family == "wavlm":
        config["num_buckets"] = arch["encoder_num_buckets"]
        config["max_bucket_distance"] = arch["encoder_max_distance"]
    state: dict[str, Tensor] = {}
    width = arch["encoder_embed_dim"]
    for key, value in encoder.model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if key.startswith("encoder.feature_projection."):
            key = key[len("encoder.") :]
        elif key.startswith("encoder.transformer."):
            key = "encoder." + key[len("encoder.transformer.") :]
        if ".attention.attention.in_proj_" in key:  # WavLM: torchaudio fuses q, k and v
            prefix, kind = key.split(".attention.attention.in_proj_")
            for name, part in zip("qkv", value.split(width), strict=True):
                state[f"{prefix}.attention.{name}_proj.{kind}"] = part.clone()
            continue
        state[key.replace(".attention.attention.out_proj.", ".attention.out_proj.")] = value
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    artifacts.write_bytes(directory / "model.safetensors", save(state, metadata={"format": "pt"}))
    artifacts.write_json(directory / "config.json", config)
    return directory


def standalone_artifacts(encoder: nn.Module | None, config: dict[str, Any]) -> dict[str, Any]:
    """A stage's speech encoder as the ``standalone`` artifact and, when unpruned, the
    ``huggingface`` one (by name); other encoders: none."""
    from distillery.artifact_kinds import HuggingFaceEncoder, StandaloneEncoder

    # A speech encoder exists only if its module (and torchaudio) was imported.
    speech = sys.modules.get("distillery.models.speech")
    if speech is None or not isinstance(encoder, speech.SpeechEncoder):
        return {}
    exported: dict[str, Any] = {"standalone": StandaloneEncoder(encoder, config)}
    if hf_representable(encoder):
        exported["huggingface"] = HuggingFaceEncoder(encoder)
    return exported
