"""Aggregate the PLL reproduction runs into results.json and the tables in README.md.

Usage: python experiments/pll/report.py [RUNS_DIR]   (default: experiments/pll/runs)
Each ``RUNS_DIR/<data>/seed*/pipeline.json`` is one run of ``experiment=pll_noise``; the
teacher encoder's own evaluation is read from ``RUNS_DIR/<data>/teacher/pipeline.json``.
One set of tables per data set.
"""

from __future__ import annotations

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
RATES = (0, 20, 40, 60, 80)  # stage-name suffixes: noise rate in percent
HEADS = {
    "ce": "CE (round 0)",
    "sd1": "SD 1",
    "sd2": "SD 2",
    "sd3": "SD 3",
    "sd4": "SD 4",
    "pll": "PLL (GCE)",
}
# The claims, each a seed-paired difference of two heads: (first, second, what it checks).
CLAIMS = (
    ("sd4", "ce", "SD 4 - CE (rounds raise accuracy)"),
    ("pll", "sd4", "PLL (GCE) - SD 4 (one PLL round vs four SD rounds)"),
    ("pll", "pll_two_hot_ce", "PLL (GCE) - PLL (two-hot CE) (the loss)"),
    ("teacher_top2_test", "ce", "teacher top-2 - top-1, test"),
)


def collect(runs: list, teacher_run: Path) -> dict:
    per_seed = []
    for path, stages in runs:
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
    teacher = finished_stages(teacher_run / "pipeline.json")["ssl"]["metrics"]
    return {
        "protocol": describe_protocol(runs),
        "runs": per_seed,
        "teacher_eval": {k: v for k, v in teacher.items() if "/eval/" in k},
    }


def table(data: str, results: dict) -> str:
    rows = results["runs"]

    def values(rate: int, key: str) -> list[float]:
        return [r[str(rate)][key] for r in rows]

    def col(rate: int, key: str) -> str:
        return mean_std(values(rate, key))

    lines = [
        f"### `data={data}`",
        "",
        results["protocol"],
        "",
        f"Test accuracy of the linear probes, mean ± std over {len(rows)} seeds (symmetric noise "
        "on the train and validation labels, test labels clean):",
        "",
        "| noise | " + " | ".join(HEADS.values()) + " | PLL (two-hot CE) |",
        "| --- | " + " | ".join("---" for _ in HEADS) + " | --- |",
    ]
    for rate in RATES:
        cells = [col(rate, h) for h in HEADS] + [col(rate, "pll_two_hot_ce")]
        lines.append(f"| {rate / 100:.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The claims, paired by seed (each seed's heads share its noise and features):",
        "",
        "| noise | " + " | ".join(label for _, _, label in CLAIMS) + " |",
        "| --- | " + " | ".join("---" for _ in CLAIMS) + " |",
    ]
    for rate in RATES:
        cells = [paired_difference(values(rate, a), values(rate, b)) for a, b, _ in CLAIMS]
        lines.append(f"| {rate / 100:.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The round-0 teacher's top-1 and top-2 accuracy against the clean labels (train split: the "
        "PLL candidate sets; test split), and the realised noise rate:",
        "",
        "| noise | realised | teacher top-1 (train) | teacher top-2 (train) | teacher top-1 (test) | teacher top-2 (test) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    teacher_keys = (
        "realised_rate",
        "teacher_top1_train",
        "teacher_top2_train",
        "ce",
        "teacher_top2_test",
    )
    for rate in RATES:
        lines.append(
            f"| {rate / 100:.1f} | " + " | ".join(col(rate, k) for k in teacher_keys) + " |"
        )
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
    groups = runs_by_data(runs_dir, "seed*/pipeline.json", "reproduce-pll")
    results = {data: collect(runs, runs_dir / data / "teacher") for data, runs in groups.items()}
    publish(HERE, results, "\n\n".join(table(data, r) for data, r in results.items()))


if __name__ == "__main__":
    main()
