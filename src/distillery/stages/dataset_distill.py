"""Stage ``dataset_distill``: KRR-ST, self-supervised dataset distillation.

Learns N synthetic log-mel inputs ``x_syn`` and target representations ``y_syn`` such that
kernel ridge regression fitted on them predicts a frozen SSL teacher's representation of
real clips, under the kernels of a pool of models trained on the synthetic set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.optim.lr_scheduler import LinearLR

from distillery.artifact_kinds import EncoderArtifact, SyntheticSet
from distillery.distill.model_pool import ModelPool, RegressionModel
from distillery.losses.krr import krr_distill_loss
from distillery.models.io import build_encoder
from distillery.stages.base import StageModule
from distillery.stages.ssl import _build_augment


class DatasetDistillStage(StageModule):
    """KRR-ST distillation of the training clips into ``size`` synthetic examples.

    - Init (at set-up, from the data module): ``x_syn`` = ``size`` random training clips
      (log-mel), ``y_syn = teacher(x_syn)``.
    - Outer step, per batch of real clips ``x``: draw a pool member ``g``;
      ``F = [g(x), 1]``; ``L = MSE(K_xs (K_ss + ridge tr(K_ss) I)^-1 y_syn, teacher(aug(x)))``
      (:func:`~distillery.losses.krr.krr_distill_loss`); the optimizer (AdamW, no weight
      decay, from ``optimizer``) updates ``x_syn`` and ``y_syn`` only, with the learning rate
      decayed linearly to ``final_lr_factor`` times its start over the run. Then ``g`` is
      trained one more step on the updated set (:class:`~distillery.distill.model_pool.ModelPool`).
    - ``g``'s kernel features come from the same ``aug(x)`` view the teacher sees, so
      input and target of each real point agree.

    ``teacher``: an ``encoder.pt`` artifact (the ``ssl`` stage's, wired through ``inputs``),
    frozen and always in eval mode. ``encoder``: the architecture of the pool members (the
    one later pretrained on the set), each with a linear head to the teacher's dimension.
    ``augment``: like the ``ssl`` stage's (a ``_target_`` module mapping a (B, 1, F, T)
    batch to one random view), or null for none.

    ``init_only``: keep the initial random real subset with its teacher targets and skip
    every outer step (the "random real subset" baseline at equal N): the fit ends at its first
    batch, on every rank alike, so the stage takes no optimizer step by design.

    Logged: ``<stage>/train/loss`` (outer loss), ``<stage>/train/pool_steps`` (mean member
    counter), ``<stage>/val/loss`` (outer loss on validation clips, no augmentation, mean over
    every pool member). Artifact ``synthetic_set``: see :mod:`distillery.distill.synthetic_set`.
    """

    produces = {"synthetic_set": SyntheticSet}
    refused_encoder_inputs = {
        arg: {"audio": "the synthetic set it learns is log-mel inputs, which both read"}
        for arg in ("encoder", "teacher")
    }

    def __init__(
        self,
        encoder: dict[str, Any],
        teacher: EncoderArtifact,
        stage_name: str = "dataset_distill",
        size: int = 100,
        ridge: float = 1e-6,
        pool_size: int = 10,
        pool_max_steps: int = 1000,
        pool_lr: float = 0.1,
        pool_weight_decay: float = 1e-3,
        pool_momentum: float = 0.9,
        final_lr_factor: float = 0.1,
        init_only: bool = False,
        augment: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            stage_name,
            optimizer or {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4},
        )
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0.0 < final_lr_factor <= 1.0:
            raise ValueError(f"final_lr_factor must be in (0, 1], got {final_lr_factor}")
        self.save_hyperparameters(ignore=["teacher"])
        self.teacher = teacher.module.requires_grad_(False).eval()
        self.check_encoder_input("teacher", self.teacher)
        self.size = size
        self.ridge = ridge
        self.final_lr_factor = final_lr_factor
        self.init_only = init_only
        self.takes_optimizer_steps = not init_only
        self.encoder_cfg = encoder
        target_dim = self.teacher.embed_dim
        self.pool = (
            None
            if init_only
            else ModelPool(
                lambda: RegressionModel(build_encoder(encoder), target_dim),
                size=pool_size,
                max_steps=pool_max_steps,
                lr=pool_lr,
                weight_decay=pool_weight_decay,
                momentum=pool_momentum,
                seed=torch.initial_seed(),  # the run's seed: the same pool on every rank
            )
        )
        self.augment = _build_augment(augment) if augment else None
        # Created in setup(), once the data's shape is known (before a checkpoint is restored).
        self.synthetic_inputs: nn.Parameter | None = None
        self.synthetic_targets: nn.Parameter | None = None
        self._member: int | None = None

    # -- set-up ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DatasetDistillStage:
        super().train(mode)
        self.teacher.eval()  # frozen: its BatchNorm statistics and dropout stay as trained
        return self

    def setup(self, stage: str) -> None:
        if self.synthetic_inputs is not None:
            return
        datamodule = self.trainer.datamodule
        train = datamodule.train_indices()
        if self.size > len(train):
            raise ValueError(
                f"{self.stage_name}: size={self.size} synthetic examples but only {len(train)} "
                "training clips to initialise them from"
            )
        # Drawn from the run's seed alone (not the global RNG's position), so an init_only
        # baseline with the same seed starts from exactly the same clips as the distilled set.
        generator = torch.Generator().manual_seed(torch.initial_seed())
        chosen = np.sort(
            train[torch.randperm(len(train), generator=generator)[: self.size].numpy()]
        )
        loader = datamodule.dataloader("train", indices=chosen)  # centre crops: deterministic
        inputs = torch.cat([datamodule.featurize(batch["audio"]) for batch in loader])
        with torch.no_grad():
            targets = self.teacher(inputs)
        self.synthetic_inputs = nn.Parameter(inputs)
        self.synthetic_targets = nn.Parameter(targets)
        self.register_buffer("initial_indices", torch.as_tensor(chosen))
        self.register_buffer("initial_inputs", inputs.clone())

    def on_train_start(self) -> None:
        # After a checkpoint is restored, so a resumed run keeps its trained pool.
        if self.pool is not None and not bool(self.pool.ready):
            self.pool.initialise(self.synthetic_inputs.detach(), self.synthetic_targets.detach())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.synthetic_inputs, self.synthetic_targets]

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.optimizer_cfg)(self.trainable_parameters())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = LinearLR(optimizer, 1.0, self.final_lr_factor, total_iters=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- objective ------------------------------------------------------------------------
    def outer_loss(self, member: int, real: Tensor, real_targets: Tensor) -> Tensor:
        """KRR-ST loss of the synthetic set under pool member ``member``'s kernel.

        Shapes: real (B, 1, n_mels, T), real_targets (B, D) -> scalar.
        """
        assert self.pool is not None and self.synthetic_inputs is not None
        n = len(self.synthetic_inputs)
        # One pass for both sets (eval mode: the same function either way, fewer calls).
        features = self.pool.features(member, torch.cat([self.synthetic_inputs, real]))
        return krr_distill_loss(
            features[n:], features[:n], self.synthetic_targets, real_targets, ridge=self.ridge
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if not self.init_only:
            return None
        # Nothing to learn: end the epoch before training_step (a step returning None fails
        # under DDP) and the fit after it, whatever max_epochs or max_steps say.
        self.trainer.should_stop = True
        return -1

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        real = batch["features"]
        if self.augment is not None:
            real = self.augment(real)
        with torch.no_grad():
            targets = self.teacher(real)
        self._member = self.pool.sample(self.global_step)
        loss = self.outer_loss(self._member, real, targets)
        self.log_split("train", {"loss": loss}, on_step=True, on_epoch=True, prog_bar=True)
        self.log_split(
            "train", {"pool_steps": self.pool.steps.float().mean()}, on_step=False, on_epoch=True
        )
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._member is not None:  # the member used this step trains on the updated set
            self.pool.step(self._member, self.synthetic_inputs, self.synthetic_targets)
            self._member = None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.init_only or not bool(self.pool.ready):
            return
        real = batch["features"]
        targets = self.teacher(real)
        loss = torch.stack(
            [self.outer_loss(i, real, targets) for i in range(len(self.pool))]
        ).mean()
        self.log_split("val", {"loss": loss}, on_epoch=True, prog_bar=True)

    # -- artifact -------------------------------------------------------------------------
    @torch.no_grad()
    def export_artifacts(self) -> dict[str, SyntheticSet]:
        meta = {
            "init_only": self.init_only,
            "outer_steps": 0 if self.init_only else int(self.trainer.global_step),
            "ridge": self.ridge,
            "initial_indices": self.initial_indices.tolist(),
            # How far distillation moved the set from where it started (RMS per element).
            "input_shift_rms": _rms(self.synthetic_inputs - self.initial_inputs),
            "target_shift_rms": _rms(self.synthetic_targets - self.teacher(self.initial_inputs)),
        }
        synthetic = SyntheticSet(
            self.synthetic_inputs.detach().float().cpu(),
            self.synthetic_targets.detach().float().cpu(),
            meta,
            real_inputs=self.initial_inputs.detach().float().cpu(),
        )
        return {"synthetic_set": synthetic}


def _rms(x: Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())
