"""Aggregate the KRR-ST reproduction runs into results.json and the table in README.md.

Usage: python experiments/krr_st/report.py [RUNS_DIR]   (default: experiments/krr_st/runs)
``RUNS_DIR/teacher/pipeline.json`` is the run of ``experiment=krr_st_teacher`` and each
``RUNS_DIR/seed*/pipeline.json`` one run of ``experiment=krr_st_compare``.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
METHODS = {  # suffix of the stage names -> what it is
    "scratch": "(a) no pretraining",
    "random": "(b) pretrained on a random real subset with teacher targets",
    "distilled": "(c) pretrained on the KRR-ST distilled set",
}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _stages(path: Path) -> dict:
    stages = json.loads(path.read_text())["stages"]
    if any(s["status"] != "done" for s in stages.values()):
        raise SystemExit(f"{path}: not every stage is done; re-run the same command to resume it")
    return stages


def first_epoch_loss(stage_dir: Path, key: str) -> float | None:
    """``key`` at the first epoch, from the stage's CSV log (``logger=csv``)."""
    for log in sorted(stage_dir.glob("logs/attempt-*/metrics.csv")):
        with log.open() as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    return float(row[key])
    return None


def collect(runs_dir: Path) -> dict:
    teacher_path = runs_dir / "teacher" / "pipeline.json"
    runs = sorted(runs_dir.glob("seed*/pipeline.json"))
    if not runs or not teacher_path.exists():
        raise SystemExit(
            f"no teacher or seed runs under {runs_dir}: run `make reproduce-krr-st` first"
        )
    teacher = _stages(teacher_path)["ssl"]
    per_seed = []
    for path in runs:
        stages = _stages(path)
        meta = json.loads(
            (
                Path(stages["distill"]["artifacts"]["synthetic_set"]).with_name("meta.json")
            ).read_text()
        )
        row = {"run": path.parent.name, "size": meta["size"], "outer_steps": meta["outer_steps"]}
        for method in METHODS:
            row[f"{method}_test_acc"] = stages[f"finetune_{method}"]["metrics"][
                f"finetune_{method}/test/acc"
            ]
            row[f"{method}_wall_s"] = stages[f"finetune_{method}"]["wall_time_s"]
        for method in ("random", "distilled"):
            metrics = stages[f"pretrain_{method}"]["metrics"]
            row[f"{method}_frozen_linear"] = metrics[f"pretrain_{method}/eval/linear_acc"]
            row[f"{method}_frozen_knn10"] = metrics[f"pretrain_{method}/eval/knn10_acc"]
            row[f"pretrain_{method}_wall_s"] = stages[f"pretrain_{method}"]["wall_time_s"]
        row["params"] = stages["finetune_scratch"]["metrics"]["finetune_scratch/eval/params"]
        row["distill_wall_s"] = stages["distill"]["wall_time_s"]
        row["distill_first_loss"] = first_epoch_loss(
            path.parent / "distill", "distill/train/loss_epoch"
        )
        row["distill_train_loss"] = stages["distill"]["metrics"]["distill/train/loss_epoch"]
        row["distill_val_loss"] = stages["distill"]["metrics"].get("distill/val/loss")
        row["input_shift_rms"] = meta["input_shift_rms"]
        row["target_shift_rms"] = meta["target_shift_rms"]
        per_seed.append(row)
    return {
        "teacher": {
            "wall_s": teacher["wall_time_s"],
            "params": teacher["metrics"]["ssl/eval/params"],
            "knn10_acc": teacher["metrics"]["ssl/eval/knn10_acc"],
        },
        "runs": per_seed,
    }


def table(results: dict) -> str:
    rows, teacher = results["runs"], results["teacher"]
    n, size = len(rows), rows[0]["size"]
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    lines = [
        f"Mean ± std over {n} seeds; AudioNTT {rows[0]['params'] / 1e6:.2f}M parameters; N = {size} "
        f"pretraining examples; finetuned and probed with 5% of the labels (8 classes, chance 0.125).",
        "",
        "| pretraining | finetune test acc | frozen linear probe | frozen kNN-10 |",
        "| --- | --- | --- | --- |",
    ]
    for method, label in METHODS.items():
        probe = "-" if method == "scratch" else mean_std(col(f"{method}_frozen_linear"))
        knn = "-" if method == "scratch" else mean_std(col(f"{method}_frozen_knn10"))
        lines.append(f"| {label} | {mean_std(col(f'{method}_test_acc'))} | {probe} | {knn} |")
    distill, pretrain = col("distill_wall_s"), col("pretrain_distilled_wall_s")
    total = [d + p for d, p in zip(distill, pretrain, strict=True)]
    lines += [
        "",
        "Wall time on this machine (2 shared CPU cores; seconds, including each stage's evaluation):",
        "",
        "| step | wall time (s) |",
        "| --- | --- |",
        f"| full SSL pretraining: the BYOL-A teacher on all clips ({teacher['params'] / 1e6:.2f}M, once) "
        f"| {teacher['wall_s']:.0f} |",
        f"| KRR-ST distillation to N = {size} ({rows[0]['outer_steps']} outer steps) | {mean_std(distill, 0)} |",
        f"| pretraining on the distilled set | {mean_std(pretrain, 0)} |",
        f"| pretraining on the random subset | {mean_std(col('pretrain_random_wall_s'), 0)} |",
        f"| distillation + pretraining | {mean_std(total, 0)} "
        f"({statistics.mean(total) / teacher['wall_s']:.0%} of the SSL teacher's) |",
        "",
        f"Distillation moved the set by an RMS of {mean_std(col('input_shift_rms'))} per log-mel "
        f"value (inputs are standardised) and {mean_std(col('target_shift_rms'))} per target "
        f"dimension. Outer loss (mean over an epoch): {mean_std(col('distill_first_loss'), 4)} in the "
        f"first epoch, {mean_std(col('distill_train_loss'), 4)} in the last; on validation clips "
        f"at the end: {mean_std(col('distill_val_loss'), 4)}.",
    ]
    return "\n".join(lines)


def main() -> None:
    runs_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs"
    results = collect(runs_dir)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    readme = HERE / "README.md"
    body = readme.read_text()
    start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
    readme.write_text(body[:start] + "\n" + text + "\n" + body[end:])
    print(text)


if __name__ == "__main__":
    main()
