"""What our stage modules share: metric naming, optimizer construction, the encoder artifact.

The contract every stage (ours or a user's) follows is in :mod:`distillery.pipeline.contract`."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn

from distillery.artifact_kinds import Artifact, EncoderArtifact


def encoder_inputs(encoder: nn.Module, batch: dict[str, Any]) -> tuple[Any, ...]:
    """The arguments ``encoder`` takes from a batch: log-mel ``features``, or, for a waveform
    encoder (``input_key = "audio"``), ``audio`` and the clips' valid ``length`` if given.
    Every stage feeds its encoders through this; a frame-level loss on a waveform batch
    with lengths masks the padded frames by the encoder's ``frame_mask(lengths, T)``."""
    key = getattr(encoder, "input_key", "features")
    if key == "audio" and "length" in batch:
        return batch["audio"], batch["length"]
    return (batch[key],)


def freeze_unused(
    encoder: nn.Module,
    uses: Literal["forward", "hidden_states"],
    highest_state: int | None = None,
) -> None:
    """Freeze the submodules of ``encoder`` that the stage's use of it never runs, as the
    encoder declares them: ``outside_forward`` (not run by ``forward``/``forward_exits``,
    e.g. a speech encoder's layers above its ``embedding_layer``) or
    ``outside_hidden_states`` (not run by ``forward_hidden_states``, e.g. a final
    LayerNorm); a stage that reads hidden states up to ``highest_state`` only also freezes
    the layers after it, by the encoder's ``outside_hidden_states_to(highest_state)``. No
    loss can train them, and under DDP a trainable parameter without a gradient stops
    training (so no ``find_unused_parameters`` and its extra graph traversal every step).
    They keep their values, and the exported encoder keeps them."""
    names = getattr(encoder, f"outside_{uses}", ())
    if uses == "hidden_states" and highest_state is not None:
        names = getattr(encoder, "outside_hidden_states_to", lambda _: names)(highest_state)
    for name in names:
        encoder.get_submodule(name).requires_grad_(False)


def lacking_attributes(stage_cls: type, arg: str, encoder: nn.Module) -> str | None:
    """What ``encoder`` (constructor argument ``arg`` of ``stage_cls``) lacks of the
    attributes the stage's ``encoder_requirements`` name for it, as a sentence; or ``None``.

    A requirement is a tuple of attribute names, every encoder's, or a dict of such tuples
    by the encoder's ``input_key``, for what only encoders of that input need (e.g.
    ``{"audio": ("frame_mask",)}``: a waveform encoder's padded frames)."""
    key = getattr(encoder, "input_key", "features")
    needed = getattr(stage_cls, "encoder_requirements", {}).get(arg, ())
    of = ""
    if isinstance(needed, dict):
        needed, of = needed.get(key, ()), f" of an encoder reading {key!r}"
    if not (lacking := [a for a in needed if not hasattr(encoder, a)]):
        return None
    return (
        f"{type(encoder).__name__} lacks {', '.join(lacking)}, which {stage_cls.__name__} "
        f"needs (required{of}: {', '.join(needed)})"
    )


def refused_input(stage_cls: type, arg: str, encoder: nn.Module) -> str | None:
    """Why ``stage_cls`` cannot feed ``encoder`` (its constructor argument ``arg``) the input
    the encoder declares by ``input_key``, by the stage's ``refused_encoder_inputs``; or
    ``None`` when it can."""
    key = getattr(encoder, "input_key", "features")
    why = getattr(stage_cls, "refused_encoder_inputs", {}).get(arg, {}).get(key)
    if why is None:
        return None
    return (
        f"{type(encoder).__name__} reads {key!r} (its input_key), which "
        f"{stage_cls.__name__} cannot feed it: {why}"
    )


