"""The teacher-student base of ``prune_distill`` and ``final_distill``: a frozen teacher and
the DPHuBERT layer-to-layer distillation loss."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distillery.artifact_kinds import (
    Artifact,
    EncoderArtifact,
    HuggingFaceEncoder,
    StandaloneEncoder,
)
from distillery.losses import l1_cosine_distill_loss
from distillery.models.io import build_encoder
from distillery.models.safe_load import load_tensors
from distillery.models.standalone import standalone_artifacts
from distillery.stages.base import StageModule, encoder_inputs

log = logging.getLogger(__name__)


def load_teacher(encoder: dict[str, Any], weights: str | None) -> nn.Module:
    """Frozen teacher in eval mode: architecture from ``encoder``, weights from ``weights``.

    ``weights`` is an ``encoder.pt`` artifact of an earlier stage or a plain state-dict
    file; an encoder with a ``load_weights`` method reads it itself (a speech encoder
    detects Hugging Face, fairseq and torchaudio files). Loaded strictly. ``None`` keeps
    the weights ``encoder`` built (random unless it names a file).
    """
    teacher = build_encoder(encoder)
    if weights is None:
        if not encoder.get("weights"):
            log.warning("teacher has random weights (no teacher_weights given)")
    elif hasattr(teacher, "load_weights"):
        teacher.load_weights(weights)
    else:
        state = load_tensors(weights)  # data only: a shared file must not run code
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            teacher.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"teacher_weights {weights} do not fit the teacher config: {err}"
            ) from err
    return teacher.requires_grad_(False).eval()


class LayerDistillLoss(nn.Module):
    """Sum over layer pairs of ``L1(P(S), T) - mean cos(P(S), T)`` (DPHuBERT).

    ``P`` is a linear projection from the student's to the teacher's width: teacher layer 0
    (the front-end output) has its own, every other distilled layer shares one. Both start
    as the identity when the widths are equal, so a student copied from the teacher starts
    at the loss minimum.

    Args:
        student_dim, teacher_dim: feature widths.
        teacher_layers: indices into the teacher's ``forward_hidden_states``.
        student_layers: the matching student indices (default: the same).
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        teacher_layers: Sequence[int],
        student_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.teacher_layers = list(teacher_layers)
        self.student_layers = list(student_layers if student_layers is not None else teacher_layers)
        if len(self.student_layers) != len(self.teacher_layers) or not self.teacher_layers:
            raise ValueError(
                f"student_layers {self.student_layers} and distill_layers {self.teacher_layers} "
                "must be non-empty and of equal length"
            )
        self.front_proj = nn.Linear(student_dim, teacher_dim)
        self.layer_proj = nn.Linear(student_dim, teacher_dim)
        if student_dim == teacher_dim:
            for proj in (self.front_proj, self.layer_proj):
                nn.init.eye_(proj.weight)
                nn.init.zeros_(proj.bias)
        # A projection no distilled layer uses is frozen: DDP rejects gradient-less parameters.
        self.front_proj.requires_grad_(0 in self.teacher_layers)
        self.layer_proj.requires_grad_(any(t != 0 for t in self.teacher_layers))

    def check_depths(self, student_states: int, teacher_states: int) -> None:
        for name, layers, n in (
            ("student_layers", self.student_layers, student_states),
            ("distill_layers", self.teacher_layers, teacher_states),
        ):
            if bad := [i for i in layers if not 0 <= i < n]:
                raise ValueError(
                    f"{name}: {bad} out of range; the model has hidden states 0..{n - 1}"
                )

    def forward(
        self, student: list[Tensor], teacher: list[Tensor], mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Student and teacher hidden states (lists of (B, T, D)) -> (total, per-layer terms).

        ``mask`` (B, T) bool marks the valid frames of a padded batch: each layer's terms
        are then means over the valid frames of the whole batch (a clip weighs by its
        length), and padded frames count for nothing."""
        total = torch.zeros((), device=student[0].device)
        terms: dict[str, Tensor] = {}
        for s_idx, t_idx in zip(self.student_layers, self.teacher_layers, strict=True):
            proj = self.front_proj if t_idx == 0 else self.layer_proj
            loss, parts = l1_cosine_distill_loss(
                proj(student[s_idx]), teacher[t_idx].detach(), mask=mask
            )
            total = total + loss
            terms[f"layer{t_idx}_l1"], terms[f"layer{t_idx}_cos"] = parts["l1"], parts["cos"]
        return total, terms


class TeacherDistillStage(StageModule):
    """Shared machinery of ``prune_distill`` and ``final_distill``: a frozen teacher (never
    trained, kept in eval mode, left out of checkpoints and rebuilt from its weights on
    resume), the layer loss, and the batch key the encoders read (``features`` = log-mel,
    or ``audio`` + lengths for waveform encoders such as HuBERT, by their ``input_key``;
    the layer loss then averages over the valid frames only, by the teacher's
    ``frame_mask``). A speech encoder is also exported for use without distillery
    (``standalone``, and ``huggingface`` when unpruned: :mod:`distillery.models.standalone`)."""

    produces = {
        "encoder": EncoderArtifact,
        "standalone": StandaloneEncoder,
        "huggingface": HuggingFaceEncoder,
    }
    #: A waveform teacher's ``frame_mask(lengths, T)`` marks the valid frames of a padded
    #: batch, which the layer loss averages over.
    encoder_requirements = {"teacher": {"audio": ("frame_mask",)}}

    def __init__(
        self,
        teacher: dict[str, Any],
        teacher_weights: str | None,
        stage_name: str,
        optimizer: dict[str, Any] | None,
        scheduler: dict[str, Any] | None,
    ) -> None:
        super().__init__(stage_name, optimizer, scheduler)
        self.teacher = load_teacher(teacher, teacher_weights)
        self.check_encoder_input("teacher", self.teacher)

    def student_hidden_states(self, x: Tensor, *lengths: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def distill_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = encoder_inputs(self.teacher, batch)  # the student reads what the teacher does
        with torch.no_grad():
            teacher_states = self.teacher.forward_hidden_states(*inputs)
        student_states = self.student_hidden_states(*inputs)
        if self.global_step == 0:
            self.distill_loss.check_depths(len(student_states), len(teacher_states))
        mask = None
        if len(inputs) == 2:  # waveforms + lengths: padded frames count for nothing
            mask = self.teacher.frame_mask(inputs[1], teacher_states[0].shape[1])
        return self.distill_loss(student_states, teacher_states, mask)

    def export_artifacts(self) -> dict[str, Artifact]:
        exported = super().export_artifacts()
        return exported | standalone_artifacts(self.encoder_for_eval(), self.encoder_cfg)

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()  # Lightning switches every submodule to train mode

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].update(
            {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        )

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, _ = self.distill_step(batch)
        self.log_split("val", {"distill_loss": loss}, on_step=False, on_epoch=True, prog_bar=True)
