"""Benchmark of :func:`distillery.clustering.kmeans` against FAISS and scikit-learn.

Two synthetic data sets with planted labels:

- ``blobs``: well-separated isotropic Gaussian blobs (``sklearn.datasets.make_blobs``),
  100k x 128, k = 100.
- ``embedding-like``: an imbalanced mixture of overlapping anisotropic Gaussians in a
  32-dimensional latent space, randomly projected to 256 dimensions plus isotropic
  noise, 50k x 256, k = 64; a stand-in for encoder embeddings.

Methods: our ``kmeans`` (defaults), ``faiss.Kmeans`` with its defaults (random init,
256 points per centroid), scikit-learn ``KMeans(n_init=1, init="k-means++")`` and
``MiniBatchKMeans`` (defaults). Each method runs with seeds 0, 1, 2 (interleaved, so
that load changes on the machine hit all methods alike); the table reports medians.
Wall time covers fitting and labelling every point. Inertia is evaluated the same way
for every method (exact squared distances of all points to their nearest centroid).

Run: ``python -m distillery.bench.clustering [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import normalized_mutual_info_score
from threadpoolctl import threadpool_limits

from distillery.clustering import assign, kmeans

__all__ = ["make_embedding_like", "run"]

REPEATS = 3
#: (name, n, d, k) of the full and of the quick (smoke-test) runs.
FULL_SIZES = {"blobs": (100_000, 128, 100), "embedding-like": (50_000, 256, 64)}
QUICK_SIZES = {"blobs": (2_000, 16, 10), "embedding-like": (2_000, 32, 8)}

#: Fits (n, d) float32 data into k clusters with a seed; returns the (k, d) centroids
#: and the (n,) labels.
Method = Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]


def make_embedding_like(
    n: int, d: int, k: int, *, latent: int = 32, noise: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping, anisotropic, imbalanced Gaussian mixture seen through a random projection.

    Component weights are Dirichlet(2) (some clusters several times bigger than others),
    centres are standard normal in ``latent`` dimensions, and each component has its own
    random covariance with per-axis scales in [0.3, 1], so neighbouring components
    overlap. The latent points are projected to ``d`` dimensions and get isotropic
    noise of standard deviation ``noise``.

    Returns:
        ``(x, y)``: (n, d) float32 points and (n,) int64 planted component labels.
    """
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(k, 2.0))
    y = rng.choice(k, size=n, p=weights)
    centres = rng.normal(size=(k, latent))
    mixing = rng.normal(size=(k, latent, latent)) / np.sqrt(latent)
    scales = rng.uniform(0.3, 1.0, size=(k, latent))
    z = rng.normal(size=(n, latent)) * scales[y]
    points = centres[y] + np.einsum("nj,nij->ni", z, mixing[y])
    projection = rng.normal(size=(latent, d)) / np.sqrt(latent)
    x = points @ projection + noise * rng.normal(size=(n, d))
    return x.astype(np.float32), y.astype(np.int64)


