"""The results table printed at the end of a pipeline and written to ``run_dir/results.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery import artifacts
from distillery.pipeline.manifest import RunManifest

#: Columns of the table, in order, when a stage reports them (``<stage>/<column>``).
COLUMNS = (
    "test/acc",
    "eval/knn10_acc",
    "eval/knn20_acc",
    "eval/linear_acc",
    "eval/nmi",
    "eval/ari",
    "pseudo/nmi",
    "eval/params",
    "eval/throughput_clips_s",
    "data/labeled_train",
    "data/labeled_val",
)


def format_value(column: str, value: float) -> str:
    if column.endswith("params"):
        return f"{value / 1e6:.2f}M"
    if column.endswith("clips_s") or "/data/" in f"/{column}":  # clips/s, clip counts
        return f"{value:.0f}"
    return f"{value:.4f}"


def results_table(manifest: RunManifest) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the results table: one row per stage, raw values (``None``
    where a stage lacks a column); columns no stage reports are left out."""
    present = [
        c for c in COLUMNS if any(f"{n}/{c}" in r.metrics for n, r in manifest.stages.items())
    ]
    header = ["stage", "kind", "status", "wall time (s)", *present]
    rows = [
        [name, record.kind, record.status, record.wall_time_s]
        + [record.metrics.get(f"{name}/{column}") for column in present]
        for name, record in manifest.stages.items()
    ]
    return header, rows


def results_markdown(manifest: RunManifest) -> str:
    header, rows = results_table(manifest)
    lines = [
        f"# Results of {manifest.run_id}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for row in rows:
        name, kind, status, wall = row[:4]
        cells = [name, kind, status, "-" if wall is None else f"{wall:.1f}"]
        for column, value in zip(header[4:], row[4:], strict=True):
            cells.append("-" if value is None else format_value(column, value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, manifest: RunManifest) -> str:
    text = results_markdown(manifest)
    artifacts.write_text(Path(run_dir) / "results.md", text)
    return text
