"""Mean average precision (multi-label evaluation) against a hand-computed case and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.eval.metrics import (
    MeanAveragePrecision,
    average_precision,
    linear_probe_map,
    mean_average_precision,
)


def test_average_precision_by_hand() -> None:
    # Ranked 0.9 (neg), 0.8 (pos), 0.7 (pos), 0.1 (neg): P@2 = 1/2, P@3 = 2/3.
    assert average_precision([0, 1, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(
        0.5 * 0.5 + 0.5 * 2 / 3
    )
    # Tied scores are one threshold: the two 0.7s give recall 1 at precision 2/3 together,
    # whatever their order (counting them one by one would give (1/2 + 2/3) / 2).
    assert average_precision([0, 1, 1, 0], [0.9, 0.7, 0.7, 0.1]) == pytest.approx(2 / 3)
    assert average_precision([0, 1, 1, 0], [0.9, 0.7, 0.7, 0.7]) == pytest.approx(0.5)


def test_map_is_the_macro_average_over_classes_with_positives() -> None:
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.1, 0.3, 0.3]])
    # class 0: ranked 0.9 (pos), 0.2 (neg), 0.1 (pos) -> (1 + 2/3) / 2; class 1: both
    # positives ranked first -> 1; class 2 has no positive and is left out.
    assert mean_average_precision(targets, scores) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_map_equals_sklearn_with_ties() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 7)) < 0.3).astype(int)
    scores = np.round(rng.normal(size=(200, 7)) + targets, 1)  # rounding makes many ties
    per_class = [
        sklearn_metrics.average_precision_score(targets[:, c], scores[:, c]) for c in range(7)
    ]
    assert [average_precision(targets[:, c], scores[:, c]) for c in range(7)] == pytest.approx(
        per_class, abs=1e-12
    )
    expected = sklearn_metrics.average_precision_score(targets, scores, average="macro")
    assert mean_average_precision(targets, scores) == pytest.approx(expected, abs=1e-12)

    metric = MeanAveragePrecision()
    for rows in np.array_split(np.arange(200), 3):  # batch by batch, as a test loop feeds it
        metric.update(torch.from_numpy(scores[rows]), torch.from_numpy(targets[rows]))
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)


def test_linear_probe_map_learns_separable_classes() -> None:
    rng = np.random.default_rng(1)
    targets = (rng.random((300, 4)) < 0.4).astype(np.float32)
    x = targets @ rng.normal(size=(4, 16)) + 0.05 * rng.normal(size=(300, 16))
    assert linear_probe_map(x[:200], targets[:200], x[200:], targets[200:], epochs=50) > 0.95
    noise = rng.normal(size=(300, 16))
    assert linear_probe_map(noise[:200], targets[:200], noise[200:], targets[200:]) < 0.7


def test_targets_must_be_multi_hot() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        mean_average_precision(np.array([[2, 0]]), np.array([[0.1, 0.2]]))
