"""Stratified split assignment and labelled subsets."""

from __future__ import annotations

import numpy as np
import pytest

from distillery.data.splits import assign_splits, label_subset


def _labels():
    # Unbalanced classes plus unknown (-1) items and a tiny class.
    return np.repeat(np.array([0, 1, 2, -1, 3]), [100, 40, 20, 30, 3])


def test_splits_are_stratified_with_requested_fractions():
    labels = _labels()
    splits = assign_splits(labels, 0.1, 0.2, seed=0)
    assert splits.shape == labels.shape
    assert set(np.unique(splits)) == {"train", "val", "test"}
    for label, n in [(0, 100), (1, 40), (2, 20), (-1, 30)]:
        in_class = splits[labels == label]
        assert (in_class == "val").sum() == round(0.1 * n)
        assert (in_class == "test").sum() == round(0.2 * n)
        assert (in_class == "train").sum() == n - round(0.1 * n) - round(0.2 * n)


def test_splits_are_deterministic_and_depend_on_seed():
    labels = _labels()
    a = assign_splits(labels, 0.1, 0.2, seed=3)
    np.testing.assert_array_equal(a, assign_splits(labels, 0.1, 0.2, seed=3))
    assert not np.array_equal(a, assign_splits(labels, 0.1, 0.2, seed=4))


def test_every_class_with_three_items_keeps_a_train_item():
    labels = np.repeat(np.arange(6), [1, 2, 3, 3, 4, 5])
    splits = assign_splits(labels, 0.45, 0.45, seed=0)
    for label in range(2, 6):
        assert (splits[labels == label] == "train").sum() >= 1
    assert np.isin(splits, ["train", "val", "test"]).all()


def test_zero_fractions_put_everything_in_train():
    labels = _labels()
    assert (assign_splits(labels, 0.0, 0.0, seed=0) == "train").all()


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (1.0, 0.0), (0.6, 0.5), (0.1, 1.2)])
def test_invalid_fractions(val, test):
    with pytest.raises(ValueError, match="fraction"):
        assign_splits(_labels(), val, test, seed=0)


def test_labels_must_be_1d_integers():
    with pytest.raises(ValueError, match="1-D"):
        assign_splits(np.zeros((2, 2), dtype=int), 0.1, 0.1, seed=0)
    with pytest.raises(ValueError, match="integers"):
        assign_splits(np.array([0.5, 1.0]), 0.1, 0.1, seed=0)


def test_label_subset_is_stratified_sorted_and_deterministic():
    labels = _labels()
    keep = label_subset(labels, 0.1, seed=0)
    assert keep.dtype == np.int64
    assert np.all(np.diff(keep) > 0)
    kept = labels[keep]
    assert (kept == 0).sum() == 10 and (kept == 1).sum() == 4 and (kept == 2).sum() == 2
    assert (kept == 3).sum() == 1  # at least one per class
    assert not (kept == -1).any()  # unknown labels cannot be "kept labelled"
    np.testing.assert_array_equal(keep, label_subset(labels, 0.1, seed=0))
    assert not np.array_equal(keep, label_subset(labels, 0.1, seed=1))


def test_label_subset_full_fraction_keeps_all_known():
    labels = _labels()
    np.testing.assert_array_equal(label_subset(labels, 1.0, seed=0), np.flatnonzero(labels >= 0))


def test_label_subset_tiny_fraction_keeps_one_per_class():
    labels = _labels()
    kept = labels[label_subset(labels, 1e-6, seed=0)]
    assert sorted(kept.tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01])
def test_label_subset_bounds(fraction):
    with pytest.raises(ValueError, match=r"label_fraction.*\(0, 1\]"):
        label_subset(_labels(), fraction, seed=0)
