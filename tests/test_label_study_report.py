"""The UnFuSeD pseudo-label study's report: chosen on validation, published as a second block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.eval.reproduction import publish
from tests.helpers import load_report

REPORT = Path(__file__).parents[1] / "experiments/unfused/report_labels.py"


def fake_run(run_dir: Path, nmi: float, val: float | None = None, test: float = 0.0) -> None:
    """A finished pipeline.json of experiment=unfused_labels (val None: NMI only)."""
    stages = {
        "ssl": {"status": "done", "metrics": {}},
        "pseudo_label": {"status": "done", "metrics": {"pseudo_label/pseudo/nmi": nmi}},
    }
    if val is not None:
        stages["student_few"] = {
            "status": "done",
            "metrics": {
                "student_few/val/acc": val,
                "student_few/test/acc": test,
                "student_few/data/labeled_train": 32.0,
            },
        }
    meta_dir = run_dir / "pseudo_label/pseudo_labels"
    meta_dir.mkdir(parents=True)
    (meta_dir / "meta.json").write_text(json.dumps({"preprocessing": "l2-normalize"}))
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": stages}))


def test_the_setting_is_chosen_on_validation_and_published_beside_the_main_table(
    tmp_path: Path,
) -> None:
    report = load_report(REPORT)
    runs = tmp_path / "runs"
    # whiten: better on validation; l2: better on test and NMI. Seed 3 counts for NMI only.
    for seed, (val_w, val_l) in enumerate([(0.80, 0.70), (0.90, 0.76)]):
        fake_run(runs / f"k16-whiten/seed{seed}", 0.4, val_w, test=0.5)
        fake_run(runs / f"k16-l2/seed{seed}", 0.6, val_l, test=0.9)
    fake_run(runs / "k16-l2/seed3", 0.7)
    results = report.collect(runs)
    assert results["chosen"] == {
        "k": 16,
        "preprocessing": "whiten",
        "mean_val_acc": pytest.approx(0.85),
    }
    table = report.table(results)
    assert "| **16** | **PCA-whitening" in table
    assert (
        "| 16 | L2 only (pca_dim null) | 0.633 ± 0.058 | 0.730 ± 0.042 | 0.900 ± 0.000 |" in table
    )

    readme = tmp_path / "README.md"
    readme.write_text(
        "a\n<!-- results:begin -->\nmain\n<!-- results:end -->\n"
        "b\n<!-- pseudo_labels:begin -->\nSTALE\n<!-- pseudo_labels:end -->\n"
    )
    publish(tmp_path, results, table, block="pseudo_labels")
    body = readme.read_text()
    assert "\nmain\n" in body and "STALE" not in body and table in body
    assert json.loads((tmp_path / "pseudo_labels.json").read_text()) == results
    with pytest.raises(SystemExit, match="no <!-- other:begin -->"):
        publish(tmp_path, results, table, block="other")
