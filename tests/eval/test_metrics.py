"""Evaluation metrics and embedding extraction on small, hand-checkable data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distillery.eval.embed import embed
from distillery.eval.metrics import clustering_scores, knn_accuracy, linear_probe_accuracy


def _blobs(
    n_per_class: int, n_classes: int, dim: int, *, spread: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around random unit directions (well separated for small spread)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centers[y] + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y.astype(np.int64)


def _knn_brute_force(train_x, train_y, test_x, test_y, k: int, temperature: float) -> float:
    """Reference: one test row at a time, plain numpy."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    correct = 0
    for q, label in zip(test_x, test_y, strict=True):
        sim = tr @ (q / np.linalg.norm(q))
        top = np.argsort(-sim)[:k]
        votes: dict[int, float] = {}
        for j in top:
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + np.exp(sim[j] / temperature)
        correct += max(votes, key=votes.get) == label
    return correct / len(test_y)


# ---------------------------------------------------------------------------- kNN


def test_knn_hand_made_example() -> None:
    # Train points on the axes of the plane: class 0 along +x, class 1 along +y.
    train_x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 1.0]], dtype=np.float32)
    train_y = np.array([0, 0, 1, 1, 1])
    test_x = np.array([[1, 0.05], [0.05, 1], [1, 0.3]], dtype=np.float32)
    # With k=1 the nearest neighbour decides: 0, 1, 0. The third true label is 1 -> 2/3.
    assert knn_accuracy(train_x, train_y, test_x, np.array([0, 1, 1]), k=1) == pytest.approx(2 / 3)
    # With k=5 and a large temperature the vote is nearly a plain count: class 1 (3 of 5)
    # wins everywhere. With a small temperature the most similar class dominates again.
    assert knn_accuracy(
        train_x, train_y, test_x, np.array([1, 1, 1]), k=5, temperature=100.0
    ) == pytest.approx(1.0)
    assert knn_accuracy(
        train_x, train_y, test_x, np.array([0, 1, 0]), k=5, temperature=0.01
    ) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 10, 20])
def test_knn_matches_brute_force_on_random_data(k: int) -> None:
    rng = np.random.default_rng(k)
    train_x = rng.normal(size=(300, 8)).astype(np.float32)
    train_y = rng.integers(0, 5, size=300)
    test_x = rng.normal(size=(120, 8)).astype(np.float32)
    test_y = rng.integers(0, 5, size=120)
    expected = _knn_brute_force(train_x, train_y, test_x, test_y, k, 0.07)
    # Small chunks exercise the chunked path; torch inputs are accepted as well.
    got = knn_accuracy(train_x, train_y, test_x, test_y, k=k, chunk_size=7)
    got_torch = knn_accuracy(
        torch.from_numpy(train_x), torch.from_numpy(train_y), test_x, test_y, k=k
    )
    assert got == pytest.approx(expected)
    assert got_torch == pytest.approx(expected)


def test_knn_ignores_unlabeled_rows() -> None:
    x, y = _blobs(40, 3, 16, spread=0.1, seed=0)
    base = knn_accuracy(x[::2], y[::2], x[1::2], y[1::2], k=10)
    assert base == pytest.approx(1.0)
    # Unlabeled train rows sitting exactly on the test points would be every test row's
    # nearest neighbours; unlabeled test rows pointing the wrong way would be misclassified.
    rng = np.random.default_rng(1)
    train_x = np.concatenate([x[::2], x[1::2]])
    train_y = np.concatenate([y[::2], -np.ones(len(y[1::2]), dtype=np.int64)])
    test_x = np.concatenate([x[1::2], rng.normal(size=(20, 16)).astype(np.float32)])
    test_y = np.concatenate([y[1::2], -np.ones(20, dtype=np.int64)])
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=10) == pytest.approx(base)
    with pytest.raises(ValueError, match="no labeled rows"):
        knn_accuracy(x, -np.ones_like(y), x, y)


# ---------------------------------------------------------------------- linear probe


def test_linear_probe_separable_blobs() -> None:
    x, y = _blobs(60, 4, 12, spread=0.15, seed=2)
    x = 5.0 * x + 3.0  # standardisation makes the scale and offset irrelevant
    acc, pred = linear_probe_accuracy(x[::2], y[::2], x[1::2], y[1::2], epochs=50)
    assert acc >= 0.98
    assert pred.shape == (len(y[1::2]),) and pred.dtype == np.int64
    assert set(np.unique(pred)) <= set(range(4))


