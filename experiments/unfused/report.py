"""Aggregate the UnFuSeD reproduction runs into results.json and the table in README.md.

Usage: python experiments/unfused/report.py [RUNS_DIR]   (default: experiments/unfused/runs)
Each ``RUNS_DIR/<data>/seed*/pipeline.json`` is one run of ``experiment=unfused_compare``;
one table per data set.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distillery.eval.reproduction import (
    describe_protocol,
    mean_std,
    paired_difference,
    publish,
    run_config,
    runs_by_data,
)

HERE = Path(__file__).parent
METHODS = {  # stage-name prefix -> what it is
    "scratch": "(a) student architecture trained from scratch",
    "teacher": "(b) SSL teacher finetuned",
    "student": "(c) UnFuSeD student finetuned",
}
FRACTIONS = {"few": "5% labels", "all": "100% labels"}


def collect(runs: list) -> dict:
    per_seed = []
    for path, stages in runs:
        row = {"run": path.parent.name}
        for method in METHODS:
            for fraction in FRACTIONS:
                name = f"{method}_{fraction}"
                row[name] = stages[name]["metrics"][f"{name}/test/acc"]
            row[f"{method}_params"] = stages[f"{method}_all"]["metrics"][
                f"{method}_all/eval/params"
            ]
        row["teacher_params"] = stages["ssl"]["metrics"]["ssl/eval/params"]
        row["pseudo_nmi"] = stages["ssl"]["metrics"]["ssl/pseudo/nmi"]
        row["pseudo_k"] = run_config(path).pipeline.stages.ssl.callbacks.pseudo_labeler.k
        row["teacher_knn10"] = stages["ssl"]["metrics"]["ssl/eval/knn10_acc"]
        row["student_knn10"] = stages["self_distill"]["metrics"]["self_distill/eval/knn10_acc"]
        per_seed.append(row)
    return {"protocol": describe_protocol(runs), "runs": per_seed}


def table(data: str, results: dict) -> str:
    rows = results["runs"]
    lines = [
        f"### `data={data}`",
        "",
        results["protocol"],
        "",
        f"Test accuracy, mean ± std over {len(rows)} seeds:",
        "",
        "| method | params | " + " | ".join(FRACTIONS.values()) + " |",
        "| --- | --- | " + " | ".join("---" for _ in FRACTIONS) + " |",
    ]
    for method, label in METHODS.items():
        params = rows[0][f"{method}_params"] / 1e6
        accs = [mean_std([r[f"{method}_{f}"] for r in rows]) for f in FRACTIONS]
        lines.append(f"| {label} | {params:.2f}M | " + " | ".join(accs) + " |")
    lines += [
        "",
        "Paired by seed (each seed's three methods share data, teacher and labelled subset):",
        "",
    ]
    for fraction, label in FRACTIONS.items():
        student = [r[f"student_{fraction}"] for r in rows]
        lines.append(
            f"- {label}: (c) - (b) {paired_difference(student, [r[f'teacher_{fraction}'] for r in rows])}; "
            f"(c) - (a) {paired_difference(student, [r[f'scratch_{fraction}'] for r in rows])}"
        )
    lines += [
        "",
        f"Pseudo-label NMI vs true classes (k = {rows[0]['pseudo_k']}): {mean_std([r['pseudo_nmi'] for r in rows])}; "
        f"kNN-10 test accuracy of the frozen embeddings (all training labels as neighbours): teacher "
        f"{mean_std([r['teacher_knn10'] for r in rows])}, student {mean_std([r['student_knn10'] for r in rows])}.",
    ]
    return "\n".join(lines)


def main() -> None:
    runs_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs"
    groups = runs_by_data(runs_dir, "seed*/pipeline.json", "reproduce-unfused")
    results = {data: collect(runs) for data, runs in groups.items()}
    publish(HERE, results, "\n\n".join(table(data, r) for data, r in results.items()))


if __name__ == "__main__":
    main()
