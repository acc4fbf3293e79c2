"""Label-noise generators: exact per-class rates, where the labels go, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from distillery.data.label_noise import add_label_noise, resolve_clusters

C = 6
LABELS = np.repeat(np.arange(C), 50)  # 50 items per class


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.8])
def test_rate_is_hit_exactly_per_class(kind: str, rate: float) -> None:
    noisy = add_label_noise(LABELS, kind, rate, C, seed=0)
    assert noisy.realised_rate == pytest.approx(rate)
    for c in range(C):
        assert (noisy.labels[np.equal(LABELS, c)] != c).sum() == round(rate * 50)


def test_symmetric_spreads_over_the_other_classes() -> None:
    labels = np.repeat(np.arange(4), 3000)
    noisy = add_label_noise(labels, "symmetric", 0.6, 4, seed=1).labels
    for c in range(4):
        moved = noisy[(labels == c) & (noisy != c)]
        counts = np.bincount(moved, minlength=4)
        assert counts[c] == 0
        # 1800 flips over 3 classes: 600 each, binomial std ~20.
        assert np.all(np.abs(np.delete(counts, c) - 600) < 100), counts


def test_asymmetric_goes_to_the_next_class() -> None:
    noisy = add_label_noise(LABELS, "asymmetric", 0.4, C, seed=0).labels
    moved = noisy != LABELS
    assert np.array_equal(noisy[moved], (LABELS[moved] + 1) % C)


def test_clustered_stays_inside_the_cluster_and_reports_the_lower_rate() -> None:
    clusters = [[0, 1, 2], [3, 4], [5]]  # class 5 cannot move
    noisy = add_label_noise(LABELS, "clustered", 0.5, C, seed=0, clusters=clusters)
    cluster_id = {c: i for i, cl in enumerate(clusters) for c in cl}
    moved = noisy.labels != LABELS
    assert all(
        cluster_id[a] == cluster_id[b]
        for a, b in zip(LABELS[moved], noisy.labels[moved], strict=True)
    )
    assert (noisy.labels[LABELS == 5] == 5).all()
    assert noisy.realised_rate == pytest.approx(0.5 * 5 / 6)
    # Without clusters there is nothing to flip into.
    with pytest.raises(ValueError, match="clusters"):
        add_label_noise(LABELS, "clustered", 0.5, C, seed=0)


def test_seeded_unlabeled_untouched_and_bad_input() -> None:
    labels = np.concatenate([LABELS, -np.ones(20, dtype=np.int64)])
    a = add_label_noise(labels, "symmetric", 0.3, C, seed=7)
    b = add_label_noise(labels, "symmetric", 0.3, C, seed=7)
    c = add_label_noise(labels, "symmetric", 0.3, C, seed=8)
    assert np.array_equal(a.labels, b.labels) and not np.array_equal(a.labels, c.labels)
    assert (a.labels[-20:] == -1).all() and a.realised_rate == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        add_label_noise(LABELS, "symmetric", 1.0, C, seed=0)
    with pytest.raises(ValueError, match="kind"):
        add_label_noise(LABELS, "uniform", 0.1, C, seed=0)


def test_resolve_clusters_by_name_and_index() -> None:
    names = ["tone_low", "tone_high", "chirp_up", "chirp_down"]
    assert resolve_clusters([["tone_low", "tone_high"], [2, "chirp_down"]], names) == [
        [0, 1],
        [2, 3],
    ]
    with pytest.raises(ValueError, match="'vowel_a'"):
        resolve_clusters([["vowel_a"]], names)
    with pytest.raises(ValueError, match="more than one cluster"):
        resolve_clusters([[0, 1], [1, 2]], names)
