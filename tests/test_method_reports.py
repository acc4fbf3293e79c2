"""The DPHuBERT, PLL, CoSS and KRR-ST reproduction reports, on fabricated finished runs (no
training): one table per data set under its protocol statement, and the numbers in it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from omegaconf import OmegaConf

from tests.helpers import load_report

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
DATA = {  # the `data=` option -> the composed data config the reports read
    "speech": {
        "source": "speech",
        "speech": {
            "words": ["yes", "no"],
            "speakers": 4,
            "clips_per_word": 1,
            "val_speakers": 1,
            "test_speakers": 1,
        },
        "label_subset_seed": 0,
    },
    "synthetic_hard": {
        "source": "synthetic",
        "synthetic": {
            "num_classes": 4,
            "clips_per_class": 12,
            "snr_db_min": -5.0,
            "snr_db_max": 10.0,
        },
        "val_fraction": 0.15,
        "test_fraction": 0.15,
        "split_seed": 0,
        "label_subset_seed": 0,
    },
}
#: What protocol=few_label puts in the config.
FEW_LABEL = OmegaConf.to_container(
    OmegaConf.load(EXPERIMENTS.parent / "conf/protocol/few_label.yaml").stage_kind_settings
)


def stage(kind: str, metrics: dict[str, float], **record) -> dict:
    return {"kind": kind, "status": "done", "metrics": metrics, "wall_time_s": 1.0, **record}


def fake_run(run_dir: Path, stages: dict[str, dict], data: str, seed: int, *extra: str) -> None:
    """A finished run: its pipeline.json, composed config and command-line overrides."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": stages}))
    config = {"seed": seed, "data": DATA[data], "stage_kind_settings": FEW_LABEL}
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    overrides = [f"data={data}", f"seed={seed}", "protocol=few_label", *extra]
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")


def fake_teacher(run_dir: Path, data: str) -> None:
    metrics = {f"ssl/eval/{k}": 0.5 for k in ("knn10_acc", "knn20_acc", "linear_acc", "nmi")}
    fake_run(run_dir, {"ssl": stage("ssl", metrics | {"ssl/eval/params": 4e5})}, data, 0)


def publish_into(tmp_path: Path, report: ModuleType, monkeypatch, *args: Path) -> dict:
    """Run the report's main() on ``args``, publishing into a README under ``tmp_path``;
    the published results.json."""
    here = tmp_path / "published"
    here.mkdir()
    (here / "README.md").write_text("<!-- results:begin -->\n<!-- results:end -->\n")
    monkeypatch.setattr(report, "HERE", here)
    monkeypatch.setattr(sys, "argv", ["report.py", *map(str, args)])
    report.main()
    return json.loads((here / "results.json").read_text())


def readme(tmp_path: Path) -> str:
    return (tmp_path / "published" / "README.md").read_text()


def pll_stages(accuracy: float) -> dict[str, dict]:
    """pll_noise: every head at ``accuracy``, SD 4 and the GCE PLL head 0.1 above it."""
    stages = {}
    for rate in (0, 20, 40, 60, 80):
        gce, twohot = f"gce_{rate:02d}", f"twohot_{rate:02d}"
        heads = {"ce": 0, "sd1": 0, "sd2": 0, "sd3": 0, "sd4": 0.1, "pll": 0.2}
        metrics = {f"{gce}/test/acc_{h}": accuracy + up for h, up in heads.items()}
        for key in ("val/acc_pll", "train/noise_realised_rate", "train/teacher_top1_clean"):
            metrics[f"{gce}/{key}"] = 0.5
        metrics |= {f"{gce}/train/teacher_top2_clean": 0.6, f"{gce}/test/teacher_top2_acc": 0.6}
        metrics |= {f"{gce}/data/labeled_train": 20.0, f"{gce}/data/labeled_val": 6.0}
        stages[gce] = stage("partial_label_sd", metrics)
        stages[twohot] = stage(
            "partial_label_sd",
            {f"{twohot}/test/acc_pll": 0.3, f"{twohot}/val/acc_pll": 0.3},
        )
    return stages


