"""Batches of clips of different lengths, for waveform encoders that take ``lengths``."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

__all__ = ["pad_waveforms"]


def pad_waveforms(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate items whose ``audio`` (samples,) differ in length.

    Returns ``audio`` (B, longest) zero-padded at the end, ``length`` (B,) int64 valid
    samples, ``attention_mask`` (B, longest) bool (``True`` on valid samples), and every
    other key collated as usual. Feed ``encoder(audio, length)``: a
    :class:`~distillery.models.speech.SpeechEncoder` then ignores the padding.
    """
    if not items:
        raise ValueError("pad_waveforms: empty batch")
    waves = [torch.as_tensor(item["audio"]) for item in items]
    if any(w.dim() != 1 for w in waves):
        raise ValueError(
            f"pad_waveforms expects 1-D audio, got shapes {[tuple(w.shape) for w in waves]}"
        )
    length = torch.tensor([len(w) for w in waves], dtype=torch.int64)
    audio = waves[0].new_zeros(len(waves), int(length.max()))
    for i, w in enumerate(waves):
        audio[i, : len(w)] = w
    rest = default_collate(
        [{k: v for k, v in item.items() if k not in ("audio", "length")} for item in items]
    )
    mask = torch.arange(audio.shape[1])[None, :] < length[:, None]
    return {**rest, "audio": audio, "length": length, "attention_mask": mask}
