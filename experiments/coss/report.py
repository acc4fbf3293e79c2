"""Aggregate the CoSS reproduction runs into results.json and the table in README.md.

Usage: python experiments/coss/report.py [RUNS_DIR] [TEACHER_RUNS]
(defaults: experiments/coss/runs, experiments/pll/runs). Each
``RUNS_DIR/<data>/seed*/pipeline.json`` is one run of ``experiment=coss_compare``, its
teacher ``TEACHER_RUNS/<data>/teacher``. One table per data set.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from distillery.eval.reproduction import (
    describe_protocol,
    finished_stages,
    mean_std,
    paired_difference,
    publish,
    runs_by_data,
)

HERE = Path(__file__).parent
METHODS = {  # stage name -> what it is
    "cosine_random": "(a) cosine only (space_weight = 0), random batches",
    "coss_random": "(b) CoSS, random batches",
    "coss_knn": "(c) CoSS, teacher-space kNN batches",
}
METRICS = {
    "knn10_acc": "kNN-10",
    "knn20_acc": "kNN-20",
    "linear_acc": "linear probe",
    "nmi": "k-means NMI",
}
# The claims, each a seed-paired difference of two students: (first, second, what it checks).
CLAIMS = (
    ("coss_random", "cosine_random", "(b) - (a): the space term"),
    ("coss_knn", "coss_random", "(c) - (b): kNN batches"),
)


def collect(runs: list, teacher_run: Path) -> dict:
    per_seed = []
    for path, stages in runs:
        row: dict = {"run": path.parent.name}
        for name in METHODS:
            m = stages[name]["metrics"]
            row[name] = {k: m[f"{name}/eval/{k}"] for k in [*METRICS, "params"]}
            row[name] |= {k: m[f"{name}/train/{k}_epoch"] for k in ("cos", "space")}
            row[name]["wall_time_s"] = stages[name]["wall_time_s"]
        per_seed.append(row)
    teacher = finished_stages(teacher_run / "pipeline.json")["ssl"]["metrics"]
    return {
        "protocol": describe_protocol(runs),
        "runs": per_seed,
        "teacher": {k: teacher[f"ssl/eval/{k}"] for k in [*METRICS, "params"]},
    }


def table(data: str, results: dict) -> str:
    rows, teacher = results["runs"], results["teacher"]
    lines = [
        f"### `data={data}`",
        "",
        results["protocol"],
        "",
        f"Frozen-embedding accuracy on the test split, mean ± std over {len(rows)} seeds "
        "(kNN and linear probe use every labelled training clip):",
        "",
        "| encoder | params | " + " | ".join(METRICS.values()) + " | final cos / space term |",
        "| --- | --- | " + " | ".join("---" for _ in METRICS) + " | --- |",
        f"| teacher (BYOL-A, seed 0) | {teacher['params'] / 1e6:.2f}M | "
        + " | ".join(f"{teacher[k]:.3f}" for k in METRICS)
        + " | - |",
    ]
    for name, label in METHODS.items():
        cells = [mean_std([r[name][k] for r in rows]) for k in METRICS]
        terms = (
            f"{statistics.mean(r[name]['cos'] for r in rows):.3f} / "
            f"{statistics.mean(r[name]['space'] for r in rows):.3f}"
        )
        lines.append(
            f"| {label} | {rows[0][name]['params'] / 1e6:.2f}M | "
            + " | ".join(cells)
            + f" | {terms} |"
        )
    lines += ["", "Paired by seed (each seed's three students share teacher and data):", ""]
    for first, second, label in CLAIMS:
        lines.append(
            f"- {label}: "
            + "; ".join(
                f"{METRICS[k]} "
                + paired_difference([r[first][k] for r in rows], [r[second][k] for r in rows])
                for k in ("knn10_acc", "linear_acc")
            )
        )
    return "\n".join(lines)


def main() -> None:
    runs_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs"
    teacher_runs = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE.parent / "pll" / "runs"
    groups = runs_by_data(runs_dir, "seed*/pipeline.json", "reproduce-coss")
    results = {
        data: collect(runs, teacher_runs / data / "teacher") for data, runs in groups.items()
    }
    publish(HERE, results, "\n\n".join(table(data, r) for data, r in results.items()))


if __name__ == "__main__":
    main()
