"""Tests of distillery.clustering: k-means quality and edge cases, assignment, stats, PCA."""

from __future__ import annotations

import json
import statistics

import faiss
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from distillery.clustering import (
    KMeansResult,
    PCAWhitening,
    assign,
    cluster_stats,
    kmeans,
    l2_normalize,
    pca_whiten,
)

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """5000 x 32 well-separated blobs, 20 planted clusters."""
    x, y = make_blobs(n_samples=5000, n_features=32, centers=20, random_state=0)
    return x.astype(np.float32), y


def _brute_force(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and squared distance, in float64 from the differences."""
    sq = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    return sq.argmin(axis=1), sq.min(axis=1)


def _check_consistent(x: np.ndarray, result: KMeansResult, k: int) -> None:
    """Labels are a nearest-centroid assignment (ties allowed) and inertia matches them."""
    assert result.centroids.shape == (k, x.shape[1])
    assert result.centroids.dtype == np.float32
    assert result.labels.shape == (x.shape[0],)
    assert result.labels.dtype == np.int64
    _, best = _brute_force(x, result.centroids)
    own = ((x.astype(np.float64) - result.centroids[result.labels]) ** 2).sum(axis=1)
    scale = max(1.0, float(np.abs(x).max()) ** 2)
    np.testing.assert_allclose(own, best, rtol=1e-4, atol=1e-5 * scale)
    assert result.inertia == pytest.approx(own.sum(), rel=1e-4, abs=1e-4 * scale)


# ------------------------------------------------------------------------- quality


def test_inertia_matches_sklearn_kmeans_plus_plus(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    ours = [kmeans(x, 20, seed=s) for s in SEEDS]
    sk = [KMeans(20, n_init=1, init="k-means++", random_state=s).fit(x).inertia_ for s in SEEDS]
    assert statistics.median(r.inertia for r in ours) <= 1.01 * statistics.median(sk)
    for r in ours:
        assert adjusted_rand_score(y, r.labels) > 0.95
        assert r.n_reseeded == 0
        _check_consistent(x, r, 20)


def test_subsampled_training_then_full_data_refinement(
    blobs: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = blobs
    # 20 * 40 = 800 training points out of 5000, then Lloyd steps on all points.
    result = kmeans(x, 20, seed=0, max_points_per_centroid=40, refine_iter=2)
    full = kmeans(x, 20, seed=0)
    assert result.inertia <= 1.01 * full.inertia
    assert adjusted_rand_score(y, result.labels) > 0.95
    _check_consistent(x, result, 20)


def test_deterministic_for_a_seed(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    x = x[:2000]
    a = kmeans(x, 30, seed=7, max_points_per_centroid=32)
    b = kmeans(x, 30, seed=7, max_points_per_centroid=32)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.inertia, a.n_iter, a.n_reseeded) == (b.inertia, b.n_iter, b.n_reseeded)


def test_global_faiss_thread_setting_untouched(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    before = faiss.omp_get_max_threads()
    kmeans(blobs[0][:500], 5)
    assert faiss.omp_get_max_threads() == before


def test_k_equals_one_and_k_equals_n() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    one = kmeans(x, 1)
    np.testing.assert_allclose(one.centroids[0], x.mean(axis=0), atol=1e-5)
    np.testing.assert_array_equal(one.labels, np.zeros(40, dtype=np.int64))
    every = kmeans(x, 40)
    assert sorted(every.labels.tolist()) == list(range(40))
    assert every.inertia == pytest.approx(0.0, abs=1e-8)


def test_accepts_float64_and_converts() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    result = kmeans(x, 3)
    assert result.centroids.dtype == np.float32
    _check_consistent(x.astype(np.float32), result, 3)


# ------------------------------------------------------------------------- empty clusters


@pytest.mark.parametrize("k", [12, 20, 50])
def test_duplicate_points_leave_no_cluster_empty(k: int) -> None:
    # 10 distinct points, 5 copies each: with k > 10, nearest-centroid search alone must
    # leave clusters empty (identical centroids, ties broken one way).
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(10, 8)).astype(np.float32), 5, axis=0)
    result = kmeans(x, k, seed=0)
    sizes = np.bincount(result.labels, minlength=k)
    assert sizes.min() >= 1
    assert result.n_reseeded >= k - 10
    assert result.inertia == pytest.approx(0.0, abs=1e-4)
    _check_consistent(x, result, k)


def test_identical_points() -> None:
    x = np.ones((25, 3), dtype=np.float32)
    result = kmeans(x, 4, seed=1)
    assert np.bincount(result.labels, minlength=4).min() >= 1
    assert result.n_reseeded >= 3
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_outlier_clusters_near_k_equals_n() -> None:
    # A dense clump plus a few far outliers, k close to n: stays valid, nothing empty.
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=(60, 2)) * 1e-3, rng.normal(size=(5, 2)) * 100])
    x = x.astype(np.float32)
    result = kmeans(x, 60, seed=0)
    assert np.bincount(result.labels, minlength=60).min() >= 1
    _check_consistent(x, result, 60)


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "match"),
    [
        (np.zeros(10, np.float32), 2, {}, r"x: expected a 2-D .*\(10,\)"),
        (np.zeros((0, 3), np.float32), 1, {}, r"x: expected a non-empty .*\(0, 3\)"),
        (
            np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]]),
            2,
            {},
            r"x: contains NaN or inf .*row 1",
        ),
        (np.array([[0.0, 1.0], [np.inf, 0.0]]), 1, {}, r"x: contains NaN or inf"),
        (np.zeros((5, 2)), 0, {}, r"k must be in \[1, 5\], got 0"),
        (np.zeros((5, 2)), 6, {}, r"k must be in \[1, 5\], got 6"),
        (np.zeros((5, 2)), 2.0, {}, r"k must be an integer, got 2.0"),
        (np.zeros((5, 2)), True, {}, r"k must be an integer, got True"),
        (np.zeros((5, 2)), 2, {"niter": 0}, r"niter must be >= 1, got 0"),
        (np.zeros((5, 2)), 2, {"chunk_size": 0}, r"chunk_size must be >= 1, got 0"),
        (np.zeros((5, 2)), 3, {"init_sample": 2}, r"init_sample must be >= 3, got 2"),
        (
            np.zeros((5, 2)),
            2,
            {"max_points_per_centroid": 0},
            r"max_points_per_centroid must be >= 1, got 0",
        ),
        (np.zeros((5, 2)), 2, {"seed": -1}, r"seed must be >= 0, got -1"),
        (np.zeros((5, 2)), 2, {"tol": 2.0}, r"tol must be in \[0, 1\], got 2.0"),
    ],
)
def test_kmeans_rejects_bad_input(x: np.ndarray, k: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kmeans(x, k, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- assign


@pytest.mark.parametrize("chunk_size", [7, 65536])
def test_assign_equals_brute_force(chunk_size: int) -> None:
    rng = np.random.default_rng(1)
    # Offset far from the origin: the expanded |x|^2 - 2x.c + |c|^2 form would lose
    # most digits of the distances, the returned ones must not.
    x = (rng.normal(size=(300, 16)) + 50.0).astype(np.float32)
    centroids = (rng.normal(size=(9, 16)) * 3 + 50.0).astype(np.float32)
    labels, sq = assign(x, centroids, chunk_size=chunk_size)
    want_labels, want_sq = _brute_force(x, centroids)
    assert labels.dtype == np.int64 and sq.dtype == np.float32
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(sq, want_sq, rtol=1e-4)


def test_assign_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError, match=r"centroids: expected 4 columns"):
        assign(np.zeros((3, 4), np.float32), np.zeros((2, 5), np.float32))


# ------------------------------------------------------------------------- cluster_stats


def test_cluster_stats_on_a_hand_made_example() -> None:
    # Sizes 6, 2, 4, 0 over k = 4: mean 3, largest 6.
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    perm = np.array([2, 0, 3, 1])
    true = perm[labels].copy()
    true[[0, 6]] = -1  # unlabeled entries are ignored
    stats = cluster_stats(
        labels, 4, true_labels=true, previous_labels=perm[labels], tiny_threshold=3
    )
    assert stats["k"] == 4 and stats["n"] == 12
    assert stats["n_empty"] == 1
    assert stats["n_tiny"] == 2  # sizes 0 and 2 are below 3
    assert (stats["min_size"], stats["max_size"]) == (0, 6)
    assert stats["mean_size"] == pytest.approx(3.0)
    assert stats["median_size"] == pytest.approx(3.0)
    assert stats["imbalance"] == pytest.approx(2.0)
    assert stats["nmi"] == pytest.approx(1.0)
    assert stats["ari"] == pytest.approx(1.0)
    assert stats["n_labeled"] == 10
    assert stats["nmi_previous"] == pytest.approx(1.0)
    assert json.loads(json.dumps(stats)) == stats
    assert all(type(v) in (int, float) for v in stats.values())


def test_cluster_stats_defaults_and_disagreement() -> None:
    labels = np.array([0, 1] * 50)
    stats = cluster_stats(labels, 2, true_labels=np.array([0] * 50 + [1] * 50))
    assert stats["tiny_threshold"] == 5
    assert stats["n_tiny"] == 0 and stats["imbalance"] == pytest.approx(1.0)
    assert stats["nmi"] == pytest.approx(0.0, abs=1e-9)
    assert "nmi_previous" not in stats
    # No labeled entry at all: no NMI rather than a meaningless one.
    assert "nmi" not in cluster_stats(labels, 2, true_labels=np.full(100, -1))


def test_cluster_stats_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, k=2\), got range \[0, 2\]"):
        cluster_stats(np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"true_labels: expected 3 entries"):
        cluster_stats(np.array([0, 1, 1]), 2, true_labels=np.array([0, 1]))


# ------------------------------------------------------------------------- pre-processing


def _correlated(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.linspace(3.0, 0.1, d)[:, None]
    return (rng.normal(size=(n, d)) @ mixing + 1000.0).astype(np.float32)


def test_pca_whiten_gives_identity_covariance() -> None:
    x = _correlated(3000, 24, seed=0)
    y, whitening = pca_whiten(x, dim=10, eig_power=-0.5)
    assert isinstance(whitening, PCAWhitening)
    assert y.shape == (3000, 10) and y.dtype == np.float32
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(10), atol=1e-3)
    np.testing.assert_allclose(whitening.apply(x), y, atol=1e-5)
    # New data goes through the same (fitted) transform.
    new = _correlated(50, 24, seed=1)
    want = ((new - whitening.mean) @ whitening.components.T) * whitening.scale
    np.testing.assert_allclose(whitening.apply(new), want, rtol=1e-4, atol=1e-4)


def test_pca_without_whitening_keeps_variances_in_order() -> None:
    x = _correlated(3000, 24, seed=0)
    y, whitening = pca_whiten(x, dim=5, eig_power=0.0)
    variances = y.var(axis=0, ddof=1)
    np.testing.assert_allclose(variances, whitening.eigenvalues, rtol=1e-3)
    assert np.all(np.diff(variances) < 0)
    y2, _ = pca_whiten(x, dim=5, eig_power=0.0)
    np.testing.assert_array_equal(y, y2)


def test_pca_whiten_rejects_bad_dim() -> None:
    with pytest.raises(ValueError, match=r"dim must be in \[1, 4\], got 5"):
        pca_whiten(np.zeros((10, 4), np.float32), dim=5)


def test_l2_normalize() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], atol=1e-7)


# ------------------------------------------------------------------------- benchmark


def test_benchmark_quick_smoke() -> None:
    from distillery.bench.clustering import markdown_table, run

    before = faiss.omp_get_max_threads()
    rows = run(quick=True, repeats=1, threads=1)
    assert faiss.omp_get_max_threads() == before
    assert {r["method"] for r in rows} >= {"distillery kmeans", "faiss.Kmeans (defaults)"}
    assert len(rows) == 8
    ours = [r for r in rows if r["method"] == "distillery kmeans"]
    assert all(0.0 < r["nmi"] <= 1.0 and r["inertia_ratio"] < 1.05 for r in ours)
    assert markdown_table(rows).count("\n") == len(rows) + 1
