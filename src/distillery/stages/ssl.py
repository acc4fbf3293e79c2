"""Stage ``ssl``: self-supervised pretraining of an encoder on unlabeled log-mel (the teacher).

Methods: BYOL (the BYOL-A default), SimCLR and Barlow Twins, all on two BYOL-A augmented
views of each clip. Labels are never read. The augmentations are defined on log-mel, so a
waveform encoder (``input_key = "audio"``, e.g. HuBERT) is refused at start-up.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.utils import get_class
from torch import Tensor, nn

from distillery.artifact_kinds import EncoderArtifact
from distillery.augment import BYOLAAugment, MixupWithPastBatches
from distillery.losses.ssl import barlow_twins_loss, byol_loss, nt_xent
from distillery.models.heads import ProjectionHead
from distillery.models.io import build_encoder
from distillery.stages.base import StageModule

METHODS = ("byol", "simclr", "barlow_twins")
#: Checkpoint key of every rank's mixup memories (a list over ranks).
MIXUP_PER_RANK = "mixup_memory_per_rank"


class SSLStage(StageModule):
    """Encoder trained with a self-supervised objective on two augmented views.

    - ``byol``: online encoder -> projector -> predictor regresses the *target* projection
      of the other view (``2 - 2 cos``, summed over both view orders, as BYOL/BYOL-A). The
      target (encoder + projector) is an EMA of the online ones, updated after every
      optimizer step: ``target <- ema_decay * target + (1 - ema_decay) * online`` (parameters
      only; the target's BatchNorm statistics come from its own forward passes).
    - ``simclr``: encoder -> projector, NT-Xent with ``temperature``.
    - ``barlow_twins``: encoder -> projector, Barlow Twins loss with ``barlow_lambda``.

    Projector: ``ProjectionHead(embed_dim, projection_hidden_dim, projection_dim)``; the BYOL
    predictor has the same shape on ``projection_dim``.

    ``augment`` holds keyword arguments of :class:`~distillery.augment.BYOLAAugment`, or any
    module's ``_target_`` plus its arguments (the module must map a ``(B, 1, F, T)`` batch to
    one random view of the same shape). The views are made on the batch's device inside the
    step from ``batch["features"]`` (B, 1, n_mels, T).

    The target is a submodule, so it is in ``state_dict`` and in every checkpoint (resume
    continues the same EMA); it has ``requires_grad=False``, so the optimizer never sees it.
    :meth:`encoder_for_eval` (the exported ``encoder.pt``) is the online encoder.

    Logged: ``<stage>/train/loss`` (per step and epoch), ``<stage>/val/loss``, and
    ``<stage>/<split>/proj_std``, the per-dimension std over the batch of the L2-normalised
    online projections: about ``1 / sqrt(projection_dim)`` when healthy, 0 when collapsed.
    """

    produces = {"encoder": EncoderArtifact}
    refused_encoder_inputs = {
        "encoder": {
            "audio": (
                "its views are BYOL-A augmentations (mixup in the linear mel-power domain, "
                "random resized crop of the mel spectrogram), defined on log-mel only; "
                "pretrain a log-mel encoder here, or start from a pretrained speech encoder "
                "(its `weights`) in the later stages"
            )
        }
    }

    def __init__(
        self,
        encoder: dict[str, Any],
        stage_name: str = "ssl",
        method: Literal["byol", "simclr", "barlow_twins"] = "byol",
        projection_dim: int = 256,
        projection_hidden_dim: int = 4096,
        ema_decay: float = 0.99,
        temperature: float = 0.1,
        barlow_lambda: float = 5e-3,
        augment: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(stage_name, optimizer, scheduler)
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.save_hyperparameters()
        self.method = method
        self.ema_decay = float(ema_decay)
        self.temperature = float(temperature)
        self.barlow_lambda = float(barlow_lambda)

        self.encoder, self.encoder_cfg = build_encoder(encoder), encoder
        self.check_encoder_input("encoder", self.encoder)
        embed_dim = self.encoder.embed_dim
        self.projector = ProjectionHead(embed_dim, projection_hidden_dim, projection_dim)
        self.predictor: ProjectionHead | None = None
        self.target_encoder: nn.Module | None = None
        self.target_projector: nn.Module | None = None
        if method == "byol":
            self.predictor = ProjectionHead(projection_dim, projection_hidden_dim, projection_dim)
            # The target starts as an exact copy of the online network (BYOL).
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.augment = _build_augment(augment)

    # -- networks -------------------------------------------------------------------------
    def encoder_for_eval(self) -> nn.Module:
        return self.encoder

    def forward(self, features: Tensor) -> Tensor:
        """(B, 1, n_mels, T) -> (B, embed_dim) online embedding."""
        return self.encoder(features)

    def _online_targets(self) -> list[tuple[nn.Module, nn.Module]]:
        assert self.target_encoder is not None and self.target_projector is not None
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    @torch.no_grad()
    def update_target(self) -> None:
        """One EMA step of the target parameters towards the online ones (BYOL only)."""
        if self.method != "byol":
            return
        for online, target in self._online_targets():
            online_params = list(online.parameters())
            target_params = list(target.parameters())
            # lerp: target + (1 - decay) * (online - target) = decay * target + (1 - decay) * online
            torch._foreach_lerp_(target_params, online_params, 1.0 - self.ema_decay)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Here rather than in on_train_batch_end: with gradient accumulation this runs once
        # per real optimizer step, which is what the EMA is defined over.
        super().optimizer_step(*args, **kwargs)
        self.update_target()

    # -- checkpoints ----------------------------------------------------------------------
    def _mixup_state_keys(self) -> list[str]:
        """``state_dict`` keys of the mixup memories (each one's extra state)."""
        return [
            f"{name}._extra_state"
            for name, m in self.named_modules()
            if isinstance(m, MixupWithPastBatches)
        ]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # state_dict holds this rank's mixup memory, and only rank 0 writes the file: every
        # rank's memory goes into the checkpoint too (all ranks run this hook).
        keys = self._mixup_state_keys()
        if keys and dist.is_available() and dist.is_initialized():
            mine = [checkpoint["state_dict"][k] for k in keys]
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            checkpoint[MIXUP_PER_RANK] = gathered

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the state_dict is loaded: put this rank's own memory in it. (A resume
        # on another number of ranks keeps rank 0's.)
        per_rank = checkpoint.get(MIXUP_PER_RANK)
        if per_rank and self._trainer is not None and len(per_rank) == self.trainer.world_size:
            for key, state in zip(
                self._mixup_state_keys(), per_rank[self.global_rank], strict=True
            ):
                checkpoint["state_dict"][key] = state

    # -- objective ------------------------------------------------------------------------
    def _views(
        self, features: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Two augmented views, each (B, 1, n_mels, T)."""
        return self.augment(features, generator), self.augment(features, generator)

    def ssl_loss(self, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor]:
        """Loss of the configured method on two (B, 1, n_mels, T) views, and the online
        projections of both views (2B, projection_dim) for monitoring."""
        b = view1.shape[0]
        if self.method == "barlow_twins":
            # Separate passes, as Barlow Twins: each view's BatchNorm statistics are its own.
            z1, z2 = self.projector(self.encoder(view1)), self.projector(self.encoder(view2))
            return barlow_twins_loss(z1, z2, self.barlow_lambda), torch.cat([z1, z2])
        # BYOL(-A) and SimCLR pass both views as one 2B batch (BatchNorm over both views).
        views = torch.cat([view1, view2])
        z = self.projector(self.encoder(views))
        if self.method == "simclr":
            return nt_xent(z[:b], z[b:], self.temperature), z
        assert self.predictor is not None and self.target_encoder is not None
        assert self.target_projector is not None
        p = self.predictor(z)
        with torch.no_grad():
            t = self.target_projector(self.target_encoder(views)).detach()
        # Symmetric: view 1 predicts view 2's target and view 2 predicts view 1's.
        loss = byol_loss(p[:b], t[b:]) + byol_loss(p[b:], t[:b])
        return loss, z

    @staticmethod
    def _projection_std(z: Tensor) -> Tensor:
        return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        view1, view2 = self._views(batch["features"])
        loss, z = self.ssl_loss(view1, view2)
        self.log_split("train", {"loss": loss}, on_step=True, on_epoch=True, prog_bar=True)
        self.log_split("train", {"proj_std": self._projection_std(z)}, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Views from a generator seeded by the batch index: the val loss is comparable across
        # epochs, and validation does not consume the global RNG that training draws from.
        generator = torch.Generator().manual_seed(batch_idx)
        view1, view2 = self._views(batch["features"], generator)
        loss, z = self.ssl_loss(view1, view2)
        self.log_split("val", {"loss": loss}, on_epoch=True, prog_bar=True)
        self.log_split("val", {"proj_std": self._projection_std(z)}, on_epoch=True)


def _build_augment(augment: dict[str, Any] | None) -> nn.Module:
    """``BYOLAAugment(**augment)``, or the class named by ``augment["_target_"]``."""
    kwargs = dict(augment or {})
    target = kwargs.pop("_target_", None)
    cls = get_class(target) if target else BYOLAAugment
    # Configs give lists; the augmentation scales are pairs.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)
