"""Peak memory and wall time of :func:`~distillery.clustering.distributed.pseudo_label` at scale.

Synthetic embedding-like features (an imbalanced mixture of anisotropic Gaussians in a
32-dimensional latent space, randomly projected to ``dim`` dimensions plus noise, as
:func:`distillery.bench.clustering.make_embedding_like`) are generated chunk by chunk
straight into a float32 ``.npy`` memmap, so generating them stays bounded too; a float16
copy is streamed through :class:`~distillery.eval.embed.NpyFeatureWriter`, as embedding
with ``feature_dir`` writes it. Each variant then runs in its own subprocess (so that the
peak resident set, ``VmHWM``, is that variant's alone; not ``ru_maxrss``, which a child
inherits from its parent's high-water mark) on a single-process comm:

- ``a``: features in memory as float32, k-means and PCA fitted on all points
  (``fit_sample=None``); the baseline.
- ``b``: features in memory as float32, fitted on ``fit_sample`` = 100k points.
- ``c``: float16 features read through a read-only memmap, ``fit_sample`` = 100k.
- ``a'``: ``a`` with another seed (k-means++ seeding and subsamples); its agreement with
  ``a`` is the yardstick for b's and c's, since k-means lands in a different but equally
  good optimum whenever anything changes.

Wall time covers :func:`pseudo_label` only (loading the in-memory features, which stands
for embedding them, is timed apart). Agreement with ``a``: NMI of the labels, and the
inertia ratio: the k-means objective of each variant's labels (each cluster around its own
mean) in ``a``'s whitened, normalised space, over ``a``'s. NMI to the planted components
is reported too.

Run: ``python -m distillery.bench.pseudo_label_scale [--n 1000000 --dim 256 --k 256]``
(``--quick`` for a smoke test of a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.lib.format import open_memmap
from sklearn.metrics import normalized_mutual_info_score

from distillery.clustering.distributed import LocalComm
from distillery.eval.embed import release_pages

__all__ = ["make_features", "markdown_table", "run"]

#: Clips k-means is fitted on in variants b and c (the PseudoLabeler default).
FIT_SAMPLE = 100_000
#: Rows generated (and converted) per block.
GEN_CHUNK = 65536
#: variant -> (description, storage, uses the fit sample, seed).
VARIANTS: dict[str, tuple[str, str, bool, int]] = {
    "a": ("in memory, float32, fit on all points", "memory", False, 0),
    "b": ("in memory, float32, fit_sample", "memory", True, 0),
    "c": ("memmap, float16 on disk, fit_sample", "float16", True, 0),
    # How much two equally good runs of the baseline agree: the scale for b's and c's NMI.
    "a'": ("as a, with seed 1", "memory", False, 1),
}


def make_features(
    path: str | os.PathLike,
    n: int,
    dim: int,
    k: int,
    *,
    latent: int = 32,
    noise: float = 0.1,
    seed: int = 0,
    chunk: int = GEN_CHUNK,
) -> np.ndarray:
    """Write an (n, dim) float32 Gaussian mixture to the ``.npy`` file ``path``, in chunks.

    Component weights are Dirichlet(2), centres standard normal in ``latent`` dimensions,
    each component has its own random covariance (per-axis scales in [0.3, 1]); points are
    projected to ``dim`` dimensions and get isotropic noise of std ``noise``. Memory:
    O(chunk * dim), whatever n is.

    Returns:
        (n,) int64 planted component of every row.
    """
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(k, 2.0))
    centres = rng.normal(size=(k, latent))
    mixing = rng.normal(size=(k, latent, latent)) / np.sqrt(latent)
    scales = rng.uniform(0.3, 1.0, size=(k, latent))
    projection = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    out = open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    y = np.empty(n, dtype=np.int64)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        yc = rng.choice(k, size=hi - lo, p=weights)
        z = rng.normal(size=(hi - lo, latent)) * scales[yc]
        points = centres[yc]
        # Per component: one (m, latent) @ (latent, latent) product, not (m, latent, latent).
        for c in np.unique(yc):
            rows = yc == c
            points[rows] += z[rows] @ mixing[c].T
        block = points @ projection + noise * rng.normal(size=(hi - lo, dim))
        out[lo:hi] = block
        release_pages(out, lo, hi)  # written pages would otherwise stay in our RSS
        y[lo:hi] = yc
    out.flush()
    del out
    return y


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant, in a fresh process: returns its timings and memory in MiB."""
    from distillery.clustering.distributed import pseudo_label

    base_rss = _vm_kib("VmRSS") / 1024  # interpreter + torch + faiss, before any data
    start = time.perf_counter()
    # In memory: all of it, as embed() returns it without feature_dir.
    x = np.load(spec["f32"]) if spec["storage"] == "memory" else np.load(spec["f16"], mmap_mode="r")
    load_s = time.perf_counter() - start
    n = len(x)
    indices = np.arange(n, dtype=np.int64)
    start = time.perf_counter()
    labels, model, result = pseudo_label(
        LocalComm(),
        indices,
        x,
        indices,
        n,
        k=spec["k"],
        fit_sample=spec["fit_sample"],
        seed=spec["seed"],
    )
    wall = time.perf_counter() - start
    np.save(spec["labels"], labels)
    with open(spec["model"], "wb") as f:
        pickle.dump(model, f)
    # Not ru_maxrss: on Linux it starts from the parent's high-water mark (inherited at
    # fork/exec), which would hide the child's own peak below the parent's.
    peak_kib = _vm_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "wall_s": wall,
        "load_s": load_s,
        "peak_rss_mib": peak_kib / 1024,
        "base_rss_mib": base_rss,
        "n_fit": int(len(result.labels)),
    }


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "distillery.bench.pseudo_label_scale", "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {spec['variant']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _objective(x: np.ndarray, model: Any, labels: np.ndarray, k: int) -> float:
    """k-means objective of ``labels`` in ``model``'s space: each cluster around its mean.

    Sum of squared norms minus sum over clusters of |cluster sum|^2 / size, in float64,
    one chunk at a time.
    """
    from distillery.clustering.distributed import iter_chunks

    sums, sq_total = None, 0.0
    for lo, hi, block in iter_chunks(x):
        t = model.transform(block).astype(np.float64)
        onehot = sp.csr_matrix(
            (np.ones(hi - lo), (labels[lo:hi], np.arange(hi - lo))), shape=(k, hi - lo)
        )
        part = onehot @ t
        sums = part if sums is None else sums + part
        sq_total += float(np.einsum("ij,ij->", t, t))
    counts = np.bincount(labels, minlength=k)
    filled = counts > 0
    return sq_total - float((np.einsum("ij,ij->i", sums, sums)[filled] / counts[filled]).sum())


