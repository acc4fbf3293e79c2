"""``python -m distillery.bench``: run the benchmarks, write ``bench/results.{json,md}``.

Benchmarks (one module each): ``clustering`` (k-means vs scikit-learn and FAISS),
``training`` (Lightning vs a plain loop), ``input_pipeline`` (log-mel on the fly vs
precomputed; data wait with 0 and 2 workers), ``pseudo_labels`` (embed + cluster + write
labels vs scikit-learn), ``end_to_end`` (a whole smoke pipeline in a subprocess),
``pruned_inference`` (a DPHuBERT-pruned encoder vs its teacher), ``speedups`` (each
speed change of the framework vs the code it replaced) and ``data_scale`` (index build
time, memory per rank at 1k/10k/100k clips, lazy loading and the embedding pass).
Every figure is a ratio against a baseline measured in the same run. A ``--only`` run
replaces its own sections of ``results.{json,md}`` and keeps the others.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillery.bench import (
    clustering,
    data_scale,
    end_to_end,
    input_pipeline,
    pruned_inference,
    pseudo_labels,
    report,
    speedups,
    training,
)
from distillery.bench.common import machine, quiet, thread_limit
from distillery.bench.timing import Comparison, stopwatch

NAMES = (
    "clustering",
    "training",
    "input_pipeline",
    "pseudo_labels",
    "end_to_end",
    "pruned_inference",
    "speedups",
    "data_scale",
)


def _clustering(
    quick: bool, cache_dir: Path, threads: int | None
) -> tuple[dict[str, Any], list[Comparison]]:
    rows = clustering.run(quick=quick, repeats=1 if quick else clustering.REPEATS, threads=threads)
    return {"rows": rows, "reference": clustering.REFERENCE}, report.clustering_rows(
        rows, clustering.REFERENCE
    )


BENCHMARKS: dict[
    str, Callable[[bool, Path, int | None], tuple[dict[str, Any], list[Comparison]]]
] = {
    "clustering": _clustering,
    "training": lambda quick, cache, threads: training.run(quick, cache),
    "input_pipeline": lambda quick, cache, threads: input_pipeline.run(quick, cache),
    "pseudo_labels": lambda quick, cache, threads: pseudo_labels.run(quick, cache),
    "end_to_end": lambda quick, cache, threads: end_to_end.run(quick, cache, threads),
    "pruned_inference": lambda quick, cache, threads: pruned_inference.run(quick, cache),
    "speedups": lambda quick, cache, threads: speedups.run(quick),
    "data_scale": lambda quick, cache, threads: data_scale.run(quick, cache),
}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m distillery.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke test of a few seconds each"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per process for torch, BLAS and FAISS (0: leave as configured); default 1, "
        "which keeps both sides of a comparison equally exposed to other load on a small machine",
    )
    parser.add_argument("--out", type=Path, default=Path("bench"), help="where results.json/.md go")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(".cache/distillery"), help="synthetic data cache"
    )
    parser.add_argument(
        "--only", nargs="+", choices=NAMES, default=list(NAMES), help="a subset of benchmarks"
    )
    args = parser.parse_args(argv)
    threads = args.threads or None
    cache_dir = args.cache_dir.resolve()  # also used by subprocesses

    quiet()
    described = machine(threads)
    benchmarks: dict[str, dict[str, Any]] = {}
    with thread_limit(threads):
        for name in args.only:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            with stopwatch() as watch:
                raw, comparisons = BENCHMARKS[name](args.quick, cache_dir, threads)
            benchmarks[name] = {
                "wall_s": watch.seconds,
                "raw": raw,
                "rows": [c.to_dict() for c in comparisons],
            }
            print(f"[bench] {name} done in {watch.seconds:.0f} s", file=sys.stderr, flush=True)
    described["load_average_1min_end"] = os.getloadavg()[0]
    settings = {
        "quick": args.quick,
        "threads": threads,
        "only": args.only,
        "cache_dir": str(cache_dir),
    }
    command = " ".join(
        ["python -m distillery.bench", *(argv if argv is not None else sys.argv[1:])]
    )
    benchmarks, rows = report.merge_earlier(args.out, benchmarks, NAMES, command)
    text = report.write(
        args.out,
        command=command,
        machine=described,
        settings=settings,
        benchmarks=benchmarks,
        rows=rows,
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
