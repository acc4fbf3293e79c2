"""Waveform encoders in every stage that takes an encoder, and frame-level distillation
losses that ignore the padding of variable-length batches."""

from __future__ import annotations

import pytest
import torch
from tests.speech_models import tiny_architecture

from distillery.data.padding import pad_waveforms
from distillery.stages.final_distill import FinalDistillStage
from distillery.stages.prune_distill import PruneDistillStage


def speech_config(family: str = "hubert", **kwargs: object) -> dict:
    """A tiny random ``SpeechEncoder`` (2 layers, width 32) as an encoder config."""
    return {
        "_target_": "distillery.models.speech.SpeechEncoder",
        "architecture": tiny_architecture(family),
        **kwargs,
    }


def clips(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=generator) for n in lengths]


def _distill_stage(kind: str) -> FinalDistillStage | PruneDistillStage:
    torch.manual_seed(0)
    if kind == "final_distill":
        return FinalDistillStage(
            teacher=speech_config(),
            student_encoder=speech_config(),  # its own random weights
            distill_layers=[0, 1, 2],
        )
    stage = PruneDistillStage(
        teacher=speech_config(), distill_layers=[0, 1, 2], prune=["heads", "ffn"]
    )
    with torch.no_grad():  # a student that differs from its teacher
        for p in stage.gated.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return stage


@pytest.mark.parametrize("kind", ["final_distill", "prune_distill"])
def test_layer_loss_of_a_padded_batch_is_the_length_weighted_loss_of_its_clips(
    kind: str, one_thread
) -> None:
    """The layer loss is a mean over frames (every layer's L1 and cosine): for a padded
    batch, the mean over the valid frames of all clips, i.e. the per-clip losses weighted
    by their valid frame counts. Padded frames must count for nothing."""
    stage = _distill_stage(kind).eval()
    waves = clips([4000, 2600, 1500])
    batch = pad_waveforms([{"audio": w, "index": i} for i, w in enumerate(waves)])
    with torch.no_grad():
        padded, _ = stage.distill_step(batch)
        alone = [stage.distill_step(pad_waveforms([{"audio": w}]))[0] for w in waves]
    frames = stage.teacher.frame_lengths(batch["length"]).double()
    expected = (torch.stack(alone).double() * frames).sum() / frames.sum()
    torch.testing.assert_close(padded.double(), expected, rtol=0, atol=1e-5)
