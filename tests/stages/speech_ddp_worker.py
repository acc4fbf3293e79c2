"""A few training steps of a stage with a speech encoder under the Trainer's DDP strategy,
in a process :func:`tests.helpers.spawn_two_ranks` started.

Kept out of the test module so that spawned processes can import it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tests.helpers import ddp_trainer, join_as_rank
from tests.speech_models import tiny_architecture
from torch.utils.data import DataLoader

from distillery.artifact_kinds import EncoderArtifact
from distillery.data.padding import pad_waveforms
from distillery.models.io import build_encoder
from distillery.stages.coss_kd import CoSSDistillStage
from distillery.stages.final_distill import FinalDistillStage
from distillery.stages.finetune import FinetuneStage
from distillery.stages.self_distill import SelfDistillStage

STEPS, BATCH, CLASSES = 3, 2, 3
KINDS = ("finetune", "self_distill", "coss_kd", "final_distill")
#: Tiny HuBERTs (2 layers) whose ``forward`` leaves parameters unused: the layer above
#: ``embedding_layer``, or the Large layout's final LayerNorm.
LAYOUTS = {
    "below_last_layer": {"architecture": tiny_architecture("hubert"), "embedding_layer": 1},
    "large": {"architecture": tiny_architecture("hubert", large=True)},
}


def build_stage(kind: str, layout: str) -> torch.nn.Module:
    encoder = {"_target_": "distillery.models.speech.SpeechEncoder", **LAYOUTS[layout]}
    if kind == "finetune":
        return FinetuneStage(encoder, num_classes=CLASSES)
    if kind == "self_distill":
        return SelfDistillStage(encoder, num_pseudo_classes=CLASSES, head_hidden_dim=8)
    teacher_cfg = {"_target_": "distillery.models.speech.SpeechEncoder", **LAYOUTS["large"]}
    if kind == "final_distill":  # trains on every hidden state, whatever embedding_layer
        return FinalDistillStage(teacher_cfg, student_encoder=encoder, distill_layers=[0, 1, 2])
    teacher = EncoderArtifact(build_encoder(teacher_cfg), teacher_cfg)
    return CoSSDistillStage(encoder, teacher, batches="random")


def fit_worker(rank: int, port: int, layout: str, out_dir: str) -> None:
    """For each stage of ``KINDS``: train ``STEPS`` steps on padded waveform batches as rank
    ``rank`` of 2 (one process group for all); save its initial and final parameters and
    which of them it trained. Buffers are left out: BatchNorm statistics are per rank."""
    join_as_rank(rank, port)
    generator = torch.Generator().manual_seed(1)
    items = [
        {
            "audio": torch.randn(int(n), generator=generator),
            "label": i % CLASSES,
            "pseudo_label": (i + 1) % CLASSES,
        }
        for i, n in enumerate(torch.randint(1500, 4000, (2 * BATCH * STEPS,), generator=generator))
    ]
    for kind in KINDS:
        torch.manual_seed(0)  # the same initial stage on both ranks
        stage = build_stage(kind, layout)
        initial = {n: p.detach().clone() for n, p in stage.named_parameters()}
        trainer = ddp_trainer(max_steps=STEPS)
        trainer.fit(stage, DataLoader(items, batch_size=BATCH, collate_fn=pad_waveforms))
        torch.save(
            {
                "steps": trainer.global_step,
                "initial": initial,
                "final": {n: p.detach() for n, p in stage.named_parameters()},
                "trained": [n for n, p in stage.named_parameters() if p.requires_grad],
            },
            Path(out_dir) / f"{kind}-rank{rank}.pt",
        )