def test_pll_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    for data in DATA:
        fake_teacher(runs / data / "teacher", data)
        for seed, accuracy in enumerate([0.5, 0.7]):
            fake_run(runs / data / f"seed{seed}", pll_stages(accuracy), data, seed)
    results = publish_into(
        tmp_path, load_report(EXPERIMENTS / "pll" / "report.py"), monkeypatch, runs
    )
    assert list(results) == ["speech", "synthetic_hard"]
    assert [r["run"] for r in results["speech"]["runs"]] == ["seed0", "seed1"]
    text = readme(tmp_path)
    assert text.count("### `data=") == 2
    assert "2 words (chance 0.500)" in text and "4 classes (chance 0.250)" in text
    # CE to SD 3 at 0.5 and 0.7, SD 4 0.1 and PLL (GCE) 0.2 above; two-hot CE 0.3 in both.
    means = "0.600 ± 0.141 | " * 4 + "0.700 ± 0.141 | 0.800 ± 0.141 | 0.300 ± 0.000 |"
    assert f"| 0.4 | {means}" in text
    assert "| 0.6 | +0.100 ± 0.000, higher in 2 of 2 seeds | +0.100 ± 0.000" in text
    assert "`gce_00`, `gce_20`, `gce_40`, `gce_60`, `gce_80`: 20 / 6" in text


def test_coss_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs, teachers = tmp_path / "runs", tmp_path / "teachers"
    methods = {"cosine_random": 0.0, "coss_random": 0.1, "coss_knn": 0.05}
    for data in DATA:
        fake_teacher(teachers / data / "teacher", data)
        for seed, accuracy in enumerate([0.6, 0.8]):
            stages = {}
            for name, up in methods.items():
                metrics = {
                    f"{name}/eval/{k}": accuracy + up
                    for k in ("knn10_acc", "knn20_acc", "linear_acc", "nmi")
                }
                metrics |= {f"{name}/eval/params": 1e5, f"{name}/train/cos_epoch": 0.02}
                stages[name] = stage("coss_kd", metrics | {f"{name}/train/space_epoch": 0.1})
            fake_run(runs / data / f"seed{seed}", stages, data, seed)
    results = publish_into(
        tmp_path, load_report(EXPERIMENTS / "coss" / "report.py"), monkeypatch, runs, teachers
    )
    assert list(results) == ["speech", "synthetic_hard"]
    text = readme(tmp_path)
    # No stage learns from labels and none is a finetune: only the subset clause is stated.
    assert "test clips. Labelled subsets drawn per seed.\n" in text
    assert "| (b) CoSS, random batches | 0.10M | 0.800 ± 0.141 |" in text
    assert "(b) - (a): the space term: kNN-10 +0.100 ± 0.000, higher in 2 of 2 seeds" in text


def test_dphubert_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = load_report(EXPERIMENTS / "dphubert" / "report.py")
    monkeypatch.setattr(  # the reports' timing loads the exported encoders
        report, "inference_seconds", lambda run: dict.fromkeys(report.METHODS, 1.0)
    )
    runs = tmp_path / "runs"
    for data in DATA:
        for seed, accuracy in enumerate([0.4, 0.6]):
            run = runs / data / f"seed{seed}"
            stages = {
                name: stage(
                    "distill",
                    {f"{name}/eval/knn10_acc": accuracy, f"{name}/eval/linear_acc": accuracy}
                    | {f"{name}/eval/params": 5e5},
                )
                for name in report.METHODS
            }
            stages["final_distill"]["metrics"]["final_distill/eval/linear_acc"] += 0.2 * seed
            stages["prune_distill"]["artifacts"] = {
                "pruning": "prune_distill/pruning.json",
                "sparsity_plot": "prune_distill/sparsity_plot.png",
            }
            fake_run(run, stages, data, seed)
            pruning = {"target_params": 5e5, "params_vs_target": 0.3, "kept": {"conv.0": 192}}
            (run / "prune_distill").mkdir()
            (run / "prune_distill" / "pruning.json").write_text(json.dumps(pruning))
            (run / "prune_distill" / "sparsity_plot.png").write_bytes(b"png")
    results = publish_into(tmp_path, report, monkeypatch, runs)
    assert list(results) == ["speech", "synthetic_hard"]
    text = readme(tmp_path)
    # (d) linear probe 0.4 and 0.8 against (b) 0.4 and 0.6: differences 0 and 0.2.
    assert "| (d) DPHuBERT after final_distill | 0.500M | 0.500 ± 0.141 | 0.600 ± 0.283 |" in text
    assert "- (d) - (b): kNN-10 +0.000 ± 0.000, higher in 0 of 2 seeds; " in text
    assert "linear probe +0.100 ± 0.141, higher in 1 of 2 seeds" in text
    plots = sorted(p.name for p in (tmp_path / "published").glob("*.png"))
    assert plots == ["sparsity_speech_seed0.png", "sparsity_synthetic_hard_seed0.png"]