def _dataset(name: str, n: int, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "blobs":
        x, y = make_blobs(n_samples=n, n_features=d, centers=k, random_state=0)
        return x.astype(np.float32), y.astype(np.int64)
    return make_embedding_like(n, d, k, seed=0)


def _ours(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    result = kmeans(x, k, seed=seed)
    return result.centroids, result.labels


def _faiss_defaults(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    km = faiss.Kmeans(x.shape[1], k, seed=seed)
    km.train(x)
    _, ids = km.index.search(x, 1)  # labels of all points, as the others return
    return km.centroids, ids[:, 0]


def _sklearn_kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    km = KMeans(n_clusters=k, n_init=1, init="k-means++", random_state=seed).fit(x)
    return km.cluster_centers_, km.labels_


def _sklearn_minibatch(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    km = MiniBatchKMeans(n_clusters=k, random_state=seed).fit(x)
    return km.cluster_centers_, km.labels_


METHODS: dict[str, Method] = {
    "distillery kmeans": _ours,
    "faiss.Kmeans (defaults)": _faiss_defaults,
    "sklearn KMeans (k-means++, n_init=1)": _sklearn_kmeans,
    "sklearn MiniBatchKMeans": _sklearn_minibatch,
}
REFERENCE = "sklearn KMeans (k-means++, n_init=1)"


@contextmanager
def _thread_limit(threads: int | None) -> Iterator[None]:
    """Cap OpenMP and BLAS threads of every method (FAISS and scikit-learn alike)."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    try:
        with threadpool_limits(limits=threads):
            faiss.omp_set_num_threads(threads)
            yield
    finally:
        faiss.omp_set_num_threads(before)


def run(quick: bool = False, repeats: int = REPEATS, threads: int | None = None) -> list[dict]:
    """Time and score every method on both data sets.

    Args:
        quick: use small data sets (a smoke test of a few seconds).
        repeats: seeds per method (0, 1, ...); medians are reported.
        threads: cap on OpenMP/BLAS threads for all methods; default: as configured
            (all cores). One thread makes the timings robust to other load on the
            machine, at the price of not measuring parallel scaling.

    Returns:
        One row per (data set, method): ``dataset``, ``n``, ``d``, ``k``, ``method``,
        ``time_s`` (wall), ``speedup`` (reference wall time / wall time), ``cpu_s``
        (process CPU time of all threads, OpenMP spin-waiting included), ``inertia``,
        ``inertia_ratio`` (inertia / reference inertia), ``inertia_ratio_min`` / ``_max`` (over seeds, each
        against the reference's median), ``nmi`` (to the planted labels), ``repeats``,
        ``cpus``, ``threads``. The reference is scikit-learn ``KMeans``.
    """
    with _thread_limit(threads):
        return _run(quick, repeats, threads)


def _run(quick: bool, repeats: int, threads: int | None) -> list[dict]:
    rows: list[dict] = []
    for name, (n, d, k) in (QUICK_SIZES if quick else FULL_SIZES).items():
        x, y = _dataset(name, n, d, k)
        runs: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in METHODS}
        for seed in range(repeats):
            for method, fit in METHODS.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                centroids, labels = fit(x, k, seed)
                elapsed = time.perf_counter() - start
                cpu = time.process_time() - start_cpu
                _, sq = assign(x, np.asarray(centroids, dtype=np.float32))
                nmi = normalized_mutual_info_score(y, np.asarray(labels))
                runs[method].append((elapsed, cpu, float(sq.sum(dtype=np.float64)), float(nmi)))
        ref_time = statistics.median(r[0] for r in runs[REFERENCE])
        ref_inertia = statistics.median(r[2] for r in runs[REFERENCE])
        for method, results in runs.items():
            times, cpus, inertias, nmis = zip(*results, strict=True)
            rows.append(
                {
                    "dataset": name,
                    "n": n,
                    "d": d,
                    "k": k,
                    "method": method,
                    "time_s": statistics.median(times),
                    "speedup": ref_time / statistics.median(times),
                    "cpu_s": statistics.median(cpus),
                    "inertia": statistics.median(inertias),
                    "inertia_ratio": statistics.median(inertias) / ref_inertia,
                    "inertia_ratio_min": min(inertias) / ref_inertia,
                    "inertia_ratio_max": max(inertias) / ref_inertia,
                    "nmi": statistics.median(nmis),
                    "repeats": repeats,
                    "cpus": os.cpu_count() or 0,
                    "threads": threads or faiss.omp_get_max_threads(),
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows of :func:`run` as a markdown table."""
    lines = [
        "| data set | n x d, k | method | wall (s) | speed-up vs sklearn KMeans | CPU (s) "
        "| inertia | inertia / sklearn KMeans (min-max over seeds) | NMI to planted |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['n']} x {r['d']}, {r['k']} | {r['method']} "
            f"| {r['time_s']:.3f} | {r['speedup']:.1f}x | {r['cpu_s']:.2f} | {r['inertia']:.4g} "
            f"| {r['inertia_ratio']:.4f} ({r['inertia_ratio_min']:.4f}-{r['inertia_ratio_max']:.4f}) "
            f"| {r['nmi']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data sets (smoke test)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="seeds per method")
    parser.add_argument("--threads", type=int, default=None, help="OpenMP/BLAS thread cap")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = run(quick=args.quick, repeats=args.repeats, threads=args.threads)
    print(
        f"medians over {args.repeats} seeds, {rows[0]['cpus']} CPUs, "
        f"{rows[0]['threads']} threads, 1-min load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after"
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
