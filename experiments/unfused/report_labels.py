"""Aggregate the pseudo-label study into pseudo_labels.json and its table in README.md.

Usage: python experiments/unfused/report_labels.py [RUNS_DIR]
(default: experiments/unfused/runs/labels). Each ``RUNS_DIR/k<k>-<prep>/seed*/pipeline.json``
is one run of ``experiment=unfused_labels`` (``make reproduce-unfused-labels``); seeds whose
run stops at the pseudo-labels count for NMI only. The setting chosen is the one with the
best mean validation accuracy of the student's 5%-label finetune: test accuracy is
reported, never used to choose.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from distillery.eval.reproduction import finished_runs, mean_std, publish

HERE = Path(__file__).parent
PREPROCESSING = {  # the Makefile's names -> what the PseudoLabeler does before k-means
    "whiten": "PCA-whitening to 128 dims (eig_power -0.5), L2",
    "pca": "PCA to 128 dims (eig_power 0), L2",
    "l2": "L2 only (pca_dim null)",
}
VARIANT = re.compile(r"k(?P<k>\d+)-(?P<prep>\w+)")


def collect(runs_dir: Path) -> dict:
    rows = []
    for variant in sorted(p for p in runs_dir.iterdir() if VARIANT.fullmatch(p.name)):
        match = VARIANT.fullmatch(variant.name)
        for path, stages in finished_runs(
            variant, "seed*/pipeline.json", "reproduce-unfused-labels"
        ):
            meta = json.loads((path.parent / "pseudo_label/pseudo_labels/meta.json").read_text())
            row = {
                "k": int(match["k"]),
                "preprocessing": match["prep"],
                "seed": path.parent.name,
                "applied": meta["preprocessing"],  # what ran (PCA is skipped <= pca_dim dims)
                "nmi": stages["pseudo_label"]["metrics"]["pseudo_label/pseudo/nmi"],
                # The teacher's stage-cache entry (one per seed); null in the run that trained it.
                "teacher_reused": Path(
                    (stages["ssl"].get("reused_from") or {}).get("entry", "")
                ).name
                or None,
            }
            if "student_few" in stages:
                metrics = stages["student_few"]["metrics"]
                row["val_acc"] = metrics["student_few/val/acc"]  # of the best-validation epoch
                row["test_acc"] = metrics["student_few/test/acc"]
                row["labeled_train"] = int(metrics["student_few/data/labeled_train"])
            rows.append(row)
    return {"runs": rows, "chosen": choose(rows)}


def settings(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    """Rows by (k, preprocessing), in the order k, then PREPROCESSING's."""
    order = list(PREPROCESSING)
    keys = sorted(
        {(r["k"], r["preprocessing"]) for r in rows}, key=lambda s: (s[0], order.index(s[1]))
    )
    return {key: [r for r in rows if (r["k"], r["preprocessing"]) == key] for key in keys}


def choose(rows: list[dict]) -> dict:
    """The setting with the best mean validation accuracy (ties: higher mean NMI)."""
    scored = {
        key: (statistics.mean(vals), statistics.mean(r["nmi"] for r in group))
        for key, group in settings(rows).items()
        if (vals := [r["val_acc"] for r in group if "val_acc" in r])
    }
    k, prep = max(scored, key=scored.get)
    return {"k": k, "preprocessing": prep, "mean_val_acc": scored[(k, prep)][0]}


def table(results: dict) -> str:
    rows, chosen = results["runs"], results["chosen"]
    groups = settings(rows)
    n_nmi = sorted({len(g) for g in groups.values()})
    n_acc = sorted({sum("val_acc" in r for r in g) for g in groups.values()})
    applied = sorted({f"{r['preprocessing']}: {r['applied']}" for r in rows})
    labeled = "/".join(
        str(n) for n in sorted({r["labeled_train"] for r in rows if "labeled_train" in r})
    )
    lines = [
        f"Mean ± std over seeds (NMI: {'/'.join(map(str, n_nmi))} seeds; accuracies: "
        f"{'/'.join(map(str, n_acc))} seeds). NMI: pseudo-labels vs the true classes of the "
        "560 training clips (8 classes). Accuracy: the self-distilled student finetuned with "
        f"5% of the labels ({labeled} clips), on the validation split (120 clips; chooses the setting, in bold) "
        "and the test split (120 clips; reported only).",
        "",
        "| k | preprocessing | NMI | student 5% val acc | student 5% test acc |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (k, prep), group in groups.items():
        cells = [
            mean_std([r["nmi"] for r in group]),
            mean_std([r["val_acc"] for r in group if "val_acc" in r]),
            mean_std([r["test_acc"] for r in group if "test_acc" in r]),
        ]
        bold = "**" if (k, prep) == (chosen["k"], chosen["preprocessing"]) else ""
        lines.append(
            f"| {bold}{k}{bold} | {bold}{PREPROCESSING[prep]}{bold} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Applied, as recorded in each run's meta.json: " + "; ".join(applied) + "."]
    return "\n".join(lines)


def main() -> None:
    runs_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs" / "labels"
    results = collect(runs_dir)
    publish(HERE, results, table(results), block="pseudo_labels")


if __name__ == "__main__":
    main()
