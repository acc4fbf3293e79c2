"""The kinds of artifact stages hand each other, as typed objects.

A stage never opens an artifact file. It declares what it produces (``produces = {name:
kind}``) and takes what it consumes as constructor arguments annotated with a kind
(``pretrained: EncoderArtifact | None``). The runner loads each input with ``kind.load``
and saves what the stage returns with ``artifact.save``; start-up validation checks that
an ``inputs`` entry hands an argument the kind it is annotated with.

Every kind has a ``filename`` (its file or folder under the stage dir); ``save`` returns
the path recorded in ``pipeline.json`` and ``load`` reads that path back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from distillery import artifacts
from distillery.distill.synthetic_set import load_synthetic_set, save_synthetic_set
from distillery.eval.plots import _save as save_figure
from distillery.models.io import load_encoder, save_encoder

__all__ = [
    "Artifact",
    "Checkpoint",
    "EncoderArtifact",
    "HuggingFaceEncoder",
    "JsonReport",
    "Plot",
    "StandaloneEncoder",
    "PseudoLabels",
    "SyntheticSet",
    "Tensors",
]


class Artifact:
    """Base of artifact kinds: ``save(path) -> recorded path`` and ``load(path)``."""

    #: File or folder name under the stage dir.
    filename: ClassVar[str]

    def save(self, path: Path) -> Path:
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | os.PathLike) -> Artifact:
        raise NotImplementedError


@dataclass
class Checkpoint(Artifact):
    """A Lightning checkpoint the trainer wrote; only its path is handed on."""

    path: Path
    filename: ClassVar[str] = "checkpoints"

    def save(self, path: Path) -> Path:
        return self.path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Checkpoint:
        return cls(Path(path))


@dataclass
class EncoderArtifact(Artifact):
    """An encoder module with the ``_target_`` config that rebuilds it (``encoder.pt``)."""

    module: nn.Module
    config: dict[str, Any]
    filename: ClassVar[str] = "encoder.pt"

    def save(self, path: Path) -> Path:
        save_encoder(path, self.module, self.config)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EncoderArtifact:
        module, config = load_encoder(path)
        return cls(module, config)


@dataclass
class PseudoLabels(Artifact):
    """k-means pseudo-labels of a data set (written by the ``PseudoLabeler``).

    ``labels``: (num_records,) int64 per data-set record, -1 where not labeled;
    ``centroids``: (k, dim) float32; ``meta``: how they were made (``meta.json``).
    The recorded path is ``pseudo_labels/labels.npy``; the other files sit next to it.
    """

    labels: np.ndarray
    k: int
    centroids: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    filename: ClassVar[str] = "pseudo_labels"

    def save(self, path: Path) -> Path:
        artifacts.write_numpy(path / "labels.npy", self.labels)
        if self.centroids is not None:
            artifacts.write_numpy(path / "centroids.npy", self.centroids)
        artifacts.write_json(path / "meta.json", self.meta | {"k": self.k})
        return path / "labels.npy"

    @classmethod
    def load(cls, path: str | os.PathLike) -> PseudoLabels:
        path = Path(path)
        labels = np.load(path, allow_pickle=False)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{path}: pseudo-labels must be a 1-d integer array, got {labels.shape}"
            )
        meta_path, centroids_path = path.with_name("meta.json"), path.with_name("centroids.npy")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        centroids = np.load(centroids_path, allow_pickle=False) if centroids_path.exists() else None
        k = int(meta.get("k", labels.max() + 1))
        return cls(labels.astype(np.int64), k, centroids, meta)


@dataclass
class SyntheticSet(Artifact):
    """A distilled data set (KRR-ST): (N, 1, n_mels, T) inputs and (N, D) targets.

    ``real_inputs``: the real clips the set started from, drawn beside it when saved.
    """

    inputs: Tensor
    targets: Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    real_inputs: Tensor | None = None
    filename: ClassVar[str] = "synthetic_set"

    def save(self, path: Path) -> Path:
        return save_synthetic_set(
            path, self.inputs, self.targets, self.meta, real_inputs=self.real_inputs
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> SyntheticSet:
        inputs, targets, meta = load_synthetic_set(path)
        return cls(inputs, targets, meta)


@dataclass
class JsonReport(Artifact):
    """A small summary (e.g. ``pruning.json``)."""

    data: dict[str, Any]
    filename: ClassVar[str] = "report.json"

    def save(self, path: Path) -> Path:
        artifacts.write_json(path, self.data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> JsonReport:
        return cls(json.loads(Path(path).read_text()))


@dataclass
class Tensors(Artifact):
    """Named tensors (and plain values), saved so that loading needs no pickled code."""

    data: dict[str, Any]
    filename: ClassVar[str] = "tensors.pt"

    def save(self, path: Path) -> Path:
        artifacts.write_torch(path, self.data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tensors:
        return cls(torch.load(path, map_location="cpu", weights_only=True))


@dataclass
class Plot(Artifact):
    """A figure, saved as PNG."""

    figure: Figure
    filename: ClassVar[str] = "plot.png"

    def save(self, path: Path) -> Path:
        return save_figure(self.figure, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plot:
        raise TypeError(f"{path}: a plot is for people to look at, not an input of a stage")


@dataclass
class StandaloneEncoder(Artifact):
    """A speech encoder that loads without distillery: a ``torch.export`` program and its
    description (``standalone/encoder.pt2``, ``encoder.json``; see
    :mod:`distillery.models.standalone`). The recorded path is the program's."""

    module: nn.Module
    config: dict[str, Any]
    filename: ClassVar[str] = "standalone"

    def save(self, path: Path) -> Path:
        from distillery.models.standalone import export_program  # torchaudio only when used

        return export_program(self.module, path, self.config)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StandaloneEncoder:
        raise TypeError(
            f"{path}: a standalone program is for use outside distillery "
            "(torch.export.load); hand stages the encoder artifact"
        )


@dataclass
class HuggingFaceEncoder(Artifact):
    """An unpruned speech encoder as a Hugging Face model directory (``huggingface/``)."""

    module: nn.Module
    filename: ClassVar[str] = "huggingface"

    def save(self, path: Path) -> Path:
        from distillery.models.standalone import save_huggingface

        return save_huggingface(self.module, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HuggingFaceEncoder:
        from distillery.models.speech import SpeechEncoder

        return cls(SpeechEncoder(weights=os.fspath(path)))
