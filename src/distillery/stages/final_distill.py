"""Stage ``final_distill``: layer-to-layer distillation of a fixed student from a frozen teacher.

In DPHuBERT this follows ``prune_distill``: the student is the physically pruned export
(gates gone) and is distilled further without the sparsity regulariser. With a fresh
``student_encoder`` instead, the same stage distils into a hand-designed student (the
DistilHuBERT-style baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from distillery.artifact_kinds import EncoderArtifact
from distillery.models.io import build_encoder
from distillery.stages.base import freeze_unused
from distillery.stages.teacher_student import LayerDistillLoss, TeacherDistillStage


class FinalDistillStage(TeacherDistillStage):
    """Distil ``student`` (an ``encoder.pt`` artifact, e.g. the pruned export of
    ``prune_distill``) or a fresh ``student_encoder`` from the frozen teacher.

    Args:
        teacher: the teacher's encoder config; ``teacher_weights`` its weights file.
        student: the student's encoder artifact (exclusive with ``student_encoder``).
        student_encoder: config of a fresh, randomly initialised student.
        distill_layers: teacher hidden-state indices; ``student_layers`` the student's
            (default: the same indices).
    """

    def __init__(
        self,
        teacher: dict[str, Any],
        teacher_weights: str | None = None,
        student: EncoderArtifact | None = None,
        student_encoder: dict[str, Any] | None = None,
        stage_name: str = "final_distill",
        distill_layers: Sequence[int] = (0, 4, 8, 12),
        student_layers: Sequence[int] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(teacher, teacher_weights, stage_name, optimizer, scheduler)
        self.save_hyperparameters(ignore=["student"])
        if (student is None) == (student_encoder is None):
            raise ValueError(
                f"{stage_name}: give exactly one of module.student (an artifact) and module.student_encoder"
            )
        if student is not None:
            self.student, self.encoder_cfg = student.module, student.config
        else:
            self.student, self.encoder_cfg = build_encoder(student_encoder), student_encoder
        self.distill_loss = LayerDistillLoss(
            self.student.embed_dim, self.teacher.embed_dim, distill_layers, student_layers
        )
        freeze_unused(self.student, "hidden_states", max(self.distill_loss.student_layers))

    def encoder_for_eval(self) -> nn.Module:
        return self.student

    def student_hidden_states(self, x: Tensor, *lengths: Tensor) -> list[Tensor]:
        return self.student.forward_hidden_states(x, *lengths)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, terms = self.distill_step(batch)
        self.log_split("train", {"distill_loss": loss}, on_step=True, on_epoch=True, prog_bar=True)
        self.log_split("train", terms, on_step=False, on_epoch=True)
        return loss
