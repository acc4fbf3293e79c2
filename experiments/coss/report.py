"""Aggregate the CoSS reproduction runs into results.json and the table in README.md.

Usage: python experiments/coss/report.py [RUNS_DIR] [TEACHER_RUN]
(defaults: experiments/coss/runs, experiments/pll/runs/teacher). Each
``RUNS_DIR/seed*/pipeline.json`` is one run of ``experiment=coss_compare``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
METHODS = {  # stage name -> what it is
    "cosine_random": "(a) cosine only (l1 = 0), random batches",
    "coss_random": "(b) CoSS, random batches",
    "coss_knn": "(c) CoSS, teacher-space kNN batches",
}
METRICS = {
    "knn10_acc": "kNN-10",
    "knn20_acc": "kNN-20",
    "linear_acc": "linear probe",
    "nmi": "k-means NMI",
}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def collect(runs_dir: Path, teacher_run: Path) -> dict:
    runs = sorted(runs_dir.glob("seed*/pipeline.json"))
    if not runs:
        raise SystemExit(f"no runs under {runs_dir}: run `make reproduce-coss` first")
    per_seed = []
    for path in runs:
        stages = json.loads(path.read_text())["stages"]
        if any(s["status"] != "done" for s in stages.values()):
            raise SystemExit(
                f"{path}: not every stage is done; re-run the same command to resume it"
            )
        row: dict = {"run": path.parent.name}
        for name in METHODS:
            m = stages[name]["metrics"]
            row[name] = {k: m[f"{name}/eval/{k}"] for k in [*METRICS, "params"]}
            row[name] |= {k: m[f"{name}/train/{k}_epoch"] for k in ("cos", "space")}
            row[name]["wall_time_s"] = stages[name]["wall_time_s"]
        per_seed.append(row)
    teacher = json.loads((teacher_run / "pipeline.json").read_text())["stages"]["ssl"]["metrics"]
    return {
        "runs": per_seed,
        "teacher": {k: teacher[f"ssl/eval/{k}"] for k in [*METRICS, "params"]},
    }


def table(results: dict) -> str:
    rows, teacher = results["runs"], results["teacher"]
    lines = [
        f"Frozen-embedding accuracy on the test split, mean ± std over {len(rows)} seeds "
        "(8 classes, chance 0.125; kNN and linear probe use every training label):",
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
    return "\n".join(lines)


def main() -> None:
    runs_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs"
    teacher_run = (
        Path(sys.argv[2]) if len(sys.argv) > 2 else HERE.parent / "pll" / "runs" / "teacher"
    )
    results = collect(runs_dir, teacher_run)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    readme = HERE / "README.md"
    body = readme.read_text()
    start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
    readme.write_text(body[:start] + "\n" + text + "\n" + body[end:])
    print(text)


if __name__ == "__main__":
    main()
