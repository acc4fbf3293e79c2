"""The results table printed at the end of a pipeline and written to ``run_dir/results.md``."""

from __future__ import annotations

from pathlib import Path

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
)


def _format(column: str, value: float) -> str:
    if column.endswith("params"):
        return f"{value / 1e6:.2f}M"
    return f"{value:.4f}"


def results_markdown(manifest: RunManifest) -> str:
    present = [
        c for c in COLUMNS if any(f"{n}/{c}" in r.metrics for n, r in manifest.stages.items())
    ]
    header = ["stage", "kind", "status", "wall time (s)", *present]
    lines = [
        f"# Results of {manifest.run_id}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for name, record in manifest.stages.items():
        wall = f"{record.wall_time_s:.1f}" if record.wall_time_s is not None else "-"
        cells = [name, record.kind, record.status, wall]
        for column in present:
            value = record.metrics.get(f"{name}/{column}")
            cells.append("-" if value is None else _format(column, value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, manifest: RunManifest) -> str:
    text = results_markdown(manifest)
    artifacts.write_text(Path(run_dir) / "results.md", text)
    return text