def krr_run(run_dir: Path, data: str, seed: int, size: int, accuracy: float, *extra: str) -> None:
    methods = {"scratch": 0.0, "random": 0.2, "distilled": 0.3}
    stages = {
        f"finetune_{m}": stage(
            "finetune",
            {f"finetune_{m}/test/acc": accuracy + up, f"finetune_{m}/eval/params": 1e5}
            | {f"finetune_{m}/data/labeled_train": 4.0, f"finetune_{m}/data/labeled_val": 6.0},
        )
        for m, up in methods.items()
    }
    for m in ("random", "distilled"):
        metrics = {f"pretrain_{m}/eval/linear_acc": 0.5, f"pretrain_{m}/eval/knn10_acc": 0.4}
        stages[f"pretrain_{m}"] = stage("pretrain_synthetic", metrics)
    stages["distill"] = stage("dataset_distill", {})
    fake_run(run_dir, stages, data, seed, f"pipeline.stages.distill.module.size={size}", *extra)
    meta = {"size": size, "outer_steps": 80, "input_shift_rms": 0.1, "target_shift_rms": 0.1}
    (run_dir / "distill" / "synthetic_set").mkdir(parents=True)
    (run_dir / "distill" / "synthetic_set" / "meta.json").write_text(json.dumps(meta))
    (run_dir / "distill" / "logs" / "attempt-0").mkdir(parents=True)
    (run_dir / "distill" / "logs" / "attempt-0" / "metrics.csv").write_text(
        "distill/train/loss_epoch,distill/val/loss\n0.04,\n,0.03\n0.02,0.025\n"
    )


def test_krr_st_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    for data in DATA:
        fake_teacher(runs / data / "teacher", data)
        for seed, accuracy in enumerate([0.4, 0.5]):
            krr_run(runs / data / "n8" / f"seed{seed}", data, seed, 8, accuracy)
    results = publish_into(
        tmp_path, load_report(EXPERIMENTS / "krr_st" / "report.py"), monkeypatch, runs
    )
    assert list(results) == ["speech", "synthetic_hard"]
    assert results["speech"]["timing"] is None
    text = readme(tmp_path)
    assert "labelled clips (train / val) per stage that learns from labels: " in text.lower()
    assert "at most 300 optimizer steps" in text
    assert "| (c) pretrained on the KRR-ST distilled set | 0.750 ± 0.071 |" in text
    assert "| (c) - (b), paired by seed | +0.100 ± 0.000, higher in 2 of 2 seeds |" in text
    assert "| outer loss, last epoch | 0.0200 ± 0.0000 |" in text


def test_krr_st_states_what_each_setting_adds(tmp_path: Path) -> None:
    report = load_report(EXPERIMENTS / "krr_st" / "report.py")
    runs = tmp_path / "speech"
    krr_run(runs / "n8" / "seed0", "speech", 0, 8, 0.4)
    longer = "pipeline.stages.distill.trainer.max_epochs=50"
    krr_run(runs / "n8_epochs50" / "seed0", "speech", 0, 8, 0.4, longer)
    krr_run(runs / "n2" / "seed0", "speech", 0, 2, 0.4)
    runs_found = [
        (p, json.loads(p.read_text())["stages"]) for p in sorted(runs.glob("n*/*/*.json"))
    ]
    text = report.describe_settings(runs_found)
    assert text.startswith("`distillery data=speech protocol=few_label pipeline.stages.distill")
    assert text.endswith(
        "That command is the one of the runs under `n2`; `n8` with "
        "`pipeline.stages.distill.module.size=8`; `n8_epochs50` with "
        f"`pipeline.stages.distill.module.size=8`, `{longer}`."
    )
