"""k-means between pipeline stages: pseudo-labels from embeddings, and their diagnostics.

The entry point is :func:`kmeans`, which combines

1. greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with local trials as in
   scikit-learn) on a random sample of the points,
2. FAISS Lloyd iterations from those seeds on a random subsample of at most
   ``max_points_per_centroid * k`` points,
3. a few Lloyd iterations on *all* points, which remove the centroid noise that the
   subsample leaves behind,
4. a final, chunked (memory-bounded) assignment of every point, with re-seeding of any
   empty cluster so that the result has ``k`` non-empty clusters whenever ``n >= k``.

FAISS' own random initialisation lands in clearly worse optima than k-means++ on
well-separated data (two centroids in one blob and none in another, which Lloyd
iterations cannot undo; about 5x the inertia of scikit-learn's k-means++ on the blobs
of :mod:`distillery.bench.clustering`), hence step 1.

Helpers: :func:`assign` (nearest centroid), :func:`cluster_stats` (sizes, imbalance,
NMI/ARI); pre-processing lives in :mod:`distillery.clustering.whitening`.
All arrays are numpy; embeddings are float32 ``(n, d)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from distillery.clustering.arrays import as_matrix, check_finite, check_int

log = logging.getLogger(__name__)

#: FAISS' default cap on training points per centroid; 256 points per centroid leave a
#: centroid error of about 1/256 of the within-cluster variance, which the full-data
#: refinement iterations then remove.
DEFAULT_MAX_POINTS_PER_CENTROID = 256
#: Seeding sample: ``INIT_POINTS_PER_CENTROID * k`` points, at least ``INIT_MIN_POINTS``.
INIT_POINTS_PER_CENTROID = 20
INIT_MIN_POINTS = 2048
#: Fewest local trials per greedy k-means++ step (scikit-learn uses 2 + ln k, about 6
#: for k = 100). On well-separated blobs 2 + ln k misses a blob in most runs (two seeds
#: in one blob, none in another); with 32 trials the candidate set nearly always contains
#: a point of an uncovered blob. The trials are scored in one matrix product, so they
#: are cheap on the seeding sample.
MIN_LOCAL_TRIALS = 32
#: Re-seeding rounds in the final assignment before ties are broken by hand.
_RESEED_ROUNDS = 3


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centroids: (k, d) float32 cluster centres.
        labels: (n,) int64 index of the nearest centroid of every point.
        inertia: sum over all points of the squared distance to their centroid.
        n_iter: Lloyd iterations run (subsample and full-data ones together).
        n_reseeded: re-seeds of empty clusters: the splits FAISS made, summed over its
            iterations, plus the clusters re-seeded in each full-data iteration and in
            the final assignment. 0 unless some cluster ran empty.
    """

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int
    n_reseeded: int


# ------------------------------------------------------------------------- assignment


