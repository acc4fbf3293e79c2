"""Aggregate the DPHuBERT reproduction runs into results.json and the table in README.md.

Usage: python experiments/dphubert/report.py [RUNS_DIR]   (default: experiments/dphubert/runs)
Each ``RUNS_DIR/<data>/seed*/pipeline.json`` is one run of ``experiment=dphubert_compare``;
one table per data set.
Inference time: every seed's teacher, DPHuBERT export and hand-designed student run the
same batch (16 one-second log-mel clips) in this process, on one thread, interleaved.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from distillery.bench.pruned_inference import time_models
from distillery.eval.reproduction import (
    describe_protocol,
    mean_std,
    paired_difference,
    publish,
    runs_by_data,
)
from distillery.models.io import load_encoder

HERE = Path(__file__).parent
METHODS = {  # stage name -> what it is
    "teacher": "(a) teacher (BYOL-A transformer)",
    "hand_designed": "(b) hand-designed student at the target size, distilled",
    "hand_designed_34": "(b') hand-designed student at the size (d) reached, distilled",
    "prune_distill": "(c) DPHuBERT after prune_distill",
    "final_distill": "(d) DPHuBERT after final_distill",
}
METRICS = {"knn10_acc": "kNN-10", "linear_acc": "linear probe"}
# The claim: DPHuBERT (d) against each hand-designed student, seed-paired.
CLAIMS = {"hand_designed": "(d) - (b)", "hand_designed_34": "(d) - (b')"}


def inference_seconds(run: Path) -> dict[str, float]:
    models = {
        name: load_encoder(run / name / "encoder.pt")[0].eval()
        for name in ("teacher", "final_distill", "hand_designed", "hand_designed_34")
    }
    torch.manual_seed(0)
    return time_models(models, torch.randn(16, 1, 64, 101), repeats=7, inner=3)


def collect(runs: list) -> dict:
    per_seed = []
    torch.set_num_threads(1)
    for path, stages in runs:
        row: dict = {"run": path.parent.name}
        for stage in METHODS:
            metrics = stages[stage]["metrics"]
            for key in (*METRICS, "params"):
                row[f"{stage}_{key}"] = metrics[f"{stage}/eval/{key}"]
        pruning_file = (
            path.parent / stages["prune_distill"]["artifacts"]["pruning"]
        )  # run-dir relative
        pruning = json.loads(pruning_file.read_text())
        row["target_params"] = pruning["target_params"]
        row["params_vs_target"] = pruning["params_vs_target"]
        row["kept"] = pruning["kept"]
        row["seconds_per_batch"] = inference_seconds(path.parent)
        per_seed.append(row)
    return {"protocol": describe_protocol(runs), "runs": per_seed}


def table(data: str, results: dict) -> str:
    rows = results["runs"]
    n = len(rows)
    lines = [
        f"### `data={data}`",
        "",
        results["protocol"],
        "",
        f"Frozen-embedding test accuracy, mean ± std over {n} seeds (kNN and linear probe use "
        "every labelled training clip); parameters of the first seed (the DPHuBERT count varies "
        "by seed, see below):",
        "",
        "| method | params | " + " | ".join(METRICS.values()) + " | inference time vs teacher |",
        "| --- | --- | " + " | ".join("---" for _ in METRICS) + " | --- |",
    ]
    speed = {"teacher": "1"} | {
        name: _speed_ratio(rows, name)
        for name in ("hand_designed", "hand_designed_34", "final_distill")
    }
    for stage, label in METHODS.items():
        params = rows[0][f"{stage}_params"] / 1e6
        accs = [mean_std([r[f"{stage}_{m}"] for r in rows]) for m in METRICS]
        lines.append(
            f"| {label} | {params:.3f}M | "
            + " | ".join(accs)
            + f" | {speed.get(stage, '(same model as d)')} |"
        )
    lines += ["", "Paired by seed (each seed's students distil the same teacher):", ""]
    for student, label in CLAIMS.items():
        lines.append(
            f"- {label}: "
            + "; ".join(
                f"{name} "
                + paired_difference(
                    [r[f"final_distill_{m}"] for r in rows], [r[f"{student}_{m}"] for r in rows]
                )
                for m, name in METRICS.items()
            )
        )
    gaps = [r["params_vs_target"] for r in rows]
    lines += [
        "",
        f"Target: 25% of the teacher = {rows[0]['target_params'] / 1e6:.3f}M parameters. DPHuBERT export vs target, per seed: "
        + ", ".join(f"{g:+.1%}" for g in gaps)
        + f" (within 2%: {sum(abs(g) <= 0.02 for g in gaps)} of {n}).",
        "Kept units per seed (conv channels of 192, heads of 4 per block, FFN units of 768 per block): "
        + "; ".join(_kept(r["kept"]) for r in rows)
        + ".",
    ]
    return "\n".join(lines)


def _speed_ratio(rows: list[dict], name: str) -> str:
    seconds = [r["seconds_per_batch"] for r in rows]
    return mean_std([s[name] / s["teacher"] for s in seconds], 2)


def _kept(kept: dict[str, int]) -> str:
    heads = [v for k, v in sorted(kept.items()) if k.startswith("heads.")]
    ffn = [v for k, v in sorted(kept.items()) if k.startswith("ffn.")]
    return f"conv {kept.get('conv.0', '-')}, heads {heads}, ffn {ffn}"


def main() -> None:
    runs_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs"
    groups = runs_by_data(runs_dir, "seed*/pipeline.json", "reproduce-dphubert")
    results = {data: collect(runs) for data, runs in groups.items()}
    for data, ((path, stages), *_) in groups.items():  # the first seed's sparsity plot
        plot = stages["prune_distill"]["artifacts"]["sparsity_plot"]  # run-dir relative
        shutil.copyfile(path.parent / plot, HERE / f"sparsity_{data}_{path.parent.name}.png")
    publish(HERE, results, "\n\n".join(table(data, r) for data, r in results.items()))


if __name__ == "__main__":
    main()
