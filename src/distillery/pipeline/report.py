"""The results table printed at the end of a pipeline and written to ``run_dir/results.md``."""

from __future__ import annotations

from pathlib import Path

from distillery import artifacts
from distillery.pipeline.manifest import RunManifest

#: Metric splits shown in the table; training-time values stay in the loggers.
REPORTED_SPLITS = ("test", "eval")


def reported_metrics(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """``<stage>/<split>/<name>`` metrics of the reported splits, keyed ``<split>/<name>``."""
    out = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == stage and parts[1] in REPORTED_SPLITS:
            out[f"{parts[1]}/{parts[2]}"] = value
    return out


def results_markdown(manifest: RunManifest) -> str:
    lines = [
        f"# Results of {manifest.run_id}",
        "",
        "| stage | kind | status | wall time (s) | metrics |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, record in manifest.stages.items():
        shown = reported_metrics(name, record.metrics)
        metrics = ", ".join(f"{k} = {v:.4g}" for k, v in sorted(shown.items())) or "-"
        wall = f"{record.wall_time_s:.1f}" if record.wall_time_s is not None else "-"
        lines.append(f"| {name} | {record.kind} | {record.status} | {wall} | {metrics} |")
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, manifest: RunManifest) -> str:
    text = results_markdown(manifest)
    artifacts.write_text(Path(run_dir) / "results.md", text)
    return text
