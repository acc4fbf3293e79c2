"""Evaluation plots and the end-to-end evaluation report write readable PNG files."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distillery.eval.plots import plot_cluster_sizes, plot_confusion_matrix, plot_embedding_map
from distillery.eval.report import evaluate_encoder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    # Atomic writes leave no temp files behind.
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_embedding_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(3, 8))[y] + 0.1 * rng.normal(size=(120, 8))
    y[:5] = -1  # drawn as "unlabeled"
    path = plot_embedding_map(
        x, y, ["dog", "rain", "siren"], tmp_path / "sub" / "map.png", max_points=90
    )
    assert path == tmp_path / "sub" / "map.png"
    _assert_png(path)


def test_confusion_matrix(tmp_path: Path) -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2, -1])
    y_pred = np.array([0, 1, 1, 1, 0, 2, 2])
    # A class absent from y_true (3) gives an empty row rather than a division by zero.
    path = plot_confusion_matrix(
        y_true, y_pred, ["a", "b", "c", "d"], tmp_path / "cm.png", title="probe"
    )
    _assert_png(path)


def test_cluster_sizes_with_empty_clusters(tmp_path: Path) -> None:
    labels = np.array([0] * 30 + [1] * 10 + [3] * 5)  # clusters 2 and 4 are empty
    _assert_png(plot_cluster_sizes(labels, 5, tmp_path / "sizes.png", title="k-means"))
    with pytest.raises(ValueError, match="must lie in"):
        plot_cluster_sizes(labels, 3, tmp_path / "bad.png", title="k-means")


class _MeanEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _loader(x: np.ndarray, y: np.ndarray, batch: int = 16) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "index": torch.arange(i, min(i + batch, len(x))),
            "audio": torch.from_numpy(x[i : i + batch]),
            "label": torch.from_numpy(y[i : i + batch]),
        }
        for i in range(0, len(x), batch)
    ]


def _split(seed: int, n_per_class: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.eye(4, dtype=np.float32) * 3.0
    y = np.repeat(np.arange(3), n_per_class)
    return (centers[y] + 0.1 * rng.normal(size=(len(y), 4))).astype(np.float32), y


def test_evaluate_encoder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("distillery.clustering")
    torch.manual_seed(0)
    encoder = _MeanEncoder()
    train, test = _split(0), _split(1)
    with caplog.at_level(logging.INFO, logger="distillery.eval"):
        metrics, paths = evaluate_encoder(
            encoder,
            _loader(*train),
            _loader(*test),
            lambda a: a,
            class_names=["a", "b", "c"],
            out_dir=tmp_path / "eval",
            probe_epochs=30,
        )
    assert set(metrics) == {
        "knn10_acc",
        "knn20_acc",
        "linear_acc",
        "nmi",
        "ari",
        "params",
        "embed_dim",
        "throughput_clips_s",
    }
    assert metrics["params"] == 20.0 and metrics["embed_dim"] == 4.0
    assert metrics["knn10_acc"] == pytest.approx(1.0)
    assert metrics["linear_acc"] == pytest.approx(1.0)
    assert {"embedding_map", "confusion"} <= set(paths)
    for path in paths.values():
        assert Path(path).parent == tmp_path / "eval"
        _assert_png(Path(path))
    assert any("knn10_acc=1.0000" in r.getMessage() for r in caplog.records)


def test_evaluate_encoder_without_train_labels(tmp_path: Path) -> None:
    x, y = _split(0)
    metrics, paths = evaluate_encoder(
        _MeanEncoder(),
        _loader(x, -np.ones_like(y)),
        _loader(x, -np.ones_like(y)),
        lambda a: a,
        class_names=["a", "b", "c"],
        out_dir=tmp_path,
        plots=False,
    )
    assert metrics.pop("throughput_clips_s") > 0
    assert metrics == {"params": 20.0, "embed_dim": 4.0}
    assert paths == {}


class _SlowEncoder(_MeanEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return super().forward(x)


def _slow_loader(x: np.ndarray, y: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
    for batch in _loader(x, y):
        time.sleep(0.25)  # reading from disk: not the encoder's time
        yield batch


def test_throughput_counts_the_encoder_not_the_loader(tmp_path: Path) -> None:
    x, y = _split(0)  # 60 clips: 4 batches of 16, so at least 0.2 s in the encoder
    metrics, _ = evaluate_encoder(
        _SlowEncoder(),
        _loader(x, y),
        _slow_loader(x, y),
        lambda a: a,
        class_names=["a", "b", "c"],
        out_dir=tmp_path,
        plots=False,
        probe_epochs=1,
    )
    # 300 clips/s at most (60 clips in 4 x 0.05 s); with the loader's 1 s it would be < 50.
    assert 100 < metrics["throughput_clips_s"] <= 300