def run(
    n: int = 1_000_000,
    dim: int = 256,
    k: int = 256,
    quick: bool = False,
    repeats: int = 1,
    workdir: str | os.PathLike | None = None,
) -> list[dict]:
    """Generate the features, run every variant in a subprocess, score the labels.

    Args:
        n, dim, k: points, feature dimension, clusters (also the planted components).
        quick: a few-second smoke test: n = 4000, dim = 16, k = 8, fit_sample n / 4.
        repeats: runs of each variant (interleaved a, b, c, a', a, ...); medians reported.
        workdir: where the feature files go (a temporary folder, deleted afterwards,
            by default). n * dim * 6 bytes of disk.

    Returns:
        One row per variant: ``variant``, ``method``, ``n``, ``dim``, ``k``,
        ``fit_sample``, ``n_fit``, ``wall_s``, ``load_s``, ``peak_rss_mib`` (VmHWM of the
        child), ``base_rss_mib`` (its RSS after imports, before any data),
        ``time_ratio`` / ``rss_ratio`` (over variant a), ``data_rss_mib`` (peak - base)
        and ``data_rss_ratio`` (over variant a's), ``nmi_vs_a``,
        ``inertia_ratio`` (see the module docstring), ``nmi_planted``, ``repeats``.
    """
    from distillery.clustering.distributed import iter_chunks
    from distillery.eval.embed import NpyFeatureWriter

    if quick:
        n, dim, k = 4000, 16, 8
    fit_sample = n // 4 if quick else FIT_SAMPLE
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="pseudo-label-scale-") if own_dir else workdir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        f32, f16 = root / "features-f32.npy", root / "features-f16.npy"
        planted = make_features(f32, n, dim, k)
        x = np.load(f32, mmap_mode="r")
        writer = NpyFeatureWriter(f16, n, "float16")
        for _, _, block in iter_chunks(x, GEN_CHUNK):
            writer.write(block)
        writer.close()

        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for rep in range(repeats):
            for variant, (_, storage, sampled, seed) in VARIANTS.items():
                spec = {
                    "variant": variant,
                    "seed": seed,
                    "storage": storage,
                    "k": k,
                    "fit_sample": fit_sample if sampled else None,
                    "f32": str(f32),
                    "f16": str(f16),
                    "labels": str(root / f"labels-{list(VARIANTS).index(variant)}.npy"),
                    "model": str(root / f"model-{list(VARIANTS).index(variant)}.pkl"),
                }
                out = _run_child(spec)
                if rep == 0:  # labels are deterministic: score the first run's
                    out["labels"] = np.load(spec["labels"])
                    with open(spec["model"], "rb") as f:
                        out["model"] = pickle.load(f)  # written by this run
                runs[variant].append(out)

        model_a, labels_a = runs["a"][0]["model"], runs["a"][0]["labels"]
        objective_a = _objective(x, model_a, labels_a, k)
        med = {
            v: {
                key: statistics.median(r[key] for r in rs)
                for key in ("wall_s", "load_s", "peak_rss_mib", "base_rss_mib")
            }
            for v, rs in runs.items()
        }
        # Above the RSS after imports (~0.9 GiB of torch, faiss, lightning): what the data cost.
        data = {v: m["peak_rss_mib"] - m["base_rss_mib"] for v, m in med.items()}
        rows = []
        for variant, (method, _, sampled, _) in VARIANTS.items():
            labels = runs[variant][0]["labels"]
            rows.append(
                {
                    "variant": variant,
                    "method": method,
                    "n": n,
                    "dim": dim,
                    "k": k,
                    "fit_sample": fit_sample if sampled else None,
                    "n_fit": runs[variant][0]["n_fit"],
                    **med[variant],
                    "time_ratio": med[variant]["wall_s"] / med["a"]["wall_s"],
                    "rss_ratio": med[variant]["peak_rss_mib"] / med["a"]["peak_rss_mib"],
                    "data_rss_mib": data[variant],
                    "data_rss_ratio": data[variant] / data["a"],
                    "nmi_vs_a": float(normalized_mutual_info_score(labels_a, labels)),
                    "inertia_ratio": _objective(x, model_a, labels, k) / objective_a,
                    "nmi_planted": float(normalized_mutual_info_score(planted, labels)),
                    "repeats": repeats,
                }
            )
        del x
        return rows
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def markdown_table(rows: list[dict]) -> str:
    """The rows of :func:`run` as a markdown table."""
    lines = [
        "| variant | n x dim, k | fit on | wall (s) | wall / a | peak RSS (MiB) | RSS / a "
        "| peak - base (MiB) | (peak - base) / a | NMI vs a | inertia / a | NMI to planted |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']}: {r['method']} | {r['n']} x {r['dim']}, {r['k']} | {r['n_fit']} "
            f"| {r['wall_s']:.2f} | {r['time_ratio']:.2f} | {r['peak_rss_mib']:.0f} "
            f"| {r['rss_ratio']:.2f} | {r['data_rss_mib']:.0f} | {r['data_rss_ratio']:.2f} "
            f"| {r['nmi_vs_a']:.4f} | {r['inertia_ratio']:.4f} "
            f"| {r['nmi_planted']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="points")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension")
    parser.add_argument("--k", type=int, default=256, help="clusters")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant (medians)")
    parser.add_argument("--workdir", default=None, help="folder for the feature files")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return
    load_before = os.getloadavg()[0]
    rows = run(
        args.n, args.dim, args.k, quick=args.quick, repeats=args.repeats, workdir=args.workdir
    )
    print(
        f"{os.cpu_count()} CPUs, medians over {args.repeats} run(s), base RSS (imports) "
        f"{rows[0]['base_rss_mib']:.0f} MiB, 1-min load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
