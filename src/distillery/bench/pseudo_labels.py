"""Pseudo-labeling pass: embed + cluster + write labels, ours vs a scikit-learn pipeline.

Embedding is what :class:`~distillery.callbacks.pseudo_labeler.PseudoLabeler` runs
(:func:`distillery.eval.embed.embed` over the data module's evaluation loader, log-mel
by ``featurize``) with the ``unfused`` SSL teacher's encoder (randomly initialised: the
cost does not depend on the weights), on a synthetic set of ``clips`` clips. Its time is
the median over equal shards of the set, scaled to 10k clips.

Both clustering pipelines then get the same embeddings, fit on the train split, label
every clip (``assign_splits=("val", "test")``, so that the whole set is labeled) and
write ``labels.npy`` atomically:

- ours: :func:`distillery.clustering.distributed.pseudo_label` in one process, as the
  ``PseudoLabeler`` calls it: ``pca_whiten(dim=128)``, ``l2_normalize``,
  ``distillery.clustering.kmeans`` (k = 32, 20 iterations), chunked assignment;
- scikit-learn: ``PCA(128, whiten=True)``, ``normalize``,
  ``KMeans(k=32, init="k-means++", n_init=1)``, ``predict``.

Both whitenings divide by the square root of the same (n - 1)-normalised eigenvalues,
so the two pipelines cluster the same space (up to the signs of the axes) and their
inertias are comparable. Clustering repeats are interleaved with seeds 0, 1, ...
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import normalized_mutual_info_score
from sklearn.preprocessing import normalize

from distillery import artifacts
from distillery.bench.common import EXPERIMENT, compose_config
from distillery.bench.timing import Comparison, interleaved, median, stopwatch
from distillery.bench.training import build_datamodule
from distillery.clustering.distributed import LocalComm, pseudo_label
from distillery.data.datamodule import AudioDataModule
from distillery.eval.embed import embed
from distillery.models.io import build_encoder

STAGE = "ssl"  # the stage that carries the PseudoLabeler in the unfused pipeline
PER_CLIPS = 10_000


@dataclass(frozen=True)
class Sizes:
    classes: int
    clips_per_class: int
    shards: int  # embedding repeats: equal shards of the set
    repeats: int  # clustering repeats per pipeline
    k: int
    pca_dim: int


FULL = Sizes(classes=8, clips_per_class=1250, shards=5, repeats=3, k=32, pca_dim=128)
QUICK = Sizes(classes=4, clips_per_class=40, shards=2, repeats=1, k=8, pca_dim=32)


def _datamodule(cache_dir: Path, sizes: Sizes, run_dir: Path) -> tuple[AudioDataModule, Any]:
    cfg = compose_config(
        [
            EXPERIMENT,
            f"run_dir={run_dir}",
            f"data.cache_dir={cache_dir}",
            f"data.synthetic.num_classes={sizes.classes}",
            f"data.synthetic.clips_per_class={sizes.clips_per_class}",
        ]
    )
    return build_datamodule(cfg, STAGE), cfg


def embed_all(
    datamodule: AudioDataModule, encoder: torch.nn.Module, shards: int
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Embeddings of every clip in dataset-index order, and the seconds of each shard."""
    everything = np.arange(len(datamodule.table.source.records))
    indices, feats, seconds = [], [], []
    for shard in np.array_split(everything, shards):
        loader = datamodule.dataloader("train", indices=shard)  # as gather_embeddings
        with stopwatch() as watch:
            got_idx, got, _ = embed(encoder, loader, datamodule.featurize)
        seconds.append(watch.seconds)
        indices.append(got_idx)
        feats.append(got)
    idx, x = np.concatenate(indices), np.concatenate(feats)
    order = np.argsort(idx)
    return idx[order], x[order], seconds


@dataclass(frozen=True)
class Task:
    """Embeddings of every clip and what to fit on."""

    indices: np.ndarray  # (n,) dataset indices, ascending
    x: np.ndarray  # (n, d) float32 embeddings
    fit_indices: np.ndarray  # dataset indices of the train split
    num_records: int
    k: int
    pca_dim: int


def ours(task: Task, seed: int) -> tuple[np.ndarray, float]:
    """The PseudoLabeler's clustering: (labels per record, inertia of the fitted points)."""
    labels, _, result = pseudo_label(
        LocalComm(),
        task.indices,
        task.x,
        task.fit_indices,
        task.num_records,
        k=task.k,
        pca_dim=task.pca_dim,
        eig_power=-0.5,
        normalize=True,
        niter=20,
        seed=seed,
    )
    return labels, float(result.inertia)


def sklearn(task: Task, seed: int) -> tuple[np.ndarray, float]:
    """The scikit-learn equivalent: (labels per record, inertia of the fitted points)."""
    is_fit = np.isin(task.indices, task.fit_indices)
    pca = PCA(n_components=task.pca_dim, whiten=True, random_state=seed).fit(task.x[is_fit])
    km = KMeans(n_clusters=task.k, init="k-means++", n_init=1, random_state=seed)
    km.fit(normalize(pca.transform(task.x[is_fit])))
    labels = np.full(task.num_records, -1, dtype=np.int64)
    labels[task.indices] = km.predict(normalize(pca.transform(task.x)))
    return labels, float(km.inertia_)


