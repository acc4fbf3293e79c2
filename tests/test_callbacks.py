"""Stage callbacks: ``PseudoLabeler``'s meta.json records what ran (the preprocessing
actually applied, the k-means iterations actually run), and ``KNNMonitor``'s cadence.
The monitor's logged value is checked against a recomputation in tests/test_unfused.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from distillery.callbacks.pseudo_labeler import PseudoLabeler
from distillery.clustering.distributed import LocalComm, label_dataset
from tests.test_pseudo_label_scale import K, _Data


class _Stage(nn.Module):
    stage_name = "ssl"

    def encoder_for_eval(self) -> nn.Module:
        return nn.Identity()


def _trainer(data: _Data) -> SimpleNamespace:
    """The parts of a single-process Trainer that the callback reads."""
    strategy = SimpleNamespace(
        world_size=1,
        global_rank=0,
        root_device=torch.device("cpu"),
        barrier=lambda name=None: None,
    )
    return SimpleNamespace(
        datamodule=data,
        strategy=strategy,
        is_global_zero=True,
        current_epoch=0,
        global_step=0,
        loggers=[],
    )


def _label(blobs: np.ndarray, tmp_path: Path, **options) -> tuple[np.ndarray, dict]:
    data = _Data(blobs)
    data.table.true_labels = np.full(len(data.table.source.records), -1)
    callback = PseudoLabeler(k=K, out_dir=str(tmp_path), seed=0, **options)
    callback.label(_trainer(data), _Stage())
    meta = json.loads((tmp_path / "pseudo_labels" / "meta.json").read_text())
    return np.load(tmp_path / "pseudo_labels" / "labels.npy"), meta


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(n_samples=700, n_features=16, centers=K, cluster_std=2.0, random_state=1)
    return x.astype(np.float32)


def test_skipped_pca_is_recorded_as_skipped(blobs: np.ndarray, tmp_path: Path) -> None:
    """16-dim embeddings with pca_dim=128: no PCA ran, and meta.json says so."""
    labels, meta = _label(blobs, tmp_path, pca_dim=128)
    assert meta["embed_dim"] == 16 and meta["pca_dim_requested"] == 128
    assert meta["pca_dim"] is None and meta["eig_power"] is None
    assert meta["preprocessing"] == "no pca (16-dim embeddings, pca_dim 128), l2-normalize"
    # What ran is what meta.json says: the same labels as asking for no PCA at all.
    plain, *_ = label_dataset(LocalComm(), nn.Identity(), _Data(blobs), k=K, pca_dim=None)
    np.testing.assert_array_equal(labels, plain)


def test_applied_pca_and_iterations_run_are_recorded(blobs: np.ndarray, tmp_path: Path) -> None:
    labels, meta = _label(blobs, tmp_path, pca_dim=8, niter=50)
    assert meta["pca_dim"] == 8 and meta["eig_power"] == -0.5 and meta["pca_dim_requested"] == 8
    assert meta["preprocessing"] == "pca to 8 dims (eig_power -0.5), l2-normalize"
    _, _, model, result = label_dataset(
        LocalComm(), nn.Identity(), _Data(blobs), k=K, pca_dim=8, niter=50
    )
    assert model.whitening is not None and model.whitening.dim == 8
    # FAISS converges on these blobs well before 50 iterations; the count run is recorded.
    assert meta["niter"] == 50 and meta["n_iter"] == result.n_iter < 50
    plain, *_ = label_dataset(LocalComm(), nn.Identity(), _Data(blobs), k=K, pca_dim=None)
    assert not np.array_equal(labels, plain)  # the whitening changed the clustering


def test_knn_monitor_measures_every_n_epochs_and_after_the_last(monkeypatch) -> None:
    """Epochs 3 and 6 of 7 (every_n_epochs=3) and the last one, 7; nothing else."""
    from distillery.callbacks import knn_monitor

    table = SimpleNamespace(
        indices=lambda split: np.arange(10) if split == "train" else np.arange(10, 14),
        visible_labels=np.array([0, 1] * 7),
    )
    data = SimpleNamespace(table=table, featurize=None, dataloader=lambda split, indices: indices)
    monkeypatch.setattr(knn_monitor, "embed", lambda enc, idx, f, dev: (idx, idx[:, None], idx % 2))
    logged = []

    class Module:
        device = "cpu"

        def encoder_for_eval(self):
            return None

        def log_split(self, split, metrics, **kwargs):
            logged.append((trainer.current_epoch + 1, split, metrics))

    trainer = SimpleNamespace(datamodule=data, max_epochs=7, current_epoch=0)
    monitor = knn_monitor.KNNMonitor(every_n_epochs=3, k=(1,))
    for epoch in range(7):
        trainer.current_epoch = epoch
        monitor.on_train_epoch_end(trainer, Module())
    assert [(e, s) for e, s, _ in logged] == [(3, "val"), (6, "val"), (7, "val")]
    assert all(set(m) == {"online_knn1_acc"} for *_, m in logged)
