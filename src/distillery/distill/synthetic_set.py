"""The synthetic-set artifact of ``dataset_distill``: tensors, meta data and a picture.

Layout of the artifact folder (each file written atomically)::

    tensors.pt    {"inputs": (N, 1, n_mels, T) float32 log-mel, "targets": (N, D) float32}
    examples.png  synthetic inputs above the real clips they were initialised from
    meta.json     sizes, shapes and how the set was made (written last)

The artifact path recorded by the runner is ``tensors.pt``; the other files sit next to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from distillery import artifacts
from distillery.eval.plots import _save as save_figure

__all__ = [
    "SyntheticSetDataModule",
    "load_synthetic_set",
    "plot_synthetic_examples",
    "save_synthetic_set",
]

TENSORS, META, EXAMPLES = "tensors.pt", "meta.json", "examples.png"


def save_synthetic_set(
    out_dir: str | os.PathLike,
    inputs: Tensor,
    targets: Tensor,
    meta: dict[str, Any],
    *,
    real_inputs: Tensor | None = None,
    num_examples: int = 8,
) -> Path:
    """Write the artifact into ``out_dir``; returns the path of ``tensors.pt``.

    ``real_inputs`` (N, 1, n_mels, T): the real clips the synthetic inputs started from,
    drawn under them in ``examples.png``.
    """
    out_dir = Path(out_dir)
    inputs, targets = inputs.detach().float().cpu(), targets.detach().float().cpu()
    path = out_dir / TENSORS
    artifacts.write_torch(path, {"inputs": inputs, "targets": targets})
    plot_synthetic_examples(out_dir / EXAMPLES, inputs, real_inputs, num_examples=num_examples)
    meta = meta | {
        "size": len(inputs),
        "input_shape": list(inputs.shape[1:]),
        "target_dim": targets.shape[1],
    }
    artifacts.write_json(out_dir / META, meta)
    return path


def load_synthetic_set(path: str | os.PathLike) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Inputs (N, 1, n_mels, T), targets (N, D) and meta data of a saved synthetic set."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"synthetic set {path} does not exist (a dataset_distill stage's tensors.pt)"
        )
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or not {"inputs", "targets"} <= payload.keys():
        raise ValueError(
            f"{path}: not a synthetic set (expected a dict with 'inputs' and 'targets')"
        )
    inputs, targets = payload["inputs"], payload["targets"]
    if inputs.dim() != 4 or targets.dim() != 2 or len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"{path}: inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be "
            "(N, 1, n_mels, T) and (N, D) with the same N > 0"
        )
    meta_path = path.with_name(META)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return inputs, targets, meta


def plot_synthetic_examples(
    path: str | os.PathLike,
    synthetic: Tensor,
    real: Tensor | None = None,
    *,
    num_examples: int = 8,
) -> Path:
    """Log-mel images of the first ``num_examples`` synthetic inputs (top row) and, when
    given, the real clips at the same positions (middle row, same colour scale per column)
    and their difference (bottom row, symmetric scale: distillation's changes are small)."""
    n = min(num_examples, len(synthetic))
    images = {"synthetic": synthetic[:n, 0].detach().float().cpu().numpy()}
    if real is not None:
        images["real (initial)"] = real[:n, 0].detach().float().cpu().numpy()
        images["difference"] = images["synthetic"] - images["real (initial)"]
    fig = Figure(figsize=(2.0 * n + 0.5, 2.0 * len(images)))
    axes = np.asarray(fig.subplots(len(images), n, squeeze=False))
    for col in range(n):
        spectrograms = [images[k][col] for k in images if k != "difference"]
        low = min(float(i.min()) for i in spectrograms)
        high = max(float(i.max()) for i in spectrograms)
        for row, (label, batch) in enumerate(images.items()):
            ax = axes[row, col]
            if label == "difference":
                bound = max(float(np.abs(batch[col]).max()), 1e-6)
                ax.imshow(
                    batch[col],
                    origin="lower",
                    aspect="auto",
                    cmap="RdBu_r",
                    vmin=-bound,
                    vmax=bound,
                )
            else:
                ax.imshow(
                    batch[col], origin="lower", aspect="auto", cmap="magma", vmin=low, vmax=high
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label)
        axes[0, col].set_title(f"#{col}")
    fig.suptitle("synthetic log-mel inputs vs the real clips they started from")
    return save_figure(fig, path)


class SyntheticSetDataModule(pl.LightningDataModule):
    """Batches ``{"index", "features", "target"}`` of a synthetic set, shuffled per epoch.

    Under DDP each rank takes its share (a ``DistributedSampler`` seeded by the run seed);
    Lightning sets the sampler's epoch, so an epoch's order depends on (seed, epoch) alone.
    """

    def __init__(self, synthetic: Any, batch_size: int) -> None:
        super().__init__()
        self.synthetic, self.batch_size = synthetic, batch_size

    def train_dataloader(self) -> DataLoader:
        dataset = _SyntheticItems(self.synthetic.inputs, self.synthetic.targets)
        world, rank = (1, 0)
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(
            dataset, world, rank, shuffle=True, seed=torch.initial_seed() % 2**31
        )
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


class _SyntheticItems(Dataset):
    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "features": self.inputs[index], "target": self.targets[index]}
