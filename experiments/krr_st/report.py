"""Aggregate the KRR-ST reproduction runs into results.json and the table in README.md.

Usage: python experiments/krr_st/report.py [RUNS_DIR]   (default: experiments/krr_st/runs)
``RUNS_DIR/teacher/pipeline.json`` is the run of ``experiment=krr_st_teacher`` and each
``RUNS_DIR/n<N>/seed<S>/pipeline.json`` one run of ``experiment=krr_st_compare`` with a
synthetic set of N examples.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from distillery.eval.reproduction import finished_stages, mean_std, publish

HERE = Path(__file__).parent
METHODS = {  # suffix of the stage names -> what it is
    "scratch": "(a) no pretraining",
    "random": "(b) pretrained on a random real subset with teacher targets",
    "distilled": "(c) pretrained on the KRR-ST distilled set",
}


def logged_values(stage_dir: Path, key: str) -> list[float]:
    """Every logged value of ``key``, in order, from the stage's CSV log (``logger=csv``)."""
    values = []
    for log in sorted(stage_dir.glob("logs/attempt-*/metrics.csv")):
        with log.open() as f:
            values += [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    return values


def collect_run(path: Path) -> dict:
    stages = finished_stages(path)
    meta = json.loads((path.parent / "distill" / "synthetic_set" / "meta.json").read_text())
    row = {"run": f"{path.parent.parent.name}/{path.parent.name}", "size": meta["size"]}
    row["outer_steps"] = meta["outer_steps"]
    for method in METHODS:
        metrics = stages[f"finetune_{method}"]["metrics"]
        row[f"{method}_test_acc"] = metrics[f"finetune_{method}/test/acc"]
    for method in ("random", "distilled"):
        metrics = stages[f"pretrain_{method}"]["metrics"]
        row[f"{method}_frozen_linear"] = metrics[f"pretrain_{method}/eval/linear_acc"]
        row[f"{method}_frozen_knn10"] = metrics[f"pretrain_{method}/eval/knn10_acc"]
        row[f"pretrain_{method}_wall_s"] = stages[f"pretrain_{method}"]["wall_time_s"]
    row["params"] = stages["finetune_scratch"]["metrics"]["finetune_scratch/eval/params"]
    row["distill_wall_s"] = stages["distill"]["wall_time_s"]
    train_losses = logged_values(path.parent / "distill", "distill/train/loss_epoch")
    val_losses = logged_values(path.parent / "distill", "distill/val/loss")
    row["distill_first_loss"], row["distill_last_loss"] = train_losses[0], train_losses[-1]
    row["distill_first_val_loss"], row["distill_last_val_loss"] = val_losses[0], val_losses[-1]
    row["input_shift_rms"] = meta["input_shift_rms"]
    row["target_shift_rms"] = meta["target_shift_rms"]
    return row


def collect(runs_dir: Path) -> dict:
    teacher_path = runs_dir / "teacher" / "pipeline.json"
    runs = sorted(runs_dir.glob("n*/seed*/pipeline.json"))
    if not runs or not teacher_path.exists():
        raise SystemExit(
            f"no teacher or seed runs under {runs_dir}: run `make reproduce-krr-st` first"
        )
    teacher = finished_stages(teacher_path)["ssl"]
    return {
        "teacher": {
            "wall_s": teacher["wall_time_s"],
            "params": teacher["metrics"]["ssl/eval/params"],
            "knn10_acc": teacher["metrics"]["ssl/eval/knn10_acc"],
        },
        "runs": [collect_run(path) for path in runs],
        "timing": collect_timing(runs_dir / "timing"),
    }


def collect_timing(timing_dir: Path) -> dict | None:
    """Stage wall times of the back-to-back timing runs (teacher, then one comparison run)."""
    teacher, compare = (
        timing_dir / "teacher" / "pipeline.json",
        timing_dir / "n28" / "pipeline.json",
    )
    if not (teacher.exists() and compare.exists()):
        return None
    walls = {name: stage["wall_time_s"] for name, stage in finished_stages(compare).items()}
    return {"ssl": finished_stages(teacher)["ssl"]["wall_time_s"], **walls}


def timing_table(timing: dict | None) -> list[str]:
    if timing is None:
        return ["(No back-to-back timing runs under runs/timing.)"]
    ssl, distill, pretrain = timing["ssl"], timing["distill"], timing["pretrain_distilled"]
    share = lambda seconds: f"{seconds:.0f} ({seconds / ssl:.0%} of full SSL pretraining)"  # noqa: E731
    return [
        "Wall time measured back to back (`runs/timing`: the teacher, then one comparison run at "
        "N = 28, seed 0; each stage's time includes its evaluation):",
        "",
        "| step | wall time (s) |",
        "| --- | --- |",
        f"| full SSL pretraining (BYOL-A teacher, all 560 clips, 10 epochs) | {ssl:.0f} |",
        f"| KRR-ST distillation to N = 28 | {share(distill)} |",
        f"| pretraining on the distilled set | {share(pretrain)} |",
        f"| distillation + pretraining | {share(distill + pretrain)} |",
        f"| finetuning, for scale | {timing['finetune_distilled']:.0f} |",
    ]


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | {' | '.join(cells)} |"


def table(results: dict) -> str:
    teacher = results["teacher"]
    # One column per setting: set size N and number of outer steps of the distillation.
    by_size: dict[tuple[int, int], list[dict]] = {}
    for row in results["runs"]:
        by_size.setdefault((row["size"], row["outer_steps"]), []).append(row)
    sizes = sorted(by_size)

    def col(setting: tuple[int, int], key: str) -> list[float]:
        return [r[key] for r in by_size[setting] if r[key] is not None]

    seeds = sorted({len(rows) for rows in by_size.values()})
    params = results["runs"][0]["params"] / 1e6
    head = " | ".join(f"N = {n}, {steps} steps" for n, steps in sizes)
    rule = " | ".join("---" for _ in sizes)
    lines = [
        f"Mean ± std over {'/'.join(map(str, seeds))} seeds (8 classes, chance 0.125); AudioNTT "
        f"{params:.2f}M parameters; N pretraining examples out of 560 training clips.",
        "",
        "Test accuracy after finetuning with 5% of the labels:",
        "",
        f"| pretraining | {head} |",
        f"| --- | {rule} |",
    ]
    for method, label in METHODS.items():
        cells = " | ".join(mean_std(col(n, f"{method}_test_acc")) for n in sizes)
        lines.append(f"| {label} | {cells} |")
    paired = {
        n: [r["distilled_test_acc"] - r["random_test_acc"] for r in by_size[n]] for n in sizes
    }
    lines.append(_row("(c) - (b), paired by seed", [mean_std(paired[n]) for n in sizes]))
    lines += [
        "",
        "Frozen pretrained encoder before finetuning, linear probe / kNN-10 test accuracy (5% of the labels):",
        "",
        f"| pretraining | {head} |",
        f"| --- | {rule} |",
    ]
    for method in ("random", "distilled"):
        cells = " | ".join(
            f"{mean_std(col(n, f'{method}_frozen_linear'))} / {mean_std(col(n, f'{method}_frozen_knn10'))}"
            for n in sizes
        )
        lines.append(f"| {METHODS[method]} | {cells} |")
    lines += ["", *timing_table(results.get("timing"))]
    lines += [
        "",
        "Wall time in seconds of every run, mean ± std over seeds (the CPU was shared with other "
        "jobs, unevenly between runs; each stage's time includes its evaluation):",
        "",
        f"| step | {head} |",
        f"| --- | {rule} |",
        _row(
            f"full SSL pretraining (the teacher, once, {teacher['params'] / 1e6:.2f}M)",
            [f"{teacher['wall_s']:.0f}"] * len(sizes),
        ),
        _row("KRR-ST distillation", [mean_std(col(n, "distill_wall_s"), 0) for n in sizes]),
        _row(
            "pretraining on the distilled set",
            [mean_std(col(n, "pretrain_distilled_wall_s"), 0) for n in sizes],
        ),
        _row(
            "pretraining on the random subset",
            [mean_std(col(n, "pretrain_random_wall_s"), 0) for n in sizes],
        ),
        "",
        f"| distillation diagnostics | {head} |",
        f"| --- | {rule} |",
        _row("outer loss, first epoch", [mean_std(col(n, "distill_first_loss"), 4) for n in sizes]),
        _row("outer loss, last epoch", [mean_std(col(n, "distill_last_loss"), 4) for n in sizes]),
        _row(
            "outer loss on validation clips, first validation",
            [mean_std(col(n, "distill_first_val_loss"), 4) for n in sizes],
        ),
        _row(
            "outer loss on validation clips, last validation",
            [mean_std(col(n, "distill_last_val_loss"), 4) for n in sizes],
        ),
        _row(
            "RMS change of the inputs (standardised log-mel)",
            [mean_std(col(n, "input_shift_rms")) for n in sizes],
        ),
        _row("RMS change of the targets", [mean_std(col(n, "target_shift_rms")) for n in sizes]),
    ]
    return "\n".join(lines)


def main() -> None:
    runs_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs"
    results = collect(runs_dir)
    publish(HERE, results, table(results))


if __name__ == "__main__":
    main()
