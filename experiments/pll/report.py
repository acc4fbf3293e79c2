"""Aggregate the PLL reproduction runs into results.json and the tables in README.md.

Usage: python experiments/pll/report.py [RUNS_DIR]   (default: experiments/pll/runs)
Each ``RUNS_DIR/seed*/pipeline.json`` is one run of ``experiment=pll_noise``; the teacher
encoder's own evaluation is read from ``RUNS_DIR/teacher/pipeline.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distillery.eval.reproduction import finished_runs, finished_stages, mean_std, publish

HERE = Path(__file__).parent
RATES = (0, 20, 40, 60, 80)  # stage-name suffixes: noise rate in percent
HEADS = {
    "ce": "CE (round 0)",
    "sd1": "SD 1",
    "sd2": "SD 2",
    "sd3": "SD 3",
    "sd4": "SD 4",
    "pll": "PLL (GCE)",
}


def collect(runs_dir: Path) -> dict:
    per_seed = []
    for path, stages in finished_runs(runs_dir, "seed*/pipeline.json", "reproduce-pll"):
        row: dict = {"run": path.parent.name}
        for rate in RATES:
            prefix, other = f"gce_{rate:02d}", f"twohot_{rate:02d}"
            main, twohot = stages[prefix]["metrics"], stages[other]["metrics"]
            row[str(rate)] = {
                **{h: main[f"{prefix}/test/acc_{h}"] for h in HEADS},
                "pll_two_hot_ce": twohot[f"{other}/test/acc_pll"],
                "val_pll": main[f"{prefix}/val/acc_pll"],
                "val_pll_two_hot_ce": twohot[f"{other}/val/acc_pll"],
                "realised_rate": main[f"{prefix}/train/noise_realised_rate"],
                "teacher_top1_train": main[f"{prefix}/train/teacher_top1_clean"],
                "teacher_top2_train": main[f"{prefix}/train/teacher_top2_clean"],
                "teacher_top2_test": main[f"{prefix}/test/teacher_top2_acc"],
            }
        per_seed.append(row)
    teacher = finished_stages(runs_dir / "teacher" / "pipeline.json")["ssl"]["metrics"]
    return {"runs": per_seed, "teacher_eval": {k: v for k, v in teacher.items() if "/eval/" in k}}


def table(results: dict) -> str:
    rows = results["runs"]
    col = lambda rate, key: mean_std([r[str(rate)][key] for r in rows])  # noqa: E731
    lines = [
        f"Test accuracy of the linear probes, mean ± std over {len(rows)} seeds (8 classes, chance "
        "0.125; symmetric noise on the train and validation labels, test labels clean):",
        "",
        "| noise | " + " | ".join(HEADS.values()) + " | PLL (two-hot CE) |",
        "| --- | " + " | ".join("---" for _ in HEADS) + " | --- |",
    ]
    for rate in RATES:
        cells = [col(rate, h) for h in HEADS] + [col(rate, "pll_two_hot_ce")]
        lines.append(f"| {rate / 100:.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The round-0 teacher's top-1 and top-2 accuracy against the clean labels (train split: the "
        "PLL candidate sets; test split), and the realised noise rate:",
        "",
        "| noise | realised | teacher top-1 (train) | teacher top-2 (train) | teacher top-1 (test) | teacher top-2 (test) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rate in RATES:
        cells = [
            col(rate, k)
            for k in (
                "realised_rate",
                "teacher_top1_train",
                "teacher_top2_train",
                "ce",
                "teacher_top2_test",
            )
        ]
        lines.append(f"| {rate / 100:.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Validation accuracy (noisy validation labels: what the loss choice may be based on) of the "
        "PLL head, GCE vs two-hot CE: "
        + "; ".join(
            f"{rate / 100:.1f}: {col(rate, 'val_pll')} vs {col(rate, 'val_pll_two_hot_ce')}"
            for rate in RATES
        )
        + ".",
    ]
    t = results["teacher_eval"]
    lines += [
        "",
        f"Frozen encoder (`experiment=pll_teacher`, seed 0): kNN-10 {t['ssl/eval/knn10_acc']:.3f}, "
        f"linear probe (shared evaluation, clean labels) {t['ssl/eval/linear_acc']:.3f}, "
        f"{t['ssl/eval/params'] / 1e6:.2f}M parameters.",
    ]
    return "\n".join(lines)


def main() -> None:
    runs_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs"
    results = collect(runs_dir)
    publish(HERE, results, table(results))


if __name__ == "__main__":
    main()
