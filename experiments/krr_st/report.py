"""Aggregate the KRR-ST reproduction runs into results.json and the table in README.md.

Usage: python experiments/krr_st/report.py [RUNS_DIR]   (default: experiments/krr_st/runs)
Per data set, ``RUNS_DIR/<data>/teacher/pipeline.json`` is the run of
``experiment=krr_st_teacher``, each ``RUNS_DIR/<data>/n<N>*/seed<S>/pipeline.json`` one run
of ``experiment=krr_st_compare`` with a synthetic set of N examples, and
``RUNS_DIR/<data>/timing`` the back-to-back timing runs. One set of tables per data set.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from distillery.eval.reproduction import (
    describe_protocol,
    finished_stages,
    mean_std,
    paired_difference,
    publish,
    runs_by_data,
)

HERE = Path(__file__).parent
METHODS = {  # suffix of the stage names -> what it is
    "scratch": "(a) no pretraining",
    "random": "(b) pretrained on a random real subset with teacher targets",
    "distilled": "(c) pretrained on the KRR-ST distilled set",
}
# The claims, each a seed-paired difference of two pretrainings: (first, second, label).
CLAIMS = (
    ("distilled", "random", "(c) - (b), paired by seed"),
    ("random", "scratch", "(b) - (a), paired by seed"),
)


def logged_values(stage_dir: Path, key: str) -> list[float]:
    """Every logged value of ``key``, in order, from the stage's CSV log (``logger=csv``)."""
    values = []
    for log in sorted(stage_dir.glob("logs/attempt-*/metrics.csv")):
        with log.open() as f:
            values += [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    return values


def collect_run(path: Path, stages: dict[str, dict]) -> dict:
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


def command(path: Path) -> set[str]:
    """A run's command-line overrides, less those every run has its own of."""
    overrides = OmegaConf.load(path.parent / ".hydra" / "overrides.yaml")
    return {o for o in overrides if not o.startswith(("seed=", "run_dir="))}


def describe_settings(runs: list) -> str:
    """The protocol, stated from the runs of the first setting (one ``n<N>...`` folder), and
    what each other setting's command adds to that one."""
    folders: dict[str, list] = {}
    for path, stages in runs:
        folders.setdefault(path.parent.parent.name, []).append((path, stages))
    (first, first_runs), *others = folders.items()
    stated = command(first_runs[0][0])
    changes = [
        f"`{folder}` with " + ", ".join(f"`{o}`" for o in sorted(command(rs[0][0]) - stated))
        for folder, rs in others
    ]
    return (
        f"{describe_protocol(first_runs)} That command is the one of the runs under `{first}`"
        + "".join(f"; {change}" for change in changes)
        + "."
    )


def collect(runs: list, data_dir: Path) -> dict:
    teacher_path = data_dir / "teacher" / "pipeline.json"
    if not teacher_path.exists():
        raise SystemExit(f"no teacher run under {data_dir}: run `make reproduce-krr-st` first")
    teacher = finished_stages(teacher_path)["ssl"]
    return {
        "protocol": describe_settings(runs),
        "teacher": {
            "params": teacher["metrics"]["ssl/eval/params"],
            "knn10_acc": teacher["metrics"]["ssl/eval/knn10_acc"],
        },
        "runs": [collect_run(path, stages) for path, stages in runs],
        "timing": collect_timing(data_dir / "timing"),
    }


def collect_timing(timing_dir: Path) -> dict | None:
    """Stage wall times of the back-to-back timing runs (teacher, then one comparison run)."""
    teacher = timing_dir / "teacher" / "pipeline.json"
    compare = sorted(timing_dir.glob("n*/pipeline.json"))
    if not (teacher.exists() and len(compare) == 1):
        return None
    walls = {name: stage["wall_time_s"] for name, stage in finished_stages(compare[0]).items()}
    meta = json.loads((compare[0].parent / "distill/synthetic_set/meta.json").read_text())
    return {"ssl": finished_stages(teacher)["ssl"]["wall_time_s"], "size": meta["size"], **walls}


def timing_table(timing: dict | None, teacher_params: float) -> list[str]:
    if timing is None:
        return ["(No back-to-back timing runs under runs/<data>/timing.)"]
    ssl, distill, pretrain = timing["ssl"], timing["distill"], timing["pretrain_distilled"]
    share = lambda seconds: f"{seconds:.0f} ({seconds / ssl:.0%} of full SSL pretraining)"  # noqa: E731
    return [
        "Wall time measured back to back (`runs/<data>/timing`: the teacher, then one comparison "
        f"run at N = {timing['size']}, seed 0; each stage's time includes its evaluation):",
        "",
        "| step | wall time (s) |",
        "| --- | --- |",
        f"| full SSL pretraining (the BYOL-A teacher, {teacher_params / 1e6:.2f}M, all training "
        f"clips) | {ssl:.0f} |",
        f"| KRR-ST distillation to N = {timing['size']} | {share(distill)} |",
        f"| pretraining on the distilled set | {share(pretrain)} |",
        f"| distillation + pretraining | {share(distill + pretrain)} |",
        f"| finetuning, for scale | {timing['finetune_distilled']:.0f} |",
    ]


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | {' | '.join(cells)} |"


def table(data: str, results: dict) -> str:
    teacher = results["teacher"]
    # One column per setting (a folder of seeds: ``n<N>...``), by set size N and number of
    # outer steps of the distillation; its runs are paired by seed.
    by_setting: dict[str, list[dict]] = {}
    for row in results["runs"]:
        by_setting.setdefault(row["run"].split("/")[0], []).append(row)
    settings = sorted(
        by_setting, key=lambda f: (by_setting[f][0]["size"], by_setting[f][0]["outer_steps"])
    )

    def col(setting: str, key: str) -> list[float]:
        return [r[key] for r in by_setting[setting] if r[key] is not None]

    seeds = sorted({len(rows) for rows in by_setting.values()})
    params = results["runs"][0]["params"] / 1e6
    head = " | ".join(
        f"N = {by_setting[f][0]['size']}, {by_setting[f][0]['outer_steps']} steps" for f in settings
    )
    rule = " | ".join("---" for _ in settings)
    lines = [
        f"### `data={data}`",
        "",
        results["protocol"],
        "",
        f"Mean ± std over {'/'.join(map(str, seeds))} seeds; AudioNTT {params:.2f}M parameters; "
        "N pretraining examples.",
        "",
        "Test accuracy after finetuning with the labelled training clips stated above:",
        "",
        f"| pretraining | {head} |",
        f"| --- | {rule} |",
    ]
    for method, label in METHODS.items():
        cells = " | ".join(mean_std(col(n, f"{method}_test_acc")) for n in settings)
        lines.append(f"| {label} | {cells} |")
    for first, second, label in CLAIMS:
        cells = [
            paired_difference(col(n, f"{first}_test_acc"), col(n, f"{second}_test_acc"))
            for n in settings
        ]
        lines.append(_row(label, cells))
    lines += [
        "",
        "Frozen pretrained encoder before finetuning, linear probe / kNN-10 test accuracy (the "
        "finetunes' labelled training clips):",
        "",
        f"| pretraining | {head} |",
        f"| --- | {rule} |",
    ]
    for method in ("random", "distilled"):
        cells = " | ".join(
            f"{mean_std(col(n, f'{method}_frozen_linear'))} / {mean_std(col(n, f'{method}_frozen_knn10'))}"
            for n in settings
        )
        lines.append(f"| {METHODS[method]} | {cells} |")
    lines += ["", *timing_table(results.get("timing"), teacher["params"])]
    lines += [
        "",
        "Wall time in seconds of every run, mean ± std over seeds (the CPU was shared with other "
        "jobs, unevenly between runs; each stage's time includes its evaluation):",
        "",
        f"| step | {head} |",
        f"| --- | {rule} |",
        _row("KRR-ST distillation", [mean_std(col(n, "distill_wall_s"), 0) for n in settings]),
        _row(
            "pretraining on the distilled set",
            [mean_std(col(n, "pretrain_distilled_wall_s"), 0) for n in settings],
        ),
        _row(
            "pretraining on the random subset",
            [mean_std(col(n, "pretrain_random_wall_s"), 0) for n in settings],
        ),
        "",
        f"| distillation diagnostics | {head} |",
        f"| --- | {rule} |",
        _row(
            "outer loss, first epoch", [mean_std(col(n, "distill_first_loss"), 4) for n in settings]
        ),
        _row(
            "outer loss, last epoch", [mean_std(col(n, "distill_last_loss"), 4) for n in settings]
        ),
        _row(
            "outer loss on validation clips, first validation",
            [mean_std(col(n, "distill_first_val_loss"), 4) for n in settings],
        ),
        _row(
            "outer loss on validation clips, last validation",
            [mean_std(col(n, "distill_last_val_loss"), 4) for n in settings],
        ),
        _row(
            "RMS change of the inputs (standardised log-mel)",
            [mean_std(col(n, "input_shift_rms")) for n in settings],
        ),
        _row("RMS change of the targets", [mean_std(col(n, "target_shift_rms")) for n in settings]),
    ]
    return "\n".join(lines)


def main() -> None:
    runs_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs"
    groups = runs_by_data(runs_dir, "n*/seed*/pipeline.json", "reproduce-krr-st")
    results = {data: collect(runs, runs_dir / data) for data, runs in groups.items()}
    publish(HERE, results, "\n\n".join(table(data, r) for data, r in results.items()))


if __name__ == "__main__":
    main()
