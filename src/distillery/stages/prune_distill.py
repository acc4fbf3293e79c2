"""Stage ``prune_distill``: joint distillation and structured pruning (DPHuBERT).

The student is a copy of the teacher with hard-concrete gates on its prunable units
(:class:`~distillery.models.pruning.GatedModel`). It minimises

    L = sum_layers [L1(P(S), T) - mean cos(P(S), T)] + l1 (s - t) + l2 (s - t)^2

with ``s`` the expected sparsity (``1 - expected params / teacher params``) and ``t`` the
target, ramped linearly from 0 to ``target_sparsity`` over the first ``sparsity_warmup``
fraction of the training steps. The multipliers ``l1, l2`` start at 0 and are trained by
gradient *ascent*: their accumulated gradient is negated once, just before each optimizer
step, so any optimizer, torch version and ``accumulate_grad_batches`` works (the reference
relies on a negative learning rate instead).
At the end the deterministic masks are folded in and the model physically pruned; that
smaller model is the stage's ``encoder`` artifact (see :func:`distillery.models.load_pruned`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from distillery.artifact_kinds import Artifact, JsonReport, Plot
from distillery.models.encoders import count_parameters
from distillery.models.pruning import GatedModel
from distillery.stages.base import freeze_unused
from distillery.stages.teacher_student import LayerDistillLoss, TeacherDistillStage


class SparsityLagrangian(nn.Module):
    """``l1 (s - t) + l2 (s - t)^2`` with multipliers trained by gradient ascent.

    Call :meth:`flip_gradients_` once between the last backward and the optimizer step: a
    descent step on the negated gradient is an ascent step on the penalty. (Not after each
    backward: under gradient accumulation the micro-batches' flipped and unflipped
    contributions would cancel.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.multipliers = nn.Parameter(torch.zeros(2))

    def forward(self, sparsity: Tensor, target: float) -> Tensor:
        gap = sparsity - target
        return self.multipliers[0] * gap + self.multipliers[1] * gap * gap

    def flip_gradients_(self) -> None:
        if self.multipliers.grad is not None:
            self.multipliers.grad.neg_()


def target_sparsity_at(step: int, total_steps: float, target: float, warmup: float) -> float:
    """Linear ramp 0 -> ``target`` over the first ``warmup`` fraction of ``total_steps``."""
    ramp_steps = max(1.0, warmup * total_steps)
    return target * min(1.0, step / ramp_steps)


class PruneDistillStage(TeacherDistillStage):
    """Student = gated copy of the teacher, distilled and pruned to ``target_sparsity``.

    Args:
        teacher: the teacher's encoder config; ``teacher_weights`` its weights file.
        distill_layers: teacher (= student) hidden-state indices to distil.
        prune: unit kinds to prune: ``conv`` (front-end channels), ``heads``, ``ffn``
            (units), and for speech encoders ``attn_layer`` / ``ffn_layer`` (whole blocks).
        target_sparsity: final fraction of the teacher's parameters to remove, in [0, 1).
        sparsity_warmup: fraction of the training steps over which the target ramps up.
        gate_lr: learning rate of the gates' ``log_alpha`` and of the multipliers (no
            weight decay on either); the other parameters use ``optimizer``'s.
        gate_noise: where the gates' training noise comes from under DDP. ``per_rank``
            (default): each rank draws its own masks from its per-batch seed, so a step
            averages the gradients of ``world_size`` mask samples. ``shared``: every rank
            draws the same masks, from (run seed, epoch, batch); a step then is exactly one
            process's step on the whole batch, whatever the number of ranks.
    """

    produces = TeacherDistillStage.produces | {"pruning": JsonReport, "sparsity_plot": Plot}

    def __init__(
        self,
        teacher: dict[str, Any],
        teacher_weights: str | None = None,
        stage_name: str = "prune_distill",
        distill_layers: Sequence[int] = (0, 4, 8, 12),
        prune: Sequence[str] = ("conv", "heads", "ffn"),
        target_sparsity: float = 0.75,
        sparsity_warmup: float = 0.3,
        gate_lr: float = 0.02,
        gate_noise: Literal["per_rank", "shared"] = "per_rank",
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(teacher, teacher_weights, stage_name, optimizer, scheduler)
        self.save_hyperparameters()
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        if gate_noise not in ("per_rank", "shared"):
            raise ValueError(f"gate_noise must be 'per_rank' or 'shared', got {gate_noise!r}")
        self.gate_noise = gate_noise
        self.noise_seed = 0  # the run's seed, read when training starts (same on every rank)
        student = copy.deepcopy(self.teacher).requires_grad_(True)
        freeze_unused(student, "hidden_states", max(distill_layers, default=None))
        self.gated = GatedModel(student, list(prune), teacher)
        dim = self.teacher.embed_dim
        self.distill_loss = LayerDistillLoss(dim, dim, distill_layers)
        self.lagrangian = SparsityLagrangian()
        self.target_sparsity, self.sparsity_warmup, self.gate_lr = (
            target_sparsity,
            sparsity_warmup,
            gate_lr,
        )
        self.history: list[dict[str, float]] = []
        self.pruned: nn.Module | None = None
        self.encoder_cfg: dict[str, Any] | None = None

    def trainable_parameters(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Two optimizer groups: the gates and multipliers get ``gate_lr`` and no decay."""
        regulariser = [*self.gated.gates.parameters(), *self.lagrangian.parameters()]
        ids = {id(p) for p in regulariser}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": main}, {"params": regulariser, "lr": self.gate_lr, "weight_decay": 0.0}]

    def student_hidden_states(self, x: Tensor, *lengths: Tensor) -> list[Tensor]:
        return self.gated.forward_hidden_states(x, *lengths)

    def current_target(self) -> float:
        total = self.trainer.estimated_stepping_batches
        return target_sparsity_at(
            self.global_step, total, self.target_sparsity, self.sparsity_warmup
        )

    def on_fit_start(self) -> None:
        self.noise_seed = torch.initial_seed()  # before any per-batch reseeding

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.gate_noise == "shared":
            key = [self.noise_seed, self.current_epoch, batch_idx]
            seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint32)[0])
            self.gated.noise = torch.Generator().manual_seed(seed)
        distill, terms = self.distill_step(batch)
        sparsity = self.gated.expected_sparsity()
        target = self.current_target()
        penalty = self.lagrangian(sparsity, target)
        loss = distill + penalty
        l1, l2 = self.lagrangian.multipliers.detach()
        kept = {f"kept_{kind}": value for kind, value in self.gated.kept_by_kind().items()}
        step_metrics = {
            "loss": loss,
            "distill_loss": distill,
            "expected_sparsity": sparsity,
            "target_sparsity": target,
            "lambda1": l1,
            "lambda2": l2,
            "expected_params": self.gated.expected_params(),
        }
        self.log_split("train", step_metrics, on_step=True, on_epoch=False, prog_bar=False)
        self.log_split("train", kept | terms, on_step=False, on_epoch=True)
        self.history.append(
            {
                "step": float(self.global_step),
                "expected_sparsity": sparsity.item(),
                "target_sparsity": target,
            }
        )
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.lagrangian.flip_gradients_()  # once per step, on the accumulated gradient

    def on_validation_epoch_end(self) -> None:
        # What the export would keep right now (deterministic masks).
        sparsity = 1.0 - self.gated.deterministic_params() / self.gated.full_params
        self.log_split("val", {"mask_sparsity": sparsity}, on_step=False, on_epoch=True)

    def on_fit_end(self) -> None:
        self.pruned, self.encoder_cfg = self.gated.export()

    def encoder_for_eval(self) -> nn.Module | None:
        return self.pruned

    def export_artifacts(self) -> dict[str, Artifact]:
        exported = super().export_artifacts()  # the pruned encoder
        pruned_params = count_parameters(self.pruned)
        target_params = (1.0 - self.target_sparsity) * self.gated.full_params
        summary = {
            "teacher_params": self.gated.full_params,
            "pruned_params": pruned_params,
            "target_sparsity": self.target_sparsity,
            "target_params": round(target_params),
            "sparsity": 1.0 - pruned_params / self.gated.full_params,
            "params_vs_target": pruned_params / target_params - 1.0,
            "kept": self.encoder_cfg["kept"],
        }
        exported["pruning"] = JsonReport(summary)
        if self.history:
            exported["sparsity_plot"] = Plot(plot_sparsity(self.history))
        return exported


def plot_sparsity(history: list[dict[str, float]]) -> Figure:
    """Expected sparsity and its target over the training steps."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["expected_sparsity"] for h in history], label="expected sparsity")
    ax.plot(steps, [h["target_sparsity"] for h in history], "--", label="target")
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    return fig
