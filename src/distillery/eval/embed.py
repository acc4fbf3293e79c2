"""Run a frozen encoder over a data loader and collect its embeddings."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from rich.progress import track
from torch import Tensor, nn

__all__ = ["embed"]

#: Loaders with more batches than this show a progress bar; smaller runs stay quiet.
PROGRESS_MIN_BATCHES = 20


def _flat_int64(value: Any) -> np.ndarray:
    return torch.as_tensor(value).reshape(-1).cpu().numpy().astype(np.int64)


def embed(
    encoder: nn.Module,
    loader: Iterable[dict[str, Any]],
    featurize: Callable[[Tensor], Tensor],
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings of every item of ``loader``, in loader order.

    The encoder runs in eval mode under ``torch.inference_mode()``; the train/eval flag of
    each of its submodules is restored afterwards (also on error). The encoder is expected
    to already be on ``device``.

    Args:
        encoder: maps ``featurize(audio)`` to (B, d) embeddings.
        loader: batches are dicts with ``index`` (B,), ``audio`` (B, samples) and
            ``label`` (B,) (``-1`` for unlabeled items).
        featurize: (B, samples) audio on ``device`` -> encoder input (e.g. log-mel).
        device: where the audio is moved before ``featurize``.

    Returns:
        ``(indices, embeddings, labels)``: (n,) int64, (n, d) float32 and (n,) int64.
    """
    device = torch.device(device)
    # Per-module flags, not just encoder.training: a module may keep e.g. frozen
    # normalisation layers in eval mode while the rest trains.
    modes = {module: module.training for module in encoder.modules()}
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    batches: Iterable[dict[str, Any]] = loader
    if n_batches is not None and n_batches > PROGRESS_MIN_BATCHES:
        batches = track(loader, total=n_batches, description="embedding", transient=True)

    indices: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    encoder.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                audio = batch["audio"].to(device, non_blocking=True)
                z = encoder(featurize(audio))
                if z.dim() != 2 or z.shape[0] != audio.shape[0]:
                    raise ValueError(
                        f"encoder output must be (B, d) with B={audio.shape[0]}, "
                        f"got {tuple(z.shape)}"
                    )
                index, label = _flat_int64(batch["index"]), _flat_int64(batch["label"])
                if len(index) != len(z) or len(label) != len(z):
                    raise ValueError(
                        f"batch of {len(z)} items has {len(index)} indices, {len(label)} labels"
                    )
                indices.append(index)
                embeddings.append(z.float().cpu().numpy())
                labels.append(label)
    finally:
        for module, training in modes.items():
            module.training = training

    if not embeddings:
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.zeros((0, 0), dtype=np.float32), empty.copy()
    return (
        np.concatenate(indices),
        np.concatenate(embeddings).astype(np.float32, copy=False),
        np.concatenate(labels),
    )
