"""Stage ``pseudo_label``: k-means pseudo-labels of a trained encoder, without training it.

The same :class:`~distillery.callbacks.pseudo_labeler.PseudoLabeler` that an ``ssl`` stage
can carry, run here on an ``encoder.pt`` artifact of an earlier stage: changing k or the
preprocessing then changes this stage's config hash only, so the teacher is trained once
and every clustering setting reuses it (with ``stage_cache``, across runs too).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from distillery.artifact_kinds import Artifact, EncoderArtifact
from distillery.callbacks.pseudo_labeler import PseudoLabeler
from distillery.stages.base import StageModule


class PseudoLabelStage(StageModule):
    """Cluster ``encoder``'s embeddings of the train split with the stage's ``PseudoLabeler``
    (``callbacks.pseudo_labeler``; its artifact ``pseudo_labels`` and ``<stage>/pseudo/*``
    metrics, e.g. ``nmi``).

    ``encoder``: an ``encoder.pt`` artifact (usually wired through ``inputs``), kept in eval
    mode. The fit ends at its first batch, before any step: the stage takes no
    optimizer step by design, and the clustering runs when training ends, as on ``ssl``.
    """

    takes_optimizer_steps = False

    def __init__(self, encoder: EncoderArtifact, stage_name: str = "pseudo_label") -> None:
        super().__init__(stage_name)
        # Parameters left as loaded (requiring grad): DDP refuses to wrap a module with
        # none; no optimizer exists and no step runs, so nothing changes them.
        self.encoder = encoder.module.eval()
        self.encoder_cfg = encoder.config

    def train(self, mode: bool = True) -> PseudoLabelStage:
        super().train(mode)
        self.encoder.eval()  # its BatchNorm statistics and dropout stay as trained
        return self

    def setup(self, stage: str) -> None:
        if not any(isinstance(c, PseudoLabeler) for c in self.trainer.callbacks):
            raise ValueError(
                f"pipeline.stages.{self.stage_name}.callbacks: a pseudo_label stage needs a "
                "PseudoLabeler callback (e.g. callbacks.pseudo_labeler from conf/callback)"
            )

    def configure_optimizers(self) -> None:
        return None  # nothing to learn

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int:
        # End the epoch before training_step and the fit after it, whatever max_epochs says.
        self.trainer.should_stop = True
        return -1

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        raise RuntimeError("unreachable: on_train_batch_start ends every epoch first")

    def encoder_for_eval(self) -> nn.Module:
        return self.encoder  # what the PseudoLabeler embeds

    def export_artifacts(self) -> dict[str, Artifact]:
        return {}  # the encoder is the earlier stage's artifact; the labels the callback's
