"""Input pipeline: log-mel on the fly vs precomputed, and time spent waiting for data.

All variants train the ``finetune`` stage's module with the plain loop of
:mod:`distillery.bench.training` (the same steps as the Lightning path, without its
overhead, so only the data path differs) and time the epochs after a warm-up one:

- ``on the fly, 0 workers``: the data module's train loader as configured (preloaded
  audio, ``num_workers=0``), log-mel by ``AudioDataModule.featurize`` every step, as in
  ``on_after_batch_transfer``. The baseline of both comparisons.
- ``precomputed``: the same clips' log-mel computed once up front, batches of feature
  tensors. The built-in clips are exactly ``clip_seconds`` long, so the training crop is
  the whole clip and the precomputed features are the ones computed on the fly.
- ``on the fly, 2 workers``: as the baseline with ``data.num_workers=2`` (persistent
  workers, started in the warm-up epoch).

Each step is split into: waiting for the loader's next batch, log-mel, and the training
step proper; the data-wait fraction is the first over the whole step time. Throughput is
the median over the timed epochs of all repeats, time shares the median over repeats.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from distillery.bench.timing import Comparison, interleaved, median
from distillery.bench.training import (
    FULL,
    QUICK,
    Sizes,
    build_datamodule,
    epoch_throughput,
    fresh_module,
    plain_loop,
    stage_config,
)
from distillery.data.datamodule import AudioDataModule

WORKERS = 2
FULL_SIZES = Sizes(epochs=4, repeats=3, overrides=FULL.overrides)
QUICK_SIZES = Sizes(epochs=2, repeats=1, overrides=QUICK.overrides)


class FeatureDataset(Dataset):
    """Precomputed (1, n_mels, frames) log-mel per clip, with the clip's label."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"features": self.features[i], "label": int(self.labels[i])}


def precomputed_loader(datamodule: AudioDataModule) -> DataLoader:
    """The train split's log-mel, computed once; batched and shuffled like the train loader."""
    clips = datamodule.dataloader("train")  # centre crops = whole clips for the built-in set
    features, labels = [], []
    for batch in clips:
        features.append(datamodule.featurize(batch["audio"]))
        labels.append(batch["label"])
    dataset = FeatureDataset(torch.cat(features), torch.cat(labels))
    return DataLoader(
        dataset,
        batch_size=datamodule.cfg.batch_size,
        shuffle=True,
        drop_last=len(dataset) > datamodule.cfg.batch_size,
    )


def run(quick: bool, cache_dir: Path, seed: int = 0) -> tuple[dict[str, Any], list[Comparison]]:
    """Interleave the three variants; medians of throughput and of time shares."""
    sizes = QUICK_SIZES if quick else FULL_SIZES
    names = {
        "fly0": "on the fly, 0 workers",
        "pre": "precomputed log-mel",
        "fly2": f"on the fly, {WORKERS} workers",
    }
    shares: dict[str, dict[str, list[float]]] = {
        key: {"samples_per_s": [], "data_wait": [], "featurize": [], "compute": []} for key in names
    }

    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        cfg = stage_config(Path(tmp) / "run", cache_dir, sizes)
        cfg_workers = stage_config(
            Path(tmp) / "run", cache_dir, sizes, (f"data.num_workers={WORKERS}",)
        )
        serial, workers = build_datamodule(cfg), build_datamodule(cfg_workers)
        loaders = {
            "fly0": (serial.train_dataloader(), serial.featurize),
            "pre": (precomputed_loader(serial), None),
            # Built once: persistent workers start in the first (warm-up) epoch of each run.
            "fly2": (workers.train_dataloader(), workers.featurize),
        }

        def variant(key: str) -> Any:
            def go() -> float:
                loader, featurize = loaders[key]
                module, optimizer = fresh_module(cfg, serial, seed)
                times = plain_loop(module, optimizer, loader, featurize, sizes.epochs)
                record = shares[key]
                record["samples_per_s"] += epoch_throughput(times.epochs)  # pooled over repeats
                for part in ("data_wait", "featurize", "compute"):
                    record[part].append(getattr(times, part) / times.seconds)
                return times.seconds

            return go

        seconds = interleaved({key: variant(key) for key in names}, sizes.repeats)
        loaders.clear()  # shuts the worker processes down before the temporary directory goes

    med = {key: {k: median(v) for k, v in record.items()} for key, record in shares.items()}
    raw = {
        "variants": names,
        "epochs": sizes.epochs,
        "warmup_epochs": 1,
        "repeats": sizes.repeats,
        "batch_size": serial.cfg.batch_size,
        "seconds": seconds,
        "runs": shares,
        "medians": med,
        "ratios": {
            "precomputed_vs_on_the_fly_throughput": med["pre"]["samples_per_s"]
            / med["fly0"]["samples_per_s"],
            "workers_vs_serial_throughput": med["fly2"]["samples_per_s"]
            / med["fly0"]["samples_per_s"],
        },
    }
    rows = [
        Comparison(
            benchmark="input pipeline",
            measure="train throughput",
            unit="samples/s",
            candidate=names["pre"],
            baseline=names["fly0"],
            candidate_value=med["pre"]["samples_per_s"],
            baseline_value=med["fly0"]["samples_per_s"],
            higher_is_better=True,
            note=f"log-mel is {med['fly0']['featurize']:.1%} of the on-the-fly step time",
        ),
        Comparison(
            benchmark="input pipeline",
            measure="train throughput",
            unit="samples/s",
            candidate=names["fly2"],
            baseline=names["fly0"],
            candidate_value=med["fly2"]["samples_per_s"],
            baseline_value=med["fly0"]["samples_per_s"],
            higher_is_better=True,
        ),
        Comparison(
            benchmark="input pipeline",
            measure="share of step time waiting for data",
            unit="fraction",
            candidate=names["fly2"],
            baseline=names["fly0"],
            candidate_value=med["fly2"]["data_wait"],
            baseline_value=med["fly0"]["data_wait"],
            higher_is_better=False,
            note="time blocked in next(loader) / whole step time",
        ),
    ]
    return raw, rows
