"""Results of a benchmark run: ``results.json`` (everything) and ``results.md`` (the table)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distillery import artifacts
from distillery.bench.timing import Comparison


def clustering_rows(rows: list[dict[str, Any]], reference: str) -> list[Comparison]:
    """Rows of :func:`distillery.bench.clustering.run` as time and inertia comparisons."""
    by_dataset: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_dataset.setdefault(row["dataset"], {})[row["method"]] = row
    out = []
    for dataset, methods in by_dataset.items():
        ref = methods[reference]
        size = f"{dataset} {ref['n']}x{ref['d']}, k={ref['k']}"
        for method, row in methods.items():
            if method == reference:
                continue
            common = {
                "benchmark": "clustering",
                "candidate": f"{method} ({size})",
                "baseline": reference,
            }
            out.append(
                Comparison(
                    **common,
                    measure="wall time (fit + label all)",
                    unit="s",
                    candidate_value=row["time_s"],
                    baseline_value=ref["time_s"],
                    higher_is_better=False,
                )
            )
            out.append(
                Comparison(
                    **common,
                    measure="inertia",
                    unit="sum sq. dist.",
                    candidate_value=row["inertia"],
                    baseline_value=ref["inertia"],
                    higher_is_better=False,
                    note=f"NMI to planted {row['nmi']:.3f} (sklearn {ref['nmi']:.3f})",
                )
            )
    return out


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    if value == 0 or 0.01 <= abs(value) < 1e5:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.3g}"


def markdown_table(rows: list[Comparison]) -> str:
    """One line per comparison; ratio = candidate / baseline."""
    lines = [
        "| benchmark | measure (unit) | candidate | baseline | candidate value | baseline value "
        "| ratio (cand. / base.) | goal | note |",
        "|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        goal = ""
        if r.goal is not None:
            goal = f"{'>=' if r.higher_is_better else '<='} {r.goal:g}: {'met' if r.goal_met else 'NOT met'}"
        lines.append(
            f"| {r.benchmark} | {r.measure} ({r.unit}) | {r.candidate} | {r.baseline} "
            f"| {_fmt(r.candidate_value)} | {_fmt(r.baseline_value)} | {r.ratio:.3f} | {goal} | {r.note} |"
        )
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def merge_earlier(
    out_dir: Path, benchmarks: dict[str, dict[str, Any]], order: Sequence[str], command: str
) -> tuple[dict[str, dict[str, Any]], list[Comparison]]:
    """This run's benchmarks plus those of the ``results.json`` already in ``out_dir`` that
    this run did not measure (a ``--only`` run updates its sections and keeps the rest),
    in ``order``, with the table rows. Each benchmark records the ``command`` that
    measured it."""
    for entry in benchmarks.values():
        entry.setdefault("command", command)
    earlier: dict[str, dict[str, Any]] = {}
    try:
        old = json.loads((out_dir / "results.json").read_text())
    except (OSError, ValueError):
        old = {}
    for name, entry in old.get("benchmarks", {}).items():
        if name not in benchmarks and name in order:
            earlier[name] = entry | {"command": entry.get("command", old.get("command", "?"))}
    merged = {name: (benchmarks | earlier)[name] for name in order if name in benchmarks | earlier}
    rows = [Comparison.from_dict(row) for entry in merged.values() for row in entry["rows"]]
    return merged, rows


def write(
    out_dir: Path,
    *,
    command: str,
    machine: dict[str, Any],
    settings: dict[str, Any],
    benchmarks: dict[str, dict[str, Any]],
    rows: list[Comparison],
) -> str:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns the markdown.
    Benchmarks measured by another command (kept by :func:`merge_earlier`) are named."""
    earlier = sorted(
        {b["command"] for b in benchmarks.values() if b.get("command", command) != command}
    )
    sources = [
        f"Rows of {', '.join(n for n, b in benchmarks.items() if b['command'] == other)} "
        f"come from an earlier run: `{other}`."
        for other in earlier
    ]
    result = {
        "command": command,
        "machine": machine,
        "settings": settings,
        "benchmarks": benchmarks,
        "table": [r.to_dict() for r in rows],
    }
    artifacts.write_text(
        out_dir / "results.json", json.dumps(_plain(result), indent=2, allow_nan=False) + "\n"
    )
    cpu = f"{machine['cpu_model']}, {machine['cpu_count']} CPUs"
    versions = ", ".join(f"{k} {machine[k]}" for k in ("torch", "lightning", "faiss", "sklearn"))
    timing = ", ".join(f"{name} {b['wall_s']:.1f} s" for name, b in benchmarks.items())
    text = "\n".join(
        [
            "# distillery benchmarks",
            "",
            f"`{command}` on {cpu} ({machine['torch_threads']} thread(s) per process; "
            f"1-min load average {machine['load_average_1min']:.1f} at the start); {versions}.",
            "Every ratio is candidate / baseline, both measured in this run (medians over "
            "interleaved repeats); details and raw values in `results.json`.",
            "",
            markdown_table(rows),
            "",
            f"Benchmark wall times: {timing}.",
            *sources,
            "",
        ]
    )
    artifacts.write_text(out_dir / "results.md", text)
    return text