PIPELINES = {"distillery": ours, "sklearn": sklearn}


def run(quick: bool, cache_dir: Path, seed: int = 0) -> tuple[dict[str, Any], list[Comparison]]:
    """Embed the set once (timed per shard), then interleave the two clustering pipelines."""
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        datamodule, cfg = _datamodule(cache_dir, sizes, Path(tmp) / "run")
        torch.manual_seed(seed)
        encoder_cfg = OmegaConf.to_container(
            cfg.pipeline.stages[STAGE].module.encoder, resolve=True
        )
        encoder = build_encoder(encoder_cfg)
        indices, x, embed_seconds = embed_all(datamodule, encoder, sizes.shards)
        datamodule.cache = None  # the preloaded audio is no longer needed

        table = datamodule.table
        task = Task(
            indices, x, table.indices("train"), len(table.source.records), sizes.k, sizes.pca_dim
        )
        is_fit = np.isin(indices, task.fit_indices)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in PIPELINES}

        def pipeline(name: str) -> Any:
            def go() -> None:
                labels, inertia = PIPELINES[name](task, seed + len(results[name]))
                artifacts.write_numpy(Path(tmp) / name / "labels.npy", labels)
                results[name].append({"labels": labels, "inertia": inertia})

            return go

        cluster_seconds = interleaved({name: pipeline(name) for name in PIPELINES}, sizes.repeats)
        fit_true = table.true_labels[indices[is_fit]]
        for runs in results.values():  # scored after timing
            for r in runs:
                r["nmi"] = _nmi(fit_true, r["labels"][indices[is_fit]])

    n = len(indices)
    scale = PER_CLIPS / n
    embed_per = median([s * sizes.shards for s in embed_seconds]) * scale
    cluster_per = {name: median(seconds) * scale for name, seconds in cluster_seconds.items()}
    total = {name: embed_per + cluster_per[name] for name in PIPELINES}
    inertia = {name: median([r["inertia"] for r in rs]) for name, rs in results.items()}
    agreement = _nmi(results["distillery"][0]["labels"], results["sklearn"][0]["labels"])
    raw = {
        "clips": n,
        "embedding_dim": int(x.shape[1]),
        "fit_clips": int(is_fit.sum()),
        "k": sizes.k,
        "pca_dim": sizes.pca_dim,
        "encoder": encoder_cfg,
        "embed_shard_seconds": embed_seconds,
        "cluster_seconds": cluster_seconds,
        "per_10k_clips_s": {"embed": embed_per, "cluster": cluster_per, "total": total},
        "inertia": inertia,
        "nmi_to_true_labels": {
            name: median([r["nmi"] for r in rs]) for name, rs in results.items()
        },
        "nmi_between_pipelines": agreement,
        "ratios": {
            "cluster_time": cluster_per["distillery"] / cluster_per["sklearn"],
            "total_time": total["distillery"] / total["sklearn"],
            "inertia": inertia["distillery"] / inertia["sklearn"],
        },
    }
    scaled = "" if n == PER_CLIPS else f" (timed on {n} clips, scaled)"
    note = f"k={sizes.k}, PCA-whiten {sizes.pca_dim}{scaled}"
    rows = [
        Comparison(
            benchmark="pseudo-labeling",
            measure="cluster + write labels (same embeddings)",
            unit="s / 10k clips",
            candidate="distillery (pca_whiten + kmeans)",
            baseline="sklearn (PCA whiten + KMeans++)",
            candidate_value=cluster_per["distillery"],
            baseline_value=cluster_per["sklearn"],
            higher_is_better=False,
            note=note,
        ),
        Comparison(
            benchmark="pseudo-labeling",
            measure="embed + cluster + write labels",
            unit="s / 10k clips",
            candidate="distillery (pca_whiten + kmeans)",
            baseline="sklearn (PCA whiten + KMeans++)",
            candidate_value=total["distillery"],
            baseline_value=total["sklearn"],
            higher_is_better=False,
            note=f"embedding (shared by both): {embed_per:.1f} s / 10k clips",
        ),
        Comparison(
            benchmark="pseudo-labeling",
            measure="embedding's share of the pass",
            unit="s / 10k clips",
            candidate="embed (log-mel + encoder)",
            baseline="embed + cluster + write (distillery)",
            candidate_value=embed_per,
            baseline_value=total["distillery"],
            higher_is_better=False,
            note=f"teacher encoder {encoder_cfg['_target_'].rsplit('.', 1)[-1]}, "
            f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M parameters",
        ),
        Comparison(
            benchmark="pseudo-labeling",
            measure="k-means inertia (same whitened space)",
            unit="sum sq. dist.",
            candidate="distillery (pca_whiten + kmeans)",
            baseline="sklearn (PCA whiten + KMeans++)",
            candidate_value=inertia["distillery"],
            baseline_value=inertia["sklearn"],
            higher_is_better=False,
            note=f"NMI between the two labelings {agreement:.2f}",
        ),
    ]
    return raw, rows


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
    return float(normalized_mutual_info_score(a, b))