class StageModule(pl.LightningModule):
    """Base class of stage modules.

    Subclasses hold their method's training step and nothing else. The runner passes
    ``stage_name`` (used in metric keys ``<stage>/<split>/<name>``) and, when the constructor
    takes them, ``num_classes``, ``num_pseudo_classes`` and the artifacts of earlier stages
    (see :mod:`distillery.pipeline.contract`).

    ``optimizer`` is a ``_partial_`` config called with the parameters; ``scheduler`` an
    optional ``_partial_`` config called with the optimizer, stepped per epoch or, with
    ``interval: step``, per optimizer step; a scheduler that takes ``total_steps`` gets the
    stage's optimizer steps (e.g. :func:`distillery.stages.schedules.warmup_decay`).
    """

    #: Artifacts :meth:`export_artifacts` returns, by name and kind; checked against other
    #: stages' ``inputs`` at start-up (the runner adds the ``checkpoint``).
    produces: ClassVar[dict[str, type[Artifact]]] = {}
    #: Attributes an encoder config argument must give, checked at start-up: by argument,
    #: a tuple of names, or a dict of tuples by the encoder's ``input_key`` (see
    #: :func:`lacking_attributes`).
    encoder_requirements: ClassVar[dict[str, tuple[str, ...] | dict[str, tuple[str, ...]]]] = {}
    #: Encoder inputs (``input_key`` values) the stage cannot feed, by encoder argument,
    #: each with the reason; checked at start-up (see :func:`refused_input`).
    refused_encoder_inputs: ClassVar[dict[str, dict[str, str]]] = {}
    #: (C, C) counts of the stage's own classifier on the test split (rows: true class), set
    #: after ``trainer.test`` by stages that classify; plotted as the stage's confusion matrix.
    test_confusion: np.ndarray | None = None
    #: False where the stage, as configured, learns nothing by gradient steps (a baseline
    #: that only builds its artifact): the runner then accepts zero optimizer steps.
    takes_optimizer_steps: bool = True

    def __init__(
        self,
        stage_name: str = "stage",
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.stage_name = stage_name
        self.optimizer_cfg = optimizer or {
            "_target_": "torch.optim.Adam",
            "_partial_": True,
            "lr": 1e-3,
        }
        self.scheduler_cfg = scheduler

    def log_split(
        self, split: str, metrics: dict[str, torch.Tensor | float], **kwargs: Any
    ) -> None:
        """Log ``metrics`` as ``<stage>/<split>/<name>``."""
        kwargs.setdefault("sync_dist", True)  # epoch values averaged over ranks under DDP
        self.log_dict({f"{self.stage_name}/{split}/{k}": v for k, v in metrics.items()}, **kwargs)

    def check_encoder_input(self, arg: str, encoder: nn.Module) -> None:
        """Raise naming ``module.<arg>`` if this stage cannot feed ``encoder`` the input it
        declares (``refused_encoder_inputs``) or the encoder lacks what the stage needs of
        it (``encoder_requirements``): for an encoder the start-up check cannot build, e.g.
        an artifact given as a file, or a stage built outside a pipeline."""
        if why := refused_input(type(self), arg, encoder) or lacking_attributes(
            type(self), arg, encoder
        ):
            raise ValueError(f"module.{arg}: {why}")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.optimizer_cfg)(self.trainable_parameters())
        if not self.scheduler_cfg:
            return optimizer
        cfg = dict(self.scheduler_cfg)
        interval = cfg.pop("interval", "epoch")
        if interval not in ("epoch", "step"):
            raise ValueError(f"scheduler.interval must be 'epoch' or 'step', got {interval!r}")
        build = instantiate(cfg)
        takes_total = "total_steps" in inspect.signature(build).parameters and (
            "total_steps" not in cfg
        )
        kwargs = (
            {"total_steps": int(self.trainer.estimated_stepping_batches)} if takes_total else {}
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": build(optimizer, **kwargs), "interval": interval},
        }

    def encoder_for_eval(self) -> nn.Module | None:
        """The encoder this stage yields (evaluated and exported, built from ``self.encoder_cfg``)."""
        return None

    def export_artifacts(self) -> dict[str, Artifact]:
        """This stage's artifacts by name; the runner saves them (rank 0 only)."""
        encoder = self.encoder_for_eval()
        if encoder is None:
            return {}
        return {"encoder": EncoderArtifact(encoder, self.encoder_cfg)}

    def configure_data(self, data: pl.LightningDataModule) -> pl.LightningDataModule:
        """The data this stage trains on; by default the shared audio data module."""
        return data
