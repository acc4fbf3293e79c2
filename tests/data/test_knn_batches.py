"""Teacher-space kNN: true neighbours; the batch sampler: neighbourhoods, coverage, ranks."""

from __future__ import annotations

import numpy as np
import pytest

from distillery.data.knn_batches import NeighbourBatchSampler, teacher_neighbours


def brute_force_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def test_neighbours_are_the_true_cosine_neighbours() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16)).astype(np.float32) * rng.uniform(
        0.1, 10, (200, 1)
    )  # scale must not matter
    found = teacher_neighbours(x, 7)
    assert found.shape == (200, 7) and found.dtype == np.int64
    np.testing.assert_array_equal(found, brute_force_neighbours(x.astype(np.float64), 7))


def test_neighbours_never_contain_the_row_itself_even_with_duplicates() -> None:
    x = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # every row has two exact copies
    found = teacher_neighbours(x, 2)
    assert not (found == np.arange(12)[:, None]).any()
    assert (found // 3 == np.arange(12)[:, None] // 3).all()  # the copies are the neighbours
    with pytest.raises(ValueError, match="k must be"):
        teacher_neighbours(x, 12)


def neighbour_table(n: int = 50, pool: int = 9) -> np.ndarray:
    return teacher_neighbours(np.random.default_rng(1).standard_normal((n, 8)), pool)


def test_batches_are_anchors_with_their_neighbours_and_cover_the_data_set() -> None:
    table = neighbour_table()
    sampler = NeighbourBatchSampler(table, anchors_per_batch=3, num_neighbours=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 17  # ceil(50 / 3)
    anchors = []
    for batch in batches:
        assert len(batch) == sampler.batch_size == 3 * 5
        for group in np.reshape(batch, (3, 5)):
            anchor, picks = group[0], group[1:]
            anchors.append(anchor)
            assert (
                set(picks) <= set(table[anchor]) and len(set(picks)) == 4
            )  # drawn without replacement
    assert set(anchors) == set(range(50))  # every item is an anchor this epoch
    assert len(anchors) == 51  # 50 items, wrapped to a full last batch
    # Seeded per epoch: the same epoch repeats, the next one is a new order.
    assert list(sampler) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_ranks_get_disjoint_anchors_that_together_cover_the_data_set() -> None:
    table = neighbour_table(n=48)

    def anchors(rank: int, world: int, n_anchors: int = 4) -> list[int]:
        sampler = NeighbourBatchSampler(table, n_anchors, 2, seed=5, rank=rank, world_size=world)
        sampler.set_epoch(3)
        return [b[i] for b in sampler for i in range(0, len(b), 3)]

    rank0, rank1 = anchors(0, 2), anchors(1, 2)
    assert len(rank0) == len(rank1) == 24  # 48 = 6 rounds x 2 ranks x 4 anchors: no wrap
    assert not set(rank0) & set(rank1)
    assert set(rank0) | set(rank1) == set(range(48))
    # Uneven: 48 items, 5 anchors x 2 ranks per round -> both ranks 5 batches, all covered.
    a, b = anchors(0, 2, 5), anchors(1, 2, 5)
    assert len(a) == len(b) == 25 and set(a) | set(b) == set(range(48))


def test_bad_sampler_arguments() -> None:
    table = neighbour_table()
    with pytest.raises(ValueError, match="num_neighbours"):
        NeighbourBatchSampler(table, 2, num_neighbours=10)
    with pytest.raises(ValueError, match="rank"):
        NeighbourBatchSampler(table, 2, 3, rank=2, world_size=2)
