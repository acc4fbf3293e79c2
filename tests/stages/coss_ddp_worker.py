"""One CoSS training step on this process's share of a fixed batch (run under Fabric).

Kept out of the test module so that spawned processes can import it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from tests.helpers import close_process_group

from distillery.artifact_kinds import EncoderArtifact
from distillery.stages.coss_kd import CoSSDistillStage

#: No BatchNorm in the student: per-device BatchNorm statistics would differ from one
#: process's by design, and this checks the loss, not normalisation layers.
STUDENT = {
    "_target_": "distillery.models.encoders.TransformerEncoder",
    "n_mels": 16,
    "dim": 16,
    "depth": 1,
    "heads": 2,
    "ffn_dim": 32,
    "dropout": 0.0,
}
BATCH, FRAMES = 8, 12


def coss_step_worker(fabric, teacher_path: str, out_dir: str) -> None:
    """Save the loss and the (rank-averaged) gradient of one step, for both ``space_batch``."""
    features = torch.randn(BATCH, 1, 16, FRAMES, generator=torch.Generator().manual_seed(1))
    share = BATCH // fabric.world_size
    mine = features[fabric.global_rank * share : (fabric.global_rank + 1) * share]
    for space_batch in ("global", "device"):
        torch.manual_seed(0)  # the same student on every rank
        module = CoSSDistillStage(
            encoder=STUDENT,
            teacher=EncoderArtifact.load(teacher_path),
            batches="random",
            space_batch=space_batch,
        )
        module.fabric = fabric  # world size and all_gather as under the Trainer's strategy
        module.train()
        loss = module._step({"features": mine}, "train")
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in module.trainable_parameters()])
        if fabric.world_size > 1:  # what DDP does with the parameters' gradients: average them
            dist.all_reduce(grads)
            grads /= fabric.world_size
        name = f"{space_batch}-w{fabric.world_size}-r{fabric.global_rank}.pt"
        torch.save({"loss": loss.detach(), "grads": grads}, Path(out_dir) / name)
    close_process_group(fabric)
