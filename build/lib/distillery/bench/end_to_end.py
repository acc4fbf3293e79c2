"""End to end: wall time and peak memory of a whole pipeline run in a subprocess.

The candidate is ``distillery experiment=unfused debug=smoke`` (every stage of the demo
pipeline on a few batches of a tiny data set, with evaluation, pseudo-labels, offline
W&B and artifacts). The full demo takes minutes and does not fit the benchmark budget;
the smoke run exercises the same code paths. The baseline is a process that only imports
what the CLI imports before running (``distillery.cli`` and the pipeline runner): the
floor every run pays. Runs are interleaved.

Peak RSS is ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by a small launcher process that
runs the command: Linux carries the high-water mark of the process image an ``exec``
replaces into the new program's ``ru_maxrss``, so a direct child of this (large) benchmark
process would report at least this process's own peak.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from distillery.bench.timing import Comparison, interleaved, median, stopwatch

FULL_COMMAND = ("experiment=unfused", "debug=smoke")
#: The quick (smoke-test) variant runs the one-stage supervised pipeline instead.
QUICK_COMMAND = ("experiment=supervised", "debug=smoke")
IMPORTS = "import distillery.cli, distillery.pipeline.runner"
#: ``python -c LAUNCHER <rss file> <command...>``: runs the command, writes its peak RSS (KiB).
LAUNCHER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(code)"
)
FULL_REPEATS, QUICK_REPEATS = 3, 1


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("distillery")
    return [str(script)] if script.exists() else [sys.executable, "-m", "distillery.cli"]


def measure(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    """Run ``argv`` to completion: (wall seconds, peak RSS in bytes). Raises on failure."""
    rss_file = log.with_suffix(".rss")
    launcher = [sys.executable, "-c", LAUNCHER, str(rss_file), *argv]
    with open(log, "wb") as out, stopwatch() as watch:
        code = subprocess.call(launcher, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(argv)} exited with {code}:\n{tail}")
    return watch.seconds, int(rss_file.read_text()) * 1024  # ru_maxrss is in KiB on Linux


def _stage_seconds(run_dir: Path) -> float:
    """Sum of the stages' wall times recorded in ``pipeline.json``."""
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    return sum(float(stage.get("wall_time_s") or 0.0) for stage in manifest["stages"].values())


def run(
    quick: bool, cache_dir: Path, threads: int | None = None
) -> tuple[dict[str, Any], list[Comparison]]:
    """Interleave pipeline runs and import-only runs; medians of wall time and peak RSS."""
    command = QUICK_COMMAND if quick else FULL_COMMAND
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    if threads is not None:  # the same thread cap as the in-process benchmarks
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    peaks: dict[str, list[int]] = {"pipeline": [], "imports": []}
    in_stages: list[float] = []

    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        counter = itertools.count()

        def pipeline() -> float:
            run_dir = Path(tmp) / f"run{next(counter)}"
            argv = [*_cli(), *command, f"run_dir={run_dir}", f"data.cache_dir={cache_dir}"]
            seconds, peak = measure(argv, env, Path(tmp) / "pipeline.log")
            peaks["pipeline"].append(peak)
            in_stages.append(_stage_seconds(run_dir) / seconds)
            return seconds

        def imports() -> float:
            seconds, peak = measure([sys.executable, "-c", IMPORTS], env, Path(tmp) / "imports.log")
            peaks["imports"].append(peak)
            return seconds

        seconds = interleaved({"pipeline": pipeline, "imports": imports}, repeats)

    wall = {name: median(values) for name, values in seconds.items()}
    rss = {name: median(values) for name, values in peaks.items()}
    raw = {
        "command": ["distillery", *command],
        "baseline": ["python", "-c", IMPORTS],
        "repeats": repeats,
        "seconds": seconds,
        "peak_rss_bytes": peaks,
        "median_seconds": wall,
        "median_peak_rss_mib": {name: value / 2**20 for name, value in rss.items()},
        "share_of_wall_in_stages": median(in_stages),
        "ratios": {
            "wall": wall["pipeline"] / wall["imports"],
            "peak_rss": rss["pipeline"] / rss["imports"],
        },
    }
    candidate = f"distillery {' '.join(command)}"
    rows = [
        Comparison(
            benchmark="end to end",
            measure="wall time",
            unit="s",
            candidate=candidate,
            baseline="import-only process",
            candidate_value=wall["pipeline"],
            baseline_value=wall["imports"],
            higher_is_better=False,
            note=f"{median(in_stages):.0%} of the run inside stages (pipeline.json)",
        ),
        Comparison(
            benchmark="end to end",
            measure="peak RSS",
            unit="MiB",
            candidate=candidate,
            baseline="import-only process",
            candidate_value=rss["pipeline"] / 2**20,
            baseline_value=rss["imports"] / 2**20,
            higher_is_better=False,
        ),
    ]
    return raw, rows