def _sq_dist_to(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(m,) float32 exact ``||x_i - c_{labels_i}||^2``.

    Computed from the differences, not from ``|x|^2 - 2 x.c + |c|^2`` as in the BLAS
    search, which loses precision when the data sit far from the origin.
    """
    diff = x - centroids[labels]
    return np.einsum("ij,ij->i", diff, diff)


def _assign(
    x: np.ndarray, centroids: np.ndarray, chunk_size: int, exact: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`assign` without input checks.

    ``exact=False`` keeps FAISS' expanded-form distances (clamped at 0), which is enough
    for intermediate Lloyd iterations and saves a pass over the data.
    """
    n, d = x.shape
    index = faiss.IndexFlatL2(d)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(n, dtype=np.int64)
    sq = np.empty(n, dtype=np.float32)
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        dist, ids = index.search(x[lo:hi], 1)
        labels[lo:hi] = ids[:, 0]
        if exact:
            sq[lo:hi] = _sq_dist_to(x[lo:hi], centroids, labels[lo:hi])
        else:
            np.maximum(dist[:, 0], 0.0, out=sq[lo:hi])
    return labels, sq


def assign(
    x: np.ndarray, centroids: np.ndarray, chunk_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (squared L2) of every point, ``chunk_size`` points at a time.

    Args:
        x: (n, d) points.
        centroids: (k, d) centroids.
        chunk_size: points per FAISS search; bounds the temporary memory.

    Returns:
        ``(labels, sq_distances)``: (n,) int64 centroid indices and (n,) float32 squared
        distances to that centroid.
    """
    x = as_matrix(x, "x")
    centroids = as_matrix(centroids, "centroids")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(
            f"centroids: expected {x.shape[1]} columns like x, got shape {centroids.shape}"
        )
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    check_finite(x, "x", chunk_size)
    check_finite(centroids, "centroids", chunk_size)
    return _assign(x, centroids, chunk_size)


# ------------------------------------------------------------------------- seeding


def _kmeans_plus_plus(
    x: np.ndarray, k: int, rng: np.random.Generator, n_local_trials: int
) -> np.ndarray:
    """Greedy k-means++ seeds: (k, d) float32 rows of the (m, d) sample ``x``.

    Each step draws ``n_local_trials`` candidates with probability proportional to the
    squared distance to the nearest seed so far and keeps the one that lowers the
    potential (sum of those squared distances) most. Cost: O(k * trials * m * d).
    """
    m = x.shape[0]
    sq_norms = np.einsum("ij,ij->i", x, x)
    seeds = np.empty((k, x.shape[1]), dtype=np.float32)
    first = int(rng.integers(m))
    seeds[0] = x[first]
    closest = np.maximum(sq_norms - 2.0 * (x @ x[first]) + sq_norms[first], 0.0)
    for j in range(1, k):
        cumulative = np.cumsum(closest, dtype=np.float64)
        targets = rng.random(n_local_trials) * cumulative[-1]
        candidates = np.minimum(np.searchsorted(cumulative, targets), m - 1)
        # (trials, m) squared distances of every sample point to every candidate.
        dist = x[candidates] @ x.T
        dist *= -2.0
        dist += sq_norms[candidates][:, None]
        dist += sq_norms[None, :]
        np.maximum(dist, 0.0, out=dist)
        np.minimum(dist, closest[None, :], out=dist)
        best = int(np.argmin(dist.sum(axis=1, dtype=np.float64)))
        closest = dist[best]
        seeds[j] = x[candidates[best]]
    return seeds


# ------------------------------------------------------------------------- Lloyd steps


def _faiss_lloyd(
    x: np.ndarray, init: np.ndarray, niter: int, tol: float, seed: int, verbose: bool
) -> tuple[np.ndarray, int, int]:
    """FAISS Lloyd iterations on all of ``x`` from ``init`` centroids.

    FAISS stops before ``niter`` iterations once the objective decreases by less than
    the fraction ``tol`` in one iteration.

    Returns:
        ``(centroids, n_iter, n_split)``: (k, d) float32 centroids, iterations run and
        empty clusters FAISS split.
    """
    k, d = init.shape
    params = faiss.ClusteringParameters()
    params.niter = niter
    params.early_stop_threshold = tol
    params.seed = seed % (2**31)
    params.verbose = verbose
    # x is already subsampled: FAISS must use all of it, and not warn that there are
    # few points per centroid (the caller validated k <= n).
    params.max_points_per_centroid = max(1, math.ceil(x.shape[0] / k))
    params.min_points_per_centroid = 1
    clus = faiss.Clustering(d, k, params)
    faiss.copy_array_to_vector(np.ascontiguousarray(init, dtype=np.float32).ravel(), clus.centroids)
    clus.train(x, faiss.IndexFlatL2(d))
    centroids = faiss.vector_float_to_array(clus.centroids).reshape(k, d).copy()
    stats = clus.iteration_stats
    n_split = sum(int(stats.at(i).nsplit) for i in range(stats.size()))
    return centroids, int(stats.size()), n_split


def _centroid_means(
    x: np.ndarray, labels: np.ndarray, previous: np.ndarray, chunk_size: int
) -> np.ndarray:
    """(k, d) float32 mean of each cluster; an empty cluster keeps its ``previous`` centre."""
    k, d = previous.shape
    sums = np.zeros((k, d), dtype=np.float64)
    for lo in range(0, x.shape[0], chunk_size):
        hi = min(lo + chunk_size, x.shape[0])
        onehot = sp.csr_matrix(
            (np.ones(hi - lo, dtype=np.float32), (labels[lo:hi], np.arange(hi - lo))),
            shape=(k, hi - lo),
        )
        sums += onehot @ x[lo:hi]
    counts = np.bincount(labels, minlength=k)
    out = previous.copy()
    filled = counts > 0
    out[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return out


def _reseed_empty(
    x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, sq: np.ndarray, k: int
) -> dict[int, int]:
    """Move every empty cluster onto a far point of a cluster that can spare one.

    Points are taken by decreasing distance to their centroid, never emptying their own
    cluster; each taken point becomes its new cluster's centroid and only member.
    Modifies ``centroids``, ``labels`` and ``sq`` in place.

    Returns:
        ``{cluster: point index}`` of the re-seeded clusters.
    """
    counts = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    seeded: dict[int, int] = {}
    if empty.size == 0:
        return seeded
    for p in np.argsort(-sq, kind="stable"):
        if len(seeded) == empty.size:
            break
        owner = labels[p]
        if counts[owner] < 2:
            continue
        j = int(empty[len(seeded)])
        counts[owner] -= 1
        counts[j] = 1
        centroids[j] = x[p]
        labels[p] = j
        sq[p] = 0.0
        seeded[j] = int(p)
    return seeded


def _hand_over_ties(
    x: np.ndarray,
    centroids: np.ndarray,
    labels: np.ndarray,
    sq: np.ndarray,
    seeded: dict[int, int],
) -> dict[int, int]:
    """Give each still-empty re-seeded cluster back its seed point.

    A cluster re-seeded on point p and then left empty by the search lost a tie: p lies
    at distance 0 from it and from the centroid it went to (duplicate points, or
    round-off of the BLAS distances). Handing p over keeps a nearest-centroid
    assignment. Clusters that cannot be filled that way are re-seeded again.

    Returns:
        ``{cluster: point index}`` of the clusters re-seeded again.
    """
    k = centroids.shape[0]
    counts = np.bincount(labels, minlength=k)
    for j in np.flatnonzero(counts == 0):
        p = seeded.get(int(j))
        if p is not None and counts[labels[p]] >= 2:
            counts[labels[p]] -= 1
            counts[j] = 1
            labels[p] = j
            sq[p] = _sq_dist_to(x[p : p + 1], centroids, labels[p : p + 1])[0]
    return _reseed_empty(x, centroids, labels, sq, k)


# ------------------------------------------------------------------------- k-means


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 20,
    init_sample: int | None = None,
    max_points_per_centroid: int | None = None,
    chunk_size: int = 65536,
    verbose: bool = False,
    tol: float = 1e-4,
    refine_iter: int = 2,
    n_local_trials: int | None = None,
) -> KMeansResult:
    """k-means (squared L2) of the rows of ``x``: k-means++ seeds, FAISS Lloyd iterations.

    Args:
        x: (n, d) float32 points (other float dtypes are converted).
        k: number of clusters, ``1 <= k <= n``.
        seed: seeds the numpy generator (samples, k-means++) and FAISS; equal seeds give
            equal results.
        niter: most Lloyd iterations on the training subsample.
        init_sample: points drawn for k-means++ seeding (at least ``k``); by default
            ``max(20 * k, 2048)``, capped by the training subsample size.
        max_points_per_centroid: the Lloyd iterations use a random subsample of at most
            ``max_points_per_centroid * k`` points (default 256 per centroid).
        chunk_size: points per block in the full-data passes; bounds temporary memory.
        verbose: log progress (and let FAISS print its iterations).
        tol: the subsample iterations stop once the objective decreases by less than
            this fraction in one iteration (0: only when it stops changing). On the
            subsample, changes below ~1e-4 are smaller than the subsampling noise.
        refine_iter: Lloyd iterations on all points after the subsample ones (skipped
            when the subsample is the whole data set).
        n_local_trials: candidates per greedy k-means++ step; by default
            ``max(2 + ln k, 32)``.

    Returns:
        A :class:`KMeansResult`; its labels and inertia are for the final centroids, and
        no cluster is empty.

    Raises:
        ValueError: if ``x`` is not a finite non-empty 2-D array, or an argument is out
            of range (the message names it and its value).
    """
    x = as_matrix(x, "x")
    n, d = x.shape
    k = check_int(k, "k", 1, n)
    niter = check_int(niter, "niter", 1)
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    refine_iter = check_int(refine_iter, "refine_iter", 0)
    seed = check_int(seed, "seed", 0)
    if not 0.0 <= tol <= 1.0:
        raise ValueError(f"tol must be in [0, 1], got {tol}")
    if max_points_per_centroid is None:
        max_points_per_centroid = DEFAULT_MAX_POINTS_PER_CENTROID
    max_points_per_centroid = check_int(max_points_per_centroid, "max_points_per_centroid", 1)
    n_train = min(n, k * max_points_per_centroid)
    if init_sample is None:
        init_sample = max(INIT_POINTS_PER_CENTROID * k, INIT_MIN_POINTS)
    init_sample = min(check_int(init_sample, "init_sample", k), n_train)
    if n_local_trials is None:
        n_local_trials = max(2 + int(math.log(k)), MIN_LOCAL_TRIALS)
    n_local_trials = check_int(n_local_trials, "n_local_trials", 1)
    check_finite(x, "x", chunk_size)

    rng = np.random.default_rng(seed)
    # Sorted indices: the gathers read x front to back.
    train = x if n_train == n else x[np.sort(rng.choice(n, size=n_train, replace=False))]
    init_idx = np.sort(rng.choice(n_train, size=init_sample, replace=False))
    seeds = _kmeans_plus_plus(train[init_idx], k, rng, n_local_trials)
    centroids, n_iter, n_reseeded = _faiss_lloyd(train, seeds, niter, tol, seed, verbose)
    if verbose:
        msg = "k-means: %d iterations on %d of %d points, %d FAISS splits"
        log.info(msg, n_iter, n_train, n, n_reseeded)

    if n_train < n:
        for _ in range(refine_iter):
            labels, sq = _assign(x, centroids, chunk_size, exact=False)
            n_reseeded += len(_reseed_empty(x, centroids, labels, sq, k))
            centroids = _centroid_means(x, labels, centroids, chunk_size)
            n_iter += 1
            if verbose:
                log.info("k-means: full-data iteration, inertia %.6g", sq.sum(dtype=np.float64))

    labels, sq = _assign(x, centroids, chunk_size)
    seeded: dict[int, int] = {}
    for _ in range(_RESEED_ROUNDS):
        moved = _reseed_empty(x, centroids, labels, sq, k)
        if not moved:
            break
        seeded.update(moved)
        labels, sq = _assign(x, centroids, chunk_size)
    else:
        extra = _hand_over_ties(x, centroids, labels, sq, seeded)
        seeded.update(extra)
    # Clusters re-seeded in several rounds (ties between duplicates) count once.
    n_reseeded += len(seeded)

    inertia = float(sq.sum(dtype=np.float64))
    if verbose:
        log.info("k-means: inertia %.6g, %d clusters re-seeded", inertia, n_reseeded)
    return KMeansResult(
        centroids=centroids.astype(np.float32, copy=False),
        labels=labels,
        inertia=inertia,
        n_iter=n_iter,
        n_reseeded=n_reseeded,
    )


# ------------------------------------------------------------------------- diagnostics


def cluster_stats(
    labels: np.ndarray,
    k: int,
    true_labels: np.ndarray | None = None,
    previous_labels: np.ndarray | None = None,
    tiny_threshold: int | None = None,
) -> dict[str, float | int]:
    """Size and agreement summary of a clustering; every value is a plain int or float.

    Args:
        labels: (n,) cluster indices in ``[0, k)``.
        k: number of clusters (clusters absent from ``labels`` count as empty).
        true_labels: optional (n,) reference classes; entries equal to -1 are ignored.
        previous_labels: optional (n,) earlier cluster indices (e.g. from the previous
            stage); entries equal to -1 are ignored.
        tiny_threshold: a cluster with fewer members than this is "tiny"; by default
            ``max(5, ceil(0.1 * n / k))``.

    Returns:
        ``k``, ``n``, ``n_empty``, ``n_tiny``, ``tiny_threshold``, ``min_size``,
        ``max_size``, ``mean_size``, ``median_size``, ``imbalance`` (largest size over
        mean size), and when given and with at least one usable entry: ``nmi`` and
        ``ari`` against ``true_labels`` (over ``n_labeled`` points), ``nmi_previous``
        against ``previous_labels``.
    """
    k = check_int(k, "k", 1)
    labels = np.asarray(labels).reshape(-1)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    n = int(labels.size)
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(
            f"labels must lie in [0, k={k}), got range [{labels.min()}, {labels.max()}]"
        )
    if tiny_threshold is None:
        tiny_threshold = max(5, math.ceil(0.1 * n / k))
    tiny_threshold = check_int(tiny_threshold, "tiny_threshold", 0)
    sizes = np.bincount(labels, minlength=k)
    mean_size = n / k
    stats: dict[str, float | int] = {
        "k": k,
        "n": n,
        "n_empty": int((sizes == 0).sum()),
        "n_tiny": int((sizes < tiny_threshold).sum()),
        "tiny_threshold": int(tiny_threshold),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "mean_size": float(mean_size),
        "median_size": float(np.median(sizes)),
        "imbalance": float(sizes.max() / mean_size) if n else 0.0,
    }
    for name, other in (("true_labels", true_labels), ("previous_labels", previous_labels)):
        if other is None:
            continue
        other = np.asarray(other).reshape(-1)
        if other.shape[0] != n:
            raise ValueError(f"{name}: expected {n} entries like labels, got {other.shape[0]}")
        keep = other != -1
        if not keep.any():
            continue
        if name == "true_labels":
            stats["nmi"] = float(normalized_mutual_info_score(other[keep], labels[keep]))
            stats["ari"] = float(adjusted_rand_score(other[keep], labels[keep]))
            stats["n_labeled"] = int(keep.sum())
        else:
            stats["nmi_previous"] = float(normalized_mutual_info_score(other[keep], labels[keep]))
    return stats