def test_linear_probe_random_labels_near_chance() -> None:
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(200, 16)), rng.normal(size=(2000, 16))
    acc, _ = linear_probe_accuracy(
        train_x, rng.integers(0, 4, size=200), test_x, rng.integers(0, 4, size=2000), epochs=50
    )
    assert 0.15 < acc < 0.35


def test_linear_probe_deterministic_and_ignores_unlabeled() -> None:
    x, y = _blobs(50, 3, 8, spread=0.4, seed=4)
    train_y = y.copy()
    train_y[::5] = -1
    test_y = y.copy()
    test_y[1::4] = -1
    # batch_size < n exercises the shuffled mini-batch path, where the seed matters.
    kwargs = {"epochs": 20, "seed": 7, "batch_size": 32}
    acc1, pred1 = linear_probe_accuracy(x, train_y, x, test_y, **kwargs)
    acc2, pred2 = linear_probe_accuracy(x, train_y, x, test_y, **kwargs)
    assert acc1 == acc2
    np.testing.assert_array_equal(pred1, pred2)
    # Predictions cover every test row; the accuracy only the labeled ones.
    assert pred1.shape == (len(x),)
    scored = test_y != -1
    assert acc1 == pytest.approx((pred1[scored] == y[scored]).mean())


def test_linear_probe_works_under_inference_mode() -> None:
    x, y = _blobs(30, 2, 4, spread=0.1, seed=5)
    with torch.inference_mode():
        acc, _ = linear_probe_accuracy(torch.from_numpy(x), y, x, y, epochs=10)
    assert acc == pytest.approx(1.0)


# ------------------------------------------------------------------------ clustering


def test_clustering_scores_on_separated_blobs() -> None:
    pytest.importorskip("distillery.clustering")
    x, y = _blobs(50, 4, 16, spread=0.05, seed=6)
    # Different norms per row: k-means runs on L2-normalised rows, so this changes nothing.
    x = x * np.random.default_rng(0).uniform(0.5, 5.0, size=(len(x), 1)).astype(np.float32)
    # Unlabeled noise rows are left out of both the clustering and the scores.
    noise = np.random.default_rng(1).normal(size=(30, 16)).astype(np.float32)
    scores = clustering_scores(
        np.concatenate([x, noise]), np.concatenate([y, -np.ones(30, dtype=np.int64)])
    )
    assert scores["k"] == 4
    assert scores["nmi"] > 0.95
    assert scores["ari"] > 0.95


# ----------------------------------------------------------------------------- embed


class _Encoder(nn.Module):
    """Mean-pools (B, 1, F, T) features; its dropout would make train-mode output random."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.drop = nn.Dropout(0.5)
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.drop(self.proj(x.mean(dim=(1, 3)))))


def _loader(n: int, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(n, 64, generator=g)
    labels = torch.arange(n) % 3
    labels[::7] = -1
    order = torch.randperm(n, generator=g)  # indices arrive shuffled, as from a sampler
    return [
        {
            "index": order[i : i + batch],
            "audio": audio[order[i : i + batch]],
            "label": labels[order[i : i + batch]],
        }
        for i in range(0, n, batch)
    ]


def _featurize(audio: torch.Tensor) -> torch.Tensor:
    return audio.reshape(audio.shape[0], 1, 8, 8)


def test_embed_returns_every_item_once_and_restores_modes() -> None:
    encoder = _Encoder()
    encoder.train()
    encoder.norm.eval()  # a frozen submodule: its flag must survive too
    loader = _loader(50, 8)
    indices, z, labels = embed(encoder, loader, _featurize)

    assert indices.dtype == np.int64 and labels.dtype == np.int64 and z.dtype == np.float32
    assert z.shape == (50, 6)
    np.testing.assert_array_equal(np.sort(indices), np.arange(50))
    expected_labels = np.arange(50) % 3
    expected_labels[::7] = -1
    np.testing.assert_array_equal(labels, expected_labels[indices])
    # Eval mode inside: deterministic, and equal to a direct eval-mode forward pass.
    assert encoder.training and encoder.proj.training and not encoder.norm.training
    encoder.eval()
    with torch.no_grad():
        direct = torch.cat([encoder(_featurize(b["audio"])) for b in loader]).numpy()
    np.testing.assert_allclose(z, direct, rtol=1e-5, atol=1e-6)


def test_embed_restores_mode_on_error() -> None:
    encoder = _Encoder().train()

    def broken(audio: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("featurizer failed")

    with pytest.raises(RuntimeError, match="featurizer failed"):
        embed(encoder, _loader(10, 5), broken)
    assert all(m.training for m in encoder.modules())
