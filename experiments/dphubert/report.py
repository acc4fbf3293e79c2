"""Aggregate the DPHuBERT reproduction runs into results.json and the table in README.md.

Usage: python experiments/dphubert/report.py [RUNS_DIR]   (default: experiments/dphubert/runs)
Each ``RUNS_DIR/seed*/pipeline.json`` is one run of ``experiment=dphubert_compare``.
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
from distillery.eval.reproduction import finished_runs, mean_std, publish
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


def inference_seconds(run: Path) -> dict[str, float]:
    models = {
        name: load_encoder(run / name / "encoder.pt")[0].eval()
        for name in ("teacher", "final_distill", "hand_designed", "hand_designed_34")
    }
    torch.manual_seed(0)
    return time_models(models, torch.randn(16, 1, 64, 101), repeats=7, inner=3)


def collect(runs_dir: Path) -> dict:
    per_seed = []
    torch.set_num_threads(1)
    for path, stages in finished_runs(runs_dir, "seed*/pipeline.json", "reproduce-dphubert"):
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
    return {"runs": per_seed}


def table(results: dict) -> str:
    rows = results["runs"]
    n = len(rows)
    lines = [
        f"Frozen-embedding test accuracy, mean ± std over {n} seeds (8 classes, chance 0.125); "
        "parameters of seed 0 (the DPHuBERT count varies by seed, see below):",
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
    results = collect(runs_dir)
    plot = runs_dir / "seed0" / "prune_distill" / "sparsity.png"
    if plot.exists():
        shutil.copyfile(plot, HERE / "sparsity_seed0.png")
    publish(HERE, results, table(results))


if __name__ == "__main__":
    main()
